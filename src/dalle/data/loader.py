"""Batches for training: a Source streamed through the one pipeline, sharded over DataLoader workers and ranks.

Each worker of each rank reads every ``num_shards``-th record (shard = rank · workers + worker), optionally shuffles
them through a seeded buffer, decodes them with :func:`dalle.data.pipeline.iter_samples` and collates its own batches
(so only one uint8 tensor per batch crosses the process boundary). Every batch also carries the skip counts gathered
since that worker's previous batch, and each worker ends with a batch holding only its last counts; :class:`Loader`
merges them into ``loader.stats`` in the main process, so ``loader.stats.summary()`` is complete after a pass even with
worker processes. A split that yields no sample at all raises :class:`~dalle.errors.UserError` with that summary.

The rank and number of ranks are torch.distributed's (taken when the loader is made, so worker processes need not
see the process group), except inside :func:`whole_data`, where every loader reads the whole split as one process
does: evaluation on rank 0 and data-dependent initialisation must see the same data in every process.

Batches are ``{"images": (B, H, W, 3) uint8 tensor, "captions": [str], "keys": [str], "attributes": [dict | None]}``;
:func:`dalle.data.transforms.to_float` makes the images training-ready.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import multiprocessing
import random
from collections.abc import Iterable, Iterator
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle.data.config import DataConfig
from dalle.data.pipeline import DecodedImages, iter_samples
from dalle.data.records import Record, Sample, SkipStats, Source
from dalle.data.registry import BUILTIN, open_source
from dalle.errors import UserError

Batch = dict[str, Any]


_FORCED_RANKS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("data_ranks", default=None)


def process_ranks() -> tuple[int, int]:
    """(rank, number of ranks) whose share of the data this process reads: torch.distributed's, or (0, 1) inside
    :func:`whole_data` or without a process group."""
    forced = _FORCED_RANKS.get()
    if forced is not None:
        return forced
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def data_ranks(rank: int, world: int) -> Iterator[None]:
    """Loaders (and token-cache batches) made inside the block read the share of ``rank`` of ``world``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    token = _FORCED_RANKS.set((rank, world))
    try:
        yield
    finally:
        _FORCED_RANKS.reset(token)


def whole_data() -> contextlib.AbstractContextManager[None]:
    """Loaders (and token-cache batches) made inside the block read the whole split, whatever the process's rank."""
    return data_ranks(0, 1)


def shard_layout(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(shard, num_shards) of the calling DataLoader worker on ``rank`` of ``world`` (default: this process's, see
    :func:`process_ranks`): each record is read by exactly one of them."""
    if rank is None or world is None:
        rank, world = process_ranks()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


def shuffled(records: Iterable[Record], buffer_size: int, rng: random.Random) -> Iterator[Record]:
    """Stream ``records`` in a random order, holding at most ``buffer_size`` (cheap: records are not decoded yet)."""
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        j = int(rng.random() * buffer_size)
        yield buffer[j]
        buffer[j] = record
    rng.shuffle(buffer)
    yield from buffer


def take_stats(stats: SkipStats) -> dict[str, Any]:
    """The counts in ``stats`` as a picklable dict (SkipStats holds a lock), resetting ``stats`` to zero."""
    out = stats.to_dict()
    stats.seen = stats.kept = stats.truncated_captions = 0
    stats.reasons.clear()
    stats.examples.clear()
    return out


def stats_from_dict(data: dict[str, Any]) -> SkipStats:
    stats = SkipStats()
    stats.seen, stats.kept = data["seen"], data["kept"]
    stats.truncated_captions = data["truncated_captions"]
    stats.reasons.update(data["reasons"])
    for reason, keys in data["examples"].items():
        stats.examples[reason].extend(keys)
    return stats


def collate(samples: list[Sample], stats: SkipStats) -> Batch:
    images = np.stack([s.image for s in samples]) if samples else np.zeros((0, 0, 0, 3), np.uint8)  # (B, H, W, 3)
    return {"images": torch.from_numpy(images), "captions": [s.caption for s in samples],
            "keys": [s.key for s in samples], "attributes": [s.attributes for s in samples],
            "skips": take_stats(stats)}


class BatchStream(IterableDataset):
    """Per-worker batches of one source split; use through :func:`make_loader`.

    ``repeat`` loops over epochs forever; the epoch number (from ``start_epoch``, for resumed runs) seeds both the
    shuffle and the random crops, so every epoch sees a new order and new crops, reproducibly. A worker whose shard
    yielded nothing in an epoch stops instead of spinning forever on an empty or all-bad shard.

    ``epoch``, a number shared with the worker processes, replaces ``start_epoch`` when given: each pass reads it
    when it starts, so that one set of persistent workers can serve every epoch of a run (:class:`TrainingEpochs`).
    """

    def __init__(self, source: Source, cfg: DataConfig, batch_size: int, shuffle: bool = False,
                 shuffle_buffer: int = 1000, repeat: bool = False, drop_last: bool = False, start_epoch: int = 0,
                 memory: DecodedImages | None = None, epoch: Synchronized | None = None):
        super().__init__()
        self.source, self.cfg, self.batch_size = source, cfg, batch_size
        self.shuffle, self.shuffle_buffer, self.repeat = shuffle, shuffle_buffer, repeat
        self.drop_last, self.start_epoch, self.memory, self.epoch = drop_last, start_epoch, memory, epoch
        self.rank, self.world = process_ranks()  # here, in the main process: workers may not see the process group
        self._kept: DecodedImages | None = None  # this process's own memory of decoded images (see __iter__)

    def epoch_samples(self, epoch: int, shard: int, num_shards: int, stats: SkipStats,
                      memory: DecodedImages | None = None) -> Iterator[Sample]:
        records = self.source.records(shard, num_shards)
        if self.shuffle:
            records = shuffled(records, self.shuffle_buffer, random.Random(f"{self.cfg.seed}:{epoch}:{shard}"))
        rng = np.random.default_rng([self.cfg.seed, epoch, shard])  # random crops differ per epoch and shard
        yield from iter_samples(records, self.cfg, stats, rng, memory)

    def __iter__(self) -> Iterator[Batch]:
        shard, num_shards = shard_layout(self.rank, self.world)
        stats = SkipStats()
        # Images met again in a later epoch are not decoded again: the caller's memory, or else, when this stream
        # sees more than one epoch (it repeats, or serves every epoch of a run), its own, kept on this copy of the
        # stream for as long as the process lives. Each data-loading process fills its own with its shard of the
        # records, the same shard in every epoch; the budget is shared between this rank's processes.
        memory = self.memory
        if memory is None and (self.repeat or self.epoch is not None):
            if self._kept is None:
                info = get_worker_info()
                self._kept = kept_images(self.cfg, info.num_workers if info is not None else 1)
            memory = self._kept
        pending: list[Sample] = []
        start = self.epoch.value if self.epoch is not None else self.start_epoch
        epochs = itertools.count(start) if self.repeat else [start]
        for epoch in epochs:
            n_samples = 0
            for sample in self.epoch_samples(epoch, shard, num_shards, stats, memory):
                n_samples += 1
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield collate(pending, stats)
                    pending = []
            if n_samples == 0:
                break  # nothing came out of this shard: another epoch would yield nothing either
        if pending and not self.drop_last:
            yield collate(pending, stats)
        elif pending:
            stats.kept -= len(pending)  # counted as skipped instead, so the summary says why they were not used
            for sample in pending:
                stats.skip("incomplete last batch (drop_last)", sample.key)
        yield collate([], stats)  # the last skip counts, so that the main process sees them all


def _as_is(batch: Batch) -> Batch:
    return batch


class Loader:
    """Iterable of batches; ``stats`` accumulates the skip counts of every worker (see the module doc).

    Each ``iter()`` starts again from ``start_epoch`` (same order, same crops); ``stats`` keeps adding up across them.
    ``persistent`` keeps the worker processes (and what they hold) from one ``iter()`` to the next.
    """

    def __init__(self, stream: BatchStream, workers: int, pin_memory: bool = False, persistent: bool = False):
        self.stream = stream
        self.stats = SkipStats()
        # Batches come collated from the stream; the identity collate_fn skips torch's default_convert, which would
        # walk every caption and attribute dict (a quarter of the loading time for shapes).
        self.dataloader = DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=workers,
                                     pin_memory=pin_memory, persistent_workers=persistent and workers > 0)

    @property
    def name(self) -> str:
        return f"{getattr(self.stream.source, 'name', self.stream.cfg.source)!r} split {self.stream.cfg.split!r}"

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(self.stats)

    def batches(self, stats: SkipStats) -> Iterator[Batch]:
        """One pass over the data, its skip counts added to ``stats`` as its batches arrive."""
        yielded = 0
        for batch in self.dataloader:
            stats.merge(stats_from_dict(batch.pop("skips")))
            if batch["captions"]:
                yielded += len(batch["captions"])
                yield batch
        if yielded == 0:
            where = ""
            if self.stream.world > 1:
                where = f" on rank {self.stream.rank} of {self.stream.world}"
            hint = ""
            if self.stream.cfg.split == "val" and self.stream.cfg.source not in BUILTIN:
                hint = (f". A user dataset's val split holds the records whose key hashes into the --data-val-fraction "
                        f"share ({self.stream.cfg.val_fraction:g}); pass a larger one, e.g. 0.1 for a few hundred "
                        "images")
            raise UserError(f"dataset {self.name} yielded no usable sample{where}: "
                            + "; ".join(line.strip() for line in stats.summary().splitlines()) + hint)


def kept_images(cfg: DataConfig, processes: int = 1) -> DecodedImages | None:
    """A memory for the images a training run decodes (``cfg.decoded_memory_mb``, split between ``processes``), or
    None when it is 0."""
    budget = (cfg.decoded_memory_mb << 20) // processes
    return DecodedImages(budget) if budget > 0 else None


class TrainingEpochs:
    """The shuffled training batches of one split (each epoch's incomplete last batch dropped), epoch by epoch,
    through one set of data-loading processes kept for the whole run.

    ``epoch(e, stats)`` yields epoch ``e``, the same batches on every call (a resumed run re-opens its epoch), and
    adds what it skips to ``stats`` as they arrive. An image is decoded once per run, not once per epoch
    (``cfg.decoded_memory_mb``): the stream keeps what it decoded in whichever process reads it, this one (``workers``
    0) or each worker, and the workers persist from epoch to epoch.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, workers: int, pin_memory: bool = False):
        self._epoch = multiprocessing.Value("q", 0)  # read by each pass when it starts, in whichever process
        self.loader = make_loader(cfg, batch_size, workers, shuffle=True, drop_last=True, pin_memory=pin_memory,
                                  epoch=self._epoch, persistent=True)

    def epoch(self, epoch: int, stats: SkipStats) -> Iterator[Batch]:
        self._epoch.value = epoch  # set when the epoch's first batch is asked for, before any process starts it
        yield from self.loader.batches(stats)


def make_loader(cfg: DataConfig, batch_size: int, workers: int = 0, shuffle: bool = False, repeat: bool = False,
                drop_last: bool = False, shuffle_buffer: int = 1000, start_epoch: int = 0, pin_memory: bool = False,
                source: Source | None = None, memory: DecodedImages | None = None, epoch: Synchronized | None = None,
                persistent: bool = False) -> Loader:
    """Batches of the split ``cfg`` names (or of ``source``, opened from ``cfg`` by default); see :class:`Loader`
    and, for ``epoch``, :class:`BatchStream`."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    if workers < 0:
        raise UserError(f"number of data workers must be >= 0 (got {workers})")
    if shuffle and shuffle_buffer < 1:
        raise UserError(f"shuffle buffer must hold at least 1 record (got {shuffle_buffer})")
    source = source if source is not None else open_source(cfg)
    stream = BatchStream(source, cfg, batch_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer, repeat=repeat,
                         drop_last=drop_last, start_epoch=start_epoch, memory=memory, epoch=epoch)
    return Loader(stream, workers, pin_memory=pin_memory, persistent=persistent)
