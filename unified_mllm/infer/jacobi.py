"""Speculative Jacobi decoding (SJD; Teng et al., 2024 — the training-free sampler of Lumina-mGPT) of code grids.

Sequential decoding spends one forward per id. SJD keeps a window of ``L`` draft ids after the accepted ones and
checks them all with one forward: fed the last accepted id and the next ``L - 1`` ids, the model gives its
distribution at every window position at once. Going left to right, each draft ``y`` (drawn from a known
distribution ``q``) is accepted with probability ``min(1, p(y) / q(y))``, where ``p`` is the processed target
distribution at its position (guidance, grid constraint, temperature, top-k: exactly what sequential decoding
would sample from, given the ids before it). The first rejected draft is replaced by a draw from the residual
``norm(max(0, p - q))``: the speculative-sampling rule, under which every accepted id is distributed exactly as
in sequential sampling. The positions after it get new drafts from the same forward's predictions (the Jacobi
step: computed from a prefix that held the rejected draft, they are guesses, and a draft only needs to be a
guess whose ``q`` is known). Greedy decoding is the case of one-hot distributions: a draft is accepted iff it
is the arg-max, so the ids equal sequential greedy decoding's. Every forward accepts at least one id.

Batches: rows accept different numbers of ids. A forward starts at the batch's shortest accepted prefix; a row
that is ahead re-feeds its accepted ids there and is checked from its own prefix on, so one forward serves every
row. Classifier-free guidance's ``[cond; uncond]`` rows are fed the same ids, as in the sequential engine. The
KV cache is transformers' ``DynamicCache``, cropped back to the shortest accepted prefix after each forward.

:func:`decode_grid` returns the ids and a :class:`JacobiStats` (forwards taken), which
``scripts/bench_generate.py`` compares with sequential decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from unified_mllm.infer.decoding import Decoder
from unified_mllm.infer.processors import Processor, next_id_probabilities


@dataclass(frozen=True)
class JacobiStats:
    """How a :func:`decode_grid` call went."""

    ids: int
    """Ids decoded per row (the grid's length)."""
    forwards: int
    """Model forwards after the prefill (sequential decoding takes ``ids - 1``)."""

    @property
    def ids_per_forward(self) -> float:
        return self.ids / max(self.forwards + 1, 1)  # the prefill yields the first id


def _distributions(
    logits: torch.Tensor, view: torch.Tensor, processors: Sequence[Processor], rows: int, greedy: bool
) -> torch.Tensor:
    """``[rows, V]`` float32 probabilities of the next id after ``view`` ``[R, T]`` (one-hot when greedy)."""
    scores = logits
    for processor in processors:
        scores = processor(view, scores)
    scores = scores[:rows]
    if greedy:
        return torch.zeros_like(scores).scatter_(1, scores.argmax(dim=1, keepdim=True), 1.0)
    return next_id_probabilities(scores)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per distribution of ``probs`` ``[..., V]`` → ``[...]``."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _verify(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target: torch.Tensor,
    checked_from: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the ``n`` window drafts ``[B, n]`` (drawn from ``draft_probs`` ``[B, n, V]``) against ``target``
    ``[B, n, V]``, each row from its window offset ``checked_from`` ``[B]`` on (earlier ids are final).

    Returns ``(accepted [B], rejected_at [B], replacement [B])``: ids of the window that are final now, the
    offset of the first rejected draft (``n`` when none) and the residual draw that replaces it."""
    rows, n = drafts.shape
    offsets = torch.arange(n, device=drafts.device)
    p = target.gather(2, drafts.unsqueeze(2)).squeeze(2)
    q = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)
    uniform = torch.rand(rows, n, generator=generator, device=drafts.device)
    # u * q < p  <=>  u < p / q for q > 0 (a draft always has q > 0: it was drawn from q).
    passed = (uniform * q < p) | (offsets[None, :] < checked_from[:, None])
    failed = ~passed
    rejected_at = torch.where(failed.any(dim=1), failed.float().argmax(dim=1), n)
    at = rejected_at.clamp(max=n - 1)
    pick = at[:, None, None].expand(-1, 1, target.shape[2])
    residual = (target.gather(1, pick) - draft_probs.gather(1, pick)).squeeze(1).clamp(min=0)
    # Rows without a rejection draw from a dummy (their replacement is never used).
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, torch.ones_like(residual))
    replacement = _draw(residual / residual.sum(dim=1, keepdim=True), generator)
    return torch.minimum(rejected_at + 1, torch.full_like(rejected_at, n)), rejected_at, replacement


class _Drafts:
    """Each row's ids (final ones, then drafts) and the distributions the drafts of the window were drawn from.

    ``ids [B, length + L]``; ``done [B]`` final ids per row; ``probs [B, L, V]`` for the window offsets
    ``0..L-1`` counted from :attr:`low`, the batch's shortest final prefix."""

    def __init__(
        self, first: torch.Tensor, length: int, window: int, generator: torch.Generator | None
    ) -> None:
        rows = first.shape[0]
        self.generator, self.window = generator, window
        self.ids = torch.zeros(rows, length + window, dtype=torch.long, device=first.device)
        self.ids[:, 0] = _draw(first, generator)  # the prefill's distribution gives the first id
        self.done = torch.ones(rows, dtype=torch.long, device=first.device)
        # The first drafts are guesses from that same distribution.
        self.probs = first[:, None].expand(-1, window, -1).contiguous()
        self.ids[:, 1 : 1 + window] = _draw(self.probs, generator)

    @property
    def low(self) -> int:
        return int(self.done.min())

    def advance(self, target: torch.Tensor) -> None:
        """Check the window's drafts against ``target`` ``[B, n, V]`` (the distributions of ids ``low ..
        low + n - 1``), keep what passes, redraw the first rejection from the residual, then draft the next
        window from ``target`` (its last distribution for offsets past its end)."""
        low, count = self.low, target.shape[1]
        accepted, rejected_at, replacement = _verify(
            self.ids[:, low : low + count], self.probs[:, :count], target, self.done - low, self.generator
        )
        rejected = rejected_at < count
        self.ids[rejected, low + rejected_at[rejected]] = replacement[rejected]
        self.done = torch.maximum(self.done, low + accepted)
        new_low = int(self.done.min())
        positions = torch.arange(new_low, new_low + self.window, device=self.ids.device)
        self.probs = target[:, (positions - low).clamp(max=count - 1)]
        fresh = _draw(self.probs, self.generator)
        is_draft = positions[None, :] >= self.done[:, None]
        window_ids = self.ids[:, new_low : new_low + self.window]
        self.ids[:, new_low : new_low + self.window] = torch.where(is_draft, fresh, window_ids)


@torch.inference_mode()
def decode_grid(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    sampled_rows: int,
    length: int,
    processors: Sequence[Processor],
    window: int,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, JacobiStats]:
    """Decode ``length`` ids after each prompt with speculative Jacobi decoding (module docstring).

    ``decoder`` runs the forwards (its public prefill / step; the :class:`~unified_mllm.infer.engine.Engine`
    passes itself). ``prompts``: ``R`` rows, the first ``sampled_rows`` (``B``) sampled, the ids fed to every
    row ``i + k * B`` as well (``[cond; uncond]`` guidance). ``window``: draft ids checked per forward
    (``L >= 1``; 1 is sequential decoding). ``progress`` hears ``(ids accepted in every row, length)`` after
    each forward. Returns the ids ``[B, length]`` (on the model's device) and the
    stats.
    """
    if window < 1:
        raise ValueError(f"the Jacobi window must be >= 1 draft id, got {window}")
    if decoder.model.code_heads is not None:
        raise ValueError("speculative Jacobi decoding supports one code per position (model.vq.kind vqgan)")
    decoder.check(prompts, torch.full((sampled_rows,), length), sampled_rows)
    repeats = len(prompts) // sampled_rows
    batch = decoder.new_batch(prompts, length)
    cache = DynamicCache(config=decoder.model.lm.config)  # cropped back after each forward
    start = batch.length  # the slot of new id 0
    logits = decoder.prefill(batch, cache).logits[:, -1]
    drafts = _Drafts(
        _distributions(logits, batch.view(), processors, sampled_rows, greedy), length, window, generator
    )
    forwards = 0
    while (low := drafts.low) < length:
        # Feed ids low-1 .. low+count-2 over a cache that ends before low-1: the distributions of low ..
        # low+count-1. Positions from low-1 on are recomputed, whatever an earlier forward left there.
        count = min(window, length - low)
        batch.rewind(start + low - 1)
        surplus = cache.get_seq_length() - batch.length
        if surplus:
            cache.crop(-surplus)  # transformers 5: a negative count drops that many of the newest positions
        batch.extend(drafts.ids[:, low - 1 : low - 1 + count].repeat(repeats, 1))
        logits = decoder.step(batch, cache, count).logits
        forwards += 1
        views = [batch.ids[:, : start + low + k] for k in range(count)]  # the ids before each window id
        target = [
            _distributions(logits[:, k], views[k], processors, sampled_rows, greedy) for k in range(count)
        ]
        drafts.advance(torch.stack(target, dim=1))
        if progress is not None:
            progress(min(drafts.low, length), length)
    return drafts.ids[:, :length], JacobiStats(ids=length, forwards=forwards)
