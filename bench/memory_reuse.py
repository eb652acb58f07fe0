"""What keeping freed memory for reuse (``dalle.runtime.keep_freed_memory``, which every ``dalle`` command calls) saves
in CPU training steps: the same steps in fresh processes with glibc's default malloc and with the setting.

With the default, glibc gives large freed blocks back to the kernel, and the next step faults their pages in again
(one minor fault per 4 KiB, each zero-filled by the kernel). The children time training steps of the ``tiny-64``
dVAE (batch 32, channels-last, Gumbel-softmax codes, squared error) and of the ``tiny`` prior with 8×8 and 16×16
codes (batch 16, fused AdamW), on random inputs in fp32, and count the minor page faults of the timed steps. The two
settings alternate, one process each per round, so both see the same stretch of a shared machine.

    .venv/bin/python bench/memory_reuse.py              # ~3 min on 2 cores
    .venv/bin/python bench/memory_reuse.py --write      # ... and record it in bench/RESULTS.md
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
from pathlib import Path

from _common import THREADS, bench_main, emit, run_child  # noqa: E402

MODELS = ("dvae", "prior-8x8", "prior-16x16")
SETTINGS = ("default", "reuse")
WARMUP, TIMED = 3, 8


def _dvae_step():
    import torch
    import torch.nn.functional as F

    from dalle.models.dvae import DVAE, preset

    cfg = preset("tiny-64")
    model = DVAE(cfg).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(32, 3, cfg.resolution, cfg.resolution).to(memory_format=torch.channels_last)

    def step():
        z = F.gumbel_softmax(model.encoder(x), tau=1.0, dim=1)
        loss = (model.decoder(z)[:, :3] - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _prior_step(grid: int):
    import torch

    from dalle.models.transformer import PriorTransformer, preset

    cfg = preset("tiny", grid_size=grid)
    model = PriorTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)
    ids = torch.randint(0, cfg.text_vocab_size, (16, cfg.text_len))
    pad = torch.zeros(16, cfg.text_len, dtype=torch.bool)
    codes = torch.randint(0, cfg.codebook_size, (16, grid, grid))

    def step():
        loss = model.loss(ids, pad, codes).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def child(name: str) -> None:
    model, setting = name.rsplit(":", 1)
    if setting == "reuse":
        from dalle.runtime import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory() did not apply on this machine")
    import time

    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    step = _dvae_step() if model == "dvae" else _prior_step(int(model.split("-")[1].split("x")[0]))
    times, faults = [], 0
    for i in range(WARMUP + TIMED):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    emit({"ms": 1000 * statistics.median(times), "faults": faults / TIMED,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(repeats: int) -> dict:
    from dalle.runtime import MALLOC_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1] / "src"),
                                                    env.get("PYTHONPATH")) if p)
    results: dict[str, list[dict]] = {}
    for round_ in range(repeats):
        for model in MODELS:
            for setting in SETTINGS:
                key = f"{model}:{setting}"
                results.setdefault(key, []).append(run_child(__file__, ["--child", key], env))
                print(f"round {round_ + 1}: {key} {results[key][-1]}", file=sys.stderr, flush=True)
    return results


def table(results: dict) -> str:
    lines = ["| model | malloc | ms/step (median of rounds) | minor page faults per step | peak RSS MiB | "
             "speed-up within each round (median, range) |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for model in MODELS:
        default, reuse = results[f"{model}:default"], results[f"{model}:reuse"]
        ratios = sorted(d["ms"] / r["ms"] for d, r in zip(default, reuse))
        for setting, runs in (("glibc default", default), ("freed memory kept", reuse)):
            ratio = (f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}-{ratios[-1]:.2f})"
                     if runs is reuse else "")
            lines.append(f"| {model} | {setting} | {statistics.median(r['ms'] for r in runs):.0f} | "
                         f"{statistics.median(r['faults'] for r in runs):,.0f} | "
                         f"{max(r['peak_rss_mib'] for r in runs):.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    bench_main(__doc__, child, measure, table, "memory_reuse",
               "CPU memory reuse in training steps (`bench/memory_reuse.py`)", "bench/memory_reuse.py",
               [f"{THREADS} torch threads, fp32, random inputs; {WARMUP} warm-up + {TIMED} timed steps per process; "
                "the two malloc settings alternate, one process each per round (--repeats rounds)"])
