"""Per-step schedules as plain functions of the step."""

from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``final_lr``. Warm-up step s gets
    ``base_lr * (s + 1) / warmup_steps``: one step ahead of the official code's ``s / warmup_steps``, whose first
    step has a learning rate of 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, base: float, cosine: bool = False) -> float:
    """Teacher momentum: constant ``base`` (the paper), or BYOL's cosine increase from ``base`` to 1."""
    if not cosine:
        return base
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))
