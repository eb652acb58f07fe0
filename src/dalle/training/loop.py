"""A training loop that knows nothing about dVAEs or transformers (in the spirit of minGPT's ``Trainer``).

A :class:`Task` builds the model, turns a batch into a loss, evaluates, draws samples and exports the result; the
:class:`Trainer` does everything else: optimizer steps with gradient accumulation and clipping, the learning-rate
schedule, the EMA of the weights (paper appendix A.2: the EMA is what gets evaluated and shipped), mixed precision,
a progress bar, CSV/TensorBoard metrics, periodic evaluation and atomic checkpoints.

Resuming is exact: a checkpoint holds the model, EMA, optimizer, RNG states, the metrics accumulated since the last log
line and the data position. Data come epoch by epoch from ``task.train_batches(epoch)``, which must be deterministic
given the epoch (the data pipeline seeds its shuffle and crops by (seed, epoch)); the position is (epoch, batches used
in that epoch), and a resumed run re-opens that epoch and skips the batches already used, so it sees exactly the
batches an uninterrupted run would have seen. (The skipped batches are read again, which costs at most one epoch of
data loading.) Evaluation and sampling run under a forked RNG, so they never shift the training random stream.

SIGINT / SIGTERM finish the current update, write a checkpoint and return; a second SIGINT aborts at once. An
exception between updates also writes a checkpoint before it propagates, so a crash loses nothing (with one process;
several processes cannot agree on a crash, so there the last periodic checkpoint is what remains).

Several processes (``torchrun``), mixed precision with per-block gradient scaling and activation checkpointing are
applied from outside the task: :mod:`dalle.training.distributed` and :mod:`dalle.training.precision`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dalle import checkpoint as ck
from dalle.config import to_dict
from dalle.data.loader import whole_data
from dalle.errors import UserError
from dalle.training import distributed as par
from dalle.training.config import SESSION_FIELDS, TrainConfig
from dalle.training.logging import MetricsWriter, format_metrics
from dalle.training.precision import autocast_dtype
from dalle.training.schedules import learning_rate

log = logging.getLogger(__name__)

# --time-limit: the run's length is planned once the speed has settled, then again every PLAN_EVERY updates (the
# speed of a shared machine drifts, and evaluations add their share as they happen). Each plan reads the speed of the
# later half of this session's updates, never of the first PLAN_WARMUP: the first updates pay for the first batch,
# kernel choice and memory, and on a freshly set-up machine `make demo`'s dVAE ran its first 30 or so updates 30%
# slower. A plan cut short on such a start is restored later, but the schedules have changed on the way (a dVAE
# keeping 45% of shapes instead of 55%). The first plan waits for PLAN_SETTLE updates, or for PLAN_SETTLE_FRACTION of
# the limit where updates are slow, and for at least PLAN_AFTER.
PLAN_WARMUP, PLAN_AFTER, PLAN_EVERY, PLAN_SETTLE, PLAN_SETTLE_FRACTION = 3, 10, 25, 50, 0.05


class Task(abc.ABC):
    """What the trainer needs from a training stage. ``setup`` is called first, with the run's config and device."""

    cfg: TrainConfig
    device: torch.device
    progress_keys: tuple[str, ...] = ()  # metrics shown in the progress bar besides loss and lr
    meta_init = False  # build_model() works on the meta device and the model has init_weights() (see meta_init)

    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        """With N processes ``cfg.batch_size`` is this process's share of the micro-batch (the run's / N)."""
        self.cfg, self.device = cfg, device

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The task's JSON-ready configuration, stored in every checkpoint (resume checks it)."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (the global RNG is seeded just before)."""

    @abc.abstractmethod
    def train_batches(self, epoch: int) -> Iterable[Any]:
        """One epoch of training batches, the same for the same epoch on every call."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(scalar loss to minimise, metrics to log) for one micro-batch at update ``step`` (0-based)."""

    @abc.abstractmethod
    def export(self, model: nn.Module, path: Path) -> None:
        """Write the finished (EMA) model where the next stage can load it."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Metrics of the EMA ``model`` on held-out data."""
        return {}

    def write_samples(self, model: nn.Module, step: int, out_dir: Path) -> Path | None:
        """Write a picture of what the EMA ``model`` does now; returns its path."""
        return None

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's residual blocks: the unit of FSDP sharding, activation checkpointing and per-block gradient
        scaling (default: ``model.blocks`` when it is a ModuleList; none otherwise)."""
        blocks = getattr(model, "blocks", None)
        return list(blocks) if isinstance(blocks, nn.ModuleList) else []

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (default: one). A group may set its own ``weight_decay`` and an
        ``lr_scale``: its learning rate as a multiple of the schedule's."""
        return [{"params": list(model.parameters())}]

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # AdamW with --weight-decay (0 by default: then exactly Adam) over the task's parameter groups.
        cfg = self.cfg
        groups = self.param_groups(getattr(model, "module", model))  # the model itself under DistributedDataParallel
        # The fused kernel updates every tensor in one pass (the per-tensor loop's update, up to rounding): ~10 ms
        # (4%) less per step of the tiny prior on 2 CPU cores, where the loop is PyTorch's default.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, fused=fused or None)

    def data_summary(self) -> str:
        """What the data pipeline used and skipped, printed at the end of the run."""
        return ""

    def set_steps(self, steps: int) -> None:
        """The run's length changed (``--time-limit``); schedules laid out over ``cfg.steps`` follow it."""
        self.cfg = dataclasses.replace(self.cfg, steps=steps)


class EpochStream:
    """Batches of ``make_epoch(0)``, ``make_epoch(1)``, ... with the position (epoch, batches used in that epoch).

    ``any_process`` (several processes) makes all of them end an epoch together, when the first runs out of batches
    (their shards of a streamed dataset can differ in size), so they all take the same steps and share one position.
    """

    def __init__(self, make_epoch: Callable[[int], Iterable[Any]], epoch: int = 0, batch: int = 0,
                 any_process: Callable[[bool], bool] | None = None):
        self.make_epoch, self.epoch, self.batch = make_epoch, epoch, batch
        self.any_process = any_process
        self.skipped_on_resume = 0
        self._it: Iterator[Any] | None = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> Any:
        # Starting a DataLoader draws its base seed from the global torch RNG; a resumed run starts one where an
        # uninterrupted run does not, so data loading must not touch the training RNG at all.
        with torch.random.fork_rng(devices=[]):
            return self._next()

    def _next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.make_epoch(self.epoch))
                for _ in range(self.batch):  # resuming inside an epoch: skip what was already used
                    next(self._it, None)
                    self.skipped_on_resume += 1
            item = next(self._it, _END)
            ended = self.any_process(item is _END) if self.any_process is not None else item is _END
            if not ended:
                self.batch += 1
                return item
            used = self.batch
            self.close()
            self.epoch, self.batch = self.epoch + 1, 0
            if used == 0:
                break
        raise UserError(f"training data epoch {self.epoch - 1} yielded no batch: the dataset has fewer usable "
                        "examples than one batch")

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


_END = object()


@dataclasses.dataclass
class TrainResult:
    step: int
    status: str  # "complete", "stopped" (stop_at_step) or "interrupted" (signal)
    eval: dict[str, float]
    wall_s: float
    model_dir: Path | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    return device


class _Signals:
    """First SIGINT/SIGTERM: ask the loop to stop after this update. Second SIGINT: KeyboardInterrupt."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("\n%s received: finishing this update and writing a checkpoint (Ctrl-C again aborts)",
                    signal.Signals(signum).name)

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class _NoMetrics:
    """The metrics writer of processes other than rank 0: they compute the same averaged rows but write nothing."""

    def log(self, kind: str, step: int, row: dict[str, float]) -> None:
        pass

    def resume_at(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    def __init__(self, task: Task, cfg: TrainConfig):
        self.task, self.cfg = task, cfg
        device = resolve_device(cfg.device)
        self.procs = par.Processes.from_env(device)
        self.device = self.procs.place(device)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.step = 0
        self.elapsed = 0.0  # seconds of training (all sessions), evaluation included
        self._session_start = time.perf_counter()
        self._safe = True  # False while an update is half done: a checkpoint then would not resume exactly
        self._acc: dict[str, float] = {}
        self._acc_n = 0
        self.last_eval: dict[str, float] = {}
        self._evaluated = False  # in this session (every process knows; only rank 0 holds the values)

    # --- set-up ------------------------------------------------------------------------------------------------

    def _build(self) -> None:
        cfg, procs = self.cfg, self.procs
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        local = dataclasses.replace(cfg, batch_size=procs.local_batch_size(cfg.batch_size)) if procs.enabled else cfg
        self.task.setup(local, self.device)
        with whole_data():  # a data-dependent initialisation reads the same images in every process
            self.prep = par.prepare(self.task, cfg, procs, self.device, self.amp_dtype)
        self.model, self.ema, self.scaling = self.prep.model, self.prep.ema, self.prep.scaling
        self.opt = self.task.optimizer(self.model)
        self.metrics = MetricsWriter(cfg.out, cfg.tensorboard) if procs.is_main else _NoMetrics()
        self.stream = self._stream()
        self._data_pos = self.stream.position()
        if procs.enabled:
            log.info("rank %d of %d on %s: %s, %d examples per process and micro-batch", procs.rank,
                     procs.world_size, self.device, self.prep.mode, local.batch_size)

    def _stream(self, epoch: int = 0, batch: int = 0) -> EpochStream:
        return EpochStream(self.task.train_batches, epoch, batch, self.procs.any if self.procs.enabled else None)

    def _run_config(self) -> dict[str, Any]:
        train = {k: v for k, v in to_dict(self.cfg).items() if k not in SESSION_FIELDS}
        return {"train": train, "task": self.task.config()}

    def _restore(self) -> bool:
        cfg = self.cfg
        latest = ck.latest_checkpoint(cfg.out)
        if latest is None:
            if cfg.resume:
                log.info("no checkpoint in %s: starting a new run", cfg.out)
            return False
        if not cfg.resume:
            raise UserError(f"{cfg.out} already holds a run (checkpoint {latest.name}); pass --resume to continue "
                            "it or choose another --out")
        weights = self.procs.is_main or not self.prep.sharded  # under fsdp rank 0 reads and scatters them
        config, tensors, state = par.read_checkpoint(latest, weights, "cpu" if self.prep.sharded else self.device)
        saved, now = config.get("task", {}), self.task.config()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed and self.procs.is_main:
            log.warning("resume: task options differ from the checkpoint's (%s); the run will not match an "
                        "uninterrupted one", ", ".join(changed))
        try:
            self.prep.load_states(self.opt, tensors, state)
        except RuntimeError as e:
            raise UserError(f"cannot resume {cfg.out}: the checkpoint does not fit the model "
                            f"({str(e).splitlines()[0]})") from None
        ck.set_rng_state({k: v.cpu() for k, v in tensors["rng"].items()}, state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        self._acc, self._acc_n = state["metrics_acc"], state["metrics_acc_n"]
        self.stream = self._stream(**state["data"])
        self._data_pos = self.stream.position()
        self.metrics.resume_at(self.step)
        if self.procs.is_main:
            log.info("resumed %s at step %d (epoch %d, batch %d)", cfg.out, self.step, self.stream.epoch,
                     self.stream.batch)
        return True

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; under fsdp every process takes part in gathering it); its path on rank 0."""
        model, ema, opt = self.prep.full_states(self.opt)
        path = None
        if self.procs.is_main:
            opt_tensors, opt_meta = ck.optimizer_to_tensors(opt)
            rng_tensors, rng_meta = ck.rng_state()
            state = {"elapsed_s": self._elapsed(), "ema_updates": self.ema.updates, "data": self._data_pos,
                     "metrics_acc": self._acc, "metrics_acc_n": self._acc_n, "optimizer": opt_meta, "rng": rng_meta,
                     "grad_scaling": self.scaling.state_dict() if self.scaling is not None else None}
            tensors = {"model": model, "ema": ema, "optimizer": opt_tensors, "rng": rng_tensors}
            path = ck.save_checkpoint(self.cfg.out, self.step, config=self._run_config(), tensors=tensors,
                                      state=state, keep=self.cfg.keep_checkpoints)
        self.procs.barrier()
        self._saved_step = self.step
        return path

    def _elapsed(self) -> float:
        return self.elapsed + time.perf_counter() - self._session_start

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self.procs.close()

    def _run(self) -> TrainResult:
        cfg, main = self.cfg, self.procs.is_main
        self._build()
        self._restore()
        self._session_start = time.perf_counter()
        self._saved_step = self.step
        self._session_first_step, self._max_steps = self.step, cfg.steps
        self._update_times: list[float] = []  # the clock after each update of this session from PLAN_WARMUP on
        self._next_plan: int | None = None  # updates of this session after which to plan next (None: not yet settled)
        if main:
            cfg.out.mkdir(parents=True, exist_ok=True)
            ck.write_text_atomic(cfg.out / "config.json", _json(self._run_config()))
        status = "complete"
        bar = _progress(cfg, self.step, main)
        try:
            with _Signals() as signals:
                while self.step < self.cfg.steps:
                    if self.procs.any(signals.received is not None):  # every process stops after the same update
                        status = "interrupted"
                        break
                    if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                        status = "stopped"
                        break
                    self._update(bar)
                    self._periodic(bar)
                    self._plan(bar)
                if status == "complete" and not self._evaluated:
                    self._evaluate(bar, record=False)  # a resumed, finished run still reports its metrics
            if self._saved_step != self.step:
                self.save_checkpoint()
        except BaseException:
            # Several processes cannot agree on writing a checkpoint after one of them failed.
            if self._safe and self._saved_step != self.step and not self.procs.enabled:
                path = self.save_checkpoint()
                log.error("training failed after step %d; checkpoint written to %s", self.step, path)
            raise
        finally:
            bar.close()
            self.stream.close()
            self.metrics.close()
        model_dir = self._export() if status == "complete" else None
        if main:
            self._report(status, model_dir)
        return TrainResult(self.step, status, self.last_eval, self._elapsed(), model_dir)

    def _plan(self, bar: Any) -> None:
        """With a time limit: lay the run out over the updates that fit in the time left at the speed measured in
        this session so far (its evaluations included), between one more update and the --steps given."""
        limit, done = self.cfg.time_limit, self.step - self._session_first_step
        if limit is None:
            return
        if done >= PLAN_WARMUP:
            self._update_times.append(time.perf_counter())  # index i: after update PLAN_WARMUP + i
        if done < PLAN_AFTER or self.step >= self.cfg.steps:
            return
        if self._next_plan is None:
            # Every process takes the same decision (any of them past the fraction), so they plan together.
            if done < PLAN_SETTLE and not self.procs.any(self._elapsed() >= PLAN_SETTLE_FRACTION * limit):
                return
        elif done < self._next_plan:
            return
        self._next_plan = done + PLAN_EVERY
        start = max(PLAN_WARMUP, done // 2)
        # Every process plans from the same (averaged) numbers, so they all stop after the same update.
        clock = self.procs.mean({"measured": self._update_times[-1] - self._update_times[start - PLAN_WARMUP],
                                 "elapsed": self._elapsed()})
        per_update = clock["measured"] / (done - start)
        fits = self.step + int(0.98 * (limit - clock["elapsed"]) / per_update)
        steps = max(self.step + 1, min(self._max_steps, fits))
        if steps == self.cfg.steps:
            return
        if self.procs.is_main and (done == PLAN_AFTER or abs(steps - self.cfg.steps) > 0.05 * self.cfg.steps):
            _say(bar, f"time limit {limit:.0f} s: {steps} of at most {self._max_steps} updates fit at "
                      f"{per_update:.2f} s each")
        self.cfg = dataclasses.replace(self.cfg, steps=steps)
        self.task.set_steps(steps)
        bar.total = steps
        bar.refresh()

    def _export(self) -> Path | None:
        """Rank 0 writes the EMA model and returns where; the others wait and return None."""
        model_dir = self.cfg.out / "model"
        model = self._whole_ema()
        if model is not None:
            self.task.export(model, model_dir)
        self.procs.barrier()
        return model_dir if self.procs.is_main else None

    def _report(self, status: str, model_dir: Path | None) -> None:
        cfg = self.cfg
        summary = self.task.data_summary()
        if summary:
            log.info("data: %s", summary.replace("\n", "\n  "))
        if self.stream.skipped_on_resume:
            log.info("data: %d batches already used before the resume were read again and skipped",
                     self.stream.skipped_on_resume)
        saving = self.prep.powersgd_saving()
        if saving is not None:
            log.info("PowerSGD at rank %d saved %.1f%% of the fp32 gradient bytes of the updates it compressed",
                     cfg.powersgd_rank, 100 * saving)
        if cfg.steps < self._max_steps:
            log.info("time limit %.0f s: the run was laid out over %d of the %d updates --steps allowed",
                     cfg.time_limit, cfg.steps, self._max_steps)
        log.info("%s at step %d of %d (%.0f s); %s", status, self.step, cfg.steps, self._elapsed(),
                 f"model exported to {model_dir}" if model_dir else f"resume with --resume --out {cfg.out}")

    def _update(self, bar: Any) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        # Data first: a failure while reading leaves the state of the last completed update intact (and saved).
        batches = [next(self.stream) for _ in range(cfg.grad_accum)]
        self._safe = False
        self.procs.reseed(cfg.seed, self.step)
        lr = learning_rate(self.step, cfg.steps, cfg.lr, cfg.lr_min, cfg.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a task may run a group at a multiple of the rate
        self.model.train()
        totals = self._backward(batches)
        totals = self.procs.mean(totals)  # every process logs, and decides on, the same numbers
        finite = totals.pop("nonfinite_loss") == 0
        grads_ok = self.scaling.unscale_() if self.scaling is not None else True
        if finite and grads_ok:
            if cfg.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                totals["grad_norm"] = par.grad_norm_value(norm)
            self.opt.step()
            self.ema.update(self.model)
        else:
            totals["skipped_updates"] = 1.0
            if not finite and self.procs.is_main:
                log.warning("step %d: non-finite loss, update skipped", self.step)
        if self.scaling is not None:
            self.scaling.update()  # an fp16 overflow lowers the scale of the group to blame (precision.py)
            totals.update(self.scaling.summary())
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self._data_pos = self.stream.position()
        self._safe = True
        totals["lr"] = lr
        totals["step_s"] = time.perf_counter() - t0
        for k, v in totals.items():
            self._acc[k] = self._acc.get(k, 0.0) + v
        self._acc_n += 1
        bar.update(1)

    def _backward(self, batches: list[Any]) -> dict[str, float]:
        """Forward and backward passes of the micro-batches of one update: their mean loss and metrics."""
        totals: dict[str, float] = {"nonfinite_loss": 0.0}
        for i, batch in enumerate(batches):
            with self.prep.sync(last=i == len(batches) - 1):
                with self._autocast():
                    loss, metrics = self.prep.loss(batch, self.step)
                scaled = loss / len(batches)
                (self.scaling.scale_loss(scaled) if self.scaling is not None else scaled).backward()
            value = float(loss.detach())
            if not math.isfinite(value):
                totals["nonfinite_loss"] = 1.0
            for k, v in {"loss": value, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
        return totals

    def _periodic(self, bar: Any) -> None:
        cfg, step = self.cfg, self.step
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {k: v / self._acc_n for k, v in self._acc.items()}
            row["skipped_updates"] = self._acc.get("skipped_updates", 0.0)
            row["epoch"] = self.stream.epoch
            row["elapsed_s"] = self._elapsed()
            saving = self.prep.powersgd_saving()
            if saving is not None:
                row["powersgd_saving"] = saving
            self._acc, self._acc_n = {}, 0
            self.metrics.log("train", step, row)
            bar.set_postfix_str(format_metrics(row, ["loss", "lr"] + self.task_keys(row)), refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            self._evaluate(bar)
        if step % cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def task_keys(self, row: dict[str, float]) -> list[str]:
        return [k for k in getattr(self.task, "progress_keys", ()) if k in row]

    def _evaluate(self, bar: Any, record: bool = True) -> None:
        """Evaluate the EMA model (and draw samples) on rank 0 over the whole validation data; the others wait."""
        self._evaluated = True
        model = self._whole_ema()
        if model is not None:
            with self._forked_rng(), torch.no_grad(), whole_data():
                values = self.task.evaluate(model, self.step)
                sample = self.task.write_samples(model, self.step, self.cfg.out / "samples") if record else None
            if values:
                if record:
                    self.metrics.log("eval", self.step, values)
                self.last_eval = values
                message = f"step {self.step}: {format_metrics(values)}"
                if sample is not None:
                    message += f"  [{sample}]"
                _say(bar, message)
        self.procs.barrier()

    def _whole_ema(self) -> nn.Module | None:
        """The EMA model, whole, on rank 0 (gathered from its shards under fsdp: a collective); None elsewhere."""
        with self._forked_rng(), whole_data():  # building rank 0's copy must not move the training random stream
            return self.prep.whole_ema(self.task, self.device, self.procs.is_main, self.cfg.meta_init)

    @contextmanager
    def _forked_rng(self) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            state = (np.random.get_state(), random.getstate())
            try:
                yield
            finally:
                np.random.set_state(state[0])
                random.setstate(state[1])

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def _progress(cfg: TrainConfig, start: int, show: bool = True) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and show), unit="step", dynamic_ncols=True,
                smoothing=0.05)


def _say(bar: Any, message: str) -> None:
    if getattr(bar, "disable", True):
        log.info(message)
    else:
        bar.write(message)


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"
