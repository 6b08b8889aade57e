"""Learning-rate schedules for the LM train loop: linear warmup, then cosine / linear decay or constant.

``lr_lambda`` is the multiplier ``torch.optim.lr_scheduler.LambdaLR`` applies to the base lr::

    sched = LambdaLR(opt, functools.partial(lr_lambda, warmup_steps=100, total_steps=10_000))

(a ``partial`` of a module-level function pickles, so a Ray worker can rebuild it, and
LambdaLR's state_dict restores the step on resume).
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine",
              min_ratio: float = 0.1) -> float:
    """lr multiplier at optimizer step ``step`` (0-based, as LambdaLR counts).

    warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first step already moves
    (a 0 lr step would waste a batch). Then over the remaining steps, progress p in [0, 1]:
    cosine  min_ratio + (1 - min_ratio) * (1 + cos(pi p)) / 2
    linear  min_ratio + (1 - min_ratio) * (1 - p)
    constant 1.
    Past total_steps the multiplier stays at min_ratio (cosine / linear).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"need warmup_steps >= 0, total_steps >= 1, 0 <= min_ratio <= 1; "
                         f"got {warmup_steps}, {total_steps}, {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = (1.0 + math.cos(math.pi * progress)) / 2 if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape
