"""The one copy of image preprocessing, shared by training, encoding, sampling and evaluation.

PIL image → RGB (palette, greyscale, CMYK, 16-bit, alpha composited on white) → resize so the shorter side equals the
resolution → centre or random square crop → ``(H, W, 3) uint8``. Batches become float tensors in [0, 1] with
:func:`to_float`; :func:`map_pixels` / :func:`unmap_pixels` are the dVAE's pixel mapping (paper, logit-Laplace section).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from dalle.config import check, option

LOGIT_LAPLACE_EPS = 0.1  # paper: pixels are mapped to [ε, 1 − ε] so the logit-Laplace density stays finite


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on ``background`` (white), not dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / max(float(arr.max()), 1.0) if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


@dataclasses.dataclass
class ImageTransform:
    resolution: int = option(64, "side of the square training image in pixels")
    crop: str = option("center", "square crop after resizing the shorter side", choices=("center", "random"))

    def __post_init__(self) -> None:
        check(self.resolution >= 8, self, "resolution", "must be at least 8")
        check(self.crop in ("center", "random"), self, "crop", "must be 'center' or 'random'")

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        """``img`` → ``(resolution, resolution, 3) uint8``: :meth:`resized`, then :meth:`cropped`."""
        return self.cropped(self.resized(img), rng)

    def resized(self, img: Image.Image) -> np.ndarray:
        """RGB, shorter side scaled to the resolution: ``(H, W, 3) uint8``, the part a training stream may keep."""
        img = to_rgb(img)
        r = self.resolution
        w, h = img.size
        if (w, h) != (r, r):
            scale = r / min(w, h)
            # reducing_gap makes large down-scales fast (a box pre-shrink to 3× the size, then bicubic) at no visible
            # cost; the user sources' JPEGs arrive already decoded at a reduced scale (DataConfig.decode_side).
            img = img.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)

    def cropped(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The square ``(resolution, resolution, 3)`` crop of a :meth:`resized` image: centred, or at a place drawn
        from ``rng``."""
        r = self.resolution
        h, w = image.shape[:2]
        if (h, w) == (r, r):
            return image
        if self.crop == "random":
            rng = rng or np.random.default_rng()
            x, y = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
        else:
            x, y = (w - r) // 2, (h - r) // 2
        return image[y: y + r, x: x + r]


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` → ``(B, 3, H, W) float32`` in [0, 1]."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 images, got {tuple(t.shape)} {t.dtype}")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` float in [0, 1] → ``(B, H, W, 3) uint8`` (clamped)."""
    return (images.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] → [ε, 1 − ε], the dVAE's input mapping."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def signed_to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], not clamped: the Gaussian dVAE decoder's mean as a pixel value."""
    return x * 0.5 + 0.5
