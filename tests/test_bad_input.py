"""Bad input costs a counted skip (with its reason) or is converted, never a crash: for the folder, manifest and
WebDataset formats. Also the caption / image filters, and a dataset that yields nothing."""

import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle.commands.data import collect_stats
from dalle.data.config import DataConfig
from dalle.data.pipeline import iter_samples
from dalle.data.records import SkipStats
from dalle.data.registry import open_source
from dalle.errors import UserError


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose (valid, CRC-checked) header claims ``width × height`` pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def noisy(mode: str = "RGB", size=(24, 20)) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb.convert(mode)


GOOD_CAPTION = b"a perfectly fine caption"
# name → (image bytes or None for a missing file, caption bytes or None for no caption, expected skip reason or None)
CASES = {
    "good": (encode(noisy()), GOOD_CAPTION, None),
    "corrupt": (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, GOOD_CAPTION, "corrupt image"),
    "not_image": (b"this is plain text, not pixels", GOOD_CAPTION, "not an image"),
    "truncated": (encode(noisy(size=(64, 64)))[:300], GOOD_CAPTION, "corrupt image"),
    "zero_bytes": (b"", GOOD_CAPTION, "empty file"),
    "bomb": (bomb_png(), GOOD_CAPTION, "image too large"),
    "empty_caption": (encode(noisy()), b"  \n\t ", "empty caption"),
    "undecodable_caption": (encode(noisy()), b"caf\xe9 \xff\xfe au lait", "undecodable caption"),
    "no_caption": (encode(noisy()), None, "missing caption"),
    "palette": (encode(noisy("P")), GOOD_CAPTION, None),
    "grey": (encode(noisy("L")), GOOD_CAPTION, None),
    "cmyk": (encode(noisy("CMYK"), "JPEG"), GOOD_CAPTION, None),
    "rgba": (encode(noisy("RGBA")), GOOD_CAPTION, None),
    "grey16": (encode(Image.fromarray(np.full((20, 24), 60000, np.uint16))), GOOD_CAPTION, None),
    "utf16_caption": (encode(noisy()), "un café".encode("utf-16"), None),
}


def expected_reasons(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        reason = CASES[name][2]
        if reason:
            out[reason] = out.get(reason, 0) + 1
    return out


def write_folder(root: Path) -> str:
    for name, (image, caption, _) in CASES.items():
        (root / f"{name}.png").write_bytes(image)
        if caption is not None:
            (root / f"{name}.txt").write_bytes(caption)
    return str(root)


def write_manifest(root: Path) -> str:
    (root / "img").mkdir()
    with open(root / "m.jsonl", "wb") as f:
        for name, (image, caption, _) in CASES.items():
            (root / "img" / f"{name}.png").write_bytes(image)
            row = {"path": f"img/{name}.png"}
            if name == "undecodable_caption":  # raw invalid UTF-8 spliced into the line, as a broken exporter writes
                line = json.dumps(row).encode()[:-1] + b', "caption": "' + caption + b'"}'
            else:
                if name == "utf16_caption":
                    caption = "un café".encode()  # JSON is text: the UTF-16 case is a folder / shard one
                line = json.dumps(row if caption is None else {**row, "caption": caption.decode()}).encode()
            f.write(line + b"\n")
        f.write(json.dumps({"path": "img/missing.png", "caption": "gone"}).encode() + b"\n")
        f.write(b"{not json at all\n")
        f.write(b"[1, 2, 3]\n")
    return str(root / "m.jsonl")


def write_webdataset(root: Path) -> str:
    with tarfile.open(root / "shard-0.tar", "w") as tar:
        for name, (image, caption, _) in CASES.items():
            parts = {"png": image} if caption is None else {"png": image, "txt": caption}
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(root / "shard-0.tar")


def read(source: str, **kw) -> tuple[list, SkipStats]:
    cfg = DataConfig(source=source, resolution=16, val_fraction=0.0, **kw)
    stats = SkipStats()
    return list(iter_samples(open_source(cfg).records(), cfg, stats)), stats


@pytest.mark.parametrize("fmt", ["folder", "manifest", "webdataset"])
def test_bad_records_are_counted_and_odd_modes_converted(tmp_path, fmt):
    source = {"folder": write_folder, "manifest": write_manifest, "webdataset": write_webdataset}[fmt](tmp_path)
    samples, stats = read(source)
    expected = expected_reasons(CASES)
    if fmt == "manifest":
        expected.update({"missing file": 1, "malformed manifest line": 2})
    assert dict(stats.reasons) == expected
    kept = {Path(s.key).name.split(".")[0] for s in samples}
    assert kept == {n for n, (_, _, reason) in CASES.items() if reason is None}
    assert all(s.image.shape == (16, 16, 3) and s.image.dtype == np.uint8 for s in samples)
    assert stats.seen == stats.kept + stats.skipped
    by_name = {Path(s.key).name.split(".")[0]: s for s in samples}
    assert by_name["grey16"].image.max() > 200  # 16-bit scaled down, not clipped to black or white noise
    assert by_name["utf16_caption"].caption == "un café"


def test_rgba_transparency_becomes_white(tmp_path):
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    (tmp_path / "clear.png").write_bytes(encode(clear))
    (tmp_path / "clear.txt").write_text("nothing to see")
    samples, _ = read(str(tmp_path))
    assert samples[0].image.min() == 255


def test_phone_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """A phone held upright saves landscape pixels plus an EXIF orientation; the training image must be the upright
    photo (red top half), not the sideways pixels (red left half)."""
    from dalle.data.images import ORIENTATION, open_image

    sideways = np.zeros((32, 64, 3), np.uint8)
    sideways[:, :32] = (255, 0, 0)  # red on the left of the stored pixels
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(sideways).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "photo.txt").write_text("a photo taken upright")
    assert open_image(tmp_path / "photo.jpg").size == (32, 64)  # portrait, as shown on the phone
    samples, stats = read(str(tmp_path), max_aspect_ratio=3)
    image = samples[0].image.astype(int)
    assert stats.skipped == 0 and image.shape == (16, 16, 3)
    # Centre crop of the upright portrait: the red half is on top after turning clockwise.
    top, bottom = image[:4].mean(axis=(0, 1)), image[-4:].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 60
    # No orientation tag, or a malformed EXIF block: the pixels as stored.
    Image.fromarray(sideways).save(tmp_path / "plain.jpg", quality=95)
    assert open_image(tmp_path / "plain.jpg").size == (64, 32)
    Image.fromarray(sideways).save(tmp_path / "bad_exif.jpg", exif=b"Exif\x00\x00garbage", quality=95)
    assert open_image(tmp_path / "bad_exif.jpg").size == (64, 32)


def test_small_max_pixels_guard(tmp_path):
    write_folder(tmp_path)
    samples, stats = read(str(tmp_path), max_pixels=100)
    # Every image whose header is readable and whose caption passes: the guard acts before decoding the pixels.
    too_large = {n for n, (_, _, reason) in CASES.items() if reason is None} | {"bomb", "truncated"}
    assert not samples and stats.reasons["image too large"] == len(too_large)


def test_caption_and_aspect_filters(tmp_path):
    for name, size, caption in [("ok", (30, 20), "four words of text"), ("wide", (90, 20), "a very wide image"),
                                ("tiny", (6, 6), "a tiny little image"), ("short", (20, 20), "short"),
                                ("long", (20, 20), "word " * 40)]:
        (tmp_path / f"{name}.png").write_bytes(encode(noisy(size=size)))
        (tmp_path / f"{name}.txt").write_text(caption)
    samples, stats = read(str(tmp_path), max_aspect_ratio=2.0, min_caption_words=2, max_caption_chars=100,
                          min_image_side=10)
    assert [s.key for s in samples] == ["ok.png"]
    assert dict(stats.reasons) == {"aspect ratio out of range": 1, "image too small": 1, "caption too short": 1,
                                   "caption too long": 1}


def _tar_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("png", encode(noisy(size=(32, 32)))), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_truncated_corrupt_and_missing_shards_cost_only_themselves(tmp_path):
    whole = _tar_bytes(6)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
    png = members[6]  # the 4th sample's image
    (tmp_path / "s-0.tar").write_bytes(whole[: png.offset_data + png.size // 2])  # cut inside a member's data
    (tmp_path / "s-1.tar").write_bytes(whole[: png.offset + 100])  # cut inside a header
    (tmp_path / "s-2.tar").write_bytes(b"\x00garbage" * 200)
    compressed = gzip.compress(whole)
    (tmp_path / "s-3.tar").write_bytes(compressed[: len(compressed) // 2])  # gzip stream cut short
    (tmp_path / "s-4.tar").write_bytes(whole)
    samples, stats = read(str(tmp_path / "s-{0..5}.tar"))
    assert sum(s.key.startswith("s-4.tar/") for s in samples) == 6  # the good shard after the bad ones is read
    assert sum(s.key.startswith(("s-0.tar/", "s-1.tar/")) for s in samples) == 6  # samples before the cuts kept
    assert stats.reasons["truncated or corrupt shard"] == 4 and stats.reasons["missing shard"] == 1
    assert set(stats.examples["truncated or corrupt shard"]) == {"s-0.tar", "s-1.tar", "s-2.tar"}


def test_oversized_member_and_bad_json_in_shard(tmp_path, monkeypatch):
    from dalle.data import user
    monkeypatch.setattr(user, "MAX_MEMBER_BYTES", 1000)
    parts = [("big", "png", encode(noisy(size=(64, 64)))), ("big", "txt", b"big"),
             ("badjson", "png", encode(noisy(size=(8, 8)))), ("badjson", "json", b"{oops"),
             ("noimage", "txt", b"caption without image")]
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for key, ext, data in parts:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, stats = read(str(tmp_path / "x.tar"))
    assert not samples
    assert dict(stats.reasons) == {"image file too large": 1, "malformed json": 1, "missing image": 1}


def test_dataset_that_yields_nothing_is_a_user_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "b.png").write_bytes(encode(noisy()))
    with pytest.raises(UserError, match="yields no usable record.*empty file.*missing caption"):
        collect_stats(DataConfig(source=str(tmp_path), val_fraction=0.0))


def test_skip_examples_name_a_record_once_however_often_it_is_met():
    stats, other = SkipStats(), SkipStats()
    for _ in range(3):  # one broken file met in three epochs, then two more
        stats.skip("not an image", "a.png")
    stats.skip("not an image", "b.png")
    other.skip("not an image", "b.png")
    other.skip("not an image", "c.png")
    other.skip("not an image", "d.png")
    stats.merge(other)
    assert stats.reasons["not an image"] == 7
    assert stats.examples["not an image"] == ["a.png", "b.png", "c.png"]
    assert "(e.g. a.png, b.png, c.png)" in stats.summary()


def test_an_empty_val_split_of_a_users_data_says_how_to_fill_it(tmp_path):
    from dalle.data.loader import make_loader

    cfg = DataConfig(source=write_folder(tmp_path), split="val", resolution=16, val_fraction=1e-9)
    with pytest.raises(UserError, match=r"--data-val-fraction share \(1e-09\); pass a larger one"):
        list(make_loader(cfg, batch_size=2))
