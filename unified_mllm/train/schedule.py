"""Learning-rate schedules as multiplicative factors of the peak LR, for ``torch.optim.lr_scheduler.LambdaLR``.

A factor is a pure function of the optimizer step (0-based: the factor for the step about to be taken), so a
resumed run gets exactly the LR the uninterrupted run had: restore ``LambdaLR.state_dict()`` (its
``last_epoch``) and the same lambda yields the same value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal


def warmup_cosine_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    shape: Literal["cosine", "constant"] = "cosine",
) -> float:
    """LR factor at ``step``: linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps``
    steps, then a half cosine from 1 down to ``min_ratio`` reached at ``total_steps`` (and held after it), or
    1 throughout with ``shape="constant"``.

    The warm-up starts at ``1 / warmup_steps`` rather than 0 so that the first step already moves the weights.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    if shape != "cosine":
        raise ValueError(f"unknown schedule shape {shape!r}; valid: 'cosine', 'constant'")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    *,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    shape: Literal["cosine", "constant"] = "cosine",
) -> Callable[[int], float]:
    """:func:`warmup_cosine_factor` with its settings bound: the ``lr_lambda`` of a ``LambdaLR``."""

    def factor(step: int) -> float:
        return warmup_cosine_factor(
            step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio, shape=shape
        )

    factor(0)  # validate eagerly, so a bad config fails when the scheduler is built, not at the first step
    return factor
