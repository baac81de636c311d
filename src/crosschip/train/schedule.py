"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step, so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    warmup = min(warmup, total)  # a short run with the default warmup still reaches its peak
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_ratio + (1 - min_ratio) * cosine)
