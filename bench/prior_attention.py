#!/usr/bin/env python
"""Time one attention layer and one transformer block of the prior: dense causal vs row / column / conv masks, with
each attention implementation, forward + backward (training) and forward only (inference).

Two shapes: the peer benchmark's (DALLE-pytorch: 32 text + 8×8 image tokens, batch 16, dim 256, 8 heads × 32) and a
paper-like length (128 text + 32×32 image tokens, batch 2, dim 512, 8 heads × 64). Every measurement runs the same
number of times, round-robin, so the noise of a shared machine falls on all of them alike; the table shows the
median (and the minimum) in ms and the speed-up over the dense causal layer of the same shape.

    python bench/prior_attention.py                  # both shapes, 2 threads, no FlexAttention
    python bench/prior_attention.py --flex           # add compiled FlexAttention (forward only on CPU; slow compile)
    python bench/prior_attention.py --shape paper --repeats 15 --threads 1 --clock cpu   # least noisy
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall every parallel op when other processes hold the cores (a shared CI
# machine): many short ops suffer most. Passive waiting must be chosen before torch loads the OpenMP runtime; set
# OMP_WAIT_POLICY=ACTIVE in the environment to measure the default behaviour instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from dalle.models import attention as A  # noqa: E402
from dalle.models.transformer import Block, preset  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    dim: int
    n_heads: int
    head_dim: int
    text_len: int
    grid_size: int
    conv_kernel: int


# wall: elapsed time. cpu: CPU time of this process (all threads), which a busy shared machine inflates far less
# (time spent waiting for a core is not counted); with --threads 1 it is the cleanest comparison of algorithms.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

SHAPES = {
    "peer": Shape("peer", batch=16, dim=256, n_heads=8, head_dim=32, text_len=32, grid_size=8, conv_kernel=5),
    "paper": Shape("paper", batch=2, dim=512, n_heads=8, head_dim=64, text_len=128, grid_size=32, conv_kernel=11),
}


def cases(shape: Shape, flex: bool) -> list[tuple[str, str]]:
    """(kind, impl) pairs to time; the first is the baseline."""
    out = [("dense", "causal")]
    for kind in ("row", "column", "conv"):
        out += [(kind, "dense"), (kind, "gather")] + ([(kind, "flex")] if flex else [])
    return out


def attention_step(shape: Shape, kind: str, impl: str, train: bool) -> Callable[[], None]:
    layout = A.Layout(shape.text_len, shape.grid_size, shape.conv_kernel)
    qkv = torch.randn(shape.batch, layout.seq_len, 3, shape.n_heads, shape.head_dim, requires_grad=train)
    grad = torch.randn(shape.batch, layout.seq_len, shape.n_heads, shape.head_dim)
    impl = "auto" if impl == "causal" else impl

    def step() -> None:
        if train:
            A.attend(qkv, kind, layout, impl).backward(grad)
            qkv.grad = None
        else:
            with torch.no_grad():
                A.attend(qkv, kind, layout, impl)
    return step


def block_step(shape: Shape, kind: str, impl: str, train: bool) -> Callable[[], None]:
    config = preset("tiny", dim=shape.dim, n_heads=shape.n_heads, head_dim=shape.head_dim, text_len=shape.text_len,
                    grid_size=shape.grid_size, conv_kernel=shape.conv_kernel, n_layers=1,
                    attn_impl="auto" if impl == "causal" else impl)
    block = Block(config, kind)
    x = torch.randn(shape.batch, config.seq_len, shape.dim, requires_grad=train)
    grad = torch.randn_like(x)

    def step() -> None:
        if train:
            block(x).backward(grad)
            block.zero_grad(set_to_none=True)
            x.grad = None
        else:
            with torch.no_grad():
                block(x)
    return step


def measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
            clock: Callable[[], float]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        for _ in range(warmup):
            step()
    for _ in range(repeats):
        for key, step in steps.items():
            start = clock()
            step()
            times[key].append((clock() - start) * 1e3)
    return times


def run_shape(shape: Shape, args: argparse.Namespace) -> list[dict]:
    rows = []
    for unit, make in (("attention", attention_step), ("block", block_step)):
        if args.unit not in ("all", unit):
            continue
        for train in (True, False):
            steps = {}
            for kind, impl in cases(shape, args.flex):
                if impl == "flex" and train:
                    continue  # torch 2.13: no FlexAttention backward on CPU
                steps[f"{kind}/{impl}"] = make(shape, kind, impl, train)
            times = measure(steps, args.repeats, args.warmup, CLOCKS[args.clock])
            base = statistics.median(times["dense/causal"])
            for key, ts in times.items():
                kind, impl = key.split("/")
                rows.append(dict(shape=shape.name, unit=unit, mode="fwd+bwd" if train else "fwd", kind=kind,
                                 impl=impl, median_ms=statistics.median(ts), min_ms=min(ts),
                                 speedup=base / statistics.median(ts)))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':6} {'unit':9} {'mode':7} {'kind':6} {'impl':6} {'median ms':>10} {'min ms':>8} {'vs dense':>8}")
    for r in rows:
        print(f"{r['shape']:6} {r['unit']:9} {r['mode']:7} {r['kind']:6} {r['impl']:6} {r['median_ms']:10.1f} "
              f"{r['min_ms']:8.1f} {r['speedup']:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--unit", choices=["attention", "block", "all"], default="all",
                        help="time one attention layer, one transformer block, or both")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the peer benchmark uses 2)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of every case, round-robin")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="what to time (see CLOCKS)")
    parser.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (forward only on CPU)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*lru_cache.*")
    shapes = SHAPES.values() if args.shape == "all" else [SHAPES[args.shape]]
    rows = [r for shape in shapes for r in run_shape(shape, args)]
    print(f"# torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"{platform.processor() or platform.machine()}, {args.clock} clock, {args.repeats} repeats, load average "
          f"{os.getloadavg()[0]:.1f}; speed-up = median of dense causal / median")
    print_table(rows)
    if args.out:
        meta = dict(torch=torch.__version__, threads=args.threads, repeats=args.repeats, clock=args.clock,
                    omp_wait_policy=os.environ["OMP_WAIT_POLICY"], load_average=os.getloadavg()[0])
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
