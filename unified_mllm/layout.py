"""The token layout: the only place token ids are assembled.

One image becomes one span (UniToken's layout, whose discrete part is exactly Lumina-mGPT's)::

    <image-start> <size-h> <size-w>  c c … c <row-end>  …  c c … c <row-end>  <sep> f f … f  <image-end>
                  resolution tokens   VQ codes, one grid row at a time          feature slots

* ``<size-n>`` stands for ``n * size_unit`` code rows (height, first) or columns (width). Chameleon's
  tokenizer has ``size_unit = 2`` (one step = 32 px at 16x downsampling); our trained tokenizers use 1.
* ``<sep>`` and the feature slots are present only when the span carries continuous features
  (``num_features > 0``); without them the span is exactly Lumina-mGPT's, so its checkpoints read it.
* Feature slots hold the placeholder id ``tokens.feature``; the model scatters projected SigLIP features
  into those positions, so ``feature_mask = ids == tokens.feature``.
* The continuous part is a :class:`FeatureBlock`: ``flat`` slots, then optionally ``rows`` rows of ``cols``
  slots each followed by ``<row-end>`` (UniToken's published AnyRes layout, ``model.vision.anyres.layout``
  ``unitoken``: there the LM reads the row-end token's own embedding after every merged feature row). An int
  ``num_features`` is ``FeatureBlock(flat=num_features)``, the only form of the default layout.

Every id comes from :class:`SpecialTokens`, which is resolved by *name* from a text tokenizer; the
functions here are pure (lists/arrays in, lists/arrays out) so they are easy to test and reuse.
:class:`SpanReader` is the one reader of spans from batched id tensors: the logits processors' grid state,
the model's code cells (``model.grid_positions``) and the engine's "is this id a code" all come from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

IMAGE_PLACEHOLDER = "<|image|>"

# The roles every tokenizer must name; see TextTokenizer.special_token_names().
SPECIAL_ROLES = (
    "bos",
    "eos",
    "pad",
    "image_start",
    "image_end",
    "row_end",
    "separator",
    "end_of_turn",
    "feature",
)


class LayoutError(ValueError):
    """Base class of layout errors."""


class MalformedSpanError(LayoutError):
    """An id sequence that is not a well-formed image span."""


class PlaceholderMismatchError(LayoutError):
    """The number of ``<|image|>`` placeholders differs from the number of images given."""


class NamedVocabulary(Protocol):
    """What :meth:`SpecialTokens.from_tokenizer` needs from a text tokenizer."""

    def special_token_names(self) -> dict[str, str]: ...
    def size_token_names(self) -> list[str]: ...
    def token_to_id(self, name: str) -> int: ...
    def image_code_ids(self) -> list[int]: ...
    @property
    def size_unit(self) -> int: ...


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the structural tokens, the resolution tokens and the image codes of one tokenizer."""

    bos: int
    eos: int
    pad: int
    image_start: int
    image_end: int
    row_end: int
    separator: int
    end_of_turn: int
    feature: int
    size_ids: tuple[int, ...]
    """``size_ids[n]`` is the token for ``n * size_unit`` code rows/columns."""
    size_unit: int
    code_ids: tuple[int, ...]
    """``code_ids[c]`` is the token id of VQ code ``c``."""
    _id_to_code: dict[int, int] = field(init=False, repr=False, compare=False)
    _code_table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        structural = [getattr(self, role) for role in SPECIAL_ROLES if role != "pad"]
        if len(set(structural)) != len(structural):
            raise LayoutError(f"structural tokens must be distinct ids, got {self.named_ids()}")
        if len(set(self.code_ids)) != len(self.code_ids):
            raise LayoutError("image code ids must be distinct")
        clash = set(self.code_ids) & set(structural) | set(self.code_ids) & set(self.size_ids)
        if clash:
            raise LayoutError(f"ids {sorted(clash)[:8]} are both image codes and special tokens")
        object.__setattr__(self, "_id_to_code", {t: c for c, t in enumerate(self.code_ids)})
        object.__setattr__(self, "_code_table", np.asarray(self.code_ids, dtype=np.int64))

    @classmethod
    def from_tokenizer(cls, tokenizer: NamedVocabulary) -> SpecialTokens:
        """Resolve every role by its name in ``tokenizer`` (raises KeyError naming a missing token)."""
        names = tokenizer.special_token_names()
        missing_roles = [role for role in SPECIAL_ROLES if role not in names]
        if missing_roles:
            raise LayoutError(f"tokenizer does not name the roles {missing_roles}")
        ids = {role: tokenizer.token_to_id(names[role]) for role in SPECIAL_ROLES}
        sizes = tuple(tokenizer.token_to_id(name) for name in tokenizer.size_token_names())
        return cls(
            **ids, size_ids=sizes, size_unit=tokenizer.size_unit, code_ids=tuple(tokenizer.image_code_ids())
        )

    def named_ids(self) -> dict[str, int]:
        return {role: getattr(self, role) for role in SPECIAL_ROLES}

    @property
    def num_codes(self) -> int:
        return len(self.code_ids)

    @property
    def max_grid(self) -> int:
        """Largest number of code rows/columns a resolution token can express."""
        return (len(self.size_ids) - 1) * self.size_unit

    # -- resolution tokens ------------------------------------------------------------------------

    def size_token(self, num_codes: int) -> int:
        """The resolution token for ``num_codes`` code rows or columns."""
        if num_codes < 1 or num_codes % self.size_unit:
            raise LayoutError(
                f"a grid side of {num_codes} codes is not a positive multiple of {self.size_unit}"
            )
        steps = num_codes // self.size_unit
        if steps >= len(self.size_ids):
            raise LayoutError(
                f"a grid side of {num_codes} codes exceeds the largest size token ({self.max_grid})"
            )
        return self.size_ids[steps]

    def size_from_token(self, token_id: int) -> int:
        """Code rows/columns encoded by a resolution token."""
        try:
            return self.size_ids.index(token_id) * self.size_unit
        except ValueError:
            raise MalformedSpanError(f"id {token_id} is not a resolution token") from None

    # -- image codes ------------------------------------------------------------------------------

    def is_code(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Boolean mask of the positions holding an image-code id."""
        return np.isin(np.asarray(ids), self._code_table)

    def codes_to_ids(self, codes: np.ndarray | Sequence[int]) -> np.ndarray:
        """Map VQ code indices (any shape) to token ids."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise LayoutError(
                f"VQ codes must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]"
            )
        return self._code_table[codes]

    def ids_to_codes(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Map token ids (any shape) back to VQ code indices; every id must be an image code."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        try:
            codes = [self._id_to_code[int(t)] for t in flat]
        except KeyError as exc:
            raise MalformedSpanError(f"id {exc.args[0]} is not an image code") from None
        return np.asarray(codes, dtype=np.int64).reshape(np.shape(ids))


# ------------------------------------------------------------------------------------- image spans


@dataclass(frozen=True)
class FeatureBlock:
    """The continuous part of an image span (after ``<sep>``): ``flat`` feature slots, then ``rows`` rows of
    ``cols`` feature slots, each row followed by one ``<row-end>`` id (UniToken's AnyRes layout; ``rows=0``:
    flat only, our default layout)."""

    flat: int
    rows: int = 0
    cols: int = 0

    def __post_init__(self) -> None:
        # rows without features (cols 0) or no rows at all both occur: UniToken keeps nothing of one side of the
        # merged grid for images far thinner than their tile grid.
        if min(self.flat, self.rows, self.cols) < 0:
            raise LayoutError(f"a feature block needs flat, rows, cols >= 0, got {self}")

    @classmethod
    def of(cls, value: int | FeatureBlock) -> FeatureBlock:
        """``value`` as a block (an int is that many flat slots)."""
        return value if isinstance(value, FeatureBlock) else cls(flat=int(value))

    @property
    def num_features(self) -> int:
        """Feature slots (continuous vectors) of the block."""
        return self.flat + self.rows * self.cols

    @property
    def length(self) -> int:
        """Positions the block takes: its feature slots plus its ``<row-end>`` ids."""
        return self.num_features + self.rows

    def __bool__(self) -> bool:
        return self.length > 0

    def ids(self, tokens: SpecialTokens) -> list[int]:
        """The block's ids: ``feature`` placeholders, with ``row_end`` after every grid row."""
        row = [tokens.feature] * self.cols + [tokens.row_end]
        return [tokens.feature] * self.flat + row * self.rows


def image_span_length(height: int, width: int, num_features: int | FeatureBlock = 0) -> int:
    """Number of ids in the span of a ``height x width`` code grid with ``num_features`` slots (or a block)."""
    block = FeatureBlock.of(num_features)
    features = 1 + block.length if block else 0
    return 3 + height * (width + 1) + features + 1


def image_prefix(tokens: SpecialTokens, height: int, width: int) -> list[int]:
    """``<image-start> <size-h> <size-w>``: how a span opens, and what a generation prompt ends with."""
    return [tokens.image_start, tokens.size_token(height), tokens.size_token(width)]


def build_image_span(
    codes: np.ndarray | Sequence[Sequence[int]], tokens: SpecialTokens, num_features: int | FeatureBlock = 0
) -> list[int]:
    """The id span of one image from its code grid ``codes [h, w]`` and ``num_features`` feature slots (an int:
    that many flat slots; a :class:`FeatureBlock`: its slots and row ends)."""
    grid = np.asarray(codes, dtype=np.int64)
    if grid.ndim != 2 or 0 in grid.shape:
        raise LayoutError(f"codes must be a non-empty [h, w] grid, got shape {grid.shape}")
    if not isinstance(num_features, FeatureBlock) and num_features < 0:
        raise LayoutError(f"num_features must be >= 0, got {num_features}")
    block = FeatureBlock.of(num_features)
    height, width = grid.shape
    rows = np.concatenate([tokens.codes_to_ids(grid), np.full((height, 1), tokens.row_end)], axis=1)
    span = image_prefix(tokens, height, width) + rows.ravel().tolist()
    if block:
        span += [tokens.separator, *block.ids(tokens)]
    span.append(tokens.image_end)
    return span


@dataclass(frozen=True)
class ParsedImage:
    """A span read back: its code grid and how many feature slots it carried."""

    codes: np.ndarray
    """[h, w] VQ code indices."""
    num_features: int
    feature_row_ends: int = 0
    """``<row-end>`` ids inside the continuous part (UniToken's AnyRes layout; 0 in ours)."""


def _expect(ids: Sequence[int], pos: int, expected: int, what: str) -> None:
    if pos >= len(ids):
        raise MalformedSpanError(f"span ends at position {pos} where {what} (id {expected}) was expected")
    if ids[pos] != expected:
        raise MalformedSpanError(f"position {pos}: expected {what} (id {expected}), found id {ids[pos]}")


def parse_image_span(ids: Sequence[int], tokens: SpecialTokens) -> ParsedImage:
    """Read one complete span (from ``<image-start>`` to ``<image-end>``) back into its code grid."""
    ids = [int(t) for t in ids]
    _expect(ids, 0, tokens.image_start, "<image-start>")
    if len(ids) < 3:
        raise MalformedSpanError("span ends before its two resolution tokens")
    height, width = tokens.size_from_token(ids[1]), tokens.size_from_token(ids[2])
    pos, rows = 3, []
    for row in range(height):
        chunk = ids[pos : pos + width]
        if len(chunk) < width:
            raise MalformedSpanError(f"row {row} ends after {len(chunk)} of {width} codes")
        bad = [i for i, t in enumerate(chunk) if t not in tokens._id_to_code]
        if bad:
            raise MalformedSpanError(
                f"row {row}, column {bad[0]} (position {pos + bad[0]}): id {chunk[bad[0]]} is not an image code"
            )
        rows.append(tokens.ids_to_codes(chunk))
        _expect(ids, pos + width, tokens.row_end, f"<row-end> after row {row}")
        pos += width + 1
    num_features = row_ends = 0
    if pos < len(ids) and ids[pos] == tokens.separator:
        pos += 1
        while pos < len(ids) and ids[pos] in (tokens.feature, tokens.row_end):
            if ids[pos] == tokens.feature:
                num_features += 1
            else:
                row_ends += 1
            pos += 1
        if num_features == 0:
            raise MalformedSpanError(f"position {pos}: <sep> is not followed by feature slots")
    _expect(ids, pos, tokens.image_end, "<image-end>")
    if pos + 1 != len(ids):
        raise MalformedSpanError(f"{len(ids) - pos - 1} ids follow <image-end> inside the span")
    return ParsedImage(codes=np.stack(rows), num_features=num_features, feature_row_ends=row_ends)


def find_image_spans(ids: Sequence[int], tokens: SpecialTokens) -> list[tuple[int, int]]:
    """``[start, end)`` bounds of every image span in ``ids`` (an unterminated span is an error)."""
    spans, start = [], None
    for pos, token in enumerate(ids):
        if token == tokens.image_start:
            if start is not None:
                raise MalformedSpanError(f"position {pos}: <image-start> inside the image opened at {start}")
            start = pos
        elif token == tokens.image_end:
            if start is None:
                raise MalformedSpanError(f"position {pos}: <image-end> without an open image")
            spans.append((start, pos + 1))
            start = None
    if start is not None:
        raise MalformedSpanError(f"image opened at position {start} is never closed")
    return spans


def split_interleaved(ids: Sequence[int], tokens: SpecialTokens) -> list[list[int] | ParsedImage]:
    """Split generated ids into text runs (lists of ids) and parsed images, in order."""
    pieces: list[list[int] | ParsedImage] = []
    cursor = 0
    for start, end in find_image_spans(ids, tokens):
        if start > cursor:
            pieces.append(list(ids[cursor:start]))
        pieces.append(parse_image_span(ids[start:end], tokens))
        cursor = end
    if cursor < len(ids):
        pieces.append(list(ids[cursor:]))
    return pieces


def feature_mask(ids: np.ndarray | Sequence[int], tokens: SpecialTokens) -> np.ndarray:
    """Boolean mask of the feature slots (where projected SigLIP features go)."""
    return np.asarray(ids) == tokens.feature


def continuous_mask(ids: np.ndarray | Sequence[int], tokens: SpecialTokens) -> np.ndarray:
    """Boolean mask of every position of the continuous parts of image spans: the feature slots and the
    ``<row-end>`` ids between them (:class:`FeatureBlock`); nothing there is predicted. In our default layout
    this is exactly :func:`feature_mask`."""
    ids = np.asarray(ids)
    mask = ids == tokens.feature
    # A <row-end> belongs to a block when the nearest non-<row-end> id before it is a feature slot or <sep>.
    for pos in np.flatnonzero(ids == tokens.row_end):
        back = pos - 1
        while back >= 0 and ids[back] == tokens.row_end:
            back -= 1
        if back >= 0 and ids[back] in (tokens.feature, tokens.separator):
            mask[pos] = True
    return mask


# --------------------------------------------------------------------------- reading spans from id rows


@dataclass(frozen=True)
class SpanState:
    """Where each row stands with respect to its last image span, read from the ids alone.

    All fields are ``[B]`` tensors on the ids' device.
    """

    inside: torch.Tensor
    """bool: the row's last ``<image-start>`` has no ``<image-end>`` after it."""
    offset: torch.Tensor
    """long: ids after that ``<image-start>`` (0: the next id is the height token); 0 outside a span."""
    height: torch.Tensor
    """long: code rows named by the span's height token; -1 outside a span or before the token."""
    width: torch.Tensor
    """long: code columns named by the width token; -1 outside a span or before the token."""

    @property
    def grid_length(self) -> torch.Tensor:
        """``[B]`` ids of the code grid of the open span (rows of ``width`` codes plus ``<row-end>``)."""
        return self.height * (self.width + 1)

    @property
    def grid_done(self) -> torch.Tensor:
        """``[B]`` bool: the open span's last row is complete; only its closing part is left."""
        return self.inside & (self.offset >= 2) & (self.offset - 2 == self.grid_length)


def _latest(found: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` long: the index of the latest position at or before each one where ``found`` ``[B, T]``
    holds (-1: none yet); cummax carries it forward along the row."""
    index = torch.arange(found.shape[1], device=found.device).expand_as(found)
    return torch.where(found, index, -1).cummax(dim=1).values


class SpanReader:
    """Reads image spans back from rows of ids ``[B, T]``: which ids are image codes, the grid cell of every
    code, and where each row stands in its last span.

    Vectorised torch on the ids' device; every row is read on its own, so batches, left padding and rows that
    hold several spans (packed samples) need nothing special. Holds the id tables of one tokenizer (copied to
    each device on first use); ids past a table are neither codes nor resolution tokens.
    """

    def __init__(self, tokens: SpecialTokens) -> None:
        self.tokens = tokens
        code_ids = torch.as_tensor(tokens.code_ids, dtype=torch.long)
        is_code = torch.zeros(int(code_ids.max()) + 1, dtype=torch.bool).index_fill_(0, code_ids, True)
        sides = torch.full((max(tokens.size_ids) + 1,), -1, dtype=torch.long)
        sides[list(tokens.size_ids)] = torch.arange(len(tokens.size_ids)) * tokens.size_unit
        self._tables = {torch.device("cpu"): {"is_code": is_code, "side": sides, "code_id": code_ids}}

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = {key: t.to(device) for key, t in self._tables[torch.device("cpu")].items()}
        return self._tables[device][name]

    def _lookup(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The table entry of each id (clamped into the table) and whether the id lies inside the table."""
        table = self._table(name, ids.device)
        last = table.numel() - 1
        return table[ids.clamp(max=last)], ids <= last

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        """bool, the shape of ``ids`` (any): which ids are image codes."""
        value, known = self._lookup("is_code", ids)
        return value & known

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        """The token id of each VQ code index in ``codes`` (any shape, on its device)."""
        return self._table("code_id", codes.device)[codes]

    def _side(self, ids: torch.Tensor) -> torch.Tensor:
        """Grid side named by each resolution id in ``ids``; -1 for any other id."""
        value, known = self._lookup("side", ids)
        return torch.where(known, value, -1)

    @staticmethod
    def _check(ids: torch.Tensor) -> None:
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")

    def cells(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, 2]`` long: the grid cell (row, column) of every image-code position of ``ids`` ``[B, T]``,
        ``-1`` everywhere else (text, structure tokens, feature slots, padding). Row = row-end tokens since the
        image start, column = codes since the last row end or image start."""
        self._check(ids)
        is_code = self.is_code(ids)
        is_start = ids == self.tokens.image_start
        is_row_end = ids == self.tokens.row_end
        start_at = _latest(is_start)
        boundary_at = _latest(is_start | is_row_end)
        row_ends = is_row_end.long().cumsum(dim=1)
        codes = is_code.long().cumsum(dim=1)
        rows = row_ends - row_ends.gather(1, start_at.clamp(min=0))
        cols = codes - codes.gather(1, boundary_at.clamp(min=0)) - 1
        inside = is_code & (start_at >= 0)
        return torch.where(inside[..., None], torch.stack([rows, cols], dim=-1), -1)

    def state(self, ids: torch.Tensor) -> SpanState:
        """The :class:`SpanState` of each row of ``ids`` ``[B, T]``: its last span, open or not."""
        self._check(ids)
        length = ids.shape[1]
        last_start = _latest(ids == self.tokens.image_start)[:, -1]
        last_end = _latest(ids == self.tokens.image_end)[:, -1]
        inside = last_start > last_end
        offset = torch.where(inside, length - 1 - last_start, 0)
        rows = torch.arange(ids.shape[0], device=ids.device)

        def side(delta: int) -> torch.Tensor:
            read = self._side(ids[rows, (last_start + delta).clamp(0, length - 1)])
            return torch.where(inside & (offset >= delta), read, -1)

        return SpanState(inside=inside, offset=offset, height=side(1), width=side(2))


# ------------------------------------------------------------------------------- text with images


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def expand_image_placeholders(
    text: str, image_spans: Sequence[Sequence[int]], encode: Callable[[str], list[int]]
) -> list[int]:
    """Tokenize ``text`` with each ``<|image|>`` replaced, in order, by one of ``image_spans``."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(image_spans):
        raise PlaceholderMismatchError(
            f"text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image_spans)} image(s) "
            f"were given: {text[:80]!r}"
        )
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(encode(piece))
        if i < len(image_spans):
            ids.extend(int(t) for t in image_spans[i])
    return ids


# ------------------------------------------------------------------------------------ generation


PromptStyle = str  # "native" | "unitoken" (model.prompt_style)


def generation_prompt(
    condition_ids: Iterable[int],
    tokens: SpecialTokens,
    height: int,
    width: int,
    answer_prefix: Sequence[int] = (),
) -> list[int]:
    """The prompt that asks for a ``height x width`` code grid given a tokenized text condition.

    It is the one-turn conversation ``<bos> condition <end-of-turn>`` (see ``data/conversation.py``)
    followed by the opening of the image span, so the LM continues with the first row of codes.
    ``answer_prefix``: ids the answer starts with before ``<image-start>`` (``model.prompt_style`` unitoken:
    the ``model.t2i_answer_prefix`` token UniToken's solvers insert there; empty in ours).
    """
    return [
        tokens.bos,
        *condition_ids,
        tokens.end_of_turn,
        *answer_prefix,
        *image_prefix(tokens, height, width),
    ]


def unconditional_prompt(
    tokens: SpecialTokens, height: int, width: int, style: PromptStyle = "native"
) -> list[int]:
    """The classifier-free-guidance prompt.

    ``native``: the same conversation with an empty condition; training drops the condition of text-to-image
    samples into exactly this form, so the model knows it. ``unitoken``: the opening of the image span alone
    (``<image-start> <size-h> <size-w>``, no ``<bos>``, no text), UniToken's unconditional branch.
    """
    if style == "unitoken":
        return image_prefix(tokens, height, width)
    if style != "native":
        raise LayoutError(f"unknown prompt style {style!r} (native or unitoken)")
    return generation_prompt((), tokens, height, width)
