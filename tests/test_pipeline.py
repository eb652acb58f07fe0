import json

from dalle.cli import main

TINY = ["--dvae-steps", "2", "--dvae-batch-size", "4", "--size", "16", "--vocab-size", "300", "--reranker-steps", "2",
        "--reranker-batch-size", "4", "--prior-steps", "2", "--prior-batch-size", "4",
        "--resolution", "32", "--dvae-preset", "tiny-32"]


def test_pipeline_runs_stages_then_skips_them(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pipeline", "--out", str(out), *TINY]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "[1/5] text tokenizer: running" in first and "[5/5] reranker: finished" in first
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "dvae" / "model" / "config.json").is_file()
    assert (out / "reranker" / "model" / "config.json").is_file()
    assert (out / "prior" / "model" / "model.safetensors").is_file()
    for split in ("train", "val", "heldout"):
        assert json.loads((out / "cache" / split / "meta.json").read_text())["complete"]

    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("done already, skipping") == 5
    assert "Not built yet" in second


def test_pipeline_resumes_an_interrupted_cache(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pipeline", "--out", str(out), *TINY, "--dataset", "shapes"]
    assert main(argv) == 0
    meta = out / "cache" / "val" / "meta.json"
    unfinished = json.loads(meta.read_text()) | {"complete": False}
    meta.write_text(json.dumps(unfinished))  # as if the val encode had been killed before finishing
    capsys.readouterr()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "[1/5] text tokenizer: done already" in again and "[2/5] dVAE: done already" in again
    assert "[3/5] token cache: running" in again and json.loads(meta.read_text())["complete"]


def test_pipeline_bad_option_is_a_clean_error(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path), "--dvae-steps", "0"]) == 2
    assert "dvae_steps" in capsys.readouterr().err
