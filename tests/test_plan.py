"""``dalle plan``: memory per device for the prior presets under FSDP (parameters, gradients, Adam, EMA,
activations with and without activation checkpointing)."""

import pytest
import torch

from dalle.cli import main
from dalle.commands.plan import GIB, PlanConfig, block_activation_bytes, memory_plan, parse_memory
from dalle.errors import UserError
from dalle.models.transformer import PRESETS, PriorTransformer, preset


def test_memory_sizes_parse_in_binary_units():
    assert parse_memory("80GB") == parse_memory("80 GiB") == parse_memory("80") == 80 * GIB
    assert parse_memory("16g") == 16 * GIB and parse_memory("512MB") == GIB // 2
    assert parse_memory("1.5TB") == 1.5 * 2**40
    with pytest.raises(UserError, match="cannot read the memory size"):
        parse_memory("lots")


def test_bad_options_name_their_field():
    with pytest.raises(UserError, match="PlanConfig.gpu_mem"):
        PlanConfig(gpu_mem="80XB")
    with pytest.raises(UserError, match="PlanConfig.shard_gpus"):
        PlanConfig(gpus=8, shard_gpus=3)


def test_paper_12b_on_8_gpus_of_80gb():
    plan, model_cfg = memory_plan(PlanConfig(preset="paper-12b", gpus=8, gpu_mem="80GB"))
    with torch.device("meta"):
        model = PriorTransformer(PRESETS["paper-12b"])
    assert plan.n_params == sum(p.numel() for p in model.parameters())
    assert 12.0e9 < plan.n_params < 12.4e9  # the paper's 12.0e9 blocks plus embeddings and heads
    # fp32 weights, gradients, Adam's two moments and the EMA, split 8 ways.
    state = sum(v for k, v in plan.fixed.items() if not k.startswith("gathered"))
    assert state == pytest.approx(20 * plan.n_params / 8)
    assert plan.activations[True] < plan.activations[False] / 5  # checkpointing keeps only the block inputs
    assert plan.fits(False) and plan.fits(True) and plan.max_batch(True) > plan.max_batch(False) >= 1


def test_sharding_and_device_size_decide_whether_it_fits():
    one = memory_plan(PlanConfig(preset="paper-12b", gpus=8, shard_gpus=1, gpu_mem="80GB"))[0]
    eight = memory_plan(PlanConfig(preset="paper-12b", gpus=8, gpu_mem="80GB"))[0]
    assert one.fixed["Adam moments (2 x fp32)"] == pytest.approx(8 * eight.fixed["Adam moments (2 x fp32)"])
    assert not one.fits(True)  # 12B × 20 bytes does not fit one 80 GB device
    v100 = memory_plan(PlanConfig(preset="paper-12b", gpus=1024, shard_gpus=8, gpu_mem="16GB"))[0]
    assert not v100.fits(True)  # our fp32 state is 20 bytes per parameter; the paper's 16-bit state fit
    bigger_batch = memory_plan(PlanConfig(preset="paper-12b", gpus=8, gpu_mem="80GB", batch_size=4))[0]
    assert bigger_batch.activations[False] == pytest.approx(4 * eight.activations[False])


def _saved_bytes_per_token(n_layers: int) -> float:
    """Bytes autograd keeps for backward per token of a small fp32 prior (parameters themselves excluded)."""
    torch.manual_seed(0)
    cfg = preset("test", dim=64, n_heads=4, head_dim=16, n_layers=n_layers, attn_schedule="dense", text_len=8,
                 grid_size=4, codebook_size=16, text_vocab_size=16)
    model = PriorTransformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    b = 8
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(torch.randint(0, 16, (b, 8)), torch.zeros(b, 8, dtype=torch.bool),
                   torch.randint(0, 16, (b, 4, 4)))
    return sum(seen.values()) / (b * cfg.seq_len)


def test_fp32_block_activation_estimate_matches_what_autograd_keeps():
    per_block = (_saved_bytes_per_token(4) - _saved_bytes_per_token(2)) / 2
    assert per_block == pytest.approx(block_activation_bytes(64, half=False), rel=0.1)


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", "--preset", "paper-2.8b", "--gpus", "8", "--gpu-mem", "40GB", "--powersgd-rank", "512"]) == 0
    out = capsys.readouterr().out
    for text in ("parameters (fp32)", "gradients (fp32)", "Adam moments", "activations", "total", "fits in",
                 "largest batch", "PowerSGD at rank 512", "83.3% on the MLP matrices"):
        assert text in out
