"""Records → samples: decode, check, filter and transform, counting every skip. Never raises on bad data."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np

from dalle.data.config import DataConfig
from dalle.data.images import BadRecord
from dalle.data.records import Record, Sample, SkipStats
from dalle.data.transforms import ImageTransform

_SPACES = re.compile(r"\s+")


def in_val_split(key: str, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic split by key hash: the same file lands in the same split on every machine and run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # little- and big-endian; UTF-8's own BOM is dropped by "utf-8-sig"


def decode_caption(caption: str | bytes) -> str:
    """Bytes → text: UTF-8 (a byte order mark dropped), or UTF-16 with a BOM; :class:`BadRecord` if neither decodes."""
    if isinstance(caption, str):
        return caption
    try:
        return caption.decode("utf-16") if caption[:2] in UTF16_BOMS else caption.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRecord("undecodable caption") from None


def clean_caption(caption: str | bytes | None) -> str:
    """Decode (see :func:`decode_caption`) and normalise white space; raise :class:`BadRecord` if nothing is left."""
    if caption is None:
        raise BadRecord("missing caption")
    text = _SPACES.sub(" ", decode_caption(caption).replace("\x00", " ")).strip()
    if not text:
        raise BadRecord("empty caption")
    return text


def check_caption(text: str, cfg: DataConfig) -> None:
    if len(text.split()) < cfg.min_caption_words:
        raise BadRecord("caption too short")
    if cfg.max_caption_chars is not None and len(text) > cfg.max_caption_chars:
        raise BadRecord("caption too long")


def check_image_size(w: int, h: int, cfg: DataConfig) -> None:
    if cfg.min_image_side is not None and min(w, h) < cfg.min_image_side:
        raise BadRecord("image too small")
    if cfg.max_aspect_ratio is not None and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise BadRecord("aspect ratio out of range")


class DecodedImages:
    """The resized images (or the reason an image was unusable) that one training stream has decoded, by record key,
    kept for its later epochs: a dataset of a few thousand images is decoded once instead of once per epoch. Stops
    keeping new ones at ``max_bytes``; a key stands for one image (captions of one image share it)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self.images: dict[str, np.ndarray | str] = {}  # the image, or the skip reason

    def get(self, key: str) -> np.ndarray | str | None:
        return self.images.get(key)

    def put(self, key: str, value: np.ndarray | str) -> None:
        size = value.nbytes if isinstance(value, np.ndarray) else 256
        if self.used + size <= self.max_bytes:
            self.images[key] = value
            self.used += size


def _resized_image(record: Record, cfg: DataConfig, transform: ImageTransform, memory: DecodedImages | None
                   ) -> np.ndarray:
    kept = memory.get(record.key) if memory is not None else None
    if isinstance(kept, str):
        raise BadRecord(kept)  # a new exception each time: one raised again would grow its traceback every epoch
    if kept is not None:
        return kept
    try:
        img = record.load()
        check_image_size(*img.size, cfg)
        image = transform.resized(img)
    except BadRecord as e:
        if memory is not None:
            memory.put(record.key, e.reason)
        raise
    if memory is not None:
        memory.put(record.key, image)
    return image


def to_sample(record: Record, cfg: DataConfig, transform: ImageTransform, rng: np.random.Generator,
              memory: DecodedImages | None = None) -> Sample:
    """One record → one sample, or :class:`BadRecord`. Captions are checked before the (costlier) image decode,
    which ``memory`` spares for an image met before."""
    if record.error:
        raise BadRecord(record.error)
    caption = clean_caption(record.caption)
    check_caption(caption, cfg)
    image = _resized_image(record, cfg, transform, memory)
    return Sample(record.key, caption, transform.cropped(image, rng), record.attributes)


def iter_samples(records: Iterable[Record], cfg: DataConfig, stats: SkipStats | None = None,
                 rng: np.random.Generator | None = None, memory: DecodedImages | None = None) -> Iterator[Sample]:
    """Stream samples from records, skipping (and counting in ``stats``) every bad one; ``memory`` keeps decoded
    images for a stream that meets them again."""
    stats = stats if stats is not None else SkipStats()
    transform = ImageTransform(cfg.resolution, cfg.crop)
    rng = rng or np.random.default_rng(cfg.seed)
    for record in records:
        stats.seen += 1
        try:
            sample = to_sample(record, cfg, transform, rng, memory)
        except BadRecord as e:
            stats.skip(e.reason, record.key)
            continue
        except MemoryError:
            stats.skip("out of memory decoding", record.key)
            continue
        except Exception as e:  # a decoder bug must cost one record, not a training run
            stats.skip(f"unreadable ({type(e).__name__})", record.key)
            continue
        stats.kept += 1
        yield sample
