"""`dalle serve`: the service (request fields → kept images), its HTTP layer (page, JSON API, status codes) and the
command's one-line errors. The models are the random tiny ones of test_generate's run fixture."""

import base64
import io
import json
import re
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from dalle.cli import main
from dalle.errors import UserError
from dalle.generation import Generator
from dalle.serving.app import make_server
from dalle.serving.service import GenerationService, ServiceLimits, png_base64
from test_generate import an_image, run_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def service(run_dir):  # noqa: F811
    return GenerationService(Generator.from_run(run_dir), ServiceLimits(max_n=8, default_n=4, default_keep=2))


@pytest.fixture(scope="module")
def server(service):
    server = make_server(service, "127.0.0.1", 0, max_body=64 * 1024)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def png_of(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(answer):
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png"])))) for i in answer["images"]]


def call(server, path, body=None, raw=None):
    """(status, parsed JSON or page text) of GET path, or of POST path with ``body`` as JSON (or ``raw`` bytes)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text, kind = response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read().decode(), e.headers["Content-Type"]
    return status, json.loads(text) if kind == "application/json" else text


# --- the service -----------------------------------------------------------------------------------------------


def test_generate_keeps_the_best_and_is_seeded(service):
    answer = service.generate({"caption": "a red circle", "n": 6, "keep": 3, "seed": 5})
    assert (answer["drawn"], answer["seed"], answer["reranked"]) == (6, 5, True)
    scores = [i["score"] for i in answer["images"]]
    assert [i["rank"] for i in answer["images"]] == [1, 2, 3] and scores == sorted(scores, reverse=True)
    images = decoded(answer)
    assert all(image.shape == (16, 16, 3) for image in images)  # the tiny dVAE's resolution
    again = service.generate({"caption": "a red circle", "n": 6, "keep": 3, "seed": 5})
    assert all(np.array_equal(a, b) for a, b in zip(images, decoded(again)))
    # The same as the library's own generation for that seed: the service adds nothing to the draws.
    from dalle.models.sampling import SampleConfig

    direct = service.generator.generate(["a red circle"], n=6, keep=3, sample=SampleConfig(seed=5))[0]
    assert all(np.array_equal(a, b) for a, b in zip(images, direct.images))


def test_a_request_without_a_seed_gets_one_that_redraws_it(service):
    answer = service.generate({"caption": "a blue square", "n": 2, "keep": 1})
    assert isinstance(answer["seed"], int)
    again = service.generate({"caption": "a blue square", "n": 2, "keep": 1, "seed": answer["seed"]})
    assert np.array_equal(decoded(answer)[0], decoded(again)[0])


def test_defaults_and_truncation_are_reported(service):
    answer = service.generate({"caption": "a red circle"})
    assert answer["drawn"] == 4 and len(answer["images"]) == 2  # the limits' defaults
    assert answer["caption_truncated"] is False
    long = service.generate({"caption": " ".join(["a red circle above a blue square"] * 4), "n": 1, "seed": 0})
    assert long["caption_truncated"] is True and long["caption_tokens"] > service.generator.tokenizer.text_len


def test_complete_keeps_the_prompt_rows(service):
    image = an_image()
    answer = service.complete({"caption": "a red circle", "image": "data:image/png;base64," + png_of(image),
                               "keep_rows": 2, "n": 3, "keep": 2, "seed": 1})
    codes = service.generator.encode_image(image)
    assert answer["keep_rows"] == 2 and len(answer["images"]) == 2
    reconstruction = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["input"]))))
    assert np.array_equal(reconstruction, service.generator.reconstruct(image))
    # Kept rows come from the image: the same codes as the library's completion for that seed.
    from dalle.models.sampling import SampleConfig

    direct = service.generator.complete(image, "a red circle", 2, n=3, keep=2, sample=SampleConfig(seed=1))
    assert all(np.array_equal(a, b) for a, b in zip(decoded(answer), direct.images))
    assert (direct.codes[:, :2] == codes[:2]).all()


def test_complete_keeps_the_top_half_when_keep_rows_is_not_given(service):
    answer = service.complete({"caption": "a red circle", "image": png_of(an_image()), "n": 1, "seed": 0})
    assert answer["keep_rows"] == service.generator.grid_size // 2


@pytest.mark.parametrize("request_, message", [
    ([], "must be a JSON object"),
    ({}, "caption: is required"),
    ({"caption": "  "}, "caption: must not be empty"),
    ({"caption": "x" * 2001}, "caption: at most 2000 characters"),
    ({"caption": "x", "n": 9}, "n: must be between 1 and 8"),
    ({"caption": "x", "n": 0}, "n: must be between 1 and 8"),
    ({"caption": "x", "n": 2, "keep": 3}, "keep: must be between 1 and n = 2"),
    ({"caption": "x", "n": True}, "n: must be an integer"),
    ({"caption": "x", "n": 2.5}, "n: must be an integer"),
    ({"caption": 3}, "caption: must be a string"),
    ({"caption": "x", "temperature": "hot"}, "temperature: must be a number"),
    ({"caption": "x", "temperature": 0}, "temperature: must be positive"),
    ({"caption": "x", "top_k": 0}, "top_k: must be at least 1"),
    ({"caption": "x", "top_p": 1.5}, "top_p: must be in (0, 1]"),
    ({"caption": "x", "seed": -1}, "seed: must be between 0"),
    ({"caption": "x", "steps": 3}, "unknown field 'steps'"),
])
def test_bad_generate_requests_name_the_field(service, request_, message):
    with pytest.raises(UserError, match=re.escape(message)):
        service.generate(request_)


@pytest.mark.parametrize("request_, message", [
    ({"caption": "x", "keep_rows": 1}, "image: is required"),
    ({"caption": "x", "image": "@@@", "keep_rows": 1}, "image: is not valid base64"),
    ({"caption": "x", "image": base64.b64encode(b"not an image").decode(), "keep_rows": 1}, "image: cannot be used"),
    ({"caption": "x", "image": "", "keep_rows": 1}, "image: cannot be used .empty file"),
    ({"caption": "x", "image": png_of(an_image()), "keep_rows": 5}, "keep_rows must be a whole number"),
])
def test_bad_complete_requests(service, request_, message):
    with pytest.raises(UserError, match=message):
        service.complete(request_)


def test_uploads_have_a_pixel_limit(service, monkeypatch):
    from dalle.serving import service as service_module

    monkeypatch.setattr(service_module, "MAX_UPLOAD_PIXELS", 40 * 30 - 1)
    with pytest.raises(UserError, match="image: cannot be used .image too large"):
        service.complete({"caption": "x", "image": png_of(an_image(size=(40, 30))), "keep_rows": 1})


def test_save_dir_keeps_every_answer(run_dir, service, tmp_path):  # noqa: F811
    saving = GenerationService(service.generator, service.limits, save_dir=tmp_path / "served",
                               models={"prior": "p"})
    answer = saving.generate({"caption": "a red circle", "n": 2, "keep": 2, "seed": 4})
    folder = tmp_path / "served" / answer["saved"].rsplit("/", 1)[1]
    assert folder.is_dir() and folder.name.endswith("-a-red-circle")
    record = json.loads((folder / "generation.json").read_text())
    assert (record["seed"], record["command"], record["models"]) == (4, "generate", {"prior": "p"})
    assert record["scores"] == [i["score"] for i in answer["images"]]
    assert np.array_equal(np.asarray(Image.open(folder / "1.png")), decoded(answer)[0])
    saving.complete({"caption": "x", "image": png_of(an_image()), "keep_rows": 1, "n": 1, "seed": 0})
    folders = sorted(p.name for p in (tmp_path / "served").iterdir())
    assert len(folders) == 2 and not any(name.startswith(".") for name in folders)  # no .partial left behind
    assert (tmp_path / "served" / folders[1] / "input.png").is_file()


def test_service_without_reranker_keeps_draw_order(run_dir):  # noqa: F811
    generator = Generator.from_run(run_dir)
    generator.reranker = None
    answer = GenerationService(generator).generate({"caption": "a red circle", "n": 3, "keep": 2, "seed": 0})
    assert answer["reranked"] is False and [i["score"] for i in answer["images"]] == [None, None]


# --- HTTP ------------------------------------------------------------------------------------------------------


def test_page_and_info(server):
    status, page = call(server, "/")
    assert status == 200 and "<form id=\"generate\">" in page and "/api/generate" in page
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere: works offline
    status, info = call(server, "/api/info")
    assert status == 200
    assert call(server, "/favicon.ico")[0] == 204
    assert (info["resolution"], info["grid_size"], info["reranker"], info["limits"]["max_n"]) == (16, 4, True, 8)


def test_the_page_script_parses():
    """The page's script, checked by Node's parser where Node is installed (a syntax error would leave a dead page)."""
    import shutil
    import subprocess

    from dalle.serving.app import page

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = re.search(r"<script>(.*)</script>", page().decode(), re.S).group(1)
    result = subprocess.run([node, "--check", "-"], input=script, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_page_fills_itself_in_a_browser(server, tmp_path):
    """Headless Chromium runs the page's script against the server: the models' description replaces the
    placeholder and the limits reach the form."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
             "--virtual-time-budget=10000", "--dump-dom"]
    dom = subprocess.run([chromium, *flags, server.url], capture_output=True, text=True, timeout=120).stdout
    info = re.search(r'id="info">([^<]*)<', dom).group(1)
    assert "16×16 px images from 4×4 codes" in info and "with a contrastive reranker" in info


def test_http_generate_and_complete(server, service):
    status, answer = call(server, "/api/generate", {"caption": "a red circle", "n": 3, "keep": 2, "seed": 2})
    assert status == 200 and len(answer["images"]) == 2
    direct = service.generate({"caption": "a red circle", "n": 3, "keep": 2, "seed": 2})
    assert [i["png"] for i in answer["images"]] == [i["png"] for i in direct["images"]]
    status, answer = call(server, "/api/complete", {"caption": "x", "image": png_of(an_image()), "keep_rows": 2,
                                                    "n": 2, "keep": 1})
    assert status == 200 and answer["input"] and len(answer["images"]) == 1


@pytest.mark.parametrize("path, body, raw, status, message", [
    ("/api/generate", None, b"{not json", 400, "not JSON"),
    ("/api/generate", None, b"\xff\xfe", 400, "not JSON"),
    ("/api/generate", {"caption": "x", "n": 100}, None, 400, "n: must be between 1 and 8"),
    ("/api/complete", {"caption": "x", "image": "###", "keep_rows": 0}, None, 400, "not valid base64"),
    ("/api/nothing", {}, None, 404, "no such endpoint"),
    ("/nothing", None, None, 404, "no such page"),
    ("/api/generate", None, b"x" * (64 * 1024 + 1), 413, "at most 65,536"),
])
def test_http_errors_are_json(server, path, body, raw, status, message):
    got, answer = call(server, path, body, raw)
    assert got == status and message in answer["error"]


def test_an_internal_fault_is_500_without_details(server, service, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(service.generator, "generate", broken)
    status, answer = call(server, "/api/generate", {"caption": "x"})
    assert status == 500 and "secret" not in answer["error"] and "log" in answer["error"]
    assert "secret detail" in caplog.text  # the traceback goes to the server's log
    status, _ = call(server, "/api/info")
    assert status == 200  # the server keeps serving


def test_a_busy_port_is_a_clear_error(service):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match=r"port \d+ on 127.0.0.1 is in use: pick another with --port"):
            make_server(service, "127.0.0.1", taken.getsockname()[1])


def test_png_base64_round_trip():
    image = an_image(size=(5, 7))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64(image))))), image)


# --- the command -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["serve"], "ServeConfig.run: is required"),
    (["serve", "--run", "{tmp}/missing"], "does not exist"),
    (["serve", "--run", "{run}", "--port", "70000"], "ServeConfig.port: must be between 0 and 65535"),
    (["serve", "--run", "{run}", "--max-n", "0"], "ServeConfig.max_n: must be at least 1"),
    (["serve", "--run", "{run}", "--host", "no.such.host.invalid", "--port", "0"], "cannot listen on no.such.host"),
])
def test_serve_errors_are_one_line(run_dir, tmp_path, capsys, argv, message):  # noqa: F811
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_serve_command_serves_until_interrupted(run_dir, monkeypatch, capsys):  # noqa: F811
    """The command end to end: it loads the run, binds, answers, and Ctrl-C stops it with exit code 0."""
    import socketserver

    from dalle.serving import app

    answers = {}

    def serve_once(self):
        answers["info"] = call(self, "/api/info")
        answers["generate"] = call(self, "/api/generate", {"caption": "a red circle", "n": 2, "seed": 0})
        raise KeyboardInterrupt

    def call_in_thread(self):  # the handler runs in a thread of its own, as serve_forever would run it
        worker = threading.Thread(target=socketserver.BaseServer.serve_forever, args=(self,), daemon=True)
        worker.start()
        try:
            serve_once(self)
        finally:
            self.shutdown()

    monkeypatch.setattr(app.Server, "serve_forever", call_in_thread, raising=False)
    assert main(["serve", "--run", str(run_dir), "--port", "0", "--max-n", "4"]) == 0
    out = capsys.readouterr().out
    assert "serving" in out and "http://127.0.0.1:" in out and "stopped" in out
    assert answers["info"][0] == 200 and answers["info"][1]["limits"]["max_n"] == 4
    assert answers["generate"][0] == 200 and len(answers["generate"][1]["images"]) == 2
