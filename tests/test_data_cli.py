"""`dalle data stats` and `dalle data preview` end to end, through dalle.cli.main."""

import json

import numpy as np
import pytest
from PIL import Image

from dalle.cli import main
from dalle.commands.data import grid_size, histogram
from dalle.data import fashion_mnist


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (30, 40), (50, 50), (60, 20), (40, 30)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(" ".join(["word"] * (i + 2)))
    (root / "broken.png").write_bytes(b"not a png")
    (root / "broken.txt").write_text("a caption for a broken file")
    (root / "nocaption.png").write_bytes((root / "0.png").read_bytes())
    return root


def test_stats_text(folder, capsys):
    assert main(["data", "stats", str(folder), "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "5 of 7 records used, 2 skipped" in out
    assert "not an image" in out and "missing caption" in out
    assert "caption words    min 2  median 4  p95 5.80  max 6" in out
    assert "original image sizes (5 decoded, before resize)" in out  # broken: not decodable; nocaption: not read
    assert "40x30 (2)" in out


def test_stats_json_and_limit(folder, capsys):
    assert main(["data", "stats", "--source", str(folder), "--val-fraction", "0", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["records"]["seen"] == 7 and s["records"]["kept"] == 5
    assert s["records"]["reasons"] == {"not an image": 1, "missing caption": 1}
    assert s["caption_chars"]["max"] == len(" ".join(["word"] * 6))
    assert s["image_sizes"]["width"]["max"] == 60 and s["image_sizes"]["aspect_ratio"]["max"] == 3.0
    assert sum(b["count"] for b in s["caption_words"]["histogram"]) == 5
    assert main(["data", "stats", str(folder), "--val-fraction", "0", "--json", "--limit", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["records"]["seen"] == 3


def test_histogram_covers_range():
    bins = histogram([1, 2, 2, 9, 30], bins=4)
    assert bins[0]["lo"] == 1 and bins[-1]["hi"] == 30 and sum(b["count"] for b in bins) == 5


def test_preview_writes_grid_of_preprocessed_samples(folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", str(folder), "--val-fraction", "0", "--out", str(out), "--n", "5",
                 "--cols", "3", "--resolution", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    img = Image.open(out)
    # 32 px upscaled ×4 to 128, 6 px padding each side, 4 caption lines of 14 px: 3 columns × 2 rows.
    assert img.size == grid_size(5, 3, 32) == (3 * 140, 2 * (140 + 56))
    assert img.mode == "RGB"


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["data", "stats", "no-such-dataset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset") and "Traceback" not in err
    assert main(["data", "preview", str(tmp_path / "missing.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    (tmp_path / "bad" / "x.txt").write_text("caption")
    assert main(["data", "stats", str(tmp_path / "bad"), "--val-fraction", "0"]) == 2
    assert "yields no usable record" in capsys.readouterr().err
    assert main(["data", "preview", str(tmp_path / "bad"), "--out", str(tmp_path / "no" / "g.png")]) == 2
    assert main(["data", "preview", "fashion-mnist", "--split", "heldout"]) == 2
    assert "no 'heldout' split" in capsys.readouterr().err


@pytest.mark.skipif(not (fashion_mnist.ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_stats_on_a_builtin(capsys):
    assert main(["data", "stats", "fashion-mnist", "--split", "val", "--limit", "50", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["records"]["kept"] == 50 and s["image_sizes"]["most_common"] == {"28x28": 50}
