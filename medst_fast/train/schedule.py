"""The official learning-rate schedule as a pure function of the optimizer step (docs/method.md §5).

Med-ST uses ``CosineAnnealingWarmupRestarts(first_cycle_steps=total, warmup_steps=int(0.4 * total),
max_lr=4e-5, min_lr=1e-8)`` stepped once per optimizer step. Its optimizer step ``i`` (0-based) runs at

    i <  W:  min + (max - min) * i / W                                   (linear warm-up from min_lr)
    i >= W:  min + (max - min) * (1 + cos(pi * (i - W) / (total - W))) / 2

A stateless function makes resuming trivial: the checkpoint stores the step, nothing else.
"""
from __future__ import annotations

import math


def warmup_steps(total: int, warmup_frac: float) -> int:
    return int(total * warmup_frac)


def cosine_warmup_lr(step: int, total: int, max_lr: float, min_lr: float = 1e-8, warmup_frac: float = 0.4) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total`` steps."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    w = warmup_steps(total, warmup_frac)
    if step < w:
        return min_lr + (max_lr - min_lr) * step / w
    span = max(total - w, 1)
    # Past the end of the cycle the official scheduler restarts; a run never gets there, so clamp.
    t = min(step - w, span) / span
    return min_lr + (max_lr - min_lr) * (1.0 + math.cos(math.pi * t)) / 2.0
