"""The learning-rate schedule of every run: linear warmup, then cosine decay to a floor, as a
pure function of step numbers (pre-training counts optimizer steps from its config; fine-tuning
converts its epochs to steps first)."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(*, warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimizer steps: ``(step + 1) / warmup`` during
    the warmup, then cosine from 1 down to ``floor`` (= min_lr / lr) at ``total`` steps, and
    ``floor`` after it."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(total - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
