"""The paper's two metric curves (section "Sampling and evaluation", zero-shot MS-COCO results):

* a metric **as a function of Gaussian blur radius** applied to all images, real and generated alike — blurring
  removes the fine detail the dVAE cannot reproduce, so the curve shows how much of a gap is low-level texture;
* a metric **as a function of the reranking sample size**: keep the best of the first n candidates per caption
  (by the contrastive reranker's score) for n = 1, 2, 4, …, N.

Blur radius follows PIL's ``GaussianBlur(radius)``: it is the standard deviation σ in pixels of the image as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]  # (real, fake) float batches → value


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ⌈3σ⌉ (covers 99.7% of the mass), ``(2·radius + 1,)``."""
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    radius = max(math.ceil(3 * sigma), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a ``(B, C, H, W)`` float batch with a separable Gaussian of std ``sigma`` pixels; σ = 0 is the identity.

    Borders are reflected, so a border pixel is not darkened by phantom zeros. A kernel wider than the image is cut
    to the image (reflect padding needs pad < side) and renormalised.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"expected a (B, C, H, W) float batch, got {tuple(images.shape)} {images.dtype}")
    if sigma == 0:
        return images
    kernel = gaussian_kernel1d(sigma, images.dtype).to(images.device)
    channels, (height, width) = images.shape[1], images.shape[-2:]
    out = images
    for axis, side in ((3, width), (2, height)):  # rows then columns
        radius = min(kernel.numel() // 2, side - 1)
        k = kernel[kernel.numel() // 2 - radius: kernel.numel() // 2 + radius + 1]
        k = k / k.sum()
        shape = (1, 1, 1, k.numel()) if axis == 3 else (1, 1, k.numel(), 1)
        pad = (radius, radius, 0, 0) if axis == 3 else (0, 0, radius, radius)
        weight = k.reshape(shape).expand(channels, -1, -1, -1)  # one copy of the kernel per channel
        out = F.conv2d(F.pad(out, pad, mode="reflect"), weight, groups=channels)
    return out


def blur_matrix(side: int, sigma: float) -> np.ndarray:
    """:func:`gaussian_blur` along one axis of length ``side`` as a ``(side, side)`` float64 matrix ``M``: a
    ``(H, W)`` map X blurs to ``M_Hᵀ X M_W`` (row i of M is the blurred i-th unit vector). Useful for blurring many
    small maps (shape templates) without a convolution call each."""
    if sigma == 0:
        return np.eye(side)
    kernel = gaussian_kernel1d(sigma, torch.float64).numpy()
    centre = kernel.size // 2
    radius = min(centre, side - 1)
    kernel = kernel[centre - radius: centre + radius + 1] / kernel[centre - radius: centre + radius + 1].sum()
    out = np.arange(side)
    matrix = np.zeros((side, side))
    for tap in range(-radius, radius + 1):
        src = np.abs(out + tap)  # reflect at the start (index -1 reads 1)
        src = np.where(src > side - 1, 2 * (side - 1) - src, src)  # and at the end
        np.add.at(matrix, (src, out), kernel[tap + radius])
    return matrix


def _blur_in_chunks(images: torch.Tensor, sigma: float, batch_size: int) -> torch.Tensor:
    return torch.cat([gaussian_blur(chunk, sigma) for chunk in images.split(batch_size)])


def metric_vs_blur(real: torch.Tensor, fake: torch.Tensor, radii: Sequence[float], metric_fn: MetricFn,
                   batch_size: int = 256) -> list[tuple[float, float]]:
    """``[(radius, metric_fn(blur(real), blur(fake)))]`` for each radius; both sets are blurred (as in the paper)."""
    return [(float(r), float(metric_fn(_blur_in_chunks(real, r, batch_size), _blur_in_chunks(fake, r, batch_size))))
            for r in radii]


def doubling_sizes(n: int) -> list[int]:
    """1, 2, 4, …, up to ``n`` (and ``n`` itself when it is not a power of two): the reranking curve's x-axis."""
    if n < 1:
        raise ValueError(f"need at least one candidate, got {n}")
    sizes = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return sizes if sizes[-1] == n else sizes + [n]


def best_of_first(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Index ``(C,)`` of the highest-scoring candidate among the first ``n`` of each caption's ``(C, N)`` scores."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n must lie in [1, {scores.shape[1]}], got {n}")
    return scores[:, :n].argmax(1)


def metric_vs_sample_size(scores: torch.Tensor, images: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                          metric_fn: Callable[[torch.Tensor], float],
                          sizes: Sequence[int] | None = None) -> list[tuple[int, float]]:
    """Reranking curve: for each n, pick per caption the best of its first n candidates and evaluate the picks.

    ``scores`` is ``(C, N)`` (caption × candidate, higher is better). ``images`` is either a ``(C, N, 3, H, W)`` tensor
    or a function from the chosen candidate indices ``(C,)`` to the ``(C, 3, H, W)`` picks (so the candidates can stay
    on disk). ``metric_fn`` evaluates the picks, e.g. a Fréchet distance to reference statistics.
    """
    if scores.ndim != 2:
        raise ValueError(f"expected (captions, candidates) scores, got {tuple(scores.shape)}")
    if isinstance(images, torch.Tensor):
        if images.shape[:2] != scores.shape:
            raise ValueError(f"images {tuple(images.shape[:2])} and scores {tuple(scores.shape)} disagree")
        table = images
        images = lambda idx: table[torch.arange(idx.numel()), idx]  # (C, 3, H, W)
    out = []
    for n in sizes or doubling_sizes(scores.shape[1]):
        out.append((n, float(metric_fn(images(best_of_first(scores, n))))))
    return out
