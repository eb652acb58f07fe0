"""Fashion-MNIST (Xiao et al. 2017) from Debian's ``dataset-fashion-mnist``: 28×28 greyscale garments, 10 classes.

Captions come from the class names through a few templates ("a photo of a t-shirt", "an ankle boot", "a grey
pullover on black"), the template chosen by a hash of the record's key so a record always has the same caption.
The images are light garments on a black background, which the templates say. "train" is the 60,000-image train
file, "val" the 10,000-image t10k file; there is no "heldout" split (every class appears in training).

The IDX files (gzip; big-endian header: magic ``0x0000080D`` with D = number of dimensions, then D uint32 sizes,
then raw uint8 pixels) are read as a stream: one 784-byte image at a time, decoded to PIL only when a record is used.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from dalle.data.config import DataConfig
from dalle.data.records import Record
from dalle.errors import UserError

ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": "train", "val": "t10k"}  # split → file prefix
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
UBYTE = 0x08  # IDX type code of unsigned bytes, the only one Fashion-MNIST uses

# Label index → (noun phrase with its article, bare noun for "a grey ..."-style templates).
CLASSES = (
    ("a t-shirt", "t-shirt"), ("a pair of trousers", "pair of trousers"), ("a pullover", "pullover"),
    ("a dress", "dress"), ("a coat", "coat"), ("a sandal", "sandal"), ("a shirt", "shirt"),
    ("a sneaker", "sneaker"), ("a bag", "bag"), ("an ankle boot", "ankle boot"),
)
TEMPLATES = (
    "{a}", "a photo of {a}", "a grey {noun} on black", "a black and white photo of {a}",
    "{a} on a black background", "a small greyscale picture of {a}",
)


class IdxError(ValueError):
    """The file is not a valid IDX file of unsigned bytes."""


def read_idx_header(f: BinaryIO) -> tuple[int, ...]:
    """Read the IDX header and return the dimensions, e.g. ``(60000, 28, 28)``; the stream is left at the data."""
    magic = f.read(4)
    if len(magic) != 4 or magic[:2] != b"\x00\x00":
        raise IdxError("bad IDX magic number")
    if magic[2] != UBYTE:
        raise IdxError(f"IDX element type 0x{magic[2]:02x} is not unsigned bytes")
    ndim = magic[3]
    raw = f.read(4 * ndim)
    if len(raw) != 4 * ndim:
        raise IdxError("truncated IDX header")
    return struct.unpack(f">{ndim}I", raw)


def iter_idx(path: Path) -> Iterator[bytes]:
    """Stream the items of a gzipped IDX file: one ``bytes`` of ``prod(dims[1:])`` per item."""
    with gzip.open(path, "rb") as f:
        dims = read_idx_header(f)
        item = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        for _ in range(dims[0]):
            chunk = f.read(item)
            if len(chunk) != item:
                raise IdxError(f"{path}: truncated after {dims[0]} items announced")
            yield chunk


def caption_for(label: int, key: str) -> str:
    """A caption of class ``label``, the template chosen by a hash of ``key`` (deterministic)."""
    a, noun = CLASSES[label]
    pick = hashlib.blake2b(key.encode(), digest_size=4).digest()
    return TEMPLATES[int.from_bytes(pick, "little") % len(TEMPLATES)].format(a=a, noun=noun)


def _image(pixels: bytes, shape: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.frombuffer(pixels, np.uint8).reshape(shape), "L")


@dataclasses.dataclass
class FashionMnistSource:
    """One IDX image/label file pair; record ``i`` goes to shard ``i % num_shards``."""

    name: str
    images: Path
    labels: Path
    size: int | None = None

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[Record]:
        try:
            yield from self._records(shard, num_shards)
        except (IdxError, OSError, EOFError) as e:  # a damaged system file: say which and how to repair it
            raise UserError(f"cannot read Fashion-MNIST ({e}); reinstall it with `{INSTALL_HINT}`") from None

    def _records(self, shard: int, num_shards: int) -> Iterator[Record]:
        with gzip.open(self.labels, "rb") as f:
            (n_labels,) = read_idx_header(f)
            labels = f.read(n_labels)  # 60 kB: read whole, while the images stream
        with gzip.open(self.images, "rb") as f:
            n, h, w = read_idx_header(f)
        if n != len(labels):
            raise IdxError(f"{self.images} has {n} images but {self.labels} has {len(labels)} labels")
        count = n if self.size is None else min(n, self.size)
        prefix = self.images.name.split("-")[0]
        for i, pixels in enumerate(iter_idx(self.images)):
            if i >= count:
                break
            if i % num_shards != shard:
                continue
            key, label = f"{prefix}/{i:05d}", labels[i]
            if label >= len(CLASSES):
                yield Record.failed(key, "label out of range")
                continue
            yield Record(key, caption_for(label, key), functools.partial(_image, pixels, (h, w)),
                         {"label": label, "class": CLASSES[label][1]})


def from_config(cfg: DataConfig, root: Path = ROOT) -> FashionMnistSource:
    if cfg.split not in FILES:
        raise UserError("fashion-mnist has no 'heldout' split (every class is in training): use --split train or val")
    prefix = FILES[cfg.split]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            raise UserError(f"Fashion-MNIST file not found ({path}): install it with `{INSTALL_HINT}`")
    return FashionMnistSource(f"fashion-mnist/{cfg.split}", images, labels, cfg.size)
