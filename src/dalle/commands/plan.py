"""``dalle plan``: the memory each device needs to train a prior preset with ``dalle train`` (paper §2.5).

    dalle plan --preset paper-12b --gpus 8 --gpu-mem 80GB
    dalle plan --preset paper-12b --gpus 1024 --shard-gpus 8 --gpu-mem 16GB --powersgd-rank 896   # the paper's setup

What is counted, per device, for our trainer (``--parallel fsdp --fsdp-shard-size SHARD_GPUS``; ``--shard-gpus 1`` is
ddp):

* **state**, sharded over ``shard_gpus`` devices: fp32 parameters (4 bytes each), fp32 gradients (4), Adam's two
  moments (8) and the weight EMA (4) — 20 bytes per parameter. (The paper kept parameters and moments in 16 bits.)
* **gathered**: what FSDP holds whole for a while: the parameters outside the blocks (embeddings, heads) and two
  blocks (the one computing and the one prefetched) in the compute dtype, and the unsharded gradients of two blocks
  in fp32 before they are reduce-scattered.
* **activations** kept for the backward pass, per token and block, for our pre-LN block under autocast (attention by
  SDPA, which keeps no L×L matrix): the fp32 residual input of both sublayers (2 × 4·dim bytes), the 16-bit inputs of
  the four matrix products and of GELU, q, k, v and the attention output: 36·dim bytes in bf16/fp16 (64·dim in fp32).
  With activation checkpointing only each block's fp32 input is kept (4·dim), plus one block recomputed at a time.
  The output layer adds 12 bytes per logit (16-bit logits, fp32 log-softmax and its gradient): text positions ×
  (vocabulary + 1) and image positions × codebook.

These are estimates: the allocator's fragmentation, the CUDA context and library workspaces are what ``--headroom``
keeps free, and the sparse attention's gather path keeps a few more copies of k and v than SDPA.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from dalle.config import add_options, check, from_args, option
from dalle.errors import ConfigError, UserError
from dalle.models.transformer import PRESETS, PriorTransformer

GIB = 2**30
STATE_BYTES = {"parameters (fp32)": 4, "gradients (fp32)": 4, "Adam moments (2 x fp32)": 8, "EMA (fp32)": 4}
LOGIT_BYTES = 12
UNITS = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20, "t": 2**40, "tb": 2**40,
         "tib": 2**40}


def parse_memory(text: str) -> int:
    """``"80GB"``, ``"80 GiB"``, ``"16g"``, ``"80"`` → bytes. GB and GiB both mean 2³⁰ bytes: device memory is sold
    in binary units (an "80GB" H100 has 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in UNITS:
        raise UserError(f"cannot read the memory size {text!r}: write it like 80GB, 16GiB or 40000MB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


@dataclasses.dataclass
class PlanConfig:
    preset: str = option("paper-12b", "prior preset (src/dalle/models/transformer.py)", choices=tuple(PRESETS))
    gpus: int = option(8, "devices training together")
    gpu_mem: str = option("80GB", "memory of one device, e.g. 80GB or 16GiB (both read as 2^30 bytes per GB)")
    shard_gpus: int | None = option(None, "devices each parameter is sharded over: --fsdp-shard-size of `dalle "
                                    "train` (default: all --gpus; 1 = no sharding, as ddp; the paper sharded over "
                                    "the 8 GPUs of one machine)")
    batch_size: int = option(1, "examples per device and micro-batch")
    amp: str = option("bf16", "dtype of activations and gathered parameters (none = fp32)",
                      choices=("bf16", "fp16", "none"))
    headroom: float = option(0.9, "fraction of device memory the plan may use (the rest: CUDA context, "
                             "fragmentation, workspaces)")
    powersgd_rank: int | None = option(None, "also report PowerSGD's gradient compression at this rank")

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, self, "preset", f"must be one of {', '.join(PRESETS)}")
        check(self.gpus >= 1, self, "gpus", "must be at least 1")
        self.shard_gpus = self.gpus if self.shard_gpus is None else self.shard_gpus
        check(1 <= self.shard_gpus <= self.gpus and self.gpus % self.shard_gpus == 0, self, "shard_gpus",
              "must divide --gpus")
        check(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        check(0 < self.headroom <= 1, self, "headroom", "must be in (0, 1]")
        check(self.powersgd_rank is None or self.powersgd_rank >= 1, self, "powersgd_rank", "must be at least 1")
        try:
            self.gpu_bytes = parse_memory(self.gpu_mem)
        except UserError as e:
            raise ConfigError(type(self).__name__, "gpu_mem", str(e)) from None


@dataclasses.dataclass
class Plan:
    """Bytes per device of each part; ``fixed`` parts do not depend on the batch, activations grow with it."""

    n_params: int
    block_params: int
    outside_params: int
    fixed: dict[str, float]
    activations: dict[bool, float]  # activation checkpointing off / on → bytes for the configured batch
    per_example: dict[bool, float]
    budget: float

    def total(self, checkpointing: bool) -> float:
        return sum(self.fixed.values()) + self.activations[checkpointing]

    def fits(self, checkpointing: bool) -> bool:
        return self.total(checkpointing) <= self.budget

    def max_batch(self, checkpointing: bool) -> int:
        return max(0, int((self.budget - sum(self.fixed.values())) // self.per_example[checkpointing]))


def block_activation_bytes(dim: int, half: bool) -> int:
    """Bytes one block keeps for its backward pass, per token (module doc): 36·dim under 16-bit autocast, 64·dim in
    fp32 (with n_heads·head_dim = dim and an MLP of 4·dim, as in every preset)."""
    return (36 if half else 64) * dim


def memory_plan(cfg: PlanConfig) -> tuple[Plan, Any]:
    """The :class:`Plan` of ``cfg`` and the model's config, from the parameter shapes of the preset built on the
    meta device."""
    import torch

    model_cfg = PRESETS[cfg.preset]
    with torch.device("meta"):
        model = PriorTransformer(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    outside = n_params - sum(p.numel() for p in model.blocks.parameters())
    half = cfg.amp != "none"
    compute_bytes = 2 if half else 4
    fixed = {name: b * n_params / cfg.shard_gpus for name, b in STATE_BYTES.items()}
    if cfg.shard_gpus > 1:
        fixed["gathered (embeddings, heads, 2 blocks)"] = (outside + 2 * block) * compute_bytes + 2 * block * 4
    d, length = model_cfg.dim, model_cfg.seq_len
    per_block = block_activation_bytes(d, half)
    logits = LOGIT_BYTES * ((model_cfg.text_len - 1) * (model_cfg.text_vocab_size + 1)
                            + model_cfg.image_len * model_cfg.codebook_size)
    per_example = {False: length * per_block * model_cfg.n_layers + logits,
                   True: length * (4 * d * model_cfg.n_layers + per_block) + logits}
    acts = {k: v * cfg.batch_size for k, v in per_example.items()}
    return Plan(n_params, block, outside, fixed, acts, per_example, cfg.headroom * cfg.gpu_bytes), model_cfg


def format_plan(cfg: PlanConfig) -> str:
    plan, m = memory_plan(cfg)
    lines = [f"{cfg.preset}: {plan.n_params / 1e9:.2f}e9 parameters ({m.n_layers} blocks of "
             f"{plan.block_params / 1e6:.1f}M, {plan.outside_params / 1e9:.2f}e9 in embeddings and heads); "
             f"sequence {m.seq_len} ({m.text_len} text + {m.grid_size}x{m.grid_size} image)",
             f"{cfg.gpus} device{'s' if cfg.gpus > 1 else ''} of {cfg.gpu_bytes / GIB:.0f} GiB, parameters sharded "
             f"over {cfg.shard_gpus}, batch {cfg.batch_size} per device, "
             f"{cfg.amp if cfg.amp != 'none' else 'fp32'} activations and gathered parameters", "",
             f"{'per device (GiB)':<40} {'no act. checkpointing':>22} {'act. checkpointing':>19}"]
    for name, b in plan.fixed.items():
        lines.append(f"{name:<40} {b / GIB:>22.2f} {b / GIB:>19.2f}")
    lines.append(f"{'activations':<40} {plan.activations[False] / GIB:>22.2f} {plan.activations[True] / GIB:>19.2f}")
    lines.append(f"{'total':<40} {plan.total(False) / GIB:>22.2f} {plan.total(True) / GIB:>19.2f}")
    fits = {k: "yes" if plan.fits(k) else "NO" for k in (False, True)}
    label = f"fits in {plan.budget / GIB:.1f} GiB ({cfg.headroom:.0%})"
    lines.append(f"{label:<40} {fits[False]:>22} {fits[True]:>19}")
    lines.append(f"{'largest batch per device that fits':<40} {plan.max_batch(False):>22} {plan.max_batch(True):>19}")
    lines += ["", f"state: {sum(STATE_BYTES.values())} bytes per parameter (fp32 weights, gradients, Adam moments and "
              f"EMA) over {cfg.shard_gpus} device{'s' if cfg.shard_gpus > 1 else ''}; the paper kept weights and "
              "moments in 16 bits"]
    if cfg.powersgd_rank is not None:
        lines.append(powersgd_line(cfg.preset, cfg.powersgd_rank))
    return "\n".join(lines)


def powersgd_line(preset: str, rank: int) -> str:
    import torch

    from dalle.training.distributed import powersgd_compression

    with torch.device("meta"):
        model = PriorTransformer(PRESETS[preset])
    mlp = [p.shape for n, p in model.named_parameters() if ".mlp." in n]
    every = [p.shape for p in model.parameters()]
    return (f"PowerSGD at rank {rank}, 16-bit factors vs 32-bit gradients: saves {powersgd_compression(mlp, rank):.1%} "
            f"on the MLP matrices (the paper's figure), {powersgd_compression(every, rank):.1%} over all gradients "
            f"({powersgd_compression(every, rank, sent_bits=32):.1%} with the fp32 factors `dalle train` sends "
            "unless --powersgd-16bit)")


def register(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan", help="memory per device to train a prior preset with FSDP: parameters, gradients, optimizer state, "
        "activations, with and without activation checkpointing",
        description="Estimate the memory each device needs to train a prior preset with `dalle train --parallel "
        "fsdp` (parameters, gradients and Adam state sharded; see docs/scaling.md), with and without activation "
        "checkpointing, and whether it fits.")
    add_options(plan, PlanConfig, title="plan")
    plan.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    print(format_plan(from_args(PlanConfig, args)))
    return 0
