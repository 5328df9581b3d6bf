"""The divergence guard: no update from a non-finite loss or gradient, and no checkpoint or export of one.

Every trainer (LM stages, image tokenizers, contrastive SigLIP) asks :meth:`DivergenceGuard.accept` after the
backward pass and before the optimizer steps. A step whose loss or gradient norm is NaN or infinite on any rank
is never applied: with ``max_bad_steps`` 0 (the default) training stops there with a
:class:`DivergenceError` — one line naming the step, the values and the last good checkpoint, which stays as
it was, since the loop checkpoints only after good steps. With ``max_bad_steps`` N > 0 up to N such steps are
skipped (the gradients dropped, the LR schedule moving on), as large-scale trainers do for loss spikes; the
(N+1)-th stops the run. The decision is all-reduced, so every rank skips or stops together.

The check costs one host sync per step (a flag), the price PyTorch's own GradScaler pays for the same decision.
DeepSpeed applies its update inside its engine before the guard sees the norm: there a bad step stops the run
(``max_bad_steps`` must stay 0), still before any checkpoint of it.

:func:`check_finite` is the last line: exports refuse a state dict with a non-finite tensor.

Fault drill: with ``UMLLM_NAN_AT_STEP=k`` the loss of (1-based) step ``k`` is multiplied by NaN
(:func:`injected_fault`), as a diverging run would produce it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from unified_mllm.train import distributed
from unified_mllm.train.checkpoint import latest_checkpoint

NAN_ENV = "UMLLM_NAN_AT_STEP"


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (or weights), more often than allowed."""


def injected_fault(step: int) -> float:
    """NaN at the (1-based) step ``UMLLM_NAN_AT_STEP`` names, else 1.0: multiply a step's loss by it."""
    return math.nan if os.environ.get(NAN_ENV, "") == str(step) else 1.0


class DivergenceGuard:
    """Decides, step by step, whether an update may be applied (see the module docstring).

    ``setting`` is the config key of ``max_bad_steps`` (named in errors); ``checkpoints`` the run's checkpoint
    directory (its newest entry is named as the last good one)."""

    def __init__(self, max_bad_steps: int, checkpoints: Path, setting: str, *, is_main: bool = True) -> None:
        if max_bad_steps < 0:
            raise ValueError(f"`{setting}` must be >= 0, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.checkpoints = checkpoints
        self.setting = setting
        self.is_main = is_main
        self.bad_steps = 0

    def accept(self, step: int, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None) -> bool:
        """Whether (1-based) step ``step`` may update the weights; raises :class:`DivergenceError` once more than
        ``max_bad_steps`` steps were non-finite. A collective: every rank calls it every step."""
        loss = torch.as_tensor(loss).detach()
        values = [loss.double().reshape(-1)]
        if grad_norm is not None:
            values.append(torch.as_tensor(grad_norm).detach().double().reshape(-1).to(loss.device))
        # On the loss's device: the one the process group's collectives take (NCCL: the GPU).
        flag = (~torch.isfinite(torch.cat(values))).any().double().reshape(1)
        if distributed.all_reduce_sum(flag).item() == 0:
            return True
        self.bad_steps += 1
        shown = f"the loss is {_show(values[0])}" + (
            f" and the gradient norm {_show(values[1])}" if grad_norm is not None else ""
        )
        if self.bad_steps > self.max_bad_steps:
            last = latest_checkpoint(self.checkpoints)
            where = (
                f"the last good checkpoint is {last}"
                if last
                else f"no checkpoint was written yet in {self.checkpoints}"
            )
            raise DivergenceError(
                f"step {step}: {shown} (on this or another rank): training diverged and stopped; {where}. "
                f"Lower the learning rate, or let `{self.setting}` (now {self.max_bad_steps}) skip such steps"
            )
        if self.is_main:
            print(
                f"step {step}: {shown}: update skipped ({self.bad_steps} of {self.max_bad_steps} allowed by "
                f"`{self.setting}`)"
            )
        return False


def _show(value: torch.Tensor) -> str:
    return ", ".join(f"{v:g}" for v in value.tolist())


def check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`DivergenceError` naming ``what`` and the first tensors of ``state`` holding NaN or inf."""
    bad = [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DivergenceError(f"{what}: non-finite values in {', '.join(bad[:3])}{more}; nothing was written")
