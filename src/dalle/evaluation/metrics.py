"""Sample-quality metrics as pure functions over tensors (paper, "Sampling and evaluation").

* **Fréchet distance** between Gaussian fits of two feature sets, from streaming statistics (:class:`FeatureStats`),
  so 50k images never sit in memory. Computed in float64 with an eigendecomposition-based matrix square root.
* **Inception-style score** exp E_x[KL(p(y|x) || p(y))] with splits, from class probabilities, also streaming
  (:class:`ScoreStats`).
* **Mean contrastive score** of (image, caption) pairs under a scorer (our reranker).
* **MSE / PSNR** of reconstructions and **codebook usage** (perplexity, codes used) of a dVAE.

Names say which network made the features: ``metric_name("FD", "EfficientNetLite0") == "FD-EfficientNetLite0"``;
only the Inception-v3 with the standard FID weights gives numbers comparable to published FID.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dalle.errors import UserError


def metric_name(kind: str, extractor_name: str) -> str:
    """``"FD"``, ``"EfficientNetLite0"`` → ``"FD-EfficientNetLite0"``: every reported number names its network."""
    return f"{kind}-{extractor_name}"


# ----------------------------------------------------------------------------------------------------- Fréchet distance

class FeatureStats:
    """Running mean and covariance of feature vectors, in float64.

    Batches are merged with Chan et al.'s pairwise update (mean and centred scatter matrix), which stays accurate
    where the textbook Σxxᵀ − nμμᵀ loses digits to cancellation when features have a large mean.
    """

    def __init__(self, dim: int, extractor: str = ""):
        self.dim, self.extractor = dim, extractor
        self.count = 0
        self._mean = torch.zeros(dim, dtype=torch.float64)
        self._scatter = torch.zeros(dim, dim, dtype=torch.float64)  # Σ (x − μ)(x − μ)ᵀ

    def update(self, features: torch.Tensor) -> None:
        """Add a ``(B, dim)`` batch of features."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) features, got {tuple(features.shape)}")
        x = features.detach().to("cpu", torch.float64)  # (B, D)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        centred = x - mean
        self._merge(n, mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> None:
        """Fold in statistics gathered elsewhere (another process, another shard)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
        if other.count:
            self._merge(other.count, other._mean, other._scatter)

    def _merge(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        total = self.count + n
        delta = mean - self._mean
        self._scatter += scatter + torch.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total

    @property
    def mean(self) -> torch.Tensor:
        return self._mean.clone()

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased sample covariance ``(dim, dim)``."""
        if self.count < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.count}")
        return self._scatter / (self.count - 1)

    def save(self, path: str | Path) -> None:
        """Save as safetensors (e.g. a reference set's statistics, computed once)."""
        tensors = {"mean": self._mean.contiguous(), "scatter": self._scatter.contiguous()}
        save_file(tensors, str(path), metadata={"count": str(self.count), "extractor": self.extractor})

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, SafetensorError) as err:
            raise UserError(f"cannot read feature statistics {path}: {err}") from None
        if set(tensors) != {"mean", "scatter"} or "count" not in metadata:
            raise UserError(f"{path} does not hold feature statistics (expected tensors 'mean' and 'scatter')")
        stats = cls(tensors["mean"].numel(), metadata.get("extractor", ""))
        stats._mean, stats._scatter = tensors["mean"].double(), tensors["scatter"].double()
        stats.count = int(metadata["count"])
        return stats


def _psd_eigvals(eigvals: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues that are round-off: a rank-deficient covariance (fewer images than dimensions) has exact
    zeros that come out as ±n·ε·λ_max, and their square roots (~1e-7 λ_max^½ each) would add up to a visible bias."""
    tol = eigvals.abs().max() * eigvals.numel() * torch.finfo(eigvals.dtype).eps
    return torch.where(eigvals > tol, eigvals, torch.zeros_like(eigvals))


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (round-off eigenvalues, which
    may be negative, count as zero, instead of producing the complex results ``scipy.linalg.sqrtm`` can return)."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * _psd_eigvals(eigvals).sqrt()) @ eigvecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2), in float64:

    |μ1 − μ2|² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1^½ Σ2 Σ1^½)^½.

    The symmetric form Σ1^½ Σ2 Σ1^½ has the same eigenvalues as Σ1 Σ2 but is symmetric PSD, so its trace-square-root
    is a sum of square roots of real non-negative eigenvalues — no complex sqrtm, no iteration.
    """
    mu1, mu2, cov1, cov2 = (t.detach().to("cpu", torch.float64) for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"mismatched statistics: means {tuple(mu1.shape)}, {tuple(mu2.shape)}, "
                         f"covariances {tuple(cov1.shape)}, {tuple(cov2.shape)}")
    root1 = sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = _psd_eigvals(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum()
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return max(float(value), 0.0)


def frechet_distance_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two :class:`FeatureStats`; refuses statistics made by different networks."""
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise UserError(f"feature statistics come from different networks: {a.extractor!r} vs {b.extractor!r}")
    if a.dim != b.dim:
        raise UserError(f"feature statistics have different dimensions: {a.dim} vs {b.dim}")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


# ----------------------------------------------------------------------------------------------------- Inception score

def _split_score(prob_sum: torch.Tensor, neg_entropy_sum: torch.Tensor, count: int) -> float:
    """exp(E_x[Σ_y p log p] − Σ_y p̄ log p̄) for one split, from its sums (KL to the split's marginal p̄)."""
    marginal = prob_sum / count
    return math.exp(float(neg_entropy_sum / count - torch.xlogy(marginal, marginal).sum()))


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` contiguous chunks of exp E[KL(p(y|x) || p(y))].

    ``probs`` is ``(N, num_classes)``, rows summing to one (a classifier's softmax). Uniform predictions give 1;
    confident predictions spread evenly over K classes give K.
    """
    if probs.ndim != 2 or probs.shape[0] < splits or splits < 1:
        raise ValueError(f"need (N, classes) probabilities with N >= splits={splits}, got {tuple(probs.shape)}")
    p = probs.detach().to("cpu", torch.float64)
    scores = []
    for chunk in torch.tensor_split(p, splits):
        scores.append(_split_score(chunk.sum(0), torch.xlogy(chunk, chunk).sum(), chunk.shape[0]))
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return mean, std


class ScoreStats:
    """Streaming :func:`inception_score`: image ``i`` (in arrival order) goes to split ``i mod splits``.

    Round-robin instead of contiguous chunks because the total is not known in advance; on shuffled captions the
    two are the same estimator.
    """

    def __init__(self, num_classes: int, splits: int = 10):
        self.num_classes, self.splits = num_classes, splits
        self.count = 0
        self._prob_sum = torch.zeros(splits, num_classes, dtype=torch.float64)
        self._neg_entropy_sum = torch.zeros(splits, dtype=torch.float64)
        self._counts = torch.zeros(splits, dtype=torch.long)

    def update(self, probs: torch.Tensor) -> None:
        """Add ``(B, num_classes)`` class probabilities."""
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"expected (B, {self.num_classes}) probabilities, got {tuple(probs.shape)}")
        p = probs.detach().to("cpu", torch.float64)  # (B, C)
        split = (torch.arange(p.shape[0]) + self.count) % self.splits  # (B,)
        self._prob_sum.index_add_(0, split, p)
        self._neg_entropy_sum.index_add_(0, split, torch.xlogy(p, p).sum(1))
        self._counts += torch.bincount(split, minlength=self.splits)
        self.count += p.shape[0]

    def compute(self) -> tuple[float, float]:
        if self.count < self.splits:
            raise UserError(f"an inception score with {self.splits} splits needs at least {self.splits} images, "
                            f"got {self.count}")
        scores = [_split_score(self._prob_sum[i], self._neg_entropy_sum[i], int(self._counts[i]))
                  for i in range(self.splits)]
        mean = sum(scores) / len(scores)
        return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


# ----------------------------------------------------------------------------------------------------- contrastive

Scorer = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]  # (B, 3, H, W) images, B captions → (B,) scores


def mean_contrastive_score(scorer: Scorer, batches: Iterable[tuple[torch.Tensor, Sequence[str]]]) -> float:
    """Mean of ``scorer(images, captions)`` over all pairs, e.g. the reranker's image–caption similarity."""
    total, count = 0.0, 0
    for images, captions in batches:
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        scores = scorer(images, captions)  # (B,)
        if scores.shape != (images.shape[0],):
            raise ValueError(f"the scorer must return one score per pair, got shape {tuple(scores.shape)}")
        total += float(scores.detach().double().sum())
        count += scores.shape[0]
    if count == 0:
        raise UserError("no image–caption pairs to score")
    return total / count


# ----------------------------------------------------------------------------------------------------- reconstructions

def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error ``(B,)`` of two ``(B, C, H, W)`` batches."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return (x.double() - y.double()).square().flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB ``(B,)``; identical images give +inf."""
    return 10 * torch.log10(max_value ** 2 / mse(x, y))


@dataclasses.dataclass(frozen=True)
class CodebookUsage:
    codebook_size: int
    used: int  # codes that occur at least once
    perplexity: float  # exp(entropy of the code histogram): codebook_size when all codes are equally frequent

    @property
    def fraction_used(self) -> float:
        return self.used / self.codebook_size


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts ``(codebook_size,)`` of each code in an integer tensor of any shape (add them up across batches)."""
    flat = codes.detach().flatten().long().cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=codebook_size)


def codebook_usage(counts: torch.Tensor) -> CodebookUsage:
    """Usage from a :func:`code_histogram`: a collapsed dVAE (paper, stage 1) shows few codes and low perplexity."""
    total = int(counts.sum())
    if total == 0:
        raise ValueError("empty code histogram")
    p = counts.double() / total
    entropy = -torch.xlogy(p, p).sum()
    return CodebookUsage(codebook_size=counts.numel(), used=int((counts > 0).sum()),
                         perplexity=math.exp(float(entropy)))


@torch.no_grad()
def reconstruction_metrics(dvae: torch.nn.Module, images: np.ndarray | torch.Tensor,
                           batch_size: int = 64) -> tuple[dict[str, Any], np.ndarray]:
    """A dVAE's mean reconstruction PSNR and codebook usage on ``(B, H, W, 3)`` uint8 images (encode to argmax codes,
    decode), and the reconstructions ``(B, H, W, 3)`` uint8."""
    from dalle.data.transforms import to_float, to_uint8

    device = next(dvae.parameters()).device
    scores, recons = [], []
    counts = torch.zeros(dvae.config.codebook_size, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size]).to(device)  # (B, 3, H, W)
        codes = dvae.encode(x)  # (B, g, g)
        recon = dvae.decode(codes)  # (B, 3, H, W)
        scores.append(psnr(x, recon).clamp(max=100.0).cpu())  # an exact reconstruction would be +inf dB
        recons.append(to_uint8(recon))
        counts += code_histogram(codes, dvae.config.codebook_size)
    usage = codebook_usage(counts)
    return ({"images": len(images), "psnr_db": float(torch.cat(scores).mean()), "codes_used": usage.used,
             "codebook_size": usage.codebook_size, "perplexity": usage.perplexity}, np.concatenate(recons))
