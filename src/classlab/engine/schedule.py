"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, schedule: str = "onecycle", warmup_frac: float = 0.15) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    onecycle: linear warm-up from 0.04 to 1 over ``warmup_frac`` of the run, then cosine
    annealing to 0 (the shape of Smith's one-cycle policy). cosine: cosine from 1 to 0.
    constant: 1.
    """
    if schedule == "constant" or total_steps <= 1:
        return 1.0
    progress = min(step / (total_steps - 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        if progress < warmup_frac:
            return 0.04 + 0.96 * progress / warmup_frac
        rest = (progress - warmup_frac) / max(1.0 - warmup_frac, 1e-12)
        return 0.5 * (1.0 + math.cos(math.pi * rest))
    raise ValueError(f"unknown schedule {schedule!r}; use onecycle, cosine or constant")
