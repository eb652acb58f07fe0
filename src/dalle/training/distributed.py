"""Training on several processes (torch.distributed), applied from outside the model and the task.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; docs/scaling.md); with one
process nothing here does anything and training is exactly what it was. With several:

* **Batches.** ``TrainConfig.batch_size`` is the micro-batch of the whole job: each of N processes draws its share,
  ``batch_size / N`` examples, from its shard of the data (the loaders shard by rank), averages its loss over them, and
  DDP / FSDP average the gradients over processes, so an update is the one a single process makes on the whole
  micro-batch. Losses that are not means over examples gather what they need (the reranker's contrastive loss,
  :func:`gather_batch`). All processes end an epoch together, when the first of them runs out of data.
* **ddp**: every process holds the whole model; gradients are all-reduced in buckets during the backward pass,
  optionally compressed by **PowerSGD** (paper §2.5; torch's hook: rank-r factors with error feedback and warm start).
* **fsdp**: FSDP2's ``fully_shard`` on each block (``task.blocks(model)``) and then on the whole: parameters, gradients,
  Adam moments and the EMA are split over the processes (the paper's parameter sharding, §2.5), or, with
  ``fsdp_shard_size``, over groups of that many processes and replicated across the groups (HSDP: the paper sharded
  within a machine). With ``meta_init`` the model is built on the ``meta`` device and each process initialises only
  its shards with the model's ``init_weights()``, so a model larger than one device (the paper's 12B) can start.
* **Checkpoints** hold whole (gathered) tensors, written by rank 0 alone and atomically, in the single-process format,
  so a run resumes on any number of processes (its data position counts global batches).
* **Evaluation, samples and export** run on rank 0 with the whole EMA model (gathered under fsdp) while the others wait.
* **Noise.** Rank 0 keeps the training random stream of a single-process run; rank r > 0 reseeds from (seed, r, step)
  at every update, so its dropout and Gumbel noise differ from the other ranks' and a resumed run repeats them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dalle.errors import UserError
from dalle.training.ema import EMA
from dalle.training.precision import GradScaling

PARALLEL = ("ddp", "fsdp")
# Rank 0 evaluates and writes checkpoints while the others wait in a collective; NCCL's default 10 minutes is too
# short for a long evaluation.
TIMEOUT = datetime.timedelta(minutes=60)
POWERSGD_MIN_COMPRESSION = 2.0  # torch's default: a matrix is compressed only if that sends at most half of it


@dataclasses.dataclass
class Processes:
    """This process's place in the job: rank, world size and local rank (all 0/1/0 for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this object started the process group and ends it in close()
    comm_device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: torch.device) -> Processes:
        """Join the job torchrun started (or the process group already running), if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        initialised = dist.is_available() and dist.is_initialized()
        if world == 1 and not initialised:
            return cls()
        if not dist.is_available():
            raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(device.index if device.index is not None else local_rank)
        owns = False
        if not initialised:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
            owns = True
        nccl = dist.get_backend() == "nccl"
        comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns, comm)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """A CUDA device without an index becomes this process's GPU (LOCAL_RANK)."""
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def local_batch_size(self, batch_size: int) -> int:
        if batch_size % self.world_size:
            raise UserError(f"batch_size {batch_size} is not divisible by the {self.world_size} processes: it is the "
                            "micro-batch of the whole job, split evenly between them")
        return batch_size // self.world_size

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (every process must pass the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world_size).tolist()))

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any."""
        if not self.enabled:
            return flag
        return bool(self.reduce_max(torch.tensor([float(flag)]))[0] > 0)

    def reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.to(self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def reseed(self, seed: int, step: int) -> None:
        """Ranks > 0: seed torch, NumPy and Python from (seed, rank, step), so each rank's noise is its own and a
        resumed run repeats it; rank 0 keeps the stream a single-process run has (and checkpoints)."""
        if self.rank == 0:
            return
        state = np.random.SeedSequence([seed, self.rank, step]).generate_state(2)
        torch.manual_seed(int(state[0]))
        np.random.seed(int(state[1]))
        random.seed(int(state[0]) ^ int(state[1]))

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


# --- losses that need the whole batch --------------------------------------------------------------------------


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """``(B_local, ...)`` of every process → ``(B_global, ...)`` in rank order, differentiable: the gradient of a
    loss computed on the whole batch by every process flows back to each process's own rows (summed over the
    processes, which DDP's averaging then divides again). Identity with one process."""
    if _world() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_list(items: Sequence[Any]) -> list[Any]:
    """Python objects (e.g. captions) of every process, concatenated in rank order. Identity with one process."""
    if _world() == 1:
        return list(items)
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


# --- the model as trained ----------------------------------------------------------------------------------------


class TaskLoss(nn.Module):
    """The task's loss as a module's ``forward``, so DDP and FSDP see one forward per micro-batch whatever methods of
    the model the task calls (the prior's ``loss``, the dVAE's ``encoder`` and ``decoder``)."""

    def __init__(self, task: Any, model: nn.Module):
        super().__init__()
        self.model = model
        self.task = task  # not a module: a plain attribute

    def forward(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.task.loss(self.model, batch, step)


@dataclasses.dataclass
class Prepared:
    """What the trainer trains: the task's ``model`` (its parameters sharded under fsdp), its ``ema``, and the
    wrapped module that computes the loss with gradient synchronisation."""

    model: nn.Module
    ema: EMA
    step_module: nn.Module
    mode: str  # "single", "ddp" or "fsdp"
    scaling: GradScaling | None = None
    powersgd: Any = None  # torch's PowerSGDState
    powersgd_16bit: bool = False
    # fsdp: rank 0's unsharded copy of the EMA, for evaluation and export
    whole_copy: nn.Module | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.step_module(batch, step)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Gradient accumulation: processes exchange gradients only in the backward pass of the last micro-batch."""
        if self.mode == "ddp" and not last:
            with self.step_module.no_sync():
                yield
            return
        if self.mode == "fsdp":
            self.step_module.set_requires_gradient_sync(last)
        yield

    def full_states(self, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                              dict[str, Any]]:
        """Whole state dicts of the model, the EMA and the optimizer, for a checkpoint (under fsdp: a collective,
        and rank 0 alone gets them)."""
        return (full_state_dict(self.model, self.sharded), full_state_dict(self.ema.model_ema, self.sharded),
                full_optimizer_state(self.model, opt, self.sharded))

    def load_states(self, opt: torch.optim.Optimizer, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any]) -> None:
        """Inverse of :meth:`full_states` from a checkpoint's tensors and state (under fsdp, those of rank 0)."""
        from dalle.checkpoint import optimizer_from_tensors

        load_full_state_dict(self.model, tensors.get("model", {}), self.sharded)
        load_full_state_dict(self.ema.model_ema, tensors.get("ema", {}), self.sharded)
        self.ema.updates = state["ema_updates"]
        saved = optimizer_from_tensors(tensors["optimizer"], state["optimizer"]) if "optimizer" in tensors else {}
        load_full_optimizer_state(self.model, opt, saved, self.sharded)
        if self.scaling is not None and state.get("grad_scaling"):
            self.scaling.load_state_dict(state["grad_scaling"])

    def whole_ema(self, task: Any, device: torch.device, is_main: bool, meta_init: bool) -> nn.Module | None:
        """The EMA model whole, on rank 0; None on the others. Under fsdp it is gathered (a collective) into a
        plain copy of the model that rank 0 builds once."""
        if not self.sharded:
            return self.ema.model_ema if is_main else None
        state = full_state_dict(self.ema.model_ema, sharded=True)
        if not is_main:
            return None
        if self.whole_copy is None:
            if meta_init and getattr(task, "meta_init", False):
                with torch.device("meta"):
                    whole = task.build_model()
                whole.to_empty(device=device)
            else:
                whole = task.build_model().to(device)
            self.whole_copy = whole.eval().requires_grad_(False)
        self.whole_copy.load_state_dict(state)
        return self.whole_copy

    def powersgd_saving(self) -> float | None:
        """Fraction of the fp32 gradient bytes PowerSGD did not send, over the updates it compressed so far."""
        s = self.powersgd
        if s is None or not s.total_numel_before_compression:
            return None
        sent = s.total_numel_after_compression * (2 if self.powersgd_16bit else 4)
        return 1.0 - sent / (4 * s.total_numel_before_compression)


def prepare(task: Any, cfg: Any, procs: Processes, device: torch.device, amp_dtype: torch.dtype | None) -> Prepared:
    """Build the task's model and EMA and apply, from outside, gradient scaling (fp16), activation checkpointing and
    DDP or FSDP. The global RNG must be seeded identically on every process before."""
    mode = cfg.parallel if procs.enabled else "single"
    meta = mode == "fsdp" and cfg.meta_init and getattr(task, "meta_init", False)
    if meta:
        with torch.device("meta"):
            model = task.build_model()
    else:
        model = task.build_model().to(device)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)  # before any hook: the copy is evaluated, never trained
    blocks = task.blocks(model)
    scaling = None
    if amp_dtype == torch.float16:
        reduce = procs.reduce_max if procs.enabled else None
        scaling = GradScaling(model, blocks, per_block=cfg.fp16_scaling == "block", reduce_max=reduce)
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)
    step_module: nn.Module = TaskLoss(task, model)
    out = Prepared(model, ema, step_module, mode, scaling)
    if mode == "ddp":
        _wrap_ddp(out, cfg, device)
    elif mode == "fsdp":
        mesh = _mesh(procs, device, cfg.fsdp_shard_size)
        _shard(step_module, blocks, amp_dtype, mesh)
        _shard(ema.model_ema, task.blocks(ema.model_ema), None, mesh)
        if meta:
            _init_shards(model, ema.model_ema, device, cfg.seed, procs.rank % mesh.size(-1))
    return out


def _mesh(procs: Processes, device: torch.device, shard_size: int | None) -> Any:
    """The device mesh: (all processes,) for FSDP, or (replicas, shard_size) for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = shard_size or procs.world_size
    if procs.world_size % shard:
        raise UserError(f"fsdp_shard_size {shard} does not divide the {procs.world_size} processes")
    if shard == procs.world_size:
        return init_device_mesh(device.type, (shard,))
    return init_device_mesh(device.type, (procs.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def _wrap_ddp(out: Prepared, cfg: Any, device: torch.device) -> None:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(out.step_module, device_ids=[device.index] if device.type == "cuda" else None)
    out.step_module = ddp
    if cfg.powersgd_rank is not None:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        # Error feedback and warm start as in the paper (§2.5, appendix E); epsilon guards against all-zero matrices
        # (e.g. the embedding rows of tokens absent from the batch only ever make rows zero, but a whole unused matrix
        # would divide by zero in the orthogonalisation).
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=cfg.powersgd_rank, start_powerSGD_iter=cfg.powersgd_start,
            min_compression_rate=POWERSGD_MIN_COMPRESSION, use_error_feedback=True, warm_start=True,
            orthogonalization_epsilon=1e-8, random_seed=cfg.seed, compression_stats_logging_frequency=2**62)
        hook = powerSGD_hook.powerSGD_hook
        if cfg.powersgd_16bit:
            hook = _in_bf16(hook)
        ddp.register_comm_hook(state, hook)
        out.powersgd, out.powersgd_16bit = state, cfg.powersgd_16bit


def _in_bf16(hook: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``hook`` run on a bf16 copy of each gradient bucket, its result copied back (so PowerSGD's factors and error
    buffers are 16-bit, as in the paper). torch's ``bf16_compress_wrapper`` does the same but DDP accepts it only
    with NCCL, although gloo reduces bf16 too."""

    def bf16_hook(state, bucket):  # unannotated: DDP checks the annotations of a hook against its own types
        bucket.set_buffer(bucket.buffer().to(torch.bfloat16))
        future = hook(state, bucket)

        def back(fut: Any) -> torch.Tensor:
            out = bucket.buffer()
            out.copy_(fut.value())  # in place, as torch's wrapper does (lower peak memory)
            return out

        return future.then(back)

    return bf16_hook


def _shard(root: nn.Module, blocks: Iterable[nn.Module], param_dtype: torch.dtype | None, mesh: Any) -> None:
    """FSDP2 per block, then the root (which takes every parameter outside the blocks: embeddings, heads)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # 16-bit copies of the parameters are gathered for compute; gradients are reduced in fp32.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)


@torch.no_grad()
def _init_shards(model: nn.Module, ema_model: nn.Module, device: torch.device, seed: int, shard: int) -> None:
    """Materialise the meta-built model's shards and initialise them with ``init_weights()``; the EMA starts equal.

    Without DTensor's RNG tracker (CPU), every process would draw the same numbers for its shard, so each shard index
    draws from its own seed (replicas of one shard alike); with the tracker (CUDA) the shards are drawn as one tensor
    would be."""
    from torch.distributed.tensor import _random as dtensor_random

    model.to_empty(device=device)
    ema_model.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        if dtensor_random._rng_tracker is None:
            torch.manual_seed(int(np.random.SeedSequence([seed, shard, 1 << 20]).generate_state(1)[0]))
            warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        model.init_weights()
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.copy_(p)
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)


# --- whole tensors for checkpoints and evaluation --------------------------------------------------------------


def full_state_dict(module: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The module's whole state dict (on CPU, on rank 0 only when ``sharded``: a collective; others get ``{}``)."""
    if not sharded:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], sharded: bool) -> None:
    """Load a whole state dict; when ``sharded``, rank 0's (the others pass ``{}``) is scattered to the shards."""
    if not sharded:
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order: torch numbers them so in ``state_dict()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """``opt.state_dict()`` of the whole model, parameters numbered as a single process numbers them (rank 0 only
    when ``sharded``), so checkpoints do not depend on the number of processes."""
    if not sharded:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, opt))}
    return {"state": {index[k]: v for k, v in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give every per-element state tensor (Adam's moments) its parameter's memory layout.

    Checkpoints store tensors contiguous, and ``load_state_dict`` keeps that layout, while a channels_last model's
    convolution weights are not contiguous. The fused optimizer kernels walk a parameter and its state with one
    layout, so a mismatch would pair the wrong elements after a resume.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                              sharded: bool) -> None:
    """Inverse of :func:`full_optimizer_state` (when ``sharded``, rank 0 passes the state, the others ``{}``)."""
    if not sharded:
        opt.load_state_dict(state)
        match_state_layout(opt)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named: dict[str, Any] = {}
    if state:
        names = _param_names(model, opt)
        named = {"state": {names[int(k)]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))


def read_checkpoint(path: Any, weights: bool, device: torch.device | str) -> tuple[
        dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """A checkpoint's config, tensors and state; without ``weights`` (fsdp ranks other than 0, which receive theirs
    from rank 0) only the small RNG tensors are read."""
    from dalle import checkpoint as ck

    if not weights:
        path = ck.resolve_dir(path)
        return (ck.read_json(path / ck.CONFIG), {"rng": ck.load_tensors(path / "rng.safetensors")},
                ck.read_json(path / "state.json"))
    return ck.load_checkpoint(path, device)


def grad_norm_value(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float (a DTensor under fsdp)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --- PowerSGD's compression, from parameter shapes ------------------------------------------------------------


def powersgd_elements(shape: Sequence[int], rank: int,
                      min_compression_rate: float = POWERSGD_MIN_COMPRESSION) -> tuple[int, int]:
    """(elements of the gradient, elements PowerSGD sends for it), as torch's hook decides: a tensor of 2 or more
    dimensions is an n × m matrix (first dimension × the rest) sent as rank-r factors P (n × r) and Q (m × r), with
    r = min(rank, n, m), when that is at most 1 / ``min_compression_rate`` of it; anything else is sent whole."""
    n = int(shape[0]) if shape else 1
    m = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    whole = n * m
    if len(shape) < 2:
        return whole, whole
    r = min(rank, n, m)
    factors = (n + m) * r
    return whole, factors if factors * min_compression_rate < whole else whole


def powersgd_compression(shapes: Iterable[Sequence[int]], rank: int, sent_bits: int = 16, grad_bits: int = 32,
                         min_compression_rate: float = POWERSGD_MIN_COMPRESSION) -> float:
    """Fraction of the gradient bytes PowerSGD saves on tensors of these shapes: factors in ``sent_bits`` instead of
    the ``grad_bits`` gradients (the paper's table compares 16-bit factors with 32-bit gradients, §2.5)."""
    totals = np.array([powersgd_elements(s, rank, min_compression_rate) for s in shapes], dtype=np.float64)
    whole, sent = totals.sum(0)
    return 1.0 - (sent * sent_bits) / (whole * grad_bits)
