"""User data formats: image folder, JSONL / CSV / TSV / JSON manifests, WebDataset shards, COCO captions; split and
shard rules. Every dataset is written by the test."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle.data import user
from dalle.data.config import DataConfig
from dalle.data.pipeline import in_val_split, iter_samples
from dalle.data.records import SkipStats
from dalle.data.registry import open_source
from dalle.errors import UserError


def png_bytes(size=(12, 10), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard: for each (key, {ext: bytes}) the members KEY.ext, in order."""
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def samples_of(source: str, **cfg):
    cfg = DataConfig(source=source, resolution=16, **cfg)
    stats = SkipStats()
    out = list(iter_samples(open_source(cfg).records(), cfg, stats))
    return out, stats


def keys_of(source: str, shard=0, num_shards=1, **cfg):
    return [r.key for r in open_source(DataConfig(source=source, **cfg)).records(shard, num_shards)]


# ----------------------------------------------------------------------------------------------------------- folder

@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for i in range(30):
        folder = root / f"part{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:02d}.png").write_bytes(png_bytes((12 + i, 10)))
        (folder / f"img{i:02d}.txt").write_text(f"picture number {i}\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(png_bytes())
    (root / "notes.md").write_text("not an image")
    return root


def test_folder_reads_images_with_same_named_captions(image_folder):
    samples, stats = samples_of(str(image_folder), val_fraction=0.0)
    assert stats.skipped == 0 and len(samples) == 30
    by_key = {s.key: s for s in samples}
    assert by_key["part1/img04.png"].caption == "picture number 4"
    assert all(s.image.shape == (16, 16, 3) for s in samples)
    assert keys_of(str(image_folder), val_fraction=0.0) == sorted(by_key)  # deterministic walk order


def test_folder_caption_file_gives_one_record_per_line_all_in_the_images_split(tmp_path):
    root = tmp_path / "birds"
    root.mkdir()
    for i in range(12):
        (root / f"bird{i:02d}.png").write_bytes(png_bytes())
        # CUB / Oxford-102 style: several captions of one image, one per line (blank lines and CRLF are fine)
        (root / f"bird{i:02d}.txt").write_bytes(f"a small bird {i}\r\n\r\nthis bird has a red crown\r\n".encode())
    samples, stats = samples_of(str(root), val_fraction=0.0)
    assert stats.skipped == 0 and len(samples) == 24
    assert [s.caption for s in samples[:2]] == ["a small bird 0", "this bird has a red crown"]
    assert samples[0].key == samples[1].key == "bird00.png"
    train, val = keys_of(str(root), val_fraction=0.4), keys_of(str(root), split="val", val_fraction=0.4)
    assert val and train and not set(train) & set(val)  # both captions of an image on the same side
    assert sorted(train + val) == sorted(2 * [f"bird{i:02d}.png" for i in range(12)])


def test_folder_caption_file_drops_tux_paint_translation_lines(tmp_path):
    root = tmp_path / "stamps"
    root.mkdir()
    (root / "quarter.png").write_bytes(png_bytes())
    (root / "quarter.txt").write_text("A US 25 cent piece ($.25) called a quarter.\nfr.utf8=Une pièce de 25 cents.\n"
                                      "pt_BR.utf8=Uma moeda de 25 centavos.\nsr@latin.utf8=Novčić.\n", encoding="utf-8")
    (root / "calc.png").write_bytes(png_bytes())
    (root / "calc.txt").write_text("A calculator.  6x7=42\n", encoding="utf-8")  # '=' alone is not a translation
    (root / "blank.png").write_bytes(png_bytes())
    (root / "blank.txt").write_text("\n  \n", encoding="utf-8")
    (root / "latin1.png").write_bytes(png_bytes())
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\nsecond line".encode("latin-1"))
    (root / "wide.png").write_bytes(png_bytes())
    (root / "wide.txt").write_text("first caption\nsecond caption", encoding="utf-16")  # with its BOM
    samples, stats = samples_of(str(root), val_fraction=0.0)
    assert sorted((s.key, s.caption) for s in samples) == [
        ("calc.png", "A calculator. 6x7=42"), ("quarter.png", "A US 25 cent piece ($.25) called a quarter."),
        ("wide.png", "first caption"), ("wide.png", "second caption")]
    assert stats.reasons == {"empty caption": 1, "undecodable caption": 1}


def _photo_jpeg(w: int, h: int) -> bytes:
    x, y = np.linspace(0, 6, w)[None, :, None], np.linspace(0, 4, h)[:, None, None]
    buf = io.BytesIO()
    Image.fromarray((127 + 100 * np.sin(x + y * np.array([1, 2, 3]))).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_large_jpegs_decode_at_a_reduced_scale_that_changes_neither_pixels_nor_filters(tmp_path):
    from dalle.data.images import open_image
    from dalle.data.transforms import ImageTransform

    data = _photo_jpeg(1600, 1200)
    small = open_image(data, draft_side=3 * 16)
    assert small.size == (200, 150)  # the 1/8 DCT scale: both sides still at least 48
    assert open_image(data, draft_side=1000).size == (1600, 1200)  # no scale keeps 1,000: decoded whole
    assert open_image(png_bytes((400, 300)), draft_side=10).size == (400, 300)  # not a JPEG: decoded whole
    transform = ImageTransform(resolution=16)
    full, drafted = transform(open_image(data)), transform(small)
    assert np.abs(full.astype(int) - drafted).max() <= 2

    root = tmp_path / "photos"
    root.mkdir()
    (root / "big.jpg").write_bytes(data)
    (root / "big.txt").write_text("a photo")
    samples, stats = samples_of(str(root), val_fraction=0.0)
    assert len(samples) == 1 and np.abs(samples[0].image.astype(int) - full).max() <= 2
    # The size filter sees the photo as it is, not as it was decoded: 1,200 px pass a 1,100-px minimum.
    assert len(samples_of(str(root), val_fraction=0.0, min_image_side=1100)[0]) == 1
    assert samples_of(str(root), val_fraction=0.0, min_image_side=1300)[1].reasons == {"image too small": 1}


def test_split_is_a_key_hash_and_shards_partition_it(image_folder):
    src = str(image_folder)
    train, val = keys_of(src, val_fraction=0.3), keys_of(src, split="val", val_fraction=0.3)
    assert not set(train) & set(val) and len(train) + len(val) == 30 and val
    assert all(in_val_split(k, 0.3) for k in val) and not any(in_val_split(k, 0.3) for k in train)
    assert keys_of(src, split="val", val_fraction=0.3, seed=1) != val  # the seed reshuffles the split
    shards = [keys_of(src, i, 3, val_fraction=0.3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(train) and all(shards)
    assert keys_of(src, val_fraction=0.3, size=5) == train[:5]
    assert sorted(keys_of(src, 0, 2, val_fraction=0.3, size=5) + keys_of(src, 1, 2, val_fraction=0.3, size=5)) \
        == sorted(train[:5])


# -------------------------------------------------------------------------------------------------------- manifests

@pytest.fixture
def manifest_dir(tmp_path):
    (tmp_path / "pics").mkdir()
    for i in range(4):
        (tmp_path / "pics" / f"{i}.jpg").write_bytes(png_bytes(fmt="JPEG"))
    return tmp_path


def test_jsonl_manifest_accepts_common_column_names(manifest_dir):
    absolute = str(manifest_dir / "pics" / "3.jpg")
    lines = [json.dumps({"path": "pics/0.jpg", "caption": "a red square"}), "",
             json.dumps({"image": "pics/1.jpg", "text": "another red square"}),
             json.dumps({"file_name": "pics/2.jpg", "prompt": "a third one", "extra": 1}),
             json.dumps({"Filename": absolute, "Caption": "absolute path"}),
             json.dumps({"url": "https://example.com/a.jpg", "caption": "remote"}),
             json.dumps({"image": "https://example.com/b.jpg", "caption": "remote"})]
    path = manifest_dir / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    samples, stats = samples_of(str(path), val_fraction=0.0)
    assert [s.caption for s in samples] == ["a red square", "another red square", "a third one", "absolute path"]
    assert stats.reasons == {"manifest line without image path": 1, "remote URL (download the images first)": 1}



def test_manifest_line_with_several_captions_gives_one_record_each_in_one_split(manifest_dir):
    lines = [{"image": "pics/0.jpg", "captions": ["a cat", "a cat on a mat"]}, {"path": "pics/1.jpg", "caption": []},
             {"path": "pics/2.jpg", "text": ["only one"]}, {"path": "pics/3.jpg", "captions": ["x y", {"not": "text"}]}]
    path = manifest_dir / "multi.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    samples, stats = samples_of(str(path), val_fraction=0.0)
    assert [(s.key, s.caption) for s in samples] == [("pics/0.jpg", "a cat"), ("pics/0.jpg", "a cat on a mat"),
                                                     ("pics/2.jpg", "only one"), ("pics/3.jpg", "x y")]
    assert stats.reasons == {"missing caption": 2}
    # The split is drawn per image: an image's captions never straddle train and validation.
    many = manifest_dir / "many.jsonl"
    many.write_text("".join(json.dumps({"path": f"pics/{i % 4}.jpg", "captions": [f"c{i} a", f"c{i} b"]}) + "\n"
                            for i in range(40)))
    train = samples_of(str(many), val_fraction=0.5)[0]
    val = samples_of(str(many), val_fraction=0.5, split="val")[0]
    assert len(train) + len(val) == 80 and not {s.key for s in train} & {s.key for s in val}


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_hugging_face_imagefolder_reads_its_metadata_file(manifest_dir, metadata):
    (manifest_dir / "pics" / "0.txt").write_text("a caption file the metadata overrides")
    rows = [("pics/0.jpg", "first from metadata"), ("pics/1.jpg", "second from metadata")]
    if metadata.endswith(".jsonl"):
        text = "".join(json.dumps({"file_name": f, "text": t, "label": 3}) + "\n" for f, t in rows)
    else:
        text = "file_name,text\n" + "".join(f"{f},{t}\n" for f, t in rows)
    (manifest_dir / metadata).write_text(text)
    samples, stats = samples_of(str(manifest_dir), val_fraction=0.0)
    assert [(s.key, s.caption) for s in samples] == rows and stats.skipped == 0
    # Metadata without captions (labels only): the folder's .txt files are the captions.
    (manifest_dir / metadata).write_text("file_name,label\npics/0.jpg,3\n" if metadata.endswith(".csv")
                                         else json.dumps({"file_name": "pics/0.jpg", "label": 3}) + "\n")
    samples, stats = samples_of(str(manifest_dir), val_fraction=0.0)
    assert [s.caption for s in samples] == ["a caption file the metadata overrides"]


def test_manifests_saved_with_a_byte_order_mark(manifest_dir):
    """Windows editors and spreadsheet exports start UTF-8 files with a BOM: the first record must still count."""
    rows = [{"path": "pics/0.jpg", "caption": "first"}, {"path": "pics/1.jpg", "caption": "second"}]
    (manifest_dir / "bom.jsonl").write_text("\r\n".join(map(json.dumps, rows)) + "\r\n", encoding="utf-8-sig")
    (manifest_dir / "bom.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    (manifest_dir / "bom.csv").write_text("path,caption\r\npics/0.jpg,first\r\npics/1.jpg,second\r\n",
                                          encoding="utf-8-sig")
    (manifest_dir / "bom.tsv").write_text("path\tcaption\r\npics/0.jpg\tfirst\r\npics/1.jpg\tsecond\r\n",
                                          encoding="utf-16")  # a spreadsheet's "Unicode text"
    for name in ("bom.jsonl", "bom.json", "bom.csv", "bom.tsv"):
        samples, stats = samples_of(str(manifest_dir / name), val_fraction=0.0)
        assert [s.caption for s in samples] == ["first", "second"] and stats.skipped == 0, name
    bom = "\ufeff".encode()
    shard = write_shard(manifest_dir / "bom.tar", [
        ("a", {"jpg": png_bytes(fmt="JPEG"), "json": bom + json.dumps({"caption": "first"}).encode()}),
        ("b", {"jpg": png_bytes(fmt="JPEG"), "txt": bom + b"second"})])
    samples, stats = samples_of(str(shard), val_fraction=0.0)
    assert [s.caption for s in samples] == ["first", "second"] and stats.skipped == 0


def test_csv_and_tsv_manifests(manifest_dir):
    with open(manifest_dir / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        w.writerow(["pics/0.jpg", "a square, red, with a comma"])
        w.writerow(["pics/1.jpg", 'a "quoted" caption\nover two lines'])
    samples, stats = samples_of(str(manifest_dir / "data.csv"), val_fraction=0.0)
    assert [s.caption for s in samples] == ["a square, red, with a comma", 'a "quoted" caption over two lines']
    (manifest_dir / "headerless.csv").write_text("pics/2.jpg,first\npics/3.jpg,second\n")
    assert [s.caption for s in samples_of(str(manifest_dir / "headerless.csv"), val_fraction=0.0)[0]] == \
        ["first", "second"]
    (manifest_dir / "data.tsv").write_text("image\ttext\npics/2.jpg\ta tab separated caption\n")
    assert samples_of(str(manifest_dir / "data.tsv"), val_fraction=0.0)[0][0].caption == "a tab separated caption"
    (manifest_dir / "nocolumn.csv").write_text("name,caption\nx,y\n")
    with pytest.raises(UserError, match="no image path column"):
        samples_of(str(manifest_dir / "nocolumn.csv"))


def test_json_list_manifest(manifest_dir):
    (manifest_dir / "list.json").write_text(json.dumps([{"path": "pics/0.jpg", "caption": "one"}, "garbage"]))
    samples, stats = samples_of(str(manifest_dir / "list.json"), val_fraction=0.0)
    assert [s.caption for s in samples] == ["one"] and stats.reasons == {"malformed manifest line": 1}


# ------------------------------------------------------------------------------------------------------- webdataset

def _sample(i: int) -> tuple[str, dict[str, bytes]]:
    if i % 2:
        meta = json.dumps({"caption": f"json caption {i}", "url": "https://example.com"}).encode()
        return f"{i:06d}", {"png": png_bytes((10 + i, 8)), "json": meta}
    return f"{i:06d}", {"jpg": png_bytes((10 + i, 8), fmt="JPEG"), "txt": f"text caption {i}".encode(),
                        "json": b'{"caption": "ignored: .txt wins"}'}


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(4):
        write_shard(folder / f"data-{s:05d}.tar", [_sample(s * 5 + i) for i in range(5)])
    return folder


def test_webdataset_shard_file_folder_brace_and_glob(shards):
    one, _ = samples_of(str(shards / "data-00000.tar"), val_fraction=0.0)
    assert [s.caption for s in one] == ["text caption 0", "json caption 1", "text caption 2", "json caption 3",
                                        "text caption 4"]
    assert one[0].key == "data-00000.tar/000000"
    every = sorted(keys_of(str(shards), val_fraction=0.0))
    assert len(every) == 20
    assert sorted(keys_of(str(shards / "data-{00000..00003}.tar"), val_fraction=0.0)) == every
    assert sorted(keys_of(str(shards / "data-{00000,00002}.tar"), val_fraction=0.0)) == \
        [k for k in every if k.startswith(("data-00000", "data-00002"))]
    assert sorted(keys_of(str(shards / "data-*.tar"), val_fraction=0.0)) == every


def test_expand_braces():
    assert user.expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert user.expand_braces("{x,y}/{0..1}") == ["x/0", "x/1", "y/0", "y/1"]
    assert user.expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("num_shards", [2, 3])  # 4 files over 2 readers: whole files; over 3: record level
def test_webdataset_sharding_partitions_records(shards, num_shards):
    every = keys_of(str(shards), val_fraction=0.25)
    parts = [keys_of(str(shards), i, num_shards, val_fraction=0.25) for i in range(num_shards)]
    assert sorted(sum(parts, [])) == sorted(every) and all(parts)
    val = keys_of(str(shards), split="val", val_fraction=0.25)
    assert val and not set(val) & set(every)


def test_gzipped_shard(tmp_path):
    path = write_shard(tmp_path / "d.tar.gz", [_sample(0), _sample(1)])
    assert len(samples_of(str(path), val_fraction=0.0)[0]) == 2


# ------------------------------------------------------------------------------------------------------------- coco

def _coco(tmp_path: Path, n_images=3) -> Path:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    images, annotations = [], []
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        (tmp_path / "train2017" / name).write_bytes(png_bytes((20, 15), fmt="JPEG"))
        images.append({"id": 100 + i, "file_name": name, "width": 20, "height": 15})
        annotations += [{"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": f"image {i} caption {j}"}
                        for j in range(2)]
    annotations.append({"id": 5, "image_id": 999, "caption": "no such image"})
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def test_coco_one_record_per_caption_with_guessed_image_root(tmp_path):
    path = _coco(tmp_path)
    samples, stats = samples_of(str(path), val_fraction=0.0)
    assert len(samples) == 6 and stats.reasons == {"annotation without a known image": 1}
    assert samples[0].caption == "image 0 caption 0" and samples[0].attributes == {"annotation_id": 1000}
    assert user.guess_image_root(path) == tmp_path / "train2017"


def test_coco_captions_of_one_image_share_a_split(tmp_path):
    path = _coco(tmp_path, n_images=30)
    train, val = keys_of(str(path), val_fraction=0.3), keys_of(str(path), split="val", val_fraction=0.3)
    assert val and not set(train) & set(val)


def test_coco_image_root_option(tmp_path):
    path = _coco(tmp_path)
    moved = tmp_path / "elsewhere"
    (tmp_path / "train2017").rename(moved)
    samples, stats = samples_of(str(path), val_fraction=0.0)
    assert not samples and stats.reasons["missing file"] == 6
    assert len(samples_of(str(path), val_fraction=0.0, image_root=moved)[0]) == 6
    with pytest.raises(UserError, match="image folder not found"):
        open_source(DataConfig(source=str(path), image_root=tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------- detection, splits

def test_unrecognised_inputs_are_user_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="unrecognised dataset format.*COCO"):
        open_source(DataConfig(source=str(tmp_path / "notes.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images or .tar shards"):
        open_source(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "other.json").write_text('"just a string"')
    with pytest.raises(UserError, match="unrecognised"):
        open_source(DataConfig(source=str(tmp_path / "other.json")))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        open_source(DataConfig(source=str(tmp_path / "broken.json")))
    with pytest.raises(UserError, match="no shard matches"):
        open_source(DataConfig(source=str(tmp_path / "x-{0..3}.tar")))
    with pytest.raises(UserError, match="unknown dataset"):
        open_source(DataConfig(source=str(tmp_path / "missing.jsonl")))


def test_user_data_has_no_heldout_split(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with pytest.raises(UserError, match="no 'heldout' split"):
        open_source(DataConfig(source=str(tmp_path), split="heldout"))


def test_streams_without_reading_images_up_front(tmp_path):
    """Records are listed without decoding: an image is only read when its record's load() is called."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("a caption")
    record = next(open_source(DataConfig(source=str(tmp_path), val_fraction=0.0)).records())
    (tmp_path / "a.png").write_bytes(png_bytes(color=(0, 0, 255)))  # changed after listing: load sees the new file
    assert np.asarray(record.load())[0, 0].tolist() == [0, 0, 255]
