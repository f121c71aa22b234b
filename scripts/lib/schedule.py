"""The learning rate as a pure function of the optimizer step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, peak: float, warmup: int, schedule: str = "constant", total_steps: int = 0) -> float:
    """LR of optimizer step `step` (0-based): a linear warmup to `peak` over `warmup` steps, then constant (as in
    DiT) or, with "cosine", peak * (1 + cos(pi * p)) / 2 where p = (step - warmup) / (total_steps - warmup) runs
    from 0 to 1 (and stays at 1 past the end).

    A decay is what a short run gains most from: the last steps average out the noise of a large LR.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
