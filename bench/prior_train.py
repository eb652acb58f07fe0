"""Prior training throughput on CPU: tokens/s and peak memory, side by side with DALLE-pytorch's ``DALLE``.

The peer's configuration (``/work/shared/anchors/dalle_pytorch_bench.py``): dim 256, depth 4, 8 heads × 32, 32 text +
8×8 image tokens, a 1000-token text vocabulary, 512 image codes, batch 16, token ids in (no dVAE in the step). The peer
is timed by the anchor script's own ``dalle_train_*_token_ids`` sections (``forward(return_loss=True)``, backward,
gradient-norm clip, Adam), in child processes of this job; its ``bf16`` rows run the same sections inside
``torch.autocast("cpu", dtype=torch.bfloat16)``, the way one would turn on mixed precision in its training script, so
that bf16 can be compared with bf16 as well as with the peer as shipped (fp32). Ours is the ``tiny`` prior preset, the
same shape, timed as ``dalle train`` steps it: the 1/8 : 7/8 loss, backward, gradient-norm clip, AdamW with the
paper's β2 and weight decay groups. Every configuration runs once per round, ``--repeats`` rounds, so that ours and the
peer's share each stretch of this shared machine's speed; the ratios within each round are reported too.

Configurations of ours: ``dense`` (every layer causal) and ``sparse`` (the paper's schedule: row, column, row, conv),
each in fp32 and with bf16 autocast (``--amp bf16`` of ``dalle train``); ``+compile`` compiles each block with
``torch.compile`` (``--compile`` of ``dalle train``). Every configuration's loss on the timed batch is compared with the
unoptimised reference path (dense masked attention in fp32, no compilation) from the same weights: the table shows the
absolute difference (rounding only in fp32; the cost of bf16 otherwise).

Memory is the peak resident set (``ru_maxrss``) of the measuring process, as the anchor script reports it for the peer:
both include the interpreter and torch (about 300–400 MiB). A second table times one training step at a paper-like
length (128 text + 32×32 image tokens, same width and depth, batch 2): sparse against dense.

    .venv/bin/python bench/prior_train.py            # ~5 min per round on 2 cores
    .venv/bin/python bench/prior_train.py --write    # ... and record it in bench/RESULTS.md
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from _common import ANCHOR, THREADS, bench_main, emit, peer_env, peer_installed, run_child, time_calls

WARMUP, TIMED = 3, 20
BATCH = 16
TEXT_LEN, TEXT_VOCAB = 32, 1000
# name → (attention schedule, amp, compile)
OURS = {
    "ours dense fp32": ("dense", "none", False),
    "ours dense bf16": ("dense", "bf16", False),
    "ours dense bf16 +compile": ("dense", "bf16", True),
    "ours sparse fp32": ("row,column,row,conv", "none", False),
    "ours sparse bf16": ("row,column,row,conv", "bf16", False),
    "ours sparse bf16 +compile": ("row,column,row,conv", "bf16", True),
}
PEER = {"peer dense": "dalle_train_full_token_ids", "peer axial/conv": "dalle_train_axial_conv_token_ids"}
# The anchor's sections again, under bf16 autocast (run by this script's child, which imports the anchor module).
PEER_BF16 = {"peer dense bf16": PEER["peer dense"], "peer axial/conv bf16": PEER["peer axial/conv"]}
# Like against like for the bf16 table: ours → the peer's row with the same kind of attention.
BF16_PAIRS = {"ours dense bf16": "peer dense bf16", "ours dense bf16 +compile": "peer dense bf16",
              "ours sparse bf16": "peer axial/conv bf16", "ours sparse bf16 +compile": "peer axial/conv bf16"}
ROUND_PAIRS = [("ours dense fp32", "peer dense"), ("ours sparse fp32", "peer axial/conv"),
               ("ours dense bf16", "peer dense"), ("ours sparse bf16", "peer axial/conv"), *BF16_PAIRS.items()]
LONG = {"dense": "dense", "sparse": "row,column,row,conv"}  # paper-like length, fp32


def _batch(cfg, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    text = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    lengths = torch.randint(cfg.text_len // 2, cfg.text_len + 1, (batch, 1), generator=g)
    pad_mask = torch.arange(cfg.text_len) >= lengths  # (B, T): captions of different lengths
    codes = torch.randint(0, cfg.codebook_size, (batch, cfg.grid_size, cfg.grid_size), generator=g)
    return text, pad_mask, codes


def _train_step(model, batch, amp: str):
    decay, no_decay = model.weight_decay_groups()  # as `dalle train` builds it (appendix B.2)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 4.5e-2}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=4.5e-4, betas=(0.9, 0.96), eps=1e-8, fused=True)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model.loss(*batch).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
        return float(loss)

    return step


def _ours(schedule: str, amp: str, compile_blocks: bool, **shape) -> dict:
    from dalle.models.transformer import PriorTransformer, preset

    torch.manual_seed(0)
    cfg = preset("tiny", attn_schedule=schedule, **shape)
    model = PriorTransformer(cfg)
    batch = _batch(cfg, 2 if shape else BATCH)  # the paper-like length runs at batch 2
    # The same weights through the reference path (dense masks, fp32, no compilation): fp32 configurations must
    # agree to rounding; bf16 ones show what autocast costs in accuracy.
    reference = PriorTransformer(preset("tiny", attn_schedule=schedule, attn_impl="dense", **shape))
    reference.load_state_dict(model.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        loss = float(model.loss(*batch).total)
    with torch.no_grad():
        loss_diff = abs(loss - float(reference.loss(*batch).total))
    del reference
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = time_calls(_train_step(model, batch, amp), TIMED, WARMUP)
    seq = cfg.text_len + cfg.image_len
    step_s = statistics.median(times)
    return {"tokens_per_s": seq * len(batch[0]) / step_s, "ms_per_step": 1e3 * step_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_setup_mib": rss_setup,
            "loss_diff_vs_reference": loss_diff, "params": sum(p.numel() for p in model.parameters()),
            "attn_impls": sorted({b.attn.impl for b in model.blocks})}


def _peer_bf16(section: str) -> None:
    """Run one of the anchor script's sections in this process under bf16 autocast; it prints its own result."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dalle_pytorch_bench", ANCHOR)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        anchor.run_child(section)


def child(name: str) -> None:
    torch.set_num_threads(THREADS)
    if name in PEER_BF16:
        _peer_bf16(PEER_BF16[name])
    elif name in OURS:
        emit(_ours(*OURS[name]))
    else:
        kind = name.split(":", 1)[1]
        emit(_ours(LONG[kind], "none", False, text_len=128, grid_size=32))


def measure(repeats: int) -> dict:
    from dalle.runtime import MALLOC_ENVIRONMENT

    # Every process, ours and the peer's, with the malloc setting `dalle train` makes (keep_freed_memory): the
    # comparison is then one of the code alone. Without it both lose speed to page faults (ours up to 1.3× in bf16).
    env = {**peer_env(), **MALLOC_ENVIRONMENT}
    results: dict[str, dict] = {}
    jobs = [(n, [__file__, "--child", n]) for n in OURS]
    if peer_installed():
        jobs += [(n, [str(ANCHOR), "--section", s]) for n, s in PEER.items()]
        jobs += [(n, [__file__, "--child", n]) for n in PEER_BF16]
    else:
        print("skipping the peer: it is not installed in .peer/site (see /work/shared/anchors/README.md)",
              file=sys.stderr)
    # Rounds: every configuration once per round, so that ours and the peer's share each stretch of this machine's
    # (noisy, shared) speed; the table reports the best of each and the ratios within each round.
    runs: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    for rep in range(repeats):
        for name, argv in jobs:
            t0 = time.time()
            r = run_child(argv[0], argv[1:], env)
            if "tokens_per_s_median_step" in r:  # the anchor script's result
                if not r.get("ok", True):
                    raise RuntimeError(f"{name}: {r.get('error')}\n{r.get('traceback', '')}")
                r = {"tokens_per_s": r["tokens_per_s_median_step"], "ms_per_step": r["ms_per_step_median"],
                     "peak_rss_mib": r["peak_rss_mib"], "params": r["params_trainable"], "loss_diff_vs_reference": None}
            runs[name].append(r)
            print(f"[{name} #{rep}] {time.time() - t0:.0f} s: {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr,
                  flush=True)
    for name, rs in runs.items():
        best = dict(min(rs, key=lambda r: r["ms_per_step"]))
        best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        best["ms_per_step_all"] = [round(r["ms_per_step"], 1) for r in rs]
        best["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rs]
        results[name] = best
    for kind in LONG:
        name = f"long:{kind}"
        runs = [run_child(__file__, ["--child", name], env) for _ in range(repeats)]
        results[name] = min(runs, key=lambda r: r["ms_per_step"])
        print(f"[{name}] {results[name]['ms_per_step']:.0f} ms/step", file=sys.stderr, flush=True)
    return results


def table(results: dict) -> str:
    lines = ["| configuration | params | tokens/s | ms/step | peak RSS MiB | vs peer dense | vs peer axial/conv | "
             "loss vs fp32 reference |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    peers = [results.get(n) for n in PEER]
    for name in [*OURS, *PEER, *PEER_BF16]:
        r = results.get(name)
        if r is None:
            continue
        ratios = [f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}×" if p else "" for p in peers]
        diff = r.get("loss_diff_vs_reference")
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {ratios[0]} | {ratios[1]} | "
                     f"{'' if diff is None else f'{diff:.1e}'} |")
    pairs = [(ours, peer) for ours, peer in BF16_PAIRS.items() if ours in results and peer in results]
    if pairs:
        lines += ["", "bf16 against bf16 (the peer's sections under bf16 autocast; same kind of attention):", "",
                  "| ours | peer | ours tokens/s | peer tokens/s | ratio | ours / peer peak RSS MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for ours, peer in pairs:
            a, b = results[ours], results[peer]
            lines.append(f"| {ours} | {peer} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                         f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}× | {a['peak_rss_mib']:.0f} / "
                         f"{b['peak_rss_mib']:.0f} |")
    rounds = [(ours, peer) for ours, peer in ROUND_PAIRS if ours in results and peer in results]
    if rounds:
        lines += ["", "Ratios within each round (ours / peer measured in the same round; median and range over "
                  "rounds):", "", "| ours | peer | median | range |", "| --- | --- | ---: | --- |"]
        for ours, peer in rounds:
            ratios = sorted(a / b for a, b in zip(results[ours]["tokens_per_s_rounds"],
                                                  results[peer]["tokens_per_s_rounds"]))
            lines.append(f"| {ours} | {peer} | {statistics.median(ratios):.2f}× | "
                         f"{ratios[0]:.2f}×–{ratios[-1]:.2f}× |")
    dense, sparse = results.get("long:dense"), results.get("long:sparse")
    if dense and sparse:
        lines += ["", "Paper-like length (128 text + 32×32 image tokens, dim 256, 4 layers, batch 2, fp32):", "",
                  "| attention | ms/step | tokens/s | peak RSS MiB | loss vs fp32 reference |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for kind, r in (("dense", dense), ("sparse (row, column, row, conv)", sparse)):
            lines.append(f"| {kind} | {r['ms_per_step']:.0f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['loss_diff_vs_reference']:.1e} |")
        lines.append(f"\nsparse vs dense at this length: {dense['ms_per_step'] / sparse['ms_per_step']:.2f}× faster")
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__, child, measure, table, "prior_train", "Prior training (`bench/prior_train.py`)",
               "bench/prior_train.py", [f"{THREADS} torch threads, OMP_WAIT_POLICY=PASSIVE, freed memory kept "
                                        f"(glibc's MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_, as `dalle` "
                                        f"sets them) in every process; {WARMUP} warm-up + "
                                        f"{TIMED} timed steps per process; every configuration once per round, "
                                        "--repeats rounds; the first table is each one's best round by median "
                                        "step; token ids in, no dVAE"])


if __name__ == "__main__":
    main()
