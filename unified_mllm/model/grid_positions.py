"""Learned 2-D positions of image slots (``model.grid_positions``).

The LM sees an image as a 1-D run of ids, so its only clue to where a code sits is the RoPE distance to the
span's start, and the row / column has to be worked out from that (``position mod (width + 1)`` with the
row-end tokens). Some unified and vision-language models give image tokens explicit 2-D positions instead; this
module is that option for our layout (what it does on the embedded world: README, quickstart section). With
``model.grid_positions = G > 0`` the LM input gets, on top of the token embedding,

* at every **code** position: ``row_embedding[r] + column_embedding[c]`` (factorised, so one table pair serves
  every ``h x w`` grid up to ``G x G``), where ``(r, c)`` is the code's cell in its image's grid;
* at every **feature slot**: one learned embedding per slot of a SigLIP view (``P`` of them; every view, base or
  AnyRes tile, has the same patch grid), added by :class:`~unified_mllm.vision.siglip.VisionEncoder` to its
  projected features (and so trained with the projector in stage 1).

Both start at zero, so a model built with them computes exactly what it computes without them until training
moves them, and published LM checkpoints load unchanged (they have no such tables; they keep their zeros).

Cells are read from the ids by :class:`CodeCells` (vectorised, any device, batch > 1, padding and packed
rows): row = row-end tokens since the image start, column = codes since the last row end or image start; a
cell past ``model.grid_positions`` is an error of the config (validate() checks it against the size tokens).
Callers that feed only the newest ids (the engine over a KV cache) compute the cells over the whole sequence
and pass the newest ones.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from unified_mllm.layout import SpecialTokens


class CodeCells:
    """``ids [B, T] → cells [B, T, 2]`` long: the grid cell (row, column) of every image-code position and
    ``-1`` everywhere else (text, structure tokens, feature slots, padding). Stateless apart from the id
    tables, which follow the ids' device."""

    def __init__(self, tokens: SpecialTokens) -> None:
        self.image_start, self.row_end = tokens.image_start, tokens.row_end
        code_ids = torch.as_tensor(tokens.codes_to_ids(np.arange(tokens.num_codes)), dtype=torch.long)
        # Id -> "is a code" up to the largest code id; ids past it are not codes (looked up clamped).
        self._is_code = torch.zeros(int(code_ids.max()) + 1, dtype=torch.bool).index_fill_(0, code_ids, True)

    def _codes(self, ids: torch.Tensor) -> torch.Tensor:
        if self._is_code.device != ids.device:
            self._is_code = self._is_code.to(ids.device)
        last = self._is_code.numel() - 1
        return self._is_code[ids.clamp(max=last)] & (ids <= last)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        is_code = self._codes(ids)
        is_start = ids == self.image_start
        is_row_end = ids == self.row_end
        index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        # The index of the latest image start / row boundary at or before each position (-1: none yet);
        # cummax carries it forward along the row.
        start_at = torch.where(is_start, index, -1).cummax(dim=1).values
        boundary_at = torch.where(is_start | is_row_end, index, -1).cummax(dim=1).values
        row_ends = is_row_end.long().cumsum(dim=1)
        codes = is_code.long().cumsum(dim=1)
        rows = row_ends - row_ends.gather(1, start_at.clamp(min=0))
        cols = codes - codes.gather(1, boundary_at.clamp(min=0)) - 1
        inside = is_code & (start_at >= 0)
        return torch.where(inside[..., None], torch.stack([rows, cols], dim=-1), -1)


class CodeGridEmbedding(nn.Module):
    """Row + column embeddings ``[B, T, H]`` of code cells ``[B, T, 2]`` (zero where a cell is ``-1``), for
    grids up to ``max_side x max_side``. Index 0 of each table is the "no cell" entry: fixed at zero, never
    trained."""

    def __init__(self, max_side: int, hidden: int, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.max_side = max_side
        self.rows = nn.Embedding(max_side + 1, hidden, padding_idx=0, device=device)
        self.cols = nn.Embedding(max_side + 1, hidden, padding_idx=0, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.rows.weight)
        nn.init.zeros_(self.cols.weight)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        return self.rows(cells[..., 0] + 1) + self.cols(cells[..., 1] + 1)
