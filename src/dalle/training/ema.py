"""Exponential moving average of a model's weights: what the paper evaluates and ships (appendix A.2, decay 0.999).

A fixed decay of 0.999 averages over ~1,000 updates, so in a run of a few thousand steps the average would still hold
much of the random initialisation. The decay therefore warms up as min(decay, (1 + n) / (10 + n)) after n updates
(the schedule of TensorFlow's ExponentialMovingAverage ``num_updates``): 0.1 at the first update, 0.9 after 80, 0.99
after 890, the full 0.999 only after ~9,000 updates, which is where the paper's runs (3M updates) spend nearly all
their time anyway. ``warmup=False`` uses the constant decay.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds ``model_ema``, an ``eval()``-mode copy of the model whose floating-point weights track the model's."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1) (got {decay})")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model_ema = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = [p for p in self.model_ema.parameters()]
        params = [p.detach() for p in model.parameters()]
        floats = [(e, p) for e, p in zip(ema_params, params) if e.dtype.is_floating_point]
        if floats:
            # e ← e + (1 − d)(p − e) == d·e + (1 − d)·p, one fused op over all tensors.
            torch._foreach_lerp_([e for e, _ in floats], [p.to(e.dtype) for e, p in floats], 1.0 - d)
        for e, b in zip(self.model_ema.buffers(), model.buffers()):
            e.copy_(b)  # running statistics and counters are copied, not averaged
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model_ema.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model_ema.load_state_dict(state)
        self.updates = updates
