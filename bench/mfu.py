"""Model FLOPs utilisation (MFU) of prior training: the model FLOP/s a training step achieves ÷ this machine's matmul
peak, measured in the same run.

* **Model FLOPs per step** are counted by ``torch.utils.flop_counter`` on one forward and backward pass of the exact
  configuration (every matrix product and attention call as executed; no activation recomputation, which would be
  hardware FLOPs, not model FLOPs). The sparse attention's ``gather`` path computes only the row blocks a layer's mask
  reaches, so its count is below the dense one at the same length. The analytic 6·N·T (N = parameters in the blocks,
  T = tokens per step) is shown beside it.
* **Peak**: the best of a few n×n matrix products in the step's dtype, in this process: fp32 2048² on CPU
  (``_common.matmul_peak``, with the benchmark's threads), bf16 8192² on CUDA (timed with CUDA events).
* **Step**: what ``dalle train`` does per update: the 1/8 text + 7/8 image loss under autocast, backward, gradient
  norm clipping, AdamW with the paper's weight-decay groups; token ids in, no data loading. Median of the timed steps.

Configurations: on CPU the ``tiny`` preset at the peer's shape (32 text + 8×8 image tokens, batch 16) and at a
paper-like length (128 text + 32×32 image, batch 2), fp32. On CUDA (``--device cuda``): a 353M-parameter prior at a
paper-like length: dim 1024, 24 layers, 16 heads × 64, 128 text + 32×32 image tokens, the paper's 16,384-token text
vocabulary and 8,192 codes, bf16 autocast, batch 8 (``--batch`` changes it).

    .venv/bin/python bench/mfu.py                        # CPU table (a few minutes on 2 cores)
    .venv/bin/python bench/mfu.py --write                # ... recorded in bench/RESULTS.md, section "mfu"
    .venv/bin/python bench/mfu.py --device cuda --write  # section "mfu_cuda"
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from _common import THREADS, command_line, matmul_peak, time_calls, write_section

# name → (device, preset, overrides, batch, amp)
CONFIGS = {
    "tiny, 32 + 8×8 tokens": ("cpu", "tiny", {}, 16, "none"),
    "tiny, 128 + 32×32 tokens": ("cpu", "tiny", dict(text_len=128, grid_size=32), 2, "none"),
    "353M, 128 + 32×32 tokens": ("cuda", "tiny", dict(dim=1024, n_layers=24, n_heads=16, head_dim=64, text_len=128,
                                                       grid_size=32, text_vocab_size=16384, codebook_size=8192,
                                                       conv_kernel=11), 8, "bf16"),
}
STEPS = {"cpu": (2, 8), "cuda": (5, 20)}  # warm-up, timed


def cuda_matmul_peak(size: int = 8192, dtype: torch.dtype = torch.bfloat16, n: int = 20) -> float:
    """Best GFLOP/s of a ``size``² matmul on the current GPU, timed with CUDA events."""
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * size**3 / best / 1e9


def _batch(cfg, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    text = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    lengths = torch.randint(cfg.text_len // 2, cfg.text_len + 1, (batch, 1), generator=g)
    pad_mask = torch.arange(cfg.text_len) >= lengths  # (B, T): captions of different lengths
    codes = torch.randint(0, cfg.codebook_size, (batch, cfg.grid_size, cfg.grid_size), generator=g)
    return text.to(device), pad_mask.to(device), codes.to(device)


def _train_step(model, batch, device: str, amp: str):
    decay, no_decay = model.weight_decay_groups()  # as `dalle train` builds it (appendix B.2)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 4.5e-2}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=4.5e-4, betas=(0.9, 0.96), eps=1e-8, fused=True)

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model.loss(*batch).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
        return float(loss.detach())  # waits for the device

    return step


def model_flops(model, batch, device: str, amp: str) -> int:
    """FLOPs of one forward and backward pass, as executed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model.loss(*batch).total
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(name: str, batch_size: int | None) -> dict:
    from dalle.models.transformer import PriorTransformer, preset

    device, preset_name, overrides, batch, amp = CONFIGS[name]
    batch = batch_size or batch
    torch.manual_seed(0)
    cfg = preset(preset_name, **overrides)
    model = PriorTransformer(cfg).to(device)
    data = _batch(cfg, batch, device)
    flops = model_flops(model, data, device, amp)
    warmup, timed = STEPS[device]
    step_s = statistics.median(time_calls(_train_step(model, data, device, amp), timed, warmup))
    block_params = sum(p.numel() for p in model.blocks.parameters())
    tokens = batch * cfg.seq_len
    return {"name": name, "device": device, "amp": amp, "batch": batch, "params": sum(p.numel() for p in
                                                                                        model.parameters()),
            "tokens": tokens, "flops": flops, "flops_6nt": 6 * block_params * tokens, "step_s": step_s,
            "attention": f"{cfg.attn_schedule} masks, {cfg.attn_impl} impl"}


def table(results: list[dict], peak_gflops: float, peak_what: str) -> str:
    lines = [f"peak: {peak_gflops:,.0f} GFLOP/s ({peak_what}, measured in this run)", "",
             "| configuration | dtype | params | batch | tokens/step | model GFLOP/step | 6·N·T GFLOP | ms/step | "
             "model GFLOP/s | MFU |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        achieved = r["flops"] / r["step_s"] / 1e9
        dtype = "bf16 autocast" if r["amp"] == "bf16" else "fp32"
        lines.append(f"| {r['name']} ({r['attention']}) | {dtype} | {r['params'] / 1e6:.1f}M | "
                     f"{r['batch']} | {r['tokens']:,} | {r['flops'] / 1e9:,.1f} | {r['flops_6nt'] / 1e9:,.1f} | "
                     f"{1e3 * r['step_s']:,.0f} | {achieved:,.1f} | {achieved / peak_gflops:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to measure (default cpu)")
    parser.add_argument("--batch", type=int, help="batch size of every configuration (default: each one's own)")
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available")
        peak, peak_what = cuda_matmul_peak(), f"bf16 8192² matmul on {torch.cuda.get_device_name()}"
    else:
        torch.set_num_threads(THREADS)
        peak, peak_what = matmul_peak(), f"fp32 2048² matmul, {THREADS} threads"
    results = []
    for name, (device, *_rest) in CONFIGS.items():
        if device == args.device:
            results.append(measure(name, args.batch))
            print(f"[{name}] {1e3 * results[-1]['step_s']:.0f} ms/step", file=sys.stderr, flush=True)
    text = table(results, peak, peak_what)
    print(text)
    if args.write:
        section = "mfu" if args.device == "cpu" else "mfu_cuda"
        write_section(section, f"Model FLOPs utilisation of prior training, {args.device} (`bench/mfu.py`)",
                      command_line("bench/mfu.py"), text,
                      ["model FLOPs counted by torch.utils.flop_counter on one forward + backward pass as executed; "
                       f"{STEPS[args.device][0]} warm-up + {STEPS[args.device][1]} timed steps, median; token ids "
                       "in, no data loading"])


if __name__ == "__main__":
    main()
