"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state."""
from __future__ import annotations

import math
from typing import Sequence

SCHEDULES = ("onecycle", "cosine", "constant", "step")


def lr_factor(step: int, total_steps: int, schedule: str = "onecycle", warmup_frac: float = 0.15,
              milestones: Sequence[float] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    onecycle: linear warm-up from 0.04 to 1 over ``warmup_frac`` of the run, then cosine
    annealing to 0 (the shape of Smith's one-cycle policy). cosine: cosine from 1 to 0.
    constant: 1. step: step decay, ``gamma ** k`` where ``k`` counts the ``milestones`` already
    reached; a milestone is a fraction of the run in (0, 1], reached at step
    ``ceil(fraction * total_steps)``. Epoch milestones convert exactly: milestone epoch ``e`` of
    ``E`` epochs is the fraction ``e / E`` and takes effect at the first step of epoch ``e``
    (0-based), as torch's MultiStepLR stepped once per epoch does. No warm-up.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if schedule == "step":
        return _step_decay(step, total_steps, milestones, gamma)
    if schedule == "constant" or total_steps <= 1:
        return 1.0
    progress = min(step / (total_steps - 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    # onecycle
    if progress < warmup_frac:
        return 0.04 + 0.96 * progress / warmup_frac
    rest = (progress - warmup_frac) / max(1.0 - warmup_frac, 1e-12)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


def _step_decay(step: int, total_steps: int, milestones: Sequence[float], gamma: float) -> float:
    if not milestones:
        raise ValueError("the step schedule needs milestones (fractions of the run in (0, 1])")
    if any(not 0.0 < float(m) <= 1.0 for m in milestones):
        raise ValueError(f"step milestones are fractions of the run in (0, 1], got {list(milestones)}")
    if not gamma > 0:
        raise ValueError(f"step gamma must be > 0, got {gamma}")
    # the small tolerance keeps e / E * (E * S) == e * S exact under float rounding
    reached = sum(1 for m in milestones if step >= math.ceil(float(m) * total_steps - 1e-9))
    return float(gamma) ** reached
