"""Small statistics about built modules (parameter counts) shared by the CLI, tests and training logs."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module``.

    Works on modules built on the ``meta`` device (it reads shapes, never data). Shared tensors (tied
    embeddings) are counted once, because ``Module.parameters()`` yields each parameter object once.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def format_count(n: int) -> str:
    """A parameter count in the usual short form: ``6.75B``, ``412.96M``, ``3.66M``, ``812.5K``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)
