"""fp16 gradient scaling (paper §2.4, appendix D): plain fp16 gradients underflow, one loss scale cannot serve blocks
whose gradients differ by many orders of magnitude, one scale per block can; scaling is exact in fp32; the trainer
runs with it."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalle.models.transformer import PriorTransformer, preset
from dalle.training import precision
from dalle.training.config import TrainConfig
from dalle.training.loop import Task, Trainer
from dalle.training.precision import GradScaling, autocast_dtype, native_bf16, scale_grad


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(4, requires_grad=True)
    y = scale_grad(x, 8.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 8.0))
    assert scale_grad(torch.ones(2), 8.0).grad_fn is None  # no gradient, nothing to scale


def test_autocast_dtypes(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype("fp16", cpu) is torch.float16 and autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("none", cpu) is None
    # auto: bf16 exactly where the machine computes it in hardware (as `dalle pipeline --amp auto` resolves it)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert autocast_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert autocast_dtype("auto", cpu) is None


def _grads(model: nn.Module, loss_fn, fp16: bool, scaling: GradScaling | None = None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        loss = loss_fn()
    (scaling.scale_loss(loss) if scaling is not None else loss).backward()
    ok = scaling.unscale_() if scaling is not None else True
    return ok, {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _prior_and_loss(weight: float):
    torch.manual_seed(0)
    model = PriorTransformer(preset("test", n_layers=4, attn_schedule="dense"))
    ids, pad = torch.randint(0, 64, (4, 8)), torch.zeros(4, 8, dtype=torch.bool)
    codes = torch.randint(0, 32, (4, 4, 4))
    return model, lambda: model.loss(ids, pad, codes).total * weight


def test_plain_fp16_gradients_underflow_where_per_block_scaling_keeps_them():
    # Late in training the loss and so every gradient is small; here scaled down to ~1e-9 per weight.
    model, loss_fn = _prior_and_loss(1e-6)
    _, reference = _grads(model, loss_fn, fp16=False)
    _, plain = _grads(model, loss_fn, fp16=True)
    ok, scaled = _grads(model, loss_fn, fp16=True, scaling=GradScaling(model, model.blocks, per_block=True))
    assert ok
    weights = [n for n in reference if n.startswith("blocks.") and n.endswith(("qkv.weight", "fc.weight"))]
    for name in weights:
        assert reference[name].abs().max() > 0
        assert float((plain[name] == 0).float().mean()) > 0.99, name  # flushed to zero in fp16
        assert _rel_err(scaled[name], reference[name]) < 0.02, name


class _Block(nn.Module):
    """A pre-LN MLP block whose gain and weight sizes set how large its gradients are relative to its inputs."""

    def __init__(self, dim: int, gain: float, fc_std: float, proj_std: float):
        super().__init__()
        self.ln, self.fc, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim,
                                                                                                     bias=False)
        with torch.no_grad():
            self.ln.weight.fill_(gain)
            nn.init.normal_(self.fc.weight, std=fc_std)
            nn.init.normal_(self.proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


def _calibrate(model: nn.Module, loss_fn, per_block: bool) -> tuple[GradScaling, dict[str, torch.Tensor]]:
    """Dynamic scaling from 2^24 until an update's gradients are all finite (as training would find it)."""
    scaling = GradScaling(model, model.blocks, per_block=per_block, init_scale=2.0**24)
    for _ in range(40):
        ok, grads = _grads(model, loss_fn, fp16=True, scaling=scaling)
        scaling.update()
        if ok:
            return scaling, grads
    raise AssertionError("the scales never settled")


def test_one_loss_scale_underflows_a_block_that_its_own_scale_keeps():
    # Block 0's weight gradients are ~1e-11 while block 1's activation gradients are large: the single scale that
    # keeps block 1 from overflowing leaves block 0 in fp16's underflow range (the paper's finding, appendix D).
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([_Block(16, 1e-4, 0.3, 1e-5), _Block(16, 1.0, 1e-4, 1e4)])
    x = torch.randn(64, 16)

    def loss_fn() -> torch.Tensor:
        h = x
        for block in model.blocks:
            h = block(h)
        return h.float().pow(2).mean() * 1e-3

    _, reference = _grads(model, loss_fn, fp16=False)
    name = "blocks.0.fc.weight"
    single, one_scale = _calibrate(model, loss_fn, per_block=False)
    per_block, own_scales = _calibrate(model, loss_fn, per_block=True)
    assert float((one_scale[name] == 0).float().mean()) > 0.5 and _rel_err(one_scale[name], reference[name]) > 0.5
    assert _rel_err(own_scales[name], reference[name]) < 0.02
    for n in reference:
        assert _rel_err(own_scales[n], reference[n]) < 0.02, n
    # Block 1's overflows lowered its own scale only; block 0, below it, was never blamed for the contamination.
    assert per_block.scales[2] <= single.scales[0] < per_block.scales[1] == 2.0**24


def test_scaling_is_exact_in_fp32():
    model, loss_fn = _prior_and_loss(1.0)
    _, plain = _grads(model, loss_fn, fp16=False)
    scaling = GradScaling(model, model.blocks, per_block=True)
    scaling.scales = [2.0**10, *(2.0 ** (3 * i) for i in range(1, len(model.blocks) + 1))]
    _, scaled = _grads(model, loss_fn, fp16=False, scaling=scaling)
    for n in plain:
        torch.testing.assert_close(scaled[n], plain[n], rtol=1e-6, atol=0, msg=n)


def test_scales_grow_after_clean_updates_and_round_trip():
    model, loss_fn = _prior_and_loss(1.0)
    scaling = GradScaling(model, model.blocks, per_block=True, init_scale=4.0, growth_interval=2)
    for _ in range(2):
        assert _grads(model, loss_fn, fp16=False, scaling=scaling)[0]
        scaling.update()
    assert scaling.scales == [8.0] * (1 + len(model.blocks))
    other = GradScaling(model, model.blocks, per_block=True)
    other.load_state_dict(scaling.state_dict())
    assert other.scales == scaling.scales and other.good_steps == scaling.good_steps
    assert scaling.summary() == {"log2_loss_scale": 3.0, "log2_block_scale_min": 3.0, "log2_block_scale_max": 3.0}
    scaling.remove()
    other.remove()


def test_an_overflow_halves_the_scale_to_blame_and_skips():
    model, loss_fn = _prior_and_loss(1.0)
    scaling = GradScaling(model, model.blocks, per_block=True, init_scale=4.0)
    model.zero_grad()
    scaling.scale_loss(loss_fn()).backward()
    model.blocks[-1].mlp.fc.weight.grad[0, 0] = math.inf  # as if the last block's backward had overflowed
    assert not scaling.unscale_()
    scaling.update()
    assert scaling.scales[-1] == 2.0 and scaling.scales[:-1] == [4.0] * len(model.blocks)


# --- in the trainer --------------------------------------------------------------------------------------------


class RandomPriorTask(Task):
    """The ``test`` prior on a fixed set of random token batches."""

    def config(self):
        return {}

    def build_model(self):
        return PriorTransformer(preset("test"))

    def train_batches(self, epoch):
        g = torch.Generator().manual_seed(epoch)
        b = self.cfg.batch_size
        for _ in range(4):
            yield (torch.randint(0, 64, (b, 8), generator=g), torch.zeros(b, 8, dtype=torch.bool),
                   torch.randint(0, 32, (b, 4, 4), generator=g))

    def loss(self, model, batch, step):
        return model.loss(*batch).total, {}

    def export(self, model, path):
        model.save_pretrained(path)


def _run(tmp_path, name, steps=4, device="cpu", **kw):
    cfg = TrainConfig(out=tmp_path / name, steps=steps, batch_size=4, lr=1e-3, log_every=1, eval_every=100,
                      checkpoint_every=2, progress=False, tensorboard=False, device=str(device), **kw)
    Trainer(RandomPriorTask(), cfg).run()
    with open(tmp_path / name / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_trainer_fp16_with_block_scales_and_activation_checkpointing(tmp_path, device):
    fp32 = _run(tmp_path, "fp32", device=device)
    checkpointed = _run(tmp_path, "checkpointed", device=device, activation_checkpointing=True)
    fp16 = _run(tmp_path, "fp16", device=device, amp="fp16", activation_checkpointing=True)
    # Recomputing activations changes nothing; fp16 stays close and reports its scales.
    assert [float(r["loss"]) for r in checkpointed] == pytest.approx([float(r["loss"]) for r in fp32], rel=1e-6)
    assert [float(r["loss"]) for r in fp16] == pytest.approx([float(r["loss"]) for r in fp32], rel=1e-2)
    assert float(fp16[-1]["log2_loss_scale"]) == 16.0 and float(fp16[-1]["log2_block_scale_min"]) == 16.0
    # The scales are in the checkpoint: a resumed fp16 run continues with them.
    resumed = _run(tmp_path, "fp16", device=device, amp="fp16", resume=True, steps=6)
    assert len(resumed) == 6 and math.isfinite(float(resumed[-1]["loss"]))


def test_native_bf16_reads_the_cpu_features(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not native_bf16(torch.device("cpu"))  # AVX2 or plain AVX512: oneDNN would emulate bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16(torch.device("cpu"))
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not native_bf16(torch.device("cpu"))  # a torch without the probes: fp32, never an AttributeError
    assert not native_bf16(torch.device("meta"))
