"""Restarting dead codes of the dVAE by splitting busy ones (an addition to the paper's recipe for small runs).

At small scale the relaxed objective has a cheap way out: the decoder quickly gets sharp on whatever is easy (a plain
background), Gumbel noise there becomes expensive, and the encoder removes it by saturating one code at every position,
after which the softmax's gradient vanishes and unused codes never get a chance (measured in bench/RESULTS.md: a
handful of codes in use, reconstructions that keep where the objects are but lose their colours). The paper's 3M updates
at batch 512 on photographs did not need a remedy; a few thousand CPU updates do.

The remedy is the one k-means uses for an empty cluster, applied to the encoder's last 1×1 conv (its rows are the
codes' linear scores of the encoder features) and to the decoder's first 1×1 conv (its columns are the codes'
embeddings): every ``every`` updates, each code unused since the last check is re-made as half of a busy code ``j``,
chosen in proportion to the spread of the features ``j`` is given (its sum of squared distances to their mean). The new
code copies ``j``'s score plus a direction through ``j``'s features, so it wins for the features on one side of their
mean and ``j`` for the other; it copies ``j``'s embedding too, so the decoder's output does not jump. Training then
pulls the two halves apart. Restarts stop after ``until`` of the run, leaving the rest to settle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The split makes the new code's logit exceed the old one's by this much for features one standard deviation along the
# split direction (and fall short by as much on the other side).
SPLIT_MARGIN = 2.0


class CodeRestarts:
    """Every ``every`` updates before ``until_step``, finds the codes no image of a fixed training sample ``x``
    (mapped pixels) is encoded to, and splits busy codes into them. Stateless between checks (the sample is fixed and
    the randomness seeded by the step), so a resumed run restarts exactly the same codes."""

    def __init__(self, x: torch.Tensor, every: int, until_step: int, max_per_check: int, seed: int = 0):
        self.x, self.every, self.until_step, self.max_per_check, self.seed = x, every, until_step, max_per_check, seed

    def due(self, step: int) -> bool:
        return self.every > 0 and 0 < step < self.until_step and step % self.every == 0

    def __call__(self, step: int, encoder: nn.Module, decoder: nn.Module) -> int:
        """Restart dead codes if ``step`` is a check step; returns how many were restarted."""
        if not self.due(step):
            return 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return split_codes(encoder, decoder, self.x, self.max_per_check, generator)


@torch.no_grad()
def split_codes(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, max_codes: int,
                generator: torch.Generator) -> int:
    """Re-make up to ``max_codes`` codes that no position of ``x`` is encoded to as halves of busy codes (see the
    module doc); returns how many were made."""
    out_conv, in_conv = encoder.blocks.output.conv, decoder.blocks.input
    feats = F.relu(encoder.blocks[:-1](x)).float()  # (B, C, g, g): what the last 1×1 conv sees
    f = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (N, C)
    w, b = out_conv.w.view(out_conv.w.shape[0], -1), out_conv.b  # (K, C), (K,)
    codes = (f @ w.float().T + b.float()).argmax(1)  # (N,)
    dead = (codes.bincount(minlength=w.shape[0]) == 0).nonzero().flatten()
    dead = dead[torch.randperm(len(dead), generator=generator)[:max_codes]]
    made = 0
    for k in dead.tolist():
        k_codes = codes.bincount(minlength=w.shape[0]).float()  # (K,)
        means = torch.zeros_like(w, dtype=torch.float32).index_add_(0, codes, f) / k_codes.clamp_min(1)[:, None]
        sse = torch.zeros(w.shape[0]).index_add_(0, codes, (f - means[codes]).pow(2).sum(1))  # (K,)
        if sse.sum() <= 0:
            break
        j = int(torch.multinomial(sse / sse.sum(), 1, generator=generator))
        members = f[codes == j] - means[j]  # (n, C) centred
        pick = members[torch.randint(len(members), (1,), generator=generator)].squeeze(0)  # (C,)
        if pick.norm() == 0:
            continue
        u = pick / pick.norm()  # (C,) the split direction
        proj = members @ u  # (n,)
        scale = SPLIT_MARGIN / proj.std().clamp_min(1e-6) if len(members) > 1 else SPLIT_MARGIN
        w[k] = w[j] + (scale * u).to(w.dtype)
        b[k] = b[j] - (scale * (u @ means[j])).to(b.dtype)
        in_conv.w[:, k] = in_conv.w[:, j]  # the decoder reads the new code as the old one, at first
        codes = (f @ w.float().T + b.float()).argmax(1)  # the assignment after the split, for the next pick
        made += 1
    return made
