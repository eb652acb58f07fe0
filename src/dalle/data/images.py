"""Safe image decoding: every way a file can be bad becomes a :class:`BadRecord` with a short reason."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps

# Decompression-bomb guard: refuse images whose header claims more pixels than this (about 16k × 16k), before decoding.
DEFAULT_MAX_PIXELS = 256 * 1024 * 1024


class BadRecord(Exception):
    """A record that must be skipped; ``reason`` is the short text counted in the skip summary."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def open_image(src: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_side: int | None = None) -> Image.Image:
    """Open and fully decode an image from a path or bytes, or raise :class:`BadRecord`.

    ``draft_side``: a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that keeps both sides at least
    this long (Pillow's ``draft``), several times faster for photos far larger than the model's images; other formats
    decode whole. The decompression-bomb guard reads the full size first.
    """
    if isinstance(src, bytes):
        if not src:
            raise BadRecord("empty file")
        fp: io.BytesIO | Path = io.BytesIO(src)
    else:
        fp = Path(src)
        try:
            if fp.stat().st_size == 0:
                raise BadRecord("empty file", str(fp))
        except FileNotFoundError:
            raise BadRecord("missing file", str(fp)) from None
        except OSError as e:
            raise BadRecord("unreadable file", f"{fp}: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise BadRecord("image too large", f"{w}x{h}")
            if draft_side is not None:
                img.draft(None, (draft_side, draft_side))
            img.load()
    except BadRecord:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRecord("image too large", str(e)) from None
    except FileNotFoundError:
        raise BadRecord("missing file", str(src)[:200]) from None
    except Image.UnidentifiedImageError:
        raise BadRecord("not an image", str(src)[:200] if not isinstance(src, bytes) else "") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated or corrupt data surfaces as OSError ("image file is truncated"), SyntaxError (bad PNG chunks), ...
        raise BadRecord("corrupt image", str(e)[:200]) from None
    if img.width < 1 or img.height < 1:
        raise BadRecord("empty image")
    return upright(img)


ORIENTATION = 0x0112  # the EXIF tag cameras and phones set instead of rotating the pixels


def upright(img: Image.Image) -> Image.Image:
    """``img`` as it is meant to be seen: turned by its EXIF orientation (a phone photo held sideways), else as is.
    A malformed EXIF block counts as no orientation."""
    try:
        orientation = img.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises many kinds on garbage; the pixels are still fine
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - as above
        return img
