"""The LM training loss: next-token cross-entropy plus z-loss, summed over supervised tokens.

:func:`causal_lm_loss` takes the model's logits ``[B, T, V]`` and the **unshifted** labels ``[B, T]`` of the data
pipeline (``IGNORE_INDEX`` where a position carries no loss: prompts, feature slots, padding) and shifts once,
here: the logits at position ``t`` predict ``labels[t + 1]``. Per supervised position, with
``lse = logsumexp(logits)``:

* cross-entropy ``lse - logits[label]``;
* z-loss ``z_loss_weight * lse**2`` (PaLM; Chameleon and Lumina-mGPT train with weight 1e-5): it keeps the
  softmax normaliser near 1, which stabilises bf16 training of a large vocabulary.

**Normalisation.** The returned ``loss`` is ``(ce_sum + z_sum) / normalizer``. By default the normaliser is
this micro-batch's supervised-token count (at least 1): the mean over tokens. The trainer instead passes the
supervised-token count of the *whole optimizer step* (every micro-batch of the gradient accumulation, on every
data-parallel rank), so that summing the micro-batch gradients gives the gradient of the mean over all tokens
of the step: every token weighs the same, however the tokens fall into micro-batches and ranks (a per
micro-batch mean would over-weight tokens of short micro-batches). Where the gradient reduction *averages*
over W data-parallel ranks (FSDP2 / DDP do), the normaliser to pass is ``global_tokens / W``.

**Loss weights.** With ``weights`` ``[B, T]`` (aligned with the unshifted labels: the weight of the token
*expected* at ``t``; the data mix's per-source ``loss_weight``) each supervised token's cross-entropy and z-loss
count ``weight`` times, and the default normaliser is the summed weight of the supervised tokens: a weighted
mean, equal to the plain mean when every weight is 1. Pass the step's global summed weight the same way as the
token count above.

**Memory.** The loss only looks at supervised positions: their rows of the logits are gathered first (bf16
rows stay bf16) and only those rows are upcast to fp32, so no second fp32 ``[B, T, V]`` tensor is made; for
understanding data, where only answers are supervised, that is a small fraction of the sequence. Finding the
supervised positions costs one host sync (their number); the returned tensors cause no further sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unified_mllm.data.conversation import IGNORE_INDEX


@dataclass
class LossParts:
    """The loss of one micro-batch and its parts (tensors on the logits' device, 0-d unless noted)."""

    loss: torch.Tensor
    """``(ce_sum + z_sum) / normalizer``, fp32, with a graph: the tensor to call ``backward()`` on."""
    ce_sum: torch.Tensor
    """Summed cross-entropy of the supervised tokens (fp32, detached; for logging)."""
    z_sum: torch.Tensor
    """Summed weighted z-loss ``z_loss_weight * sum(lse**2)`` (fp32, detached; zero when the weight is 0)."""
    num_tokens: torch.Tensor
    """Supervised tokens of this micro-batch (int64)."""
    weight_sum: torch.Tensor
    """Summed loss weight of the supervised tokens (fp32; equals ``num_tokens`` without ``weights``)."""
    token_ce: torch.Tensor
    """``[N]`` unweighted cross-entropy of each supervised token (fp32, detached; for per-source logging)."""
    token_positions: torch.Tensor
    """``[N, 2]`` (row, position) in the labels of each ``token_ce`` entry (the position of its label)."""


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_loss_weight: float,
    *,
    normalizer: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> LossParts:
    """Next-token CE + z-loss of ``logits`` ``[B, T, V]`` against unshifted ``labels`` ``[B, T]``.

    ``labels[b, t]`` is the id expected *at* position ``t`` (``IGNORE_INDEX`` = no loss); position ``t``'s
    logits are scored against ``labels[b, t + 1]``, so ``labels[:, 0]`` is never used and the last position's
    logits predict nothing. ``normalizer``: see the module docstring; a number must be positive, a tensor
    (e.g. an all-reduced token count, possibly divided by the world size) that is not positive is replaced by
    1, so that a step without supervised tokens gives loss 0, not NaN. ``weights`` ``[B, T]``: per-token loss
    weights (module docstring). Label ids outside ``[0, V)`` are not checked here (that would cost a host sync).
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer ids, got {labels.dtype}")
    if z_loss_weight < 0:
        raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights must match labels {tuple(labels.shape)}, got {tuple(weights.shape)}")
    if isinstance(normalizer, (int, float)) and normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    # (row, t) of every supervised target labels[row, t + 1]: the one host sync of the loss.
    row, t = (labels[:, 1:] != IGNORE_INDEX).nonzero().unbind(1)
    rows = logits[row, t].float()  # [N, V]: only the supervised rows are gathered and upcast
    wanted = labels[row, t + 1].long()  # [N]
    lse = torch.logsumexp(rows, dim=-1)  # [N]
    token_ce = lse - rows.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)  # [N]
    ce, z = token_ce, lse.square()
    num_tokens = torch.tensor(row.numel(), device=logits.device)
    if weights is None:
        weight_sum = num_tokens.float()
    else:
        token_weights = weights[row, t + 1].float()  # [N]
        ce, z, weight_sum = ce * token_weights, z * token_weights, token_weights.sum()
    ce_sum = ce.sum()
    z_sum = z_loss_weight * z.sum() if z_loss_weight > 0 else torch.zeros_like(ce_sum)
    if normalizer is None:
        denominator = torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
    elif isinstance(normalizer, torch.Tensor):
        denominator = normalizer.to(device=ce_sum.device, dtype=torch.float32)
        # A zero count (no supervised token anywhere in the step) means ce_sum == 0: divide by 1, not 0.
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    else:
        denominator = torch.tensor(float(normalizer), device=ce_sum.device)
    return LossParts(
        loss=(ce_sum + z_sum) / denominator,
        ce_sum=ce_sum.detach(),
        z_sum=z_sum.detach(),
        num_tokens=num_tokens,
        weight_sum=weight_sum.detach(),
        token_ce=token_ce.detach(),
        token_positions=torch.stack([row, t + 1], dim=1),
    )
