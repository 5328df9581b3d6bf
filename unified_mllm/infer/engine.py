"""Autoregressive decoding over token ids with a transformers KV cache (design convention 7).

:class:`Engine` drives a :class:`~unified_mllm.model.unified.UnifiedModel` through the prefill / step
primitives of :mod:`unified_mllm.infer.decoding`: one prefill of the left-padded prompts (``attention_mask`` +
``position_ids`` that start at 0 on each row's first real id, continuous features scattered into the prompt's
feature slots), then one forward per new token over the cache. Each step runs the logits processors
(:mod:`unified_mllm.infer.processors`) on ``[R, V]`` float32 scores and picks the next id by arg-max (greedy)
or by sampling from a ``torch.Generator`` (seeded runs repeat exactly). Rows stop on their own: at a stop id
(end-of-turn / eos), at their token budget, or when the code grid of an image they opened is complete
(``stop_at_image_grid``; the caller closes the span, see ``infer/solver.py``). Finished rows are fed padding
until the whole batch is done.

**Image mode** (:meth:`Engine.generate_images`) runs classifier-free guidance with the conditional and
unconditional rows in *one* batch ``[cond (B); uncond (B)]``: the unconditional prompt is
:func:`~unified_mllm.layout.unconditional_prompt`, :class:`~unified_mllm.infer.processors.CFGProcessor` combines
the two halves, the token is sampled once per pair (from the conditional half) and fed to both rows. Compared
with running the unconditional branch as a second forward inside a processor (Lumina-mGPT, UniToken), each step
is one batched forward instead of two sequential ones.

Caches: ``"dynamic"`` (transformers' ``DynamicCache``, grows by concatenation) or ``"static"`` (``StaticCache``
sized for prompt + budget once, updated in place: no reallocation per step, and the layout ``torch.compile`` /
CUDA graphs need, but every step attends over the whole reserved length). ``"auto"`` (the default) takes the
static cache for images, whose grid fixes the number of steps (no reallocation; on the 2-core CPU box the
two measure the same at batch 1 and static ~4% faster at batch 8), and the dynamic one for text, which usually
stops long before its budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unified_mllm.infer.decoding import Decoder
from unified_mllm.infer.jacobi import decode_grid
from unified_mllm.infer.processors import (
    CFGProcessor,
    GridConstraint,
    Processor,
    check_non_negative,
    next_id_probabilities,
)
from unified_mllm.layout import generation_prompt, unconditional_prompt

# (logits [R, V] of one code slot for all R rows, slot index) -> the chosen code of every row [R].
StackChoice = Callable[[torch.Tensor, int], torch.Tensor]
# (ids decoded so far, ids to decode in all): called as decoding advances, e.g. to feed a progress bar.
Progress = Callable[[int, int], None]
FINISH_REASONS = ("running", "stop", "length", "image")


@dataclass(frozen=True)
class Generation:
    """What :meth:`Engine.generate` returns, one entry per prompt."""

    ids: list[list[int]]
    """New ids of each row; they end with the stop id when the row finished with ``"stop"``."""
    finish: list[str]
    """Why each row ended: ``"stop"`` (a stop id), ``"length"`` (its budget), ``"image"`` (a complete grid)."""
    stacks: list[np.ndarray] | None = None
    """Code-stack tokenizers only: per row ``[n_new_ids, D]``, the stack sampled at each new id (rows of -1
    where the id is not a code)."""


def guided_stack_choice(
    sampled_rows: int,
    cfg_scale: float = 1.0,
    *,
    top_k: int = 0,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> StackChoice:
    """How the depth heads pick each code of a stack: classifier-free guidance per code when the rows are
    ``[cond (B); uncond (B)]`` (``uncond + s * (cond - uncond)``, as UniTok's MLLM does per sub-code), then
    temperature and top-k, then arg-max or a draw; the choice is fed to both halves."""
    check_non_negative("cfg scale", cfg_scale)

    def choose(logits: torch.Tensor, slot: int) -> torch.Tensor:
        scores = logits[:sampled_rows].float()
        if logits.shape[0] == 2 * sampled_rows:
            scores = logits[sampled_rows:].float() + cfg_scale * (scores - logits[sampled_rows:].float())
        if greedy:
            picked = scores.argmax(dim=-1)
        else:
            scores = scores / max(temperature, 1e-6)
            if 0 < top_k < scores.shape[-1]:
                kth = scores.topk(top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            picked = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        return picked.repeat(logits.shape[0] // sampled_rows)

    return choose


class Engine(Decoder):
    """Batched autoregressive decoding for a :class:`UnifiedModel` in eval mode (see the module docstring), on
    the public prefill / step primitives of :class:`~unified_mllm.infer.decoding.Decoder` (and its arguments).
    """

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
        processors: Sequence[Processor] = (),
        stop_ids: Sequence[int] | None = None,
        greedy: bool = True,
        generator: torch.Generator | None = None,
        pixel_values: torch.Tensor | None = None,
        code_stacks: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
        stop_at_image_grid: bool = False,
        stack_choice: StackChoice | None = None,
        sampled_rows: int | None = None,
        fixed_length: bool = False,
        progress: Progress | None = None,
    ) -> Generation:
        """Continue each prompt (a list of ids) for at most ``max_new_tokens`` ids (one budget, or one per row).

        ``stop_ids`` default to ``(end_of_turn, eos)``. ``greedy`` picks the arg-max; otherwise each id is
        drawn from ``softmax(scores)`` with ``generator``. ``pixel_values`` ``[N_views, 3, S, S]`` fill the
        feature slots of the prompts, row by row in order (``UnifiedModel.embed``, which also takes
        ``feature_index``); ``code_stacks`` ``[N, D]``
        are the stacks of the prompts' code positions in the same order (code-stack tokenizers).
        ``stop_at_image_grid`` ends a row as soon as the grid of an image span it opened is complete (finish
        reason ``"image"``). With code-stack tokenizers every code id a row writes gets its stack from the
        depth heads through ``stack_choice`` (default: :func:`guided_stack_choice` without guidance, greedy or
        drawn like the ids), from the same hidden state and all rows together (guidance sees both halves); the
        stack's first code becomes the id and the next forward embeds the stack. :attr:`Generation.stacks`
        returns them.

        Ids are picked for the first ``sampled_rows`` (``B``, default: every row) and fed to every row
        ``i + k * B`` as well (``2B`` rows for ``[cond; uncond]`` guidance). ``fixed_length``: every row runs its
        whole budget (images), which is where the ``"auto"`` cache picks the static one. ``progress`` is called
        with ``(steps taken, largest budget)`` after every step.
        """
        sampled_rows = len(prompts) if sampled_rows is None else sampled_rows
        stop_ids = (self.tokens.end_of_turn, self.tokens.eos) if stop_ids is None else tuple(stop_ids)
        if self.model.code_heads is not None and stack_choice is None:
            stack_choice = guided_stack_choice(sampled_rows, greedy=greedy, generator=generator)
        limits = torch.as_tensor(max_new_tokens, dtype=torch.long).reshape(-1)
        if np.ndim(max_new_tokens) == 0:  # one budget for every row
            limits = limits.expand(sampled_rows)
        self.check(prompts, limits, sampled_rows)
        batch = self.new_batch(prompts, int(limits.max()))
        cache = self.new_cache(batch.capacity, fixed_length=fixed_length)
        out = self.prefill(batch, cache, pixel_values, code_stacks, feature_index)
        logits, hidden = out.logits[:, -1], out.hidden[:, -1]
        state = _RowState(sampled_rows, limits.to(batch.ids.device), stop_ids, batch.ids.device)
        repeats = len(prompts) // sampled_rows
        for step in range(int(limits.max())):
            scores = logits
            for processor in processors:
                scores = processor(batch.view(), scores)
            scores = scores[:sampled_rows]
            if greedy:
                picked = scores.argmax(dim=-1)
            else:
                picked = torch.multinomial(next_id_probabilities(scores), 1, generator=generator).squeeze(1)
            picked = torch.where(state.done, self.tokens.pad, picked)
            stacks = None
            if stack_choice is not None:
                picked, stacks = self._sample_stacks(picked, hidden, stack_choice)
            fed = picked.repeat(repeats)
            batch.extend(fed[:, None])
            grid_done = (
                self.spans.state(batch.view()[:sampled_rows]).grid_done if stop_at_image_grid else None
            )
            finished = state.update(picked, grid_done, stacks)
            if progress is not None:
                progress(step + 1, int(limits.max()))
            if finished:
                break
            fed_stacks = None if stacks is None else stacks.repeat(repeats, 1)[self.spans.is_code(fed)]
            out = self.step(batch, cache, code_stacks=fed_stacks)
            logits, hidden = out.logits[:, -1], out.hidden[:, -1]
        return state.result()

    def generate_images(
        self,
        conditions: Sequence[Sequence[int]],
        *,
        height: int,
        width: int,
        cfg_scale: float = 1.0,
        processors: Sequence[Processor] = (),
        greedy: bool = False,
        generator: torch.Generator | None = None,
        stack_choice: StackChoice | None = None,
        jacobi_window: int = 0,
        prompt_style: str = "native",
        answer_prefix: Sequence[int] = (),
        progress: Progress | None = None,
    ) -> list[np.ndarray]:
        """Sample one ``height x width`` code grid per tokenized text condition; returns ``[h, w]`` VQ codes
        (``[h, w, D]`` stacks for code-stack tokenizers, sampled by the depth heads through ``stack_choice``,
        default :func:`guided_stack_choice` with this call's ``cfg_scale``, greedy or plain sampling).
        ``jacobi_window > 0`` decodes with speculative Jacobi decoding, checking that many draft ids per
        forward (:mod:`unified_mllm.infer.jacobi`; the same distribution, fewer forwards; VQ-GAN codes only).

        The prompt of each condition is :func:`~unified_mllm.layout.generation_prompt` (with ``answer_prefix``
        before the image start); with ``cfg_scale != 1`` the batch is doubled with
        :func:`~unified_mllm.layout.unconditional_prompt` rows of ``prompt_style`` (``model.prompt_style``;
        unitoken: the rows start at ``<image-start>``) and guided by :class:`CFGProcessor`. The grid constraint
        comes next, then ``processors`` (temperature, top-k, ...).
        Decoding stops after exactly ``height * (width + 1)`` ids: the last ``<row-end>``. ``progress`` hears
        ``(ids of the grid decoded, height * (width + 1))`` after every forward.
        """
        check_non_negative("cfg scale", cfg_scale)
        if jacobi_window < 0:
            raise ValueError(f"jacobi_window must be >= 0 (0: sequential decoding), got {jacobi_window}")
        prompts = [generation_prompt(c, self.tokens, height, width, answer_prefix) for c in conditions]
        guided: list[Processor] = []
        if cfg_scale != 1.0:
            prompts += [unconditional_prompt(self.tokens, height, width, prompt_style)] * len(conditions)
            guided.append(CFGProcessor(cfg_scale))
        guided += [GridConstraint(self.tokens, size=(height, width)), *processors]
        length = height * (width + 1)
        decoding = {"sampled_rows": len(conditions), "greedy": greedy, "generator": generator}
        if jacobi_window > 0:
            ids, _ = decode_grid(
                self,
                prompts,
                length=length,
                processors=guided,
                window=jacobi_window,
                progress=progress,
                **decoding,
            )
            rows = ids.tolist()
        else:
            if self.model.code_heads is not None and stack_choice is None:
                stack_choice = guided_stack_choice(
                    len(conditions), cfg_scale, greedy=greedy, generator=generator
                )
            result = self.generate(
                prompts,
                max_new_tokens=length,
                processors=guided,
                stop_ids=(),
                fixed_length=True,
                stack_choice=stack_choice,
                progress=progress,
                **decoding,
            )
            if result.stacks is not None:
                return [np.asarray(s).reshape(height, width + 1, -1)[:, :width] for s in result.stacks]
            rows = result.ids
        grids = [np.asarray(ids).reshape(height, width + 1)[:, :width] for ids in rows]
        return [self.tokens.ids_to_codes(grid) for grid in grids]

    def _sample_stacks(
        self, picked: torch.Tensor, hidden: torch.Tensor, choose: StackChoice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows that picked a code id: the depth heads' stack ``[B, D]`` (rows of -1 elsewhere) and the
        ids with each code replaced by the id of its stack's first code."""
        heads = self.model.code_heads
        assert heads is not None
        is_code = self.spans.is_code(picked)
        stacks = heads.sample(hidden, choose)  # [R, D]: every row decodes (cheap), the code rows are kept
        stacks = stacks[: picked.shape[0]]
        ids = torch.where(is_code, self.spans.code_to_id(stacks[:, 0]), picked)
        return ids, torch.where(is_code[:, None], stacks, torch.full_like(stacks, -1))


class _RowState:
    """Per-row bookkeeping of one decoding run: tokens kept, counts, finish reasons."""

    def __init__(
        self, rows: int, limits: torch.Tensor, stop_ids: Sequence[int], device: torch.device
    ) -> None:
        self.limits = limits
        self.stop_ids = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.count = torch.zeros(rows, dtype=torch.long, device=device)
        self.reason = torch.zeros(rows, dtype=torch.long, device=device)
        self.picked: list[torch.Tensor] = []
        self.stacks: list[torch.Tensor] = []

    def update(
        self, picked: torch.Tensor, grid_done: torch.Tensor | None, stacks: torch.Tensor | None = None
    ) -> bool:
        """Record one step's ids ``[B]`` (and code stacks ``[B, D]``); returns True when every row has finished."""
        running = ~self.done
        self.picked.append(picked)
        if stacks is not None:
            self.stacks.append(stacks)
        self.count += running.long()
        stopped = running & torch.isin(picked, self.stop_ids)
        reason = torch.where(stopped, FINISH_REASONS.index("stop"), 0)
        if grid_done is not None:
            reason = torch.where(running & ~stopped & grid_done, FINISH_REASONS.index("image"), reason)
        at_limit = running & (reason == 0) & (self.count >= self.limits)
        reason = torch.where(at_limit, FINISH_REASONS.index("length"), reason)
        self.reason = torch.where(running, reason, self.reason)
        self.done = self.done | (reason > 0)
        return bool(self.done.all())

    def result(self) -> Generation:
        table = torch.stack(self.picked, dim=1).cpu() if self.picked else torch.zeros(len(self.done), 0)
        counts, reasons = self.count.tolist(), self.reason.tolist()
        ids = [table[row, : counts[row]].tolist() for row in range(len(counts))]
        stacks = None
        if self.stacks:
            cube = torch.stack(self.stacks, dim=1).cpu().numpy()  # [B, steps, D]
            stacks = [cube[row, : counts[row]] for row in range(len(counts))]
        return Generation(ids=ids, finish=[FINISH_REASONS[r] for r in reasons], stacks=stacks)
