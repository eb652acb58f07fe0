"""What every dataset source yields, and how bad input is counted instead of crashing a run.

A *source* yields :class:`Record` objects: a key, a caption (``str`` or undecoded ``bytes``) and a zero-argument
``load`` that returns the image (``PIL.Image``). Decoding is deferred so that a corrupt file costs only a skip, and so
that workers can shard records before paying for decoding. :func:`dalle.data.pipeline.iter_samples` turns records into
training-ready :class:`Sample` objects and counts everything it skips in a :class:`SkipStats`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Record:
    key: str  # stable identifier (relative path, shard/member name, index): used for splits and skip reports
    caption: str | bytes | None
    load: Callable[[], Image.Image]
    attributes: dict[str, Any] | None = None  # what the caption states, where the source knows it (shapes)
    # Set by a source that knows while listing that the record is unusable (a malformed manifest line, a truncated
    # shard): the pipeline counts it as a skip with this reason instead of calling ``load``.
    error: str | None = None

    @classmethod
    def failed(cls, key: str, reason: str) -> Record:
        """A record its source already knows is unusable: counted as a skip with ``reason``, never loaded."""
        return cls(key, None, _unloadable, error=reason)


def _unloadable() -> Image.Image:
    raise RuntimeError("a record with an error is never loaded")


@dataclasses.dataclass
class Sample:
    key: str
    caption: str
    image: np.ndarray  # (H, W, 3) uint8, already at the model's resolution
    attributes: dict[str, Any] | None = None


class Source(Protocol):
    """A dataset split. ``records`` streams; ``shard``/``num_shards`` split the stream between workers or ranks."""

    name: str

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[Record]: ...


class SkipStats:
    """Counts of skipped records by reason, with a few example keys per reason. Thread-safe; mergeable."""

    EXAMPLES = 3

    def __init__(self) -> None:
        self.seen = 0
        self.kept = 0
        self.truncated_captions = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def skip(self, reason: str, key: str) -> None:
        with self._lock:
            self.reasons[reason] += 1
            examples = self.examples[reason]
            if len(examples) < self.EXAMPLES and key not in examples:  # a record met again each epoch: name it once
                examples.append(key)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def merge(self, other: SkipStats) -> None:
        with self._lock:
            self.seen += other.seen
            self.kept += other.kept
            self.truncated_captions += other.truncated_captions
            self.reasons.update(other.reasons)
            for reason, keys in other.examples.items():
                examples = self.examples[reason]
                examples.extend([k for k in keys if k not in examples][:max(self.EXAMPLES - len(examples), 0)])

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "skipped": self.skipped, "truncated_captions":
                self.truncated_captions, "reasons": dict(self.reasons), "examples": dict(self.examples)}

    def summary(self) -> str:
        """A few human lines: what was kept, what was skipped and why (with example keys)."""
        lines = [f"{self.kept} of {self.seen} records used, {self.skipped} skipped"]
        for reason, n in self.reasons.most_common():
            lines.append(f"  skipped {n:>7} × {reason}  (e.g. {', '.join(self.examples[reason])})")
        if self.truncated_captions:
            lines.append(f"  {self.truncated_captions} captions truncated to the maximum length")
        return "\n".join(lines)
