"""dVAE throughput on CPU: training and encoding images/s, side by side with DALLE-pytorch's ``DiscreteVAE``.

Configurations (64-pixel images, 512 codes, 8× down-sampling to an 8×8 grid):

* ``ours tiny-64``: the ``tiny-64`` preset (n_hid 32, 1 resblock per group, 4 groups), batch 16 (the peer's) and
  32 (the default of ``dalle vae train``); its training FLOPs per image are within 1.3× of the peer's;
* ``peer``: ``DiscreteVAE(image_size=64, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=64)``,
  batch 16, the configuration of ``/work/shared/anchors/dalle_pytorch_bench.py``.

What differs (our architecture is the paper's): we have 7×7 input conv, resblocks of 4 convs, max-pools and nearest
up-sampling, and 1×1 convs into and out of the K code channels; the peer has 3 strided 4×4 convs each way and a 256-d
codebook. A training step is ours: Gumbel-softmax, logit-Laplace NLL + β·KL, backward, Adam, EMA update (the
:mod:`dalle.training.dvae_task` loss); the peer: ``vae(images, return_loss=True)`` (MSE, KL weight 0), backward, Adam,
exactly as the anchor script times it. Encoding: ours ``DVAE.encode`` (argmax, ``inference_mode``), the peer
``get_codebook_indices``; batch 16 for both. Data loading is excluded from both.

FLOPs per image are counted from the layer shapes (``torch.utils.flop_counter``: 2·Cin·Cout·k²·H·W per conv,
2·m·n·k per matmul) on one forward pass, ×3 for a training step (forward + backward); the achieved rate is compared
with this machine's fp32 matmul peak (≈130 GFLOP/s on 2 threads, and as measured here by a 2048² matmul).

Each measurement runs in its own process, ``--repeats`` times, and keeps the run with the lowest median step.

    .venv/bin/python bench/dvae_train.py            # print the table (~10 min on 2 cores)
    .venv/bin/python bench/dvae_train.py --write    # ... and record it in bench/RESULTS.md

The peer is installed offline beside the repo (see /work/shared/anchors/README.md; .peer/ is ignored by git)::

    .venv/bin/python -m pip install --no-deps --target .peer/site dalle-pytorch==1.6.6 rotary-embedding-torch==0.9.1 \
        axial-positional-embedding==0.3.12 einops==0.8.2 ...   # the list in the anchors README
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from _common import (
    PEAK_GFLOPS,
    THREADS,
    anchor_result,
    bench_main,
    emit,
    matmul_peak,
    peer_env,
    peer_installed,
    run_child,
    time_calls,
)

WARMUP, TIMED = 3, 20

# name → (implementation, batch size, model options)
CONFIGS = {
    "ours tiny-64 b16": ("ours", 16, {}),
    "ours tiny-64 b32": ("ours", 32, {}),
    "peer DiscreteVAE b16": ("peer", 16, {}),
}
PEER_VAE = dict(image_size=64, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=64)


# --- child side: one measurement per process ------------------------------------------------------------------


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.rand(n, 3, 64, 64, generator=g)  # (B, 3, H, W) in [0, 1], as the peer's harness feeds it


def _forward_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _ours(batch: int, options: dict) -> dict:
    from dalle.data.transforms import map_pixels
    from dalle.models.dvae import DVAE, preset
    from dalle.training.ema import EMA
    from dalle.training.losses import dvae_terms, likelihood_nll

    cfg = dataclasses.replace(preset("tiny-64"), **options)
    model = DVAE(cfg).to(memory_format=torch.channels_last)  # as dalle.training.dvae_task builds it
    ema = EMA(model, 0.999)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as dalle.training.loop builds it
    images = _images(batch).contiguous(memory_format=torch.channels_last)
    x = map_pixels(images)
    nll = likelihood_nll(cfg.likelihood)  # the preset's, as dalle vae train uses it

    def train_step():
        terms, _, _ = dvae_terms(model.encoder, model.decoder, x, tau=0.5, nll=nll)
        loss = terms.objective(beta=6.6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

    def encode():
        with torch.inference_mode():
            model.encode(images)

    flops = _forward_flops(lambda: dvae_terms(model.encoder, model.decoder, x[:1], tau=0.5, nll=nll)) * 3
    params = sum(p.numel() for p in model.parameters())
    return {"config": {**dataclasses.asdict(cfg), "batch": batch}, "params": params, "train_flops_per_image": flops,
            "train": time_calls(train_step, TIMED, WARMUP),
            "encode": time_calls(encode, TIMED, WARMUP)}


def _peer(batch: int, options: dict) -> dict:
    import dalle_pytorch

    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(**PEER_VAE).train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    images = _images(batch)

    def train_step():
        loss = vae(images, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def encode():
        with torch.inference_mode():
            vae.get_codebook_indices(images)

    flops = _forward_flops(lambda: vae(images[:1], return_loss=True)) * 3
    params = sum(p.numel() for p in vae.parameters())
    return {"config": {**PEER_VAE, "batch": batch, "version": dalle_pytorch.__version__}, "params": params,
            "train_flops_per_image": flops, "train": time_calls(train_step, TIMED, WARMUP),
            "encode": time_calls(encode, TIMED, WARMUP)}


def child(name: str) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if name == "matmul":
        out = {"gflops": matmul_peak()}
    else:
        impl, batch, options = CONFIGS[name]
        out = (_ours if impl == "ours" else _peer)(batch, options)
    emit(out)


# --- parent side ----------------------------------------------------------------------------------------------


def summarise(r: dict) -> dict:
    batch = r["config"]["batch"]
    train_s, encode_s = statistics.median(r["train"]), statistics.median(r["encode"])
    train_ips = batch / train_s
    return {**r, "train_images_per_s": train_ips, "encode_images_per_s": batch / encode_s,
            "train_gflops": train_ips * r["train_flops_per_image"] / 1e9, "train_ms_per_step": 1e3 * train_s}


def measure(repeats: int) -> dict:
    env = peer_env()
    results: dict[str, dict] = {"matmul": max((run_child(__file__, ["--child", "matmul"], env) for _ in range(repeats)),
                                              key=lambda r: r["gflops"])}
    for name in CONFIGS:
        if CONFIGS[name][0] == "peer" and not peer_installed():
            print(f"skipping {name}: the peer is not installed in .peer/site", file=sys.stderr)
            continue
        runs = []
        for rep in range(repeats):
            t0 = time.time()
            runs.append(summarise(run_child(__file__, ["--child", name], env)))
            print(f"[{name} #{rep}] {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        best = min(runs, key=lambda r: r["train_ms_per_step"])
        best["encode_images_per_s"] = max(r["encode_images_per_s"] for r in runs)
        best["train_ms_per_step_all"] = [round(r["train_ms_per_step"], 1) for r in runs]
        results[name] = best
    anchor_run = anchor_result("vae_train", env)  # the anchor script's own figure, run in this job
    results["anchor"] = anchor_run["images_per_s_median_step"] if anchor_run else None
    return results


def table(results: dict) -> str:
    anchor = results.get("anchor")
    peak = results["matmul"]["gflops"]
    peer = results.get("peer DiscreteVAE b16")
    lines = ["| configuration | params | train GFLOP/image | train images/s | ms/step | GFLOP/s | % of 130 | "
             "% of measured peak | encode images/s | train vs peer | encode vs peer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in CONFIGS:
        r = results.get(name)
        if r is None:
            continue
        vs = (f"{r['train_images_per_s'] / peer['train_images_per_s']:.2f}×",
              f"{r['encode_images_per_s'] / peer['encode_images_per_s']:.2f}×") if peer else ("", "")
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['train_flops_per_image'] / 1e9:.2f} | "
                     f"{r['train_images_per_s']:.1f} | {r['train_ms_per_step']:.0f} | {r['train_gflops']:.1f} | "
                     f"{100 * r['train_gflops'] / PEAK_GFLOPS:.1f}% | {100 * r['train_gflops'] / peak:.1f}% | "
                     f"{r['encode_images_per_s']:.0f} | {vs[0]} | {vs[1]} |")
    lines.append("")
    lines.append(f"measured fp32 matmul peak (2048², {THREADS} threads): {peak:.0f} GFLOP/s")
    if anchor is not None:
        lines.append(f"anchor script's own DiscreteVAE figure in this job: {anchor:.0f} images/s (median step)")
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__, child, measure, table, "dvae_train", "dVAE training and encoding (`bench/dvae_train.py`)",
               "bench/dvae_train.py", [f"{THREADS} torch threads; {WARMUP} warm-up + {TIMED} timed steps per "
                                       "process, best of the repeats by median step; 64 px, 512 codes, 8×8 grid; "
                                       "data loading excluded"])


if __name__ == "__main__":
    main()
