"""The primitives every decoder is built on: a batch of left-padded id rows, and prefill / step forwards.

:class:`DecodeBatch` holds the rows being decoded (ids, padding mask, the additive key bias and the positions of
the newest ids); :class:`Decoder` runs a :class:`~unified_mllm.model.unified.UnifiedModel` over it with a
transformers KV cache: :meth:`Decoder.prefill` feeds the prompts, :meth:`Decoder.step` the ids written since.
Both return a :class:`Forward` (float32 logits and last hidden states of the newest positions). The sequential
engine (:mod:`unified_mllm.infer.engine`) and speculative Jacobi decoding (:mod:`unified_mllm.infer.jacobi`)
differ only in how they choose the ids they write.

Positions count real ids only, so a left-padded row reads exactly like the same prompt unpadded. Image codes,
their stacks and grid cells are read with :class:`~unified_mllm.layout.SpanReader`. The forwards build no
autograd graph only under ``torch.inference_mode()``, which the decoders built on them enter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, StaticCache

from unified_mllm.layout import SpanReader, SpecialTokens
from unified_mllm.model.unified import UnifiedModel

CacheKind = Literal["auto", "dynamic", "static"]
Cache = DynamicCache | StaticCache


class DecodeBatch:
    """Left-padded ids ``[R, C]`` (``C`` = longest prompt + budget) of the rows being decoded, filled up to
    :attr:`length`, with their padding mask ``[R, C]`` (1: a real id) and the same as an additive key bias
    ``[R, 1, 1, C]`` in the model's dtype (0: a real id; the dtype's minimum: padding or a slot not written yet).
    :attr:`positions` ``[R, n]`` are the positions of the newest ``n`` ids (after construction: the prompts').
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        budget: int,
        pad: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        longest = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), longest + budget), pad, dtype=torch.long)
        self.mask = torch.zeros_like(self.ids)
        for row, prompt in enumerate(prompts):
            self.ids[row, longest - len(prompt) : longest] = torch.as_tensor(list(prompt), dtype=torch.long)
            self.mask[row, longest - len(prompt) : longest] = 1
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.blocked = torch.finfo(dtype).min
        self.key_bias = torch.zeros(self.mask.shape, dtype=dtype, device=device)
        self.key_bias = self.key_bias.masked_fill(self.mask == 0, self.blocked)[:, None, None, :]
        self.length = longest
        self.padded = bool((self.mask[:, :longest] == 0).any())
        self.positions = (self.mask[:, :longest].cumsum(dim=1) - 1).clamp(min=0)

    @property
    def capacity(self) -> int:
        return self.ids.shape[1]

    def view(self) -> torch.Tensor:
        """``[R, length]`` ids so far (what the processors read)."""
        return self.ids[:, : self.length]

    def additive_mask(self, queries: int, keys: int) -> torch.Tensor:
        """``[R, 1, queries, keys]`` additive mask of the newest ``queries`` ids over the first ``keys`` cache
        slots: causal, and blind to padding. A padding query sees nothing but blocked slots, which the finite
        minimum turns into a uniform (finite) attention instead of NaN; its output is never read."""
        bias = self.key_bias[..., :keys]
        if queries == 1:
            return bias
        device = bias.device
        query_positions = torch.arange(self.length - queries, self.length, device=device)
        future = torch.arange(keys, device=device)[None, :] > query_positions[:, None]
        return bias.masked_fill(future, self.blocked)

    def extend(self, new_ids: torch.Tensor) -> None:
        """Write ``new_ids`` ``[R, n]`` after the ids so far; :attr:`positions` becomes theirs ``[R, n]``."""
        start, count = self.length, new_ids.shape[1]
        self.ids[:, start : start + count] = new_ids
        self.mask[:, start : start + count] = 1
        self.key_bias[:, 0, 0, start : start + count] = 0
        self.length += count
        before = self.mask[:, :start].sum(dim=1, keepdim=True)
        self.positions = before + torch.arange(count, device=new_ids.device)

    def rewind(self, length: int) -> None:
        """Forget the ids from slot ``length`` on (speculative decoding takes back rejected drafts)."""
        self.mask[:, length : self.length] = 0  # the ids there stay but are never read: view() ends at length
        self.key_bias[:, 0, 0, length : self.length] = self.blocked
        self.length = length


@dataclass(frozen=True)
class Forward:
    """What one forward of :class:`Decoder` gives for the newest ``n`` positions it fed (the prefill: the
    prompts' last position only, so a long prompt never materialises ``[R, T, V]`` logits)."""

    logits: torch.Tensor
    """``[R, n, V]`` float32 logits over the full vocabulary."""
    hidden: torch.Tensor
    """``[R, n, H]`` the LM's last hidden states there (the depth heads' input)."""


class Decoder:
    """Prefill and step forwards of a :class:`UnifiedModel` in eval mode over a KV cache (module docstring).

    Args:
        model: the unified model; its ``lm`` / ``lm_head`` / ``embed`` run the forwards.
        tokens: the tokenizer's :class:`SpecialTokens` (padding, feature slots, image codes).
        cache: ``"auto"``, ``"dynamic"`` or ``"static"``: what :meth:`new_cache` makes (``"auto"``: static
            for fixed-length runs, dynamic otherwise).
    """

    def __init__(self, model: UnifiedModel, tokens: SpecialTokens, *, cache: CacheKind = "auto") -> None:
        if cache not in ("auto", "dynamic", "static"):
            raise ValueError(f"cache must be 'auto', 'dynamic' or 'static', got {cache!r}")
        self.model = model
        self.tokens = tokens
        self.cache = cache
        self.spans = SpanReader(tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check(self, prompts: Sequence[Sequence[int]], budgets: torch.Tensor, sampled_rows: int) -> None:
        """ValueError unless the model is in eval mode, every prompt has an id, ``budgets`` ``[sampled_rows]``
        are >= 1, and the longest prompt plus its budget fits the model's positions."""
        if self.model.training:
            raise ValueError("the model is in training mode (dropout on): call model.eval() before decoding")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one id (prompts start with <bos>)")
        if budgets.numel() != sampled_rows or bool((budgets < 1).any()):
            raise ValueError(
                f"max_new_tokens must be >= 1, one value or one per prompt; got {budgets.tolist()}"
            )
        longest = max(len(p) for p in prompts) + int(budgets.max())
        limit = self.model.config.lm.max_position_embeddings
        if longest > limit:
            raise ValueError(f"prompt + new tokens need {longest} positions; the model has {limit}")

    def new_batch(self, prompts: Sequence[Sequence[int]], budget: int) -> DecodeBatch:
        """The prompts left-padded on the model's device, with room for ``budget`` new ids per row."""
        dtype = self.model.lm.get_input_embeddings().weight.dtype
        return DecodeBatch(prompts, budget, self.tokens.pad, self.device, dtype)

    def new_cache(self, max_length: int, fixed_length: bool) -> Cache:
        """An empty KV cache for ``max_length`` positions; ``fixed_length``: every row runs its whole budget."""
        if self.cache == "static" or (self.cache == "auto" and fixed_length):
            return StaticCache(config=self.model.lm.config, max_cache_len=max_length)
        return DynamicCache(config=self.model.lm.config)

    def prefill(
        self,
        batch: DecodeBatch,
        cache: Cache,
        pixel_values: torch.Tensor | None = None,
        code_stacks: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
    ) -> Forward:
        """Feed the prompts of a fresh ``batch`` into an empty ``cache``; the :class:`Forward` of their last
        position. ``pixel_values`` ``[N_views, 3, S, S]`` fill the feature slots row by row (the prefill is the
        only forward that reads slots; ``feature_index`` as ``UnifiedModel.embed`` takes it); with code stacks,
        ``code_stacks`` ``[N, D]`` are the stacks of the prompts' code positions in the same order."""
        ids = batch.view()
        if pixel_values is not None:
            pixel_values = pixel_values.to(
                device=ids.device, dtype=next(self.model.vision.parameters()).dtype
            )
        if code_stacks is not None:
            code_stacks = code_stacks.to(ids.device)
        elif self.model.code_heads is not None and bool(self.spans.is_code(ids).any()):
            raise ValueError("the prompts hold image codes but no code_stacks were given for them")
        return self._forward(
            ids,
            batch,
            cache,
            pixel_values,
            ids == self.tokens.feature,
            code_stacks,
            last=True,
            index=feature_index,
        )

    def step(
        self, batch: DecodeBatch, cache: Cache, count: int = 1, code_stacks: torch.Tensor | None = None
    ) -> Forward:
        """Feed the newest ``count`` ids of ``batch`` (written with :meth:`DecodeBatch.extend` after the ids the
        cache holds); the :class:`Forward` of every one of them. With code stacks, ``code_stacks`` ``[N, D]``
        are the stacks of their code positions, in row order."""
        return self._forward(batch.view()[:, -count:], batch, cache, None, None, code_stacks, last=False)

    def code_cells(self, batch: DecodeBatch, count: int) -> torch.Tensor | None:
        """The code cells ``[R, count, 2]`` of the newest ``count`` ids of ``batch`` (None: the model has no
        grid positions). Read over the whole sequence: a code's row and column depend on the ids before it."""
        if self.model.code_grid_embedding is None:
            return None
        return self.spans.cells(batch.view())[:, -count:]

    def _forward(
        self,
        ids: torch.Tensor,
        batch: DecodeBatch,
        cache: Cache,
        pixel_values: torch.Tensor | None,
        feature_mask: torch.Tensor | None,
        code_stacks: torch.Tensor | None,
        last: bool,
        index: torch.Tensor | None = None,
    ) -> Forward:
        """Embed ``ids`` ``[R, t]`` (the newest ``t`` of ``batch``), run the LM over ``cache`` and the head on
        every position, or on the last one only (``last``)."""
        code_mask = self.spans.is_code(ids) if code_stacks is not None else None
        cells = self.code_cells(batch, ids.shape[1])
        embeds = self.model.embed(ids, pixel_values, feature_mask, code_stacks, code_mask, cells, index)
        hidden = self.model.lm(
            inputs_embeds=embeds,
            attention_mask=self._attention_mask(batch, embeds.shape[1], cache),
            position_ids=batch.positions,
            use_cache=True,
            **{self.model.cache_argument: cache},
        ).last_hidden_state
        if last:
            hidden = hidden[:, -1:]
        return Forward(logits=self.model.lm_head(hidden).float(), hidden=hidden)

    def _attention_mask(self, batch: DecodeBatch, queries: int, cache: Cache) -> torch.Tensor | None:
        """The mask of one forward. sdpa / eager get a ready 4D additive mask (transformers would rebuild one
        from the 2D mask at every step, a measurable share of a small model's step); flash attention gets the
        2D mask it needs. Unpadded rows over a dynamic cache need none: sdpa's causal fast path."""
        static = isinstance(cache, StaticCache)
        if self.model.lm.config._attn_implementation not in ("sdpa", "eager"):
            return batch.mask[:, : batch.length] if batch.padded else None
        if not batch.padded and not static:
            return None
        return batch.additive_mask(queries, batch.capacity if static else batch.length)
