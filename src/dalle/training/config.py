"""The training loop's options (:class:`TrainConfig`), per-command defaults, and how a resumed run merges the saved
options with the ones given now."""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any

from dalle import checkpoint as ck
from dalle.config import check, from_dict, option
from dalle.training import distributed as par
from dalle.training.precision import AMP_CHOICES, FP16_SCALING

log = logging.getLogger(__name__)

# Fields that describe one session rather than the run: a resumed run takes them from the command line, never from
# the checkpoint, and changing them does not change the numbers the run produces (beyond rounding).
SESSION_FIELDS = ("out", "resume", "stop_at_step", "workers", "progress", "tensorboard", "device", "threads",
                  "parallel", "fsdp_shard_size", "activation_checkpointing")


@dataclasses.dataclass
class TrainConfig:
    out: Path = option(Path("runs/train"), "run directory: checkpoints, metrics, samples and the exported model")
    steps: int = option(2000, "optimizer updates in the whole run; every schedule is laid out over this many")
    time_limit: float | None = option(None, "seconds of training (evaluations included, all sessions) to plan the "
                                      "run for: from the measured speed the run takes as many updates as fit, at "
                                      "most --steps, and lays every schedule out over them (so the number of "
                                      "updates depends on the machine)")
    batch_size: int = option(32, "examples per micro-batch, over all processes (each of N processes takes "
                             "batch_size / N)")
    grad_accum: int = option(1, "micro-batches per update (effective batch = batch_size x grad_accum)")
    lr: float = option(1e-3, "peak learning rate (Adam)")
    lr_min: float = option(1e-5, "learning rate at the end of the cosine decay")
    warmup_fraction: float = option(0.0, "linear learning-rate warm-up, as a fraction of the steps")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "Adam's beta1 and beta2")
    adam_eps: float = option(1e-8, "Adam's epsilon")
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW)")
    grad_clip: float | None = option(None, "clip the gradient norm to this value (default: no clipping)")
    ema_decay: float = option(0.999, "decay of the weight EMA used for evaluation and export (paper: 0.999)")
    ema_warmup: bool = option(True, "warm the EMA decay up as min(decay, (1+n)/(10+n)) so short runs average "
                              "recent weights, not the initialisation")
    amp: str = option("auto", "autocast dtype: auto = bf16 where this machine computes it in hardware (a GPU "
                      "that supports it, or a CPU with AVX512-BF16 or AMX), else none; fp16 adds dynamic gradient "
                      "scaling (--fp16-scaling)", choices=AMP_CHOICES)
    fp16_scaling: str = option("block", "with --amp fp16: one gradient scale per residual block (the paper's fix for "
                               "underflowing gradients in deep resblocks, section 2.4) or one loss scale (global)",
                               choices=FP16_SCALING)
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass instead "
                                            "of keeping them (paper 2.4): much less memory, about 1/3 more compute")
    parallel: str = option("ddp", "with several processes (torchrun): ddp keeps the whole model on each; fsdp shards "
                           "parameters, gradients, optimizer state and EMA per block (FSDP2; the paper's parameter "
                           "sharding)", choices=par.PARALLEL)
    fsdp_shard_size: int | None = option(None, "fsdp: shard over groups of this many processes (e.g. the 8 GPUs of "
                                         "a node) and replicate across groups (HSDP), as the paper sharded within a "
                                         "machine; default: over all processes")
    meta_init: bool = option(True, "fsdp: build the model on the meta device and initialise each process's shards "
                             "with the model's init_weights(), so the whole model never exists in one process (how "
                             "the paper-size presets start); off: build it whole first, as one process does")
    powersgd_rank: int | None = option(None, "ddp: compress the gradients with PowerSGD at this rank, with error "
                                       "feedback (paper 2.5: 512, 640, 896 for the 2.8B, 5.6B, 12B priors); "
                                       "default: plain all-reduce")
    powersgd_start: int = option(10, "ddp + PowerSGD: plain all-reduce for the first N updates (at least 2)")
    powersgd_16bit: bool = option(False, "ddp + PowerSGD: send the gradients and factors in bf16, 16 bits as the "
                                  "paper did (bf16, not fp16: torch orthogonalises the factors by Gram-Schmidt in "
                                  "that dtype, and fp16 norms underflow to NaN)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    seed: int = option(0, "seed of the initialisation and of the training noise")
    workers: int = option(0, "data-loading worker processes")
    log_every: int = option(25, "write a metrics row every this many updates")
    eval_every: int = option(250, "evaluate (EMA weights) and write samples every this many updates")
    checkpoint_every: int = option(250, "write a checkpoint every this many updates")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: bool = option(False, "continue the run in --out from its latest checkpoint (its saved options are "
                          "used; options given now override them)")
    stop_at_step: int | None = option(None, "end this session after this update with a checkpoint; --resume "
                                      "continues it")
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "also write TensorBoard events when the tensorboard package is installed")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.adam_betas = tuple(self.adam_betas)
        check(self.steps >= 1, self, "steps", "must be at least 1")
        check(self.time_limit is None or self.time_limit > 0, self, "time_limit", "must be positive")
        check(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        check(self.grad_accum >= 1, self, "grad_accum", "must be at least 1")
        check(self.lr > 0, self, "lr", "must be positive")
        check(0 <= self.lr_min <= self.lr, self, "lr_min", "must be in [0, lr]")
        check(0.0 <= self.warmup_fraction < 1.0, self, "warmup_fraction", "must be in [0, 1)")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), self, "adam_betas",
              "must be two numbers in [0, 1)")
        check(self.adam_eps > 0, self, "adam_eps", "must be positive")
        check(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        check(self.grad_clip is None or self.grad_clip > 0, self, "grad_clip", "must be positive")
        check(0.0 <= self.ema_decay < 1.0, self, "ema_decay", "must be in [0, 1)")
        check(self.amp in AMP_CHOICES, self, "amp", f"must be one of {', '.join(AMP_CHOICES)}")
        check(self.fp16_scaling in FP16_SCALING, self, "fp16_scaling", f"must be one of {', '.join(FP16_SCALING)}")
        check(self.parallel in par.PARALLEL, self, "parallel", f"must be one of {', '.join(par.PARALLEL)}")
        check(self.fsdp_shard_size is None or self.fsdp_shard_size >= 1, self, "fsdp_shard_size", "must be at least 1")
        check(self.powersgd_rank is None or self.powersgd_rank >= 1, self, "powersgd_rank", "must be at least 1")
        check(self.powersgd_rank is None or self.parallel == "ddp", self, "powersgd_rank",
              "needs --parallel ddp (PowerSGD is a DDP communication hook)")
        check(self.powersgd_start >= 2, self, "powersgd_start", "must be at least 2 (torch's hook needs two plain "
              "all-reduce iterations with error feedback)")
        check(self.threads is None or self.threads >= 1, self, "threads", "must be at least 1")
        check(self.workers >= 0, self, "workers", "must be >= 0")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            check(getattr(self, name) >= 1, self, name, "must be at least 1")
        check(self.keep_checkpoints >= 1, self, "keep_checkpoints", "must be at least 1")
        check(self.stop_at_step is None or self.stop_at_step >= 1, self, "stop_at_step", "must be at least 1")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)


def with_defaults(cls: type, name: str, **defaults: Any) -> type:
    """A subclass of config dataclass ``cls`` whose listed fields default to new values (help text kept), so each
    command shows its own defaults in ``--help``: ``with_defaults(TrainConfig, "DVAETrain", lr=3e-3)``."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(defaults) - set(hints))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}")
    fields = [(k, hints[k], dataclasses.field(default=v, metadata=_field(cls, k).metadata))
              for k, v in defaults.items()]
    new = dataclasses.make_dataclass(name, fields, bases=(cls,))
    new.__module__ = cls.__module__
    return new


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def config_for_run(cls: type, args: Any, saved: dict[str, Any] | None, prefix: str = "") -> Any:
    """``cls`` from the command line, or, for a resumed run, from its ``saved`` dict with the options given now
    (only those: the parser leaves the others out) applied on top; session fields always come from the command line."""
    if saved is None:
        from dalle.config import from_args

        return from_args(cls, args, prefix)
    values = {k: v for k, v in saved.items() if k not in SESSION_FIELDS}
    for f in dataclasses.fields(cls):
        dest = (prefix + f.name).replace("-", "_")
        if hasattr(args, dest):
            new = getattr(args, dest)
            if f.name in values and f.name not in SESSION_FIELDS and _plain(values[f.name]) != _plain(new):
                log.warning("resume: %s changes from %r to %r", f.name, values[f.name], new)
            values[f.name] = new
    return from_dict(cls, values)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, tuple | list) else (str(v) if isinstance(v, Path) else v)


def saved_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The configs stored in a run's latest checkpoint (``{"train": ..., "task": ...}``), or None without one."""
    latest = ck.latest_checkpoint(run_dir)
    return ck.read_json(latest / ck.CONFIG) if latest is not None else None
