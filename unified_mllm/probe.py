"""Linear probes: how much of a label a frozen representation holds, read out by a linear classifier.

A probe fits one softmax classifier per *head* on frozen features (``labels (N, H)``: ``H`` independent
questions of ``C`` classes each, e.g. one head "which shape" or eighteen yes/no heads "is there a red circle"),
then scores it on held-out features. It is the standard measure of what an image encoder has learned,
independent of a text side (zero-shot classification also needs the text tower to name the classes).

The fit is deterministic: features are standardised with the training set's mean and standard deviation,
and the L2-regularised cross-entropy is minimised by full-batch L-BFGS from zero weights (a convex problem,
so the answer does not depend on a seed). Torch only, so any layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    """A fitted probe: ``logits (N, H, C) = ((x - mean) / std) @ weight + bias``."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, H * C)
    bias: torch.Tensor  # (H * C,)
    num_heads: int
    num_classes: int

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``features (N, D)`` → ``(N, H, C)``."""
        x = (features.double() - self.mean) / self.std
        return (x @ self.weight + self.bias).view(-1, self.num_heads, self.num_classes)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``features (N, D)`` → predicted classes ``(N, H)``."""
        return self.logits(features).argmax(dim=-1)


def _check(features: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str) -> None:
    if features.ndim != 2 or labels.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what}: need features (N, D) and labels (N, H) with the same N, got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{what}: labels must lie in 0..{num_classes - 1}")


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, l2: float = 1e-3, max_iter: int = 200
) -> LinearProbe:
    """Fit :class:`LinearProbe` on ``features (N, D)`` and integer ``labels (N, H)`` in ``0..num_classes-1``.

    Minimises the mean cross-entropy over samples and heads plus ``l2 * ||weight||^2`` (the bias is not
    penalised) in float64, so tiny gradients near the optimum do not stall in rounding noise.
    """
    _check(features, labels, num_classes, "fit_linear_probe")
    x = features.double()
    mean = x.mean(dim=0)
    # A constant feature carries nothing; dividing by 1 keeps it at 0 instead of making it NaN.
    std = x.std(dim=0, correction=0).clamp_min(1e-12)
    std = torch.where(std > 1e-9, std, torch.ones_like(std))
    x = (x - mean) / std
    heads = labels.shape[1]
    weight = torch.zeros(x.shape[1], heads * num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(heads * num_classes, dtype=torch.float64, requires_grad=True)
    target = labels.reshape(-1).long()
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = (x @ weight + bias).view(-1, num_classes)
        loss = F.cross_entropy(logits, target) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach(), heads, num_classes)


def probe_scores(
    probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor, *, positive: int | None = None
) -> dict[str, Any]:
    """How ``probe`` does on held-out ``features (N, D)`` / ``labels (N, H)``.

    ``accuracy``: the fraction of right answers over all samples and heads; ``all_heads``: the fraction of
    samples with every head right. With ``positive`` (yes/no heads: the "yes" class), also ``f1`` of that
    class pooled over all heads (accuracy alone flatters a probe when most answers are "no").
    """
    _check(features, labels, probe.num_classes, "probe_scores")
    predicted = probe.predict(features)
    right = predicted == labels
    result: dict[str, Any] = {
        "num_samples": labels.shape[0],
        "accuracy": right.double().mean().item(),
        "all_heads": right.all(dim=1).double().mean().item(),
    }
    if positive is not None:
        hit = ((predicted == positive) & (labels == positive)).sum().item()
        said, truth = (predicted == positive).sum().item(), (labels == positive).sum().item()
        result["f1"] = 2 * hit / (said + truth) if said + truth else 1.0
    return result


def run_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    l2: float = 1e-3,
    positive: int | None = None,
) -> dict[str, Any]:
    """Fit on ``train`` (features, labels), score on ``test`` (:func:`probe_scores`), plus ``num_train``."""
    probe = fit_linear_probe(*train, num_classes, l2=l2)
    return {"num_train": train[1].shape[0], **probe_scores(probe, *test, positive=positive)}
