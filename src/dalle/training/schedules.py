"""Schedules as pure functions of the step: nothing to checkpoint, identical after a resume.

The paper (section 2.1, appendix A.2) anneals the Gumbel-softmax temperature τ from 1 to 1/16 with a cosine over the
first 150k of 3M updates, ramps the KL weight β linearly from 0 to 6.6 over the first 5,000 updates and decays the
learning rate with a cosine from 1e-4 to 1.25e-6 over the whole run. A schedule's length is given either in steps or
as a fraction of the run (:func:`schedule_steps`), so that short runs keep the shape of the paper's schedules.
"""

from __future__ import annotations

import math


def schedule_steps(steps: int | None, fraction: float, total_steps: int) -> int:
    """Length of a schedule: ``steps`` if given, else ``fraction`` of the run, rounded (0 means "at the end value")."""
    if steps is not None:
        return max(0, steps)
    return max(0, round(fraction * total_steps))


def cosine(step: int, steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``steps`` and after)."""
    if steps <= 0 or step >= steps:
        return end
    t = max(step, 0) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear(step: int, steps: int, start: float, end: float) -> float:
    """Straight line from ``start`` (step 0) to ``end`` (step ``steps`` and after)."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * max(step, 0) / steps


def learning_rate(step: int, total_steps: int, lr: float, lr_min: float, warmup_steps: int = 0) -> float:
    """Linear warm-up from lr/warmup to ``lr`` over ``warmup_steps``, then a cosine from ``lr`` to ``lr_min`` that
    reaches ``lr_min`` at ``total_steps``. ``step`` counts optimizer updates from 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, max(total_steps - warmup_steps, 0), lr, lr_min)
