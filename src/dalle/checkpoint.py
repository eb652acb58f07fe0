"""Checkpoints as directories: ``config.json`` + safetensors files + small JSON state. Never pickles.

Two layouts share these helpers:

* a **model directory** (``save_model_dir`` / ``load_model_dir``): what a finished stage hands to the next one
  (``config.json`` + ``model.safetensors``, plus e.g. ``tokenizer.json``);
* a **training run** (``save_checkpoint`` / ``latest_checkpoint``): ``RUN/checkpoints/step-00001000/`` directories
  holding model, EMA and optimizer tensors, RNG state and the data position; ``checkpoints/latest`` names the newest.

Every write goes to a temporary name first and is renamed into place, so a kill at any moment leaves either the
previous checkpoint or the new one, never a broken one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dalle.errors import UserError

CONFIG = "config.json"
MODEL = "model.safetensors"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes without error.

    An existing ``path`` is moved aside, the new one renamed in, then the old one removed; :func:`resolve_dir` finds
    the moved-aside copy if a crash falls between the two renames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_dir(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else the copy :func:`atomic_dir` moved aside before a crash, else a :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(f".{path.name}.old")
    if old.is_dir():
        return old
    raise UserError(f"no such checkpoint directory: {path}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt JSON in {path}: {e}") from None


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing weights file: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt weights file {path}: {e}") from None


def save_model_dir(path: str | os.PathLike, config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                   extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write ``config.json`` + ``model.safetensors`` (+ ``extra_files``: name → text) to ``path``."""
    with atomic_dir(path) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(_contiguous(state_dict), str(tmp / MODEL))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, Any],
                                                                                         dict[str, torch.Tensor]]:
    """Read a directory written by :func:`save_model_dir`: ``(config, state_dict)``."""
    path = resolve_dir(path)
    return read_json(path / CONFIG), load_tensors(path / MODEL, device)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; tied weights are saved as separate copies.
    return {k: v.detach().contiguous().clone() if v.data_ptr() in _shared(tensors) else v.detach().contiguous()
            for k, v in tensors.items()}


def _shared(tensors: dict[str, torch.Tensor]) -> set[int]:
    seen: dict[int, int] = {}
    for v in tensors.values():
        if v.device.type != "meta":
            seen[v.data_ptr()] = seen.get(v.data_ptr(), 0) + 1
    return {p for p, n in seen.items() if n > 1}


# --- optimizer and RNG state as tensors + JSON -------------------------------------------------------------------


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        plain[str(pid)] = {}
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                plain[str(pid)][name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_tensors`, ready for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {int(pid): dict(values) for pid, values in meta["plain"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch (CPU and CUDA), NumPy and Python RNG states: tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# --- training runs ---------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, config: dict[str, Any],
                    tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``RUN/checkpoints/step-N/`` (``config.json``, one ``NAME.safetensors`` per entry of ``tensors``,
    ``state.json``), then point ``RUN/checkpoints/latest`` at it and prune all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name, group in tensors.items():
            save_file(_contiguous(group), str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    write_text_atomic(root / LATEST, target.name + "\n")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or ``None`` if it has none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "state.json").is_file():
            return target
    # The pointer is written last; fall back to the newest directory that is complete.
    for cand in sorted(root.glob("step-*"), reverse=True):
        if (cand / "state.json").is_file():
            return cand
    return None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[
        dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint directory: ``(config, {name: tensors}, state)``."""
    path = resolve_dir(path)
    tensors = {p.stem: load_tensors(p, device) for p in sorted(path.glob("*.safetensors"))}
    return read_json(path / CONFIG), tensors, read_json(path / "state.json")


# --- TorchScript archives (OpenAI's released CLIP files) -------------------------------------------------------------

_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptModule:
    """Inert stand-in for a module object of a TorchScript archive: keeps its attributes, runs no code."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected TorchScript object state of type {type(state).__name__}")
        self.attributes = state

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, value in getattr(self, "attributes", {}).items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptModule):
                out.update(value.tensors(f"{prefix}{name}."))
        return out


def _rebuild_tensor(flat: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
                    ) -> torch.Tensor:
    return flat.as_strided(size, stride, offset).clone()


class _ScriptUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a TorchScript archive allowing only tensors, dicts and module stand-ins."""

    def __init__(self, archive: Any, prefix: str, data: bytes):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptModule
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        dtype, key = pid[1], str(pid[2])
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive's module tree under their dotted names, without ``torch.jit.load``.

    The archive's code is never run and its pickle may name only tensors, storages, ordered dicts and TorchScript
    module objects (kept as inert stand-ins); anything else raises :class:`UserError`.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise UserError(f"{path} is not a TorchScript archive (no single top-level data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            root = _ScriptUnpickler(archive, prefix, archive.read(pickles[0])).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, ValueError, RuntimeError) as e:
        raise UserError(f"refusing to read {path} as a TorchScript archive: {e}") from None
    if not isinstance(root, _ScriptModule):
        raise UserError(f"{path}: the archive's root is a {type(root).__name__}, not a module")
    return root.tensors()
