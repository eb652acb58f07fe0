"""Metrics of generated samples against real images (paper, "Sampling and evaluation"), given N candidates per
caption in draw order and the reranker's score of each.

* the **Fréchet distance** of the reranked picks to real validation images in a feature network's space, the
  **Inception-style score** of an ImageNet classifier and the mean **contrastive score**;
* the paper's two curves: each metric **against the Gaussian blur radius** applied to real and generated images
  alike, and **against the reranking sample size** n = 1, 2, 4, …, N (the best of the first n draws; n = 1 is no
  reranking). The picks of the sizes overlap, so each distinct pick goes through the feature network once;
* **compositional accuracy** (shapes): the checker's verdict on every candidate, so accuracy can be read for the
  first draw, the reranked pick and every sample size.

Images are ``(B, H, W, 3)`` uint8 arrays or ``(B, 3, H, W)`` floats in [0, 1] (see :mod:`dalle.evaluation.features`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle.data.transforms import to_float
from dalle.evaluation.blur import best_of_first, doubling_sizes, gaussian_blur
from dalle.evaluation.features import (
    Classifier,
    EfficientNetLite0,
    EncodeImageFeatures,
    FeatureExtractor,
    as_images,
    build_extractor,
)
from dalle.evaluation.metrics import FeatureStats, ScoreStats, frechet_distance_stats
from dalle.evaluation.shapes_checker import ATTRIBUTES, CheckResult, ShapesChecker, summarize

# Display names: every number says which network made it ("Fréchet distance (EfficientNet-Lite0 features)").
NETWORK_LABELS = {"EfficientNetLite0": "EfficientNet-Lite0", "InceptionV3": "Inception-v3",
                  "Reranker": "our reranker's image encoder"}


class FeatureReader:
    """Feature vectors for the Fréchet distance and ImageNet class probabilities for the Inception-style score.

    ``classifier`` is the feature network itself when it is an ImageNet classifier (one pass gives both), otherwise
    a separate EfficientNet-Lite0; ``None`` skips the score.
    """

    def __init__(self, extractor: FeatureExtractor, classifier: Classifier | None, batch_size: int = 64):
        self.extractor, self.classifier, self.batch_size = extractor, classifier, batch_size

    @classmethod
    def build(cls, features: str, inception_weights: str | Path | None, reranker: Any | None, score: bool,
              device: torch.device, batch_size: int = 64) -> FeatureReader:
        """``features``: "efficientnet-lite0", "inception" (needs ``inception_weights``) or "reranker"."""
        if features == "reranker":
            # The scorer's own preprocessing: resizing, and a CLIP's normalisation.
            extractor: Any = EncodeImageFeatures(reranker.model, reranker.name, reranker.embed_dim,
                                                 preprocess=reranker.preprocess)
        else:
            name = {"efficientnet-lite0": "efficientnet-lite0", "inception": "inception-v3"}.get(features, features)
            extractor = build_extractor(name, inception_weights).to(device)
        classifier = None
        if score:
            classifier = extractor if isinstance(extractor, Classifier) else EfficientNetLite0().to(device)
        return cls(extractor, classifier, batch_size)

    @property
    def feature_label(self) -> str:
        return f"Fréchet distance ({NETWORK_LABELS.get(self.extractor.name, self.extractor.name)} features)"

    @property
    def score_label(self) -> str | None:
        if self.classifier is None:
            return None
        return f"Inception-style score ({NETWORK_LABELS.get(self.classifier.name, self.classifier.name)} " \
               f"ImageNet classes)"

    def read(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features ``(B, dim)`` and class probabilities ``(B, classes)`` (or ``None``), float64 on the CPU."""
        feats, probs = [], []
        for start in range(0, len(images), self.batch_size):
            x = as_images(images[start:start + self.batch_size])  # (b, 3, H, W)
            if self.classifier is self.extractor:
                f, logits = self.classifier.features_and_logits(x)
            else:
                f = self.extractor.features(x)
                logits = self.classifier.logits(x) if self.classifier is not None else None
            feats.append(f.detach().double().cpu())
            if logits is not None:
                probs.append(logits.detach().double().softmax(-1).cpu())
        return torch.cat(feats), torch.cat(probs) if probs else None


def frechet_to(features: torch.Tensor, reference: FeatureStats) -> float:
    stats = FeatureStats(reference.dim, reference.extractor)
    stats.update(features)
    return frechet_distance_stats(stats, reference)


def score_of(probs: torch.Tensor | None, splits: int) -> float | None:
    if probs is None:
        return None
    stats = ScoreStats(probs.shape[1], splits)
    stats.update(probs)
    return stats.compute()[0]


@dataclasses.dataclass
class Reference:
    """The real validation images as the metrics see them."""

    stats: FeatureStats
    score: float | None  # Inception-style score of the real images
    contrastive: float  # mean reranker score of the real (image, caption) pairs


def reference(reader: FeatureReader, images: np.ndarray, contrastive: float, splits: int) -> Reference:
    feats, probs = reader.read(images)
    stats = FeatureStats(feats.shape[1], reader.extractor.name)
    stats.update(feats)
    return Reference(stats, score_of(probs, splits), contrastive)


# ----------------------------------------------------------------------------------------------------- curves

def sample_size_curve(reader: FeatureReader, candidates: np.ndarray, scores: torch.Tensor, ref: Reference,
                      splits: int) -> dict[str, Any]:
    """Each metric of the best of the first n candidates per caption, for n = 1, 2, 4, …, N.

    ``candidates`` is ``(C, N, H, W, 3)`` uint8 in draw order and ``scores`` ``(C, N)`` the reranker's. Returns
    ``{"n": [...], "fd": [...], "is": [...] | None, "contrastive": [...]}``: at n = 1 the unreranked first draws, at
    n = N the reranked picks.
    """
    sizes = doubling_sizes(scores.shape[1])
    picks = {n: best_of_first(scores, n) for n in sizes}  # n → (C,)
    needed = sorted({(c, int(j)) for p in picks.values() for c, j in enumerate(p)})
    feats, probs = reader.read(candidates[[c for c, _ in needed], [j for _, j in needed]])
    row = {pair: i for i, pair in enumerate(needed)}
    curve: dict[str, Any] = {"n": sizes, "fd": [], "is": [] if probs is not None else None, "contrastive": []}
    for n in sizes:
        idx = [row[(c, int(j))] for c, j in enumerate(picks[n])]
        curve["fd"].append(frechet_to(feats[idx], ref.stats))
        if probs is not None:
            curve["is"].append(score_of(probs[idx], splits))
        curve["contrastive"].append(float(scores[torch.arange(len(idx)), picks[n]].double().mean()))
    return curve


def blur_curve(reader: FeatureReader, real: np.ndarray, fake: np.ndarray, radii: Sequence[float], splits: int,
               unblurred: tuple[float, float | None] | None = None) -> dict[str, Any]:
    """Fréchet distance and Inception-style score with both image sets blurred by each radius (σ in pixels).

    ``unblurred`` gives the two values at radius 0 when they are known already (no second pass over the images).
    """
    real_f, fake_f = to_float(real), to_float(fake)  # (B, 3, H, W)
    curve: dict[str, Any] = {"radius": [float(r) for r in radii], "fd": [], "is": []}
    for radius in radii:
        if radius == 0 and unblurred is not None:
            curve["fd"].append(unblurred[0])
            curve["is"].append(unblurred[1])
            continue
        real_feats, _ = reader.read(_blur(real_f, radius, reader.batch_size))
        fake_feats, fake_probs = reader.read(_blur(fake_f, radius, reader.batch_size))
        stats = FeatureStats(real_feats.shape[1], reader.extractor.name)
        stats.update(real_feats)
        curve["fd"].append(frechet_to(fake_feats, stats))
        curve["is"].append(score_of(fake_probs, splits))
    if reader.classifier is None:
        curve["is"] = None
    return curve


def _blur(images: torch.Tensor, radius: float, batch_size: int) -> torch.Tensor:
    # Blurring is a convex combination of pixels, so the result stays in [0, 1] up to round-off.
    return torch.cat([gaussian_blur(chunk, radius) for chunk in images.split(batch_size)]).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------- compositional

@dataclasses.dataclass
class Verdicts:
    """The checker on one caption set: every candidate ``(C, N)``, and the reranked picks ``(C,)``."""

    candidates: list[list[CheckResult]]
    reranked: list[CheckResult]

    @property
    def unreranked(self) -> list[CheckResult]:
        return [row[0] for row in self.candidates]

    def any_correct(self, rows: Sequence[int] | None = None) -> float:
        """Fraction of captions with at least one candidate entirely correct: what a perfect reranker would reach."""
        rows = range(len(self.candidates)) if rows is None else rows
        return sum(any(r.all_correct for r in self.candidates[i]) for i in rows) / len(rows)

    def accuracy_at(self, picks: Sequence[int]) -> float:
        """Fraction of captions whose picked candidate shows everything the caption states."""
        return sum(row[j].all_correct for row, j in zip(self.candidates, picks)) / len(picks)


def check_samples(checker: ShapesChecker, candidates: np.ndarray, reranked: np.ndarray,
                  stated: Sequence[str | Mapping[str, Any]]) -> Verdicts:
    """Judge ``(C, N, H, W, 3)`` candidates and ``(C, H, W, 3)`` picks against C captions or attribute dicts."""
    return Verdicts([[checker.check(image, s) for image in row] for row, s in zip(candidates, stated)],
                    [checker.check(image, s) for image, s in zip(reranked, stated)])


def accuracy_summary(verdicts: Verdicts) -> dict[str, Any]:
    """Per-attribute accuracy (and ``"all"``) of the reranked picks, of the first draws and of every candidate (the
    prior's own rate, from N times as many samples as the first draws), and ``"any_candidate"``: the fraction of
    captions that a perfect reranker would get right."""
    return {"reranked": summarize(verdicts.reranked), "unreranked": summarize(verdicts.unreranked),
            "every_candidate": summarize([r for row in verdicts.candidates for r in row]),
            "any_candidate": verdicts.any_correct()}


def accuracy_ratio(numerator: Sequence[bool], denominator: Sequence[bool], level: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``mean(numerator) / mean(denominator)`` (e.g. held-out against training captions' accuracy after reranking),
    with a bootstrap interval: each set's captions resampled with replacement, independently, ``resamples`` times.
    It says how far the ratio could move with other captions drawn, which on a few dozen captions is a lot.
    ``ratio`` and the interval are None where the denominator is 0."""
    if not numerator or not denominator:
        raise ValueError("both caption sets need at least one verdict")
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    out: dict[str, Any] = {"ratio": None, "interval": None, "level": level, "resamples": resamples,
                           "captions": [len(num), len(den)]}
    if den.mean() == 0:
        return out
    rng = np.random.default_rng(seed)
    num_means = num[rng.integers(0, len(num), (resamples, len(num)))].mean(1)  # (resamples,)
    den_means = den[rng.integers(0, len(den), (resamples, len(den)))].mean(1)  # (resamples,)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(den_means > 0, num_means / den_means, np.inf)  # a resample without a right one: unbounded
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail], method="inverted_cdf")
    out["ratio"] = float(num.mean() / den.mean())
    out["interval"] = [float(low), float(high) if np.isfinite(high) else None]
    return out


def accuracy_by_kind(verdicts: Verdicts, kinds: Sequence[str | None]) -> dict[str, dict[str, float | int]]:
    """Fraction entirely correct, reranked and first draw, among the captions of each kind (e.g. "1 object")."""
    out: dict[str, dict[str, float | int]] = {}
    for kind in sorted({k for k in kinds if k is not None}):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = {"captions": len(rows),
                     "reranked": sum(verdicts.reranked[i].all_correct for i in rows) / len(rows),
                     "unreranked": sum(verdicts.candidates[i][0].all_correct for i in rows) / len(rows),
                     "any_candidate": verdicts.any_correct(rows)}
    return out


def verdict_dict(result: CheckResult) -> dict[str, bool | None]:
    return {name: getattr(result, name) for name in ATTRIBUTES}
