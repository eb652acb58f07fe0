"""What `dalle eval` draws samples for and compares them with: the caption sets (validation, training, held-out),
the real images of a split, and the reranked candidates of every caption (:func:`draw`)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dalle.checkpoint import read_json
from dalle.config import from_dict
from dalle.data.config import DataConfig
from dalle.data.token_cache import TokenCache, captions_file
from dalle.errors import UserError

if TYPE_CHECKING:
    from dalle.evaluation.run_eval import EvalConfig
    from dalle.generation import Generator


def split_data(run: Path, split: str) -> DataConfig:
    """The data options the token cache of ``split`` was encoded with: the same images, decoded the same way."""
    return from_dict(DataConfig, read_json(run / "cache" / split / "meta.json")["data"])


@dataclasses.dataclass
class CaptionSet:
    name: str  # "val", "train" or "heldout"
    title: str
    captions: list[str]
    attributes: list[dict[str, Any] | None]


def caption_kind(attributes: Mapping[str, Any] | None) -> str | None:
    """The form of a caption where its record's attributes say it: "1 object" or "2 objects" on shapes (one
    object in a place, or two in a relation); ``None`` where the data does not say."""
    objects = (attributes or {}).get("objects")
    if not isinstance(objects, list) or not objects:
        return None
    return f"{len(objects)} object{'s' if len(objects) > 1 else ''}"


def _spread(indices: Sequence[int], n: int) -> list[int]:
    """``n`` of ``indices`` spread evenly over them (a file-ordered dataset may be sorted by topic)."""
    if n <= 0 or not indices:
        return []
    return [indices[int(i)] for i in np.unique(np.linspace(0, len(indices) - 1, min(n, len(indices))).round())]


def cache_captions(run: Path, split: str, n: int, title: str, match: Mapping[str, int] | None = None) -> CaptionSet:
    """``n`` records spread evenly over the split's cache.

    ``match`` (caption kind → count, see :func:`caption_kind`) picks that many records of each kind instead, so that
    two sets compared with each other hold the same mix: on shapes, two-object captions are much harder than
    one-object ones, and 48 records spread evenly held 33% of them in one split and 48% in the other. A kind the
    split has too few records of is filled up with records of the other kinds.
    """
    cache = TokenCache(run / "cache" / split)
    everything = range(len(cache))
    if match:
        by_kind: dict[str | None, list[int]] = {}
        for i in everything:
            by_kind.setdefault(caption_kind(cache.row(i)["attributes"]), []).append(i)
        chosen = [i for kind, count in sorted(match.items()) for i in _spread(by_kind.get(kind, []), count)]
        rest = sorted(set(everything) - set(chosen))
        picked = sorted(chosen + _spread(rest, min(n, len(cache)) - len(chosen)))
    else:
        picked = _spread(list(everything), n)
    rows = [cache.row(i) for i in picked]
    return CaptionSet(split, title, [r["caption"] for r in rows], [r["attributes"] for r in rows])


def kind_counts(captions: CaptionSet) -> dict[str, int]:
    """How many captions of the set are of each known kind (see :func:`caption_kind`)."""
    return dict(Counter(k for k in map(caption_kind, captions.attributes) if k is not None))


def training_captions(run: Path) -> set[str]:
    """Every training caption, normalised, read from the cache's caption files (no images)."""
    path = run / "cache" / "train"
    out = set()
    for i in range(read_json(path / "meta.json")["chunks"]):
        with open(path / captions_file(i), encoding="utf-8") as f:
            out.update(normal_caption(json.loads(line)["caption"]) for line in f)
    return out


def normal_caption(caption: str) -> str:
    """Lower case, single spaces: how captions are compared with the training captions."""
    return " ".join(caption.lower().split())


def load_real(data: DataConfig, n: int) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` images ``(n, H, W, 3)`` uint8 of a split (in the cache's order) and their captions."""
    from dalle.training.reranker_task import load_pairs

    images, captions = load_pairs(data, n)
    return images.numpy(), captions


# ----------------------------------------------------------------------------------------------------- sampling

@dataclasses.dataclass
class Samples:
    """A caption set's samples: ``candidates (C, N, H, W, 3)`` uint8 in draw order, the reranker's ``scores (C, N)``
    and its picks ``reranked (C, H, W, 3)``."""

    captions: CaptionSet
    candidates: np.ndarray
    scores: torch.Tensor
    reranked: np.ndarray

    @property
    def unreranked(self) -> np.ndarray:
        return self.candidates[:, 0]

    @property
    def picks(self) -> list[int]:
        return self.scores.argmax(1).tolist()


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def draw(generator: Generator, sets: list[CaptionSet], cfg: EvalConfig) -> dict[str, Samples]:
    """One ``generate`` call for every caption of every set (batches fill up), split back by set."""
    from dalle.models.sampling import SampleConfig

    captions = [c for s in sets for c in s.captions]
    sample = SampleConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
    results = generator.generate(captions, n=cfg.candidates, keep=1, sample=sample)
    if any(r.candidate_scores is None for r in results):
        raise UserError("the generator returned no reranker scores; evaluation needs RUN/reranker/model")
    out, start = {}, 0
    for s in sets:
        chunk = results[start:start + len(s.captions)]
        start += len(s.captions)
        out[s.name] = Samples(s, np.stack([_array(r.candidates) for r in chunk]),
                              torch.stack([torch.as_tensor(_array(r.candidate_scores)).float() for r in chunk]),
                              np.stack([_array(r.images)[0] for r in chunk]))
    return out
