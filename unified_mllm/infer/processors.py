"""Logits processors: small stateless callables ``(input_ids [B, T], scores [B, V]) -> scores [B, V]``.

They follow transformers' ``LogitsProcessor`` signature, so the same objects serve our engine
(:mod:`unified_mllm.infer.engine`) and ``model.generate(logits_processor=...)``. Each one derives everything it
needs from ``input_ids`` on every call (no decoding state is kept between calls), takes its device from its
inputs, never prints, and treats every row of the batch independently (design convention 7); where a row
stands in its image span is read by the layout's one span reader (:class:`~unified_mllm.layout.SpanReader`):

* :class:`CFGProcessor` — classifier-free guidance for a batch laid out as ``[conditional rows; unconditional
  rows]``: ``uncond + s * (cond - uncond)``, returned for both halves so that a pair samples the same token.
* :class:`GridConstraint` — the image-span grammar (layout.py): inside an image only code ids, ``<row-end>``
  exactly at the end of each row, the span's closing token after the last row, and the two resolution tokens
  forced to a requested size when the model opens an image itself.
* :class:`ModalityTemperature`, :class:`ModalityTopK`, :class:`ModalityTopP` — sampling settings that differ
  for image codes and text: a row whose last image span is still open samples with the image settings.

A temperature of 0 means greedy: :class:`ModalityTemperature` keeps only the arg-max of such rows, so that any
sampler then picks it. :func:`create_logits_processor` assembles the usual list (Lumina-mGPT's order: guidance,
grammar, then the sampling warpers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from unified_mllm.layout import SpanReader, SpecialTokens

# What the engine calls a processor: (input_ids [B, T], scores [B, V]) -> scores [B, V].
Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_scores(input_ids: torch.Tensor, scores: torch.Tensor) -> None:
    if scores.ndim != 2 or scores.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"scores must be [B, V] with B = input_ids rows ({input_ids.shape[0]}), got {tuple(scores.shape)}"
        )


class CFGProcessor(LogitsProcessor):
    """Classifier-free guidance over a batch ``[cond rows (B); uncond rows (B)]``.

    Returns ``[2B, V]``: the guided scores ``uncond + scale * (cond - uncond)`` for both halves, so whichever
    half a sampler reads, a conditional row and its unconditional twin get the same token. ``scale`` 1 gives the
    conditional scores, 0 the unconditional ones.
    """

    def __init__(self, scale: float) -> None:
        self.scale = check_non_negative("cfg scale", scale)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(input_ids, scores)
        if scores.shape[0] % 2:
            raise ValueError(
                f"CFG needs an even batch laid out as [conditional; unconditional], got {scores.shape[0]} rows"
            )
        cond, uncond = scores.chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        return torch.cat([guided, guided])


class GridConstraint(LogitsProcessor):
    """Restrict each row to the ids the image-span layout allows next (rows outside images are untouched).

    Inside an open span: the height and width tokens (forced to ``size = (rows, cols)`` in codes when given,
    else any positive resolution token), then per row ``width`` code ids and ``<row-end>``, then after the last
    row only the closing token: ``<sep>`` when spans carry feature slots (``with_features``), else
    ``<image-end>``. After that closing token the row is left alone (feature slots are filled by the caller,
    not sampled). A span whose resolution ids are not resolution tokens raises ValueError.
    """

    FREE, CODE, ROW_END, CLOSE, HEIGHT, WIDTH = range(6)

    def __init__(
        self, tokens: SpecialTokens, *, size: tuple[int, int] | None = None, with_features: bool = False
    ) -> None:
        self.tokens = tokens
        self.read = SpanReader(tokens)
        self.size = size
        self.size_ids = None if size is None else (tokens.size_token(size[0]), tokens.size_token(size[1]))
        self.close_id = tokens.separator if with_features else tokens.image_end
        self._masks: dict[tuple[int, str], torch.Tensor] = {}

    def _allowed_table(self, vocab: int, device: torch.device) -> torch.Tensor:
        """``[6, V]`` bool: the ids allowed in each state (rows indexed by the class constants)."""
        key = (vocab, str(device))
        if key not in self._masks:
            tokens = self.tokens
            if max(max(tokens.code_ids), tokens.row_end, self.close_id, *tokens.size_ids) >= vocab:
                raise ValueError(f"scores have {vocab} columns, fewer than the tokenizer's image ids need")
            table = torch.zeros(6, vocab, dtype=torch.bool)
            table[self.FREE] = True
            table[self.CODE, list(tokens.code_ids)] = True
            table[self.ROW_END, tokens.row_end] = True
            table[self.CLOSE, self.close_id] = True
            positive_sizes = list(tokens.size_ids[1:])
            heights = positive_sizes if self.size_ids is None else [self.size_ids[0]]
            widths = positive_sizes if self.size_ids is None else [self.size_ids[1]]
            table[self.HEIGHT, heights] = True
            table[self.WIDTH, widths] = True
            self._masks[key] = table.to(device)
        return self._masks[key]

    def states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` long: the class constant of what each row may emit next."""
        state = self.read.state(input_ids)
        grid = state.offset - 2
        in_grid = state.inside & (state.offset >= 2)
        bad = in_grid & ((state.height < 1) | (state.width < 1))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"row {row}: the open image span has no valid resolution tokens after <image-start>"
            )
        in_rows = in_grid & (grid < state.grid_length)
        # clamp: rows outside a span have width -1, and an integer modulo by zero raises on the CPU
        at_row_end = in_rows & (grid % (state.width + 1).clamp(min=1) == state.width)
        cls = torch.full_like(state.offset, self.FREE)
        cls = torch.where(state.inside & (state.offset == 0), self.HEIGHT, cls)
        cls = torch.where(state.inside & (state.offset == 1), self.WIDTH, cls)
        cls = torch.where(in_rows, torch.where(at_row_end, self.ROW_END, self.CODE), cls)
        return torch.where(in_grid & (grid == state.grid_length), self.CLOSE, cls)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(input_ids, scores)
        allowed = self._allowed_table(scores.shape[1], scores.device)[self.states(input_ids)]
        return scores.masked_fill(~allowed, -torch.inf)


def _per_row(read: SpanReader, input_ids: torch.Tensor, image: float, text: float) -> torch.Tensor:
    """``[B, 1]``: ``image`` for rows inside an open image span, ``text`` for the others (dtype of the values)."""
    return torch.where(read.state(input_ids).inside, image, text).unsqueeze(1)


def next_id_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """``softmax`` of processed scores ``[B, V]``, the distribution a sampler draws the next id from; a row the
    processors left without any allowed id (or with NaN) is an error, not a silent draw."""
    probs = scores.softmax(dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the processors left a row with no allowed id (all scores -inf) or NaN scores")
    return probs


def check_non_negative(name: str, value: float) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite and >= 0 (a temperature, a guidance
    scale: an infinite one would turn every score into NaN far from here)."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class ModalityTemperature(LogitsProcessor):
    """Divide each row's scores by its temperature (image codes vs text); 0 keeps only the arg-max (greedy)."""

    def __init__(self, tokens: SpecialTokens, *, image: float = 1.0, text: float = 1.0) -> None:
        self.read = SpanReader(tokens)
        self.image = check_non_negative("image temperature", image)
        self.text = check_non_negative("text temperature", text)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(input_ids, scores)
        temperature = _per_row(self.read, input_ids, self.image, self.text).to(scores.device)
        greedy = temperature == 0
        scaled = scores / torch.where(greedy, 1.0, temperature).to(scores.dtype)
        best = scores.argmax(dim=1, keepdim=True)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True)
        return torch.where(greedy & ~keep, -torch.inf, scaled)


def check_top_k(name: str, value: int | None) -> int | None:
    """``value`` as an int (None passes: no top-k); ValueError naming ``name`` unless it is an integer >= 1."""
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 (or None to disable), got {value!r}")
    return None if value is None else int(value)


class ModalityTopK(LogitsProcessor):
    """Keep the ``k`` best scores of each row (``image`` k inside an image span, ``text`` k elsewhere).

    ``None`` disables top-k for that modality; ties at the k-th score are all kept (as transformers does).
    """

    def __init__(self, tokens: SpecialTokens, *, image: int | None = None, text: int | None = None) -> None:
        self.read = SpanReader(tokens)
        self.image = check_top_k("image top-k", image)
        self.text = check_top_k("text top-k", text)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(input_ids, scores)
        vocab = scores.shape[1]
        image_k = min(self.image or vocab, vocab)
        text_k = min(self.text or vocab, vocab)
        if image_k == text_k == vocab:
            return scores
        k = _per_row(self.read, input_ids, image_k, text_k).to(scores.device)
        top = scores.topk(max(image_k, text_k), dim=1).values
        kth = top.gather(1, k - 1)
        return scores.masked_fill(scores < kth, -torch.inf)


class ModalityTopP(LogitsProcessor):
    """Nucleus filtering per row: keep the smallest set of best ids whose probability reaches ``p``.

    ``image`` applies inside an image span, ``text`` elsewhere; ``p = 1`` disables it. The best id is always kept.
    """

    def __init__(self, tokens: SpecialTokens, *, image: float = 1.0, text: float = 1.0) -> None:
        for name, value in (("image top-p", image), ("text top-p", text)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.read = SpanReader(tokens)
        self.image, self.text = float(image), float(text)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(input_ids, scores)
        if self.image == self.text == 1.0:
            return scores
        p = _per_row(self.read, input_ids, self.image, self.text).to(scores.device)
        ordered, order = scores.sort(dim=1, descending=True)
        probs = ordered.float().softmax(dim=1)
        # An id is dropped when the ids ranked before it already reach p.
        drop_sorted = (probs.cumsum(dim=1) - probs) >= p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        return scores.masked_fill(drop, -torch.inf)


def create_logits_processor(
    tokens: SpecialTokens,
    *,
    cfg: float | None = None,
    image_top_k: int | None = None,
    text_top_k: int | None = None,
    image_temperature: float = 1.0,
    text_temperature: float = 1.0,
    top_p: float = 1.0,
    size: tuple[int, int] | None = None,
    with_features: bool = False,
) -> LogitsProcessorList:
    """The processors for one decoding run, in order: CFG (when ``cfg`` is given and not 1), grid constraint,
    temperature, top-k, top-p. ``size`` is ``(rows, cols)`` in codes for images the model opens itself.

    With ``cfg`` the batch must be laid out ``[conditional rows; unconditional rows]`` (:class:`CFGProcessor`).
    """
    processors: list[LogitsProcessor] = []
    if cfg is not None and cfg != 1.0:
        processors.append(CFGProcessor(cfg))
    processors.append(GridConstraint(tokens, size=size, with_features=with_features))
    processors += sampling_processors(
        tokens,
        image_temperature=image_temperature,
        text_temperature=text_temperature,
        image_top_k=image_top_k,
        text_top_k=text_top_k,
        top_p=top_p,
    )
    return LogitsProcessorList(processors)


def sampling_processors(
    tokens: SpecialTokens,
    *,
    image_temperature: float,
    text_temperature: float,
    image_top_k: int | None,
    text_top_k: int | None,
    top_p: float = 1.0,
) -> list[LogitsProcessor]:
    """Only the warpers (temperature, top-k, top-p), for callers that add guidance and grammar themselves."""
    return [
        ModalityTemperature(tokens, image=image_temperature, text=text_temperature),
        ModalityTopK(tokens, image=image_top_k, text=text_top_k),
        ModalityTopP(tokens, image=top_p, text=top_p),
    ]
