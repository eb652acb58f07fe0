"""The user's own (image, caption) data, in the formats people already have. Chosen by the path in ``--source``:

* a **folder** of images (recursive; jpg/jpeg/png/webp/bmp/gif/tif) each with a same-named ``.txt`` caption
  (``cat.jpg`` + ``cat.txt``); an image without one is a counted "missing caption" skip. Each non-empty line of the
  ``.txt`` is a caption of its own (one record each), except the translation lines of Tux Paint's stamps. A folder
  with a ``metadata.jsonl`` / ``metadata.csv`` with a caption column at its top (Hugging Face's "imagefolder" layout)
  is read as that manifest;
* a **manifest**: ``.jsonl`` (one JSON object per line) or ``.csv`` / ``.tsv`` (with a header) holding an image path
  (column ``path``, ``image``, ``image_path``, ``file``, ``filename``, ``file_name`` or ``img``) and a caption
  (``caption``, ``text``, ``prompt``, ``title`` or ``description``; or a list of them in ``captions`` / ``texts``,
  one record each); relative paths are relative to the manifest, and
  a malformed line is a counted skip. A ``.json`` holding a list of such objects works too;
* **WebDataset** ``.tar`` shards as img2dataset writes them (``KEY.jpg``/``.png``/``.webp`` + ``KEY.txt`` and/or
  ``KEY.json`` with a "caption"): one shard, a folder of them, a brace pattern (``data-{00000..00009}.tar``) or a glob.
  Shards are read as streams, member by member; a truncated or corrupt shard costs its remaining records, is
  counted once, and the next shard goes on;
* a **COCO captions** JSON (``captions_train2017.json``) plus its images (``--image-root``, else a sibling folder
  named like the split, e.g. ``train2017/`` next to ``annotations/``, else the JSON's own folder): one record per
  (image, caption). The annotation file is loaded whole (it is metadata); the images stream.

Everything else streams: folders are walked lazily, manifests read line by line, images decoded only when a record
is used, so a dataset larger than memory works. Splits: "val" holds the records whose key (the image's path or
WebDataset key, so all captions of one image fall on the same side) hashes below ``val_fraction``
(:func:`dalle.data.pipeline.in_val_split`), "train" the rest; user data has no "heldout" split. Record ``i`` of a
split goes to shard ``i % num_shards``, except that WebDataset shards are dealt out whole when there are enough.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import json
import math
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from dalle.data.config import DataConfig
from dalle.data.images import BadRecord, open_image
from dalle.data.pipeline import UTF16_BOMS, decode_caption, in_val_split
from dalle.data.records import Record
from dalle.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "file_name", "img")
# A folder holding one of these at its top is read as that manifest (the Hugging Face "imagefolder" layout:
# ``file_name`` plus a caption column such as ``text``, paths relative to the folder).
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("caption", "text", "prompt", "title", "description", "captions", "texts")
MAX_CAPTION_BYTES = 64 * 1024  # a caption file larger than this is not a caption; reading stops there
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a tar member larger than this is skipped unread
FORMATS = ("a folder of images with same-named .txt captions (or a metadata.jsonl / .csv), a .jsonl/.csv/.tsv manifest "
           "(path + caption), "
           "WebDataset .tar shards (a file, a folder of them, a brace pattern or a glob), or a COCO captions .json")


Opener = Callable[[Any], Image.Image]  # a path or bytes → the decoded image, or BadRecord


def _opener(cfg: DataConfig) -> Opener:
    """How this dataset's images are decoded: the bomb guard, and large JPEGs at a reduced scale (``decode_side``)."""
    return functools.partial(open_image, max_pixels=cfg.max_pixels, draft_side=cfg.decode_side)


class _Picker:
    """Which records of a stream one split and shard yields: the split by key hash, then every ``num_shards``-th
    record of that split, at most ``size`` of them (counted over all shards)."""

    def __init__(self, cfg: DataConfig, shard: int = 0, num_shards: int = 1, size: int | None = None):
        self.val, self.fraction, self.seed = cfg.split == "val", cfg.val_fraction, cfg.seed
        self.shard, self.num_shards = shard, num_shards
        self.size = cfg.size if size is None else size
        self.index = 0

    def in_split(self, key: str) -> bool:
        return in_val_split(key, self.fraction, self.seed) == self.val

    def take(self, key: str) -> bool:
        if self.full or not self.in_split(key):
            return False
        self.index += 1
        return (self.index - 1) % self.num_shards == self.shard

    @property
    def full(self) -> bool:
        return self.size is not None and self.index >= self.size


def _caption_value(value: Any) -> str | bytes | None:
    """A manifest's caption: text stays text; text holding undecodable bytes (read with ``surrogateescape``) goes back
    to bytes, so the pipeline counts it as an undecodable caption."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")
    return text


# ----------------------------------------------------------------------------------------------------------- folder

def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in a deterministic order (sorted per folder), hidden folders and files skipped."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTS):
                yield Path(folder) / name


def _read_caption(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_CAPTION_BYTES)
    except OSError:
        return None


# A translation line of Tux Paint's stamp descriptions ("fr.utf8=Un chat.", "pt_BR.utf8=...", "sr@latin.utf8=...")
# after the English first line: not a caption of its own.
_LOCALE_LINE = re.compile(r"^[A-Za-z]{2,3}(?:_[A-Za-z]{2,4})?(?:@[A-Za-z]+)?\.utf-?8\s*=", re.IGNORECASE)


def caption_lines(raw: bytes | None) -> list[str | bytes | None]:
    """A caption file's captions, one per non-empty line (CUB's and Oxford-102's files hold ten each), without
    locale-tagged translation lines. A missing or undecodable file stays one value, which the pipeline counts as a
    skip; a file of blank lines gives its text, counted as an empty caption."""
    if raw is None:
        return [None]
    try:
        text = decode_caption(raw)
    except BadRecord:
        return [raw]
    lines = [line for line in text.splitlines() if line.strip() and not _LOCALE_LINE.match(line)]
    return lines or [text]


@dataclasses.dataclass
class FolderSource:
    name: str
    root: Path
    cfg: DataConfig

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[Record]:
        pick, open_ = _Picker(self.cfg, shard, num_shards), _opener(self.cfg)
        for path in _walk_images(self.root):
            if pick.full:
                return
            key = path.relative_to(self.root).as_posix()
            if not pick.in_split(key):
                continue  # the other split's caption file is not even read
            load = functools.partial(open_, path)
            for caption in caption_lines(_read_caption(path.with_suffix(".txt"))):
                if pick.full:
                    return
                if pick.take(key):  # the image's path: all its captions land in the same split
                    yield Record(key, caption, load)


# --------------------------------------------------------------------------------------------------------- manifest

def _column(names: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    lower = {n.strip().lower(): n for n in names if isinstance(n, str)}
    return next((lower[w] for w in wanted if w in lower), None)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    yield lineno, json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8", "surrogateescape"))
                except json.JSONDecodeError:
                    yield lineno, None


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV/TSV as dicts; a header is required unless the first row is ``image path, caption``."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, "rb") as f:  # spreadsheets' "Unicode text" export is UTF-16 with a byte order mark
        encoding = "utf-16" if f.read(2) in UTF16_BOMS else "utf-8-sig"
    with open(path, encoding=encoding, errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        if _column(header, PATH_COLUMNS) is None:
            if len(header) >= 2 and header[0].strip().lower().endswith(IMAGE_EXTS):
                header, first = ["path", "caption"], header  # headerless: path, caption
                yield 1, dict(zip(header, first))
            else:
                raise UserError(f"{path}: no image path column in the header {header[:6]} "
                                f"(expected one of {', '.join(PATH_COLUMNS)})")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield reader.line_num, None
                continue
            if row:
                yield reader.line_num, dict(zip(header, row)) if len(row) >= len(header) else None


@dataclasses.dataclass
class ManifestSource:
    name: str
    path: Path
    cfg: DataConfig
    rows: list[Any] | None = None  # a .json list manifest, already parsed; None: stream the file

    @functools.cached_property
    def _open(self) -> Opener:
        return _opener(self.cfg)

    def _rows(self) -> Iterator[tuple[int, Any]]:
        if self.rows is not None:
            return enumerate(self.rows, 1)
        return _jsonl_rows(self.path) if self.path.suffix.lower() == ".jsonl" else _csv_rows(self.path)

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[Record]:
        pick = _Picker(self.cfg, shard, num_shards)
        for lineno, row in self._rows():
            for record in self._records(lineno, row):
                if pick.full:
                    return
                if pick.take(record.key):  # the image's path: all its captions land in the same split
                    yield record

    def _records(self, lineno: int, row: Any) -> list[Record]:
        """One record per caption of a manifest line (a caption field may hold a list of them, as COCO has)."""
        where = f"{self.path.name}:{lineno}"
        if not isinstance(row, dict):
            return [Record.failed(where, "malformed manifest line")]
        path_col, caption_col = _column(row, PATH_COLUMNS), _column(row, CAPTION_COLUMNS)
        value = row.get(path_col) if path_col else None
        if not isinstance(value, str) or not value.strip():
            return [Record.failed(where, "manifest line without image path")]
        value = value.strip()
        if "://" in value:
            return [Record.failed(value, "remote URL (download the images first)")]
        image = Path(value) if os.path.isabs(value) else self.path.parent / value
        load = functools.partial(self._open, image)
        captions = row.get(caption_col) if caption_col else None
        if not isinstance(captions, list) or not captions:
            captions = [captions]
        return [Record(value, _caption_value(caption), load) for caption in captions]


# ------------------------------------------------------------------------------------------------------- webdataset

def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` lists alternatives; nests left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def shard_paths(source: str) -> list[Path]:
    """The shard files a WebDataset source names: a file, a folder's shards, a brace pattern and/or a glob. Named
    shards that do not exist are kept (they become counted skips); a glob that matches nothing adds nothing."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.name.lower().endswith(SHARD_EXTS) and p.is_file())
    paths: list[Path] = []
    for item in expand_braces(source):
        if glob.has_magic(item):
            paths.extend(Path(p) for p in sorted(glob.glob(item)))
        else:
            paths.append(Path(item))
    return paths


def _sample_record(shard: str, key: str, parts: dict[str, bytes | None], open_: Opener) -> Record:
    """One WebDataset sample (its members' bytes by extension) → a record."""
    name = f"{shard}/{key}"
    ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff") if e in parts), None)
    if ext is None:
        return Record.failed(name, "missing image")
    if parts[ext] is None:
        return Record.failed(name, "image file too large")
    caption: str | bytes | None = parts.get("txt")
    if caption is None and parts.get("json") is not None:
        try:
            meta = json.loads(parts["json"].decode("utf-8-sig", "surrogateescape"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return Record.failed(name, "malformed json")
        if isinstance(meta, dict):
            caption = _caption_value(meta.get(_column(meta, CAPTION_COLUMNS) or "caption"))
    return Record(name, caption, functools.partial(open_, parts[ext]))


def iter_shard(path: Path, pick: _Picker, open_: Opener) -> Iterator[Record]:
    """Stream one shard's samples (consecutive members sharing a key). A damaged shard ends with one error record,
    which ``pick`` gives to one split and one worker like any record, so it is counted once."""
    try:
        with tarfile.open(path, mode="r|*") as tar:  # "r|*": a forward-only stream, any compression
            yield from _iter_samples(tar, path.name, pick, open_)
        if _cut_short(path):
            raise tarfile.ReadError("truncated")
    except FileNotFoundError:
        if pick.take(path.name):
            yield Record.failed(path.name, "missing shard")
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        # The sample being read is lost with the rest of the shard; counted once, under the shard's name.
        if pick.take(path.name):
            yield Record.failed(path.name, "truncated or corrupt shard")


def _cut_short(path: Path) -> bool:
    """An uncompressed tar is whole 512-byte blocks; tarfile ends silently when the cut falls inside a header."""
    with open(path, "rb") as f:
        compressed = f.read(4).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zX"))
    return not compressed and path.stat().st_size % tarfile.BLOCKSIZE != 0


def _iter_samples(tar: tarfile.TarFile, shard: str, pick: _Picker, open_: Opener) -> Iterator[Record]:
    key, parts, wanted = None, {}, False
    for member in tar:
        if pick.full:
            return
        folder, base = posixpath.split(member.name)
        stem, dot, ext = base.partition(".")
        if not member.isfile() or not dot or not stem:
            continue
        if posixpath.join(folder, stem) != key:
            if wanted:
                yield _sample_record(shard, key, parts, open_)
            key, parts = posixpath.join(folder, stem), {}
            wanted = pick.take(key)  # decided before reading: samples of other splits / workers are not read
        if wanted:
            parts[ext.lower()] = _read_member(tar, member)
    if wanted:
        yield _sample_record(shard, key, parts, open_)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    """A member's bytes; None if too large to read. A stream cut inside the member raises ``tarfile.ReadError``
    (tarfile itself returns the short data silently)."""
    f = tar.extractfile(member) if member.size <= MAX_MEMBER_BYTES else None
    if f is None:
        return None
    data = f.read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"{member.name}: {len(data)} of {member.size} bytes")
    return data


@dataclasses.dataclass
class WebDatasetSource:
    name: str
    shards: list[Path]
    cfg: DataConfig

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[Record]:
        # Whole shards per worker when each gets at least as many as 4, or all the same number: no one reads bytes
        # that others use. Otherwise everyone reads every shard and keeps every num_shards-th sample.
        n = len(self.shards)
        if num_shards > 1 and (n >= 4 * num_shards or n % num_shards == 0):
            size = None if self.cfg.size is None else math.ceil(self.cfg.size / num_shards)
            pick = _Picker(self.cfg, size=size)
            for path in self.shards[shard::num_shards]:
                yield from iter_shard(path, pick, _opener(self.cfg))
            return
        pick = _Picker(self.cfg, shard, num_shards)
        for path in self.shards:
            yield from iter_shard(path, pick, _opener(self.cfg))


# ------------------------------------------------------------------------------------------------------------- coco

def guess_image_root(json_path: Path) -> Path:
    """``annotations/captions_train2017.json`` → ``train2017/`` beside ``annotations/`` (or inside it), else the
    JSON's folder."""
    split = json_path.stem.split("_", 1)[1] if "_" in json_path.stem else json_path.stem
    up = json_path.parent.parent
    for candidate in (up / split, json_path.parent / split, up / "images" / split):
        if candidate.is_dir():
            return candidate
    return json_path.parent


@dataclasses.dataclass
class CocoSource:
    name: str
    image_root: Path
    files: dict[Any, str]  # image id → file name
    annotations: list[Any]  # the JSON's "annotations" entries ({image_id, caption, id})
    cfg: DataConfig

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[Record]:
        pick, open_ = _Picker(self.cfg, shard, num_shards), _opener(self.cfg)
        for n, ann in enumerate(self.annotations):
            if pick.full:
                return
            file = self.files.get(ann.get("image_id")) if isinstance(ann, dict) else None
            if file is None:
                record = Record.failed(f"annotation {n}", "annotation without a known image")
            else:
                load = functools.partial(open_, self.image_root / file)
                record = Record(file, _caption_value(ann.get("caption")), load, {"annotation_id": ann.get("id")})
            if pick.take(record.key):  # the image's file name: all its captions land in the same split
                yield record


def _coco_source(path: Path, data: dict[str, Any], cfg: DataConfig) -> CocoSource:
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise UserError(f"{path}: a COCO captions file needs 'images' and 'annotations' lists")
    files = {im["id"]: im["file_name"] for im in images
             if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str)}
    root = cfg.image_root if cfg.image_root is not None else guess_image_root(path)
    if not root.is_dir():
        raise UserError(f"COCO image folder not found: {root} (set --image-root)")
    return CocoSource(f"{path}/{cfg.split}", root, files, annotations, cfg)


# -------------------------------------------------------------------------------------------------------- detection

def _has_image(root: Path) -> bool:
    return next(_walk_images(root), None) is not None


def _has_captions(manifest: ManifestSource) -> bool:
    """Whether a folder's metadata file names a caption column in its first row (else: labels only, and the folder's
    ``.txt`` files hold the captions)."""
    try:
        first = next((row for _, row in manifest._rows() if isinstance(row, dict)), None)
    except (OSError, UserError):
        return False
    return first is not None and _column(first, CAPTION_COLUMNS) is not None


def from_config(cfg: DataConfig) -> FolderSource | ManifestSource | WebDatasetSource | CocoSource:
    """Open the user dataset at ``cfg.source`` (see the module doc for the formats)."""
    if cfg.split == "heldout":
        raise UserError("user datasets have no 'heldout' split (only the built-in shapes and emoji do): "
                        "use --split train or val")
    source, name = cfg.source, f"{cfg.source}/{cfg.split}"
    path = Path(source)
    if path.is_dir():
        shards = shard_paths(source)
        if shards:
            return WebDatasetSource(name, shards, cfg)
        metadata = next((path / n for n in METADATA_FILES if (path / n).is_file()), None)
        if metadata is not None and _has_captions(manifest := ManifestSource(name, metadata, cfg)):
            return manifest  # a Hugging Face "imagefolder"
        if not _has_image(path):
            raise UserError(f"no images or .tar shards found in {path}; expected {FORMATS}")
        return FolderSource(name, path, cfg)
    if not path.exists():
        if "{" in source or glob.has_magic(source):
            shards = shard_paths(source)
            if not any(p.is_file() for p in shards):
                raise UserError(f"no shard matches {source!r}")
            return WebDatasetSource(name, shards, cfg)
        raise UserError(f"no such file or folder: {source}")
    suffix = path.name.lower()
    if suffix.endswith(SHARD_EXTS):
        return WebDatasetSource(name, [path], cfg)
    if suffix.endswith((".jsonl", ".csv", ".tsv")):
        return ManifestSource(name, path, cfg)
    if suffix.endswith(".json"):
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        if isinstance(data, list):
            return ManifestSource(name, path, cfg, rows=data)
        if isinstance(data, dict):
            return _coco_source(path, data, cfg)
    raise UserError(f"{path}: unrecognised dataset format; expected {FORMATS}")
