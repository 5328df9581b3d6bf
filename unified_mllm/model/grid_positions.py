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

Cells are read from the ids by :class:`CodeCells` (the layout's span reader); a cell past
``model.grid_positions`` is an error of the config (validate() checks it against the size tokens). Callers that
feed only the newest ids (the engine over a KV cache) compute the cells over the whole sequence and pass the
newest ones.
"""

from __future__ import annotations

import torch
from torch import nn

from unified_mllm.layout import SpanReader, SpecialTokens


class CodeCells:
    """``ids [B, T] → cells [B, T, 2]``: the grid cell (row, column) of every image-code position, ``-1``
    elsewhere, as :meth:`~unified_mllm.layout.SpanReader.cells` reads them."""

    def __init__(self, tokens: SpecialTokens) -> None:
        self._read = SpanReader(tokens)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self._read.cells(ids)


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
