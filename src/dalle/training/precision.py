"""Mixed precision: the autocast dtype, and dynamic gradient scaling for fp16, per residual block as the paper did.

bf16 keeps fp32's exponent range, so autocast alone is safe. fp16 keeps 5 exponent bits: magnitudes below 2⁻²⁴ ≈ 6e-8
flush to zero and above 65,504 overflow, and gradients are small. The usual remedy is one *loss scale* (multiply the
loss, divide the gradients, halve the scale when a gradient overflows). The paper (§2.4 and appendix D) found that this
is not enough for a deep transformer: the activation gradients shrink from the last resblocks to the first, so a single
scale small enough for the last blocks not to overflow leaves the first ones underflowing. Its fix is a **separate
gradient scale per resblock**; :class:`GradScaling` implements both (``per_block`` on or off).

How a block's scale acts (our reading of the paper's Figure 4): the forward pass is unchanged. In the backward pass
the gradient arriving at block b's output, in units of the loss scale s₀, is multiplied by s_b / s₀ before it enters
the block, so everything the block's backward computes (its fp16 activation gradients and its parameters' gradients)
is in units of s_b; the gradient leaving at the block's input is multiplied by s₀ / s_b, back to the residual stream's
units. Whole blocks are wrapped from outside by forward hooks (the model knows nothing about it), so the identity path
inside a block carries the block's scale too, which is harmless: it is fp32 under autocast.

After the backward pass each group (the parameters outside every block at s₀, and each block's at s_b) is divided by
its scale and checked for non-finite values; all processes agree on the result. A group with one halves its scale and
the update is skipped; a group that went ``growth_interval`` updates without one doubles its scale. Scales are powers
of two, so scaling and unscaling are exact wherever nothing under- or overflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
FP16_SCALING = ("block", "global")
INIT_SCALE = 2.0**16
MIN_SCALE, MAX_SCALE = 2.0**-24, 2.0**40  # a group whose gradients are all zero would otherwise grow without bound


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp``; ``auto`` is bf16 where ``device`` computes it in hardware (:func:`native_bf16`:
    a GPU that supports it, or a CPU with AVX512-BF16 or AMX), else fp32."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and native_bf16(device):
        return torch.bfloat16
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware: a CUDA GPU with bf16, or an x86 CPU with
    AVX512-BF16 or AMX. Elsewhere (AVX2, or AVX512 without BF16) oneDNN emulates bf16 and it can be slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers: guard their absence
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


class _Probe:
    """Whether every gradient that passed one point of the backward pass was finite (a device tensor: no sync)."""

    def __init__(self) -> None:
        self.ok: torch.Tensor | None = None

    def see(self, grad: torch.Tensor) -> None:
        ok = torch.isfinite(grad).all()
        self.ok = ok if self.ok is None else self.ok & ok

    def bad(self) -> float:
        return 0.0 if self.ok is None else float(not bool(self.ok))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; in the backward pass, with a ``probe``, notes whether the arriving gradient is finite and
    replaces its non-finite values by 0 (so an overflow does not spread: see :class:`GradScaling`), then multiplies
    it by ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float, probe: _Probe | None) -> torch.Tensor:
        ctx.factor, ctx.probe = factor, probe
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.probe is not None:
            ctx.probe.see(grad)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        return (grad * ctx.factor if ctx.factor != 1.0 else grad), None, None


def scale_grad(x: Any, factor: float, probe: _Probe | None = None) -> Any:
    """``x`` with its gradient multiplied by ``factor`` (tensors that carry no gradient pass through)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad:
        return _ScaleGrad.apply(x, factor, probe)
    return x


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class GradScaling:
    """Dynamic gradient scales: s₀ for the loss (parameters outside every block) and, with ``per_block``, one per
    block in ``blocks``. Use: ``scale_loss(loss).backward()`` (once per micro-batch), then ``ok = unscale_()``; step
    only if ``ok``; then ``update()``. ``reduce_max`` combines the overflow flags of all processes.

    Which scale to lower: an overflow in one block would make the gradient it passes down non-finite, and every block
    below it would overflow too. So each block notes whether the gradient arriving at its output and the one leaving
    at its input are finite, and passes on zeros instead of non-finite values (the update is skipped anyway). Every
    group is then judged on its own in every update: a block is to blame for non-finite parameter gradients or a
    non-finite gradient leaving it; the loss scale s₀ for non-finite gradients outside the blocks, or arriving at a
    block (the output head, or what runs between blocks, overflowed). All guilty groups back off at once.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module] = (), per_block: bool = True,
                 init_scale: float = INIT_SCALE, growth_interval: int = 200,
                 reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be at least 1 (got {growth_interval})")
        self.model, self.blocks = model, list(blocks) if per_block else []
        self.growth_interval, self.reduce_max = growth_interval, reduce_max
        self.scales = [float(init_scale)] * (1 + len(self.blocks))
        self.good_steps = [0] * len(self.scales)
        self._incoming = [_Probe() for _ in self.blocks]  # gradient arriving at each block's output
        self._outgoing = [_Probe() for _ in self.blocks]  # gradient leaving at each block's input
        self._culprits: list[bool] = [False] * len(self.scales)
        self._handles = [h for i, b in enumerate(self.blocks) for h in self._hook(b, i)]

    def _hook(self, block: nn.Module, i: int) -> list[Any]:
        # Read the scales at forward time: they change between updates, never within one.
        def enter(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            factor = self.scales[0] / self.scales[i + 1]  # leaving the block: back to s₀
            return tuple(scale_grad(a, factor, self._outgoing[i]) for a in args)

        def leave(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"per-block gradient scaling needs blocks that return one tensor, not {type(out)}")
            return scale_grad(out, self.scales[i + 1] / self.scales[0], self._incoming[i])  # entering: s₀ → s_b

        return [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]

    def groups(self) -> list[list[nn.Parameter]]:
        """The parameters outside every block, then each block's. Looked up each time: FSDP replaces a module's
        parameters by sharded ones after the hooks are in place."""
        in_blocks = [list(b.parameters()) for b in self.blocks]
        taken = {id(p) for ps in in_blocks for p in ps}
        return [[p for p in self.model.parameters() if id(p) not in taken], *in_blocks]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scales[0]

    @torch.no_grad()
    def unscale_(self) -> bool:
        """Divide every gradient by its group's scale; True when all are finite (on every process)."""
        flags = [self._unscale_group(params, scale) for params, scale in zip(self.groups(), self.scales)]
        flags += [p.bad() for p in self._incoming] + [p.bad() for p in self._outgoing]
        bad = torch.tensor(flags)  # (groups + 2 · blocks,)
        if self.reduce_max is not None:
            bad = self.reduce_max(bad)
        n, nb = len(self.scales), len(self.blocks)
        params_bad, in_bad, out_bad = (bad[:n] > 0).tolist(), (bad[n:n + nb] > 0).tolist(), (bad[n + nb:] > 0).tolist()
        blocks = [params_bad[b + 1] or out_bad[b] for b in range(nb)]
        self._culprits = [params_bad[0] or any(in_bad), *blocks]
        for p in (*self._incoming, *self._outgoing):
            p.ok = None
        return not any(params_bad) and not any(in_bad) and not any(out_bad)

    @staticmethod
    def _unscale_group(params: list[nn.Parameter], scale: float) -> float:
        found = 0.0
        grads = [_local(p.grad) for p in params if p.grad is not None]
        for (device, _), same in _by_device_and_dtype(grads).items():
            f = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(same, f, torch.full((1,), 1.0 / scale, device=device))
            found += float(f)
        return found

    def update(self) -> None:
        """Halve the scale of each group to blame for an overflow; double one after ``growth_interval`` clean
        updates."""
        for i, culprit in enumerate(self._culprits):
            if culprit:
                self.scales[i], self.good_steps[i] = max(self.scales[i] / 2, MIN_SCALE), 0
            else:
                self.good_steps[i] += 1
                if self.good_steps[i] >= self.growth_interval:
                    self.scales[i], self.good_steps[i] = min(self.scales[i] * 2, MAX_SCALE), 0

    def state_dict(self) -> dict[str, list[float] | list[int]]:
        return {"scales": list(self.scales), "good_steps": list(self.good_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scales of a checkpoint with the same groups; a different layout keeps the initial scales."""
        if len(state.get("scales", ())) == len(self.scales):
            self.scales = [float(s) for s in state["scales"]]
            self.good_steps = [int(n) for n in state["good_steps"]]

    def summary(self) -> dict[str, float]:
        """log2 of the loss scale and of the smallest and largest block scale, for the metrics."""
        out = {"log2_loss_scale": math.log2(self.scales[0])}
        if len(self.scales) > 1:
            out["log2_block_scale_min"] = math.log2(min(self.scales[1:]))
            out["log2_block_scale_max"] = math.log2(max(self.scales[1:]))
        return out


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    out: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out
