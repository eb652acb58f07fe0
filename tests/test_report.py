import base64
import io
import re

import numpy as np
from PIL import Image

from dalle.evaluation import report


def metrics(with_checker=True):
    sets = {"heldout": {"title": "held-out captions", "reranked": {"color": 0.75, "all": 0.5},
                        "unreranked": {"color": 0.5, "all": 0.25}}}
    return {
        "run": "runs/x", "dataset": "shapes", "created": "2024-01-01T00:00:00+00:00",
        "counts": {"candidates": 4, "real_images": 8, "generated_val": 3, "floor_images": 3},
        "distribution": {
            "fd_label": "Fréchet distance (EfficientNet-Lite0 features)",
            "is_label": "Inception-style score (EfficientNet-Lite0 ImageNet classes)",
            "cs_label": "contrastive score (our reranker, scaled cosine similarity)",
            "fd": {"reranked": 12.5, "unreranked": 17.25, "real_floor": 3.0},
            "is": {"reranked": 1.5, "unreranked": 1.25, "real": 2.0},
            "contrastive": {"reranked": 9.0, "unreranked": 7.0, "real": float("nan")}},
        "compositional": {"checker": "shapes", "sets": sets,
                          "ceiling": {"images": 8, "real": {"color": 1.0, "all": 1.0},
                                      "reconstructions": {"color": 0.625, "all": 0.125}}} if with_checker else
        {"checker": None, "reason": "Not measured: only the shapes dataset has a pixel checker."},
        "dvae": {"images": 8, "psnr_db": 21.5, "codes_used": 40, "codebook_size": 64, "perplexity": 30.0},
        "prior": {"val": {"records": 8, "loss": 4.0, "text_loss": 3.0, "image_loss": 4.1, "image_bits_per_token": 5.9}},
        "notes": ["a note <b>with markup</b>"],
    }


def sample_section(side=8, n=3):
    rng = np.random.default_rng(0)
    candidates = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    row = report.SampleRow("a small <script>red</script> circle", candidates[0], candidates[2], candidates, pick=2,
                           verdict_unreranked={"color": True, "shape": False, "relation": None},
                           verdict_reranked={"color": True, "shape": True, "relation": None})
    return report.SampleSection("Samples for held-out captions", "note", [row], [("grid", "grid.png")])


def decode(uri):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_report_embeds_every_image_and_its_links_resolve(tmp_path):
    report.save_png(tmp_path / "grid.png", np.zeros((4, 4, 3), np.uint8))
    report.save_png(tmp_path / "curve.png", np.full((5, 7, 3), 200, np.uint8))
    figure = report.Figure("FD against blur", "curve.png", "both sets blurred")
    path = report.write_report(tmp_path, metrics(), [sample_section()], curves=[figure])
    text = path.read_text(encoding="utf-8")
    assert report.unresolved_links(path) == []
    # The figure is embedded (the page works on its own) and linked to its PNG by a relative name.
    uris = re.findall(r'src="(data:image/png;base64,[^"]+)"', text)
    assert any(decode(u).shape == (5, 7, 3) for u in uris)
    assert 'href="curve.png"' in text and 'href="grid.png"' in text
    # Unreranked, reranked and the strip of candidates of the sample row (8-px images).
    assert sum(decode(u).shape[:2] == (8, 8) for u in uris) == 2
    assert "Fréchet distance (EfficientNet-Lite0 features)" in text and "FID" not in text
    assert "12.50" in text and "17.25" in text and "50.0%" in text and "25.0%" in text
    assert "their dVAE reconstructions" in text and "62.5%" in text and "12.5%" in text  # the ceiling rows
    assert "—" in text  # the NaN contrastive score of real pairs
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;b&gt;with markup" in text
    assert "shape ✗" in text and "shape ✓" in text and "relation" not in text.split("Samples for")[1].split("<h2>")[0]


def test_report_says_why_compositional_accuracy_is_missing(tmp_path):
    path = report.write_report(tmp_path, metrics(with_checker=False))
    text = path.read_text(encoding="utf-8")
    assert "only the shapes dataset has a pixel checker" in text
    assert "compositional accuracy," not in text  # no headline row without a checker


def test_unresolved_links_finds_missing_files_and_broken_images(tmp_path):
    report.save_png(tmp_path / "here.png", np.zeros((2, 2, 3), np.uint8))
    good = report.data_uri(report.png_bytes(np.zeros((2, 2, 3), np.uint8)))
    page = tmp_path / "page.html"
    page.write_text(f'<a href="here.png">ok</a><a href="gone.png">x</a><img src="{good}">'
                    '<img src="data:image/png;base64,AAAA"><a href="#top">top</a>')
    bad = report.unresolved_links(page)
    assert bad[0] == "gone.png" and bad[1].startswith("data:image/png;base64,AAAA") and len(bad) == 2


def test_candidate_strip_frames_the_pick_and_grid_lays_out_rows():
    candidates = np.zeros((3, 4, 4, 3), np.uint8)
    strip = report.candidate_strip(candidates, pick=1, pad=2)
    assert strip.shape == (8, 3 * 6 + 2, 3)
    x = 2 + 1 * 6  # left edge of the second image
    assert tuple(strip[0, x]) == report.MARK and tuple(strip[0, 2]) == report.GAP
    assert (strip[2:6, x:x + 4] == 0).all()
    grid = report.image_grid(np.zeros((5, 4, 4, 3), np.uint8), columns=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1, 3)
    assert (grid[11:15, 1:5] == 0).all() and (grid[11:15, 6:10] == report.GAP).all()  # fifth image, then blank
