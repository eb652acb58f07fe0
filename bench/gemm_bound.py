"""The matrix-multiply floor of one prior training step: the GEMMs of the ``tiny`` preset's forward and backward at
the peer benchmark's shapes (batch 16, 32 text + 8×8 image tokens), timed alone, back to back, with nothing else.

No training step can be faster than its GEMMs, so ``tokens per step / GEMM time`` bounds the throughput that
``bench/prior_train.py`` can reach in this dtype on this machine, and dividing it by the peer's measured tokens/s
bounds the ratio to the peer. Every ``nn.Linear`` contributes three GEMMs (the output, the input's gradient, the
weight's gradient) in the layouts autograd uses; attention contributes its two batched products per direction.

    .venv/bin/python bench/gemm_bound.py [--dtype bf16] [--peer-tokens-per-s 3646]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import THREADS, time_calls
from prior_train import BATCH  # the peer benchmark's batch


def linear_gemms(m: int, k: int, n: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Operand pairs of y = x Wᵀ, dx = dy W, dW = dyᵀ x for x (m, k) and W (n, k)."""
    x, w, dy = (torch.randn(*s, dtype=dtype) for s in ((m, k), (n, k), (m, n)))
    return [(x, w.t()), (dy, w), (dy.t(), x)]


def step_gemms(cfg, dtype: torch.dtype) -> tuple[list, list]:
    """Operand pairs of the 2-D and the batched products of one step of a prior with config ``cfg``."""
    length = cfg.seq_len
    tokens, inner, dim = BATCH * length, cfg.n_heads * cfg.head_dim, cfg.dim
    hidden = int(cfg.mlp_ratio * dim)
    mm = []
    for _ in range(cfg.n_layers):
        for k, n in ((dim, 3 * inner), (inner, dim), (dim, hidden), (hidden, dim)):
            mm += linear_gemms(tokens, k, n, dtype)
    mm += linear_gemms(BATCH * (cfg.text_len - 1), dim, cfg.text_vocab_size + 1, dtype)  # text head (+ pad class)
    mm += linear_gemms(BATCH * cfg.image_len, dim, cfg.codebook_size, dtype)  # image head
    d = cfg.head_dim
    q, k, v, p = (torch.randn(BATCH * cfg.n_heads, *s, dtype=dtype) for s in
                  ((length, d), (length, d), (length, d), (length, length)))
    # Forward: the scores and the weighted values; backward: dP, dV, dQ, dK.
    one_layer = [(q, k.transpose(1, 2)), (p, v),
                 (q, v.transpose(1, 2)), (p.transpose(1, 2), v), (p, k), (p.transpose(1, 2), q)]
    return mm, one_layer * cfg.n_layers


def run(pairs_mm: list, pairs_bmm: list) -> None:
    for a, b in pairs_mm:
        torch.mm(a, b)
    for a, b in pairs_bmm:
        torch.bmm(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--peer-tokens-per-s", type=float, default=3646.0,
                        help="the peer's dense tokens/s from bench/prior_train.py (default: the recorded 3,646)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from dalle.models.transformer import preset

    torch.set_num_threads(THREADS)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    cfg = preset("tiny")
    mm, bmm = step_gemms(cfg, dtype)
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in mm)
    flops += sum(2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] for a, b in bmm)
    s = statistics.median(time_calls(lambda: run(mm, bmm), args.repeats, warmup=3))
    bound = BATCH * cfg.seq_len / s
    print(f"{args.dtype}, {THREADS} threads: {len(mm)} GEMMs + {len(bmm)} batched, {flops / 1e9:.1f} GFLOP per step")
    print(f"GEMMs alone: {1e3 * s:.0f} ms per step (median of {args.repeats}), {flops / s / 1e9:.0f} GFLOP/s")
    print(f"throughput bound: {bound:,.0f} tokens/s = {bound / args.peer_tokens_per_s:.2f}x the peer's "
          f"{args.peer_tokens_per_s:,.0f} tokens/s")


if __name__ == "__main__":
    main()
