"""The token cache: a dataset split encoded once by the (EMA) dVAE into image codes, for training the prior.

Paper section 2.2: the prior models the 32×32 grid of **argmax** codes of the dVAE encoder (no Gumbel noise), so the
codes never change while the prior trains and are computed once. Layout of a cache directory::

    meta.json              format, dVAE config, grid_size, codebook_size, dtype, count, source, split, data config
    codes-00000.npy        (n, g, g) uint16 (uint32 when the codebook has more than 65,536 codes), n ≤ chunk_size
    captions-00000.jsonl   one {"key", "caption", "attributes"} per row of the matching codes file

Writing streams: one chunk is held in memory at a time, so a dataset larger than memory works. Each chunk is written
through a temporary name and renamed, captions first and codes last, so a complete ``codes-N.npy`` marks a complete
chunk; an interrupted encode resumes after the last complete chunk (the records before it are read again but not
encoded), and a finished cache (``meta.json`` with ``"complete": true``) is left alone unless ``overwrite``.

Reading: :class:`TokenCache` memory-maps the codes (opened lazily in each DataLoader worker) and
:func:`cache_batches` yields shuffled, rank-sharded batches for the prior.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dalle.checkpoint import read_json, write_text_atomic
from dalle.config import to_dict
from dalle.data.config import DataConfig
from dalle.data.loader import make_loader, process_ranks
from dalle.data.transforms import to_float
from dalle.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "dalle-token-cache"
VERSION = 1
META = "meta.json"


def codes_file(i: int) -> str:
    return f"codes-{i:05d}.npy"


def captions_file(i: int) -> str:
    return f"captions-{i:05d}.jsonl"


def code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16 if codebook_size <= 2**16 else np.uint32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- writing ---------------------------------------------------------------------------------------------------


def _identity(model_cfg: dict[str, Any], model_sha: str, data: DataConfig, chunk_size: int, batch_size: int,
              workers: int) -> dict[str, Any]:
    """What must not change between the sessions of one encode (else the chunks would not fit together)."""
    return {"dvae": model_cfg, "model_sha256": model_sha, "data": to_dict(data), "chunk_size": chunk_size,
            "batch_size": batch_size, "workers": workers}


# Options that only set how the records are read: a resumed encode keeps the first session's values, because the
# order in which records arrive depends on them (records are dealt out to the workers).
READ_OPTIONS = ("batch_size", "workers")


@dataclasses.dataclass
class _Progress:
    chunks: int = 0  # complete chunks kept from an earlier session
    records: int = 0  # records in them
    complete: bool = False


def _prepare(out: Path, identity: dict[str, Any], overwrite: bool) -> _Progress:
    """What an earlier session left in ``out`` (updating ``identity``'s read options to that session's); deletes what
    an overwrite or a resume must not keep."""
    meta_path = out / META
    if not meta_path.is_file():
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UserError(f"{out} exists and is not a token cache; choose another --out or pass --overwrite")
        _remove_cache_files(out)
        return _Progress()
    meta = read_json(meta_path)
    if overwrite:
        _remove_cache_files(out)
        return _Progress()
    saved = meta.get("identity", {})
    changed = sorted(k for k in identity if k not in READ_OPTIONS and saved.get(k) != identity[k])
    if changed:
        raise UserError(f"{out} holds a token cache made with other options ({', '.join(changed)}); pass "
                        "--overwrite to re-encode it or choose another --out")
    if meta.get("complete"):
        return _Progress(meta["chunks"], meta["count"], True)
    for k in READ_OPTIONS:
        if k in saved and saved[k] != identity[k]:
            log.info("resume: keeping %s=%s of the interrupted encode (the record order depends on it)", k, saved[k])
            identity[k] = saved[k]
    done = _Progress()
    while (out / codes_file(done.chunks)).is_file() and (out / captions_file(done.chunks)).is_file():
        done.records += _npy_rows(out / codes_file(done.chunks))
        done.chunks += 1
    _remove_cache_files(out, first_chunk=done.chunks, keep_meta=True)
    return done


def _remove_cache_files(out: Path, first_chunk: int = 0, keep_meta: bool = False) -> None:
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith(("codes-", "captions-", ".codes-", ".captions-")):
            digits = "".join(ch for ch in p.name if ch.isdigit())
            if not digits or int(digits) >= first_chunk:
                p.unlink()
        elif p.name == META and not keep_meta:
            p.unlink()


def _write_chunk(out: Path, index: int, codes: np.ndarray, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text_atomic(out / captions_file(index), text)
    tmp = out / f".{codes_file(index)}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, codes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / codes_file(index))


@dataclasses.dataclass
class EncodeResult:
    path: Path
    count: int
    encoded: int  # records encoded in this session (0 when the cache was already complete)
    skip_summary: str


def encode_dataset(model: torch.nn.Module, model_dir: Path, data: DataConfig, out: Path, *, batch_size: int = 64,
                   chunk_size: int = 4096, workers: int = 0, device: torch.device | str = "cpu",
                   overwrite: bool = False, progress: bool = True) -> EncodeResult:
    """Encode the split ``data`` names with the dVAE ``model`` (loaded from ``model_dir``) into the cache ``out``."""
    if chunk_size < 1 or batch_size < 1:
        raise UserError("chunk size and batch size must be at least 1")
    out = Path(out)
    cfg = model.config
    if data.resolution != cfg.resolution:
        raise UserError(f"the dVAE takes {cfg.resolution}-pixel images but the data resolution is "
                        f"{data.resolution}; pass --data-resolution {cfg.resolution}")
    identity = _identity(to_dict(cfg), file_sha256(Path(model_dir) / "model.safetensors"), data, chunk_size,
                         batch_size, workers)
    done = _prepare(out, identity, overwrite)
    if done.complete:
        log.info("%s is already complete (%d records); pass --overwrite to encode again", out, done.records)
        return EncodeResult(out, done.records, 0, "")
    batch_size, workers = identity["batch_size"], identity["workers"]
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "complete": False, "count": None, "chunks": None,
            "chunk_size": chunk_size, "grid_size": cfg.grid_size, "codebook_size": cfg.codebook_size,
            "dtype": code_dtype(cfg.codebook_size).name, "dvae": to_dict(cfg), "model": str(model_dir),
            "source": data.source, "split": data.split, "data": to_dict(data), "identity": identity}
    write_text_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    if done.chunks:
        log.info("resuming the encode of %s after %d complete chunks (%d records)", out, done.chunks, done.records)

    loader = make_loader(data, batch_size, workers, shuffle=False, repeat=False, drop_last=False)
    device = torch.device(device)
    model = model.to(device).eval()
    count = _encode_stream(model, loader, out, done, chunk_size, device, progress)
    meta.update(complete=True, count=count, chunks=-(-count // chunk_size), skips=loader.stats.to_dict())
    write_text_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    summary = loader.stats.summary()
    return EncodeResult(out, count, count - done.records, summary)


def _encode_stream(model: torch.nn.Module, loader: Any, out: Path, done: _Progress, chunk_size: int,
                   device: torch.device, progress: bool) -> int:
    from tqdm.auto import tqdm

    dtype = code_dtype(model.config.codebook_size)
    to_skip = done.records
    chunk, codes, rows = done.chunks, [], []
    held, total = 0, to_skip
    bar = tqdm(desc="encode", unit="img", disable=not progress, initial=to_skip)
    with torch.inference_mode():
        for batch in loader:
            images, n = batch["images"], len(batch["captions"])
            start = min(to_skip, n)  # records encoded by an earlier session: read again, not encoded
            to_skip -= start
            if start == n:
                continue
            x = to_float(images[start:].to(device)).contiguous(memory_format=torch.channels_last)
            codes.append(model.encode(x).cpu().numpy().astype(dtype))  # (b, g, g)
            rows += [{"key": k, "caption": c, "attributes": a} for k, c, a in
                     zip(batch["keys"][start:], batch["captions"][start:], batch["attributes"][start:])]
            held += n - start
            total += n - start
            bar.update(n - start)
            while held >= chunk_size:
                stacked = np.concatenate(codes)
                _write_chunk(out, chunk, stacked[:chunk_size], rows[:chunk_size])
                codes, rows, held, chunk = [stacked[chunk_size:]], rows[chunk_size:], held - chunk_size, chunk + 1
    if held:
        _write_chunk(out, chunk, np.concatenate(codes), rows)
    bar.close()
    if to_skip > 0:
        raise UserError(f"the data yielded fewer records than the {done.records} already encoded: "
                        "the dataset changed since the encode started; pass --overwrite")
    return total


# --- reading ---------------------------------------------------------------------------------------------------


class TokenCache(Dataset):
    """A finished token cache: ``cache[i]`` → ``(codes (g, g) int64 tensor, caption, attributes)``.

    Codes are memory-mapped (opened lazily, so each DataLoader worker maps its own); captions are read one chunk at a
    time on first use and kept.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a token cache (no {META}); create one with `dalle vae encode`")
        self.meta = read_json(meta_path)
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise UserError(f"{self.path}: unsupported token cache format "
                            f"{self.meta.get('format')!r} version {self.meta.get('version')!r}")
        if not self.meta.get("complete"):
            raise UserError(f"{self.path} is an unfinished token cache: run the same `dalle vae encode` again to "
                            "finish it")
        self.grid_size: int = self.meta["grid_size"]
        self.codebook_size: int = self.meta["codebook_size"]
        self.sizes = [_npy_rows(self.path / codes_file(i)) for i in range(self.meta["chunks"])]
        if sum(self.sizes) != self.meta["count"]:
            raise UserError(f"{self.path}: the chunks hold {sum(self.sizes)} records but meta.json says "
                            f"{self.meta['count']}; encode it again with --overwrite")
        self.starts = np.cumsum([0] + self.sizes).tolist()
        self._codes: list[np.ndarray] | None = None
        self._captions: dict[int, list[dict[str, Any]]] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        # Workers map the files themselves instead of receiving pickled copies of the arrays.
        return {**self.__dict__, "_codes": None}

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a token cache of {len(self)} records")
        i %= len(self)
        chunk = bisect.bisect_right(self.starts, i) - 1
        return chunk, i - self.starts[chunk]

    def _chunk_codes(self, chunk: int) -> np.ndarray:
        if self._codes is None:
            self._codes = [np.load(self.path / codes_file(c), mmap_mode="r") for c in range(len(self.sizes))]
        return self._codes[chunk]

    def _chunk_rows(self, chunk: int) -> list[dict[str, Any]]:
        if chunk not in self._captions:
            with open(self.path / captions_file(chunk), encoding="utf-8") as f:
                self._captions[chunk] = [json.loads(line) for line in f]
        return self._captions[chunk]

    def row(self, i: int) -> dict[str, Any]:
        """``{"key", "caption", "attributes"}`` of record ``i``, without reading its codes."""
        chunk, j = self._locate(i)
        return self._chunk_rows(chunk)[j]

    def record(self, i: int) -> dict[str, Any]:
        """``{"codes": (g, g) int64 tensor, "key", "caption", "attributes"}`` of record ``i``."""
        chunk, j = self._locate(i)
        codes = torch.from_numpy(self._chunk_codes(chunk)[j].astype(np.int64))  # (g, g)
        return {"codes": codes, **self._chunk_rows(chunk)[j]}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, dict[str, Any] | None]:
        r = self.record(i)
        return r["codes"], r["caption"], r["attributes"]

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """A whole batch at once (the DataLoader's batched fetch): see :func:`cache_batches`."""
        records = [self.record(i) for i in indices]
        return {"codes": torch.stack([r["codes"] for r in records]),  # (B, g, g) int64
                "captions": [r["caption"] for r in records], "keys": [r["key"] for r in records],
                "attributes": [r["attributes"] for r in records], "indices": torch.as_tensor(indices)}


def _npy_rows(path: Path) -> int:
    if not path.is_file():
        raise UserError(f"token cache chunk missing: {path}")
    return int(np.load(path, mmap_mode="r").shape[0])


def epoch_order(n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, rank: int = 0,
                world_size: int = 1) -> np.ndarray:
    """This rank's record indices for one epoch: one permutation per (seed, epoch), dealt out round-robin and cut to
    the same length on every rank, so all ranks take the same number of steps."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world_size
    return order[rank::world_size][:per_rank]


def cache_batches(cache: TokenCache, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                  rank: int | None = None, world_size: int | None = None, workers: int = 0, drop_last: bool = True,
                  start_batch: int = 0) -> Iterator[dict[str, Any]]:
    """One epoch of batches ``{"codes": (B, g, g) int64, "captions", "keys", "attributes", "indices"}`` for ``rank``
    of ``world_size`` (default: this process's, :func:`dalle.data.loader.process_ranks`).

    The order depends only on (seed, epoch), so a resumed run passes ``start_batch`` to continue exactly; DataLoader
    workers each fetch whole batches. Batch ``i`` of the R ranks, each of ``batch_size``, together hold records
    ``order[i·R·batch_size : (i+1)·R·batch_size]`` of the epoch's permutation: exactly what one process drawing
    batches of ``R·batch_size`` would see as its batch ``i``, whatever R is.
    """
    if rank is None or world_size is None:
        rank, world_size = process_ranks()
    order = epoch_order(len(cache), seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    batches = [order[i:i + batch_size].tolist() for i in range(0, stop, batch_size)][start_batch:]
    if not batches:
        return iter(())
    loader = DataLoader(cache, batch_sampler=batches, num_workers=workers, collate_fn=_identity_collate)
    return iter(loader)


def _identity_collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch
