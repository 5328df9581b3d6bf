"""Learned 2-D positions of image slots (model.grid_positions): code cells read from ids, the embeddings the
model adds, decoding over a KV cache, export, training rules and config checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_mllm.config import ConfigError, get_preset, load_config
from unified_mllm.data.collate import Collator
from unified_mllm.infer.engine import Engine
from unified_mllm.infer.processors import GridConstraint
from unified_mllm.layout import SpecialTokens, build_image_span, generation_prompt
from unified_mllm.model.grid_positions import CodeCells
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer
from unified_mllm.train.optim import config_rules, resolve_rules

P = 64  # feature slots per view of the tiny preset
REPO = Path(__file__).resolve().parents[1]


def grid_model(grid: int = 32, seed: int = 0, random_tables: bool = True) -> UnifiedModel:
    config = get_preset("tiny")
    config.lm = dataclasses.replace(config.lm, num_layers=2)
    config.grid_positions = grid
    torch.manual_seed(seed)
    model = UnifiedModel(config)
    if random_tables and grid:
        with torch.no_grad():  # away from their zero start, so that a wrong cell changes the output
            model.code_grid_embedding.rows.weight[1:].normal_(std=0.5)
            model.code_grid_embedding.cols.weight[1:].normal_(std=0.5)
            model.vision.slot_embedding.normal_(std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tokens(sp_tokenizer: TextTokenizer) -> SpecialTokens:
    return sp_tokenizer.special_tokens()


def codes_of(tokens: SpecialTokens, height: int, width: int, first: int = 0) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) + first) % tokens.num_codes


# ------------------------------------------------------------------------------------------- cells


def test_cells_of_codes_in_two_images_with_features_padding_and_packing(tokens: SpecialTokens) -> None:
    text = [300, 301, 302]
    first = build_image_span(codes_of(tokens, 2, 3), tokens, num_features=4)
    second = build_image_span(codes_of(tokens, 3, 1, first=100), tokens)
    sample = [tokens.bos, *text, *first, *text, *second, tokens.end_of_turn]
    expected_first = [(r, c) for r in range(2) for c in range(3)]
    expected_second = [(r, 0) for r in range(3)]
    # Row 0: the sample; row 1: the same sample after two pads (left padding), then the second image's span
    # once more, packed behind it (a new image start resets the count).
    row0 = sample + [tokens.pad] * 2 + second
    row1 = [tokens.pad] * 2 + sample + second
    cells = CodeCells(tokens)(torch.tensor([row0, row1]))
    assert cells.shape == (2, len(row0), 2)
    for row, offset in ((0, 0), (1, 2)):
        is_code = tokens.is_code(np.asarray([row0, row1][row]))
        got = [tuple(c) for c in cells[row][torch.from_numpy(is_code)].tolist()]
        assert got == expected_first + expected_second + expected_second
        assert (cells[row][torch.from_numpy(~is_code)] == -1).all()
        # The very first code sits right after <image-start> <size-h> <size-w>.
        start = offset + 1 + len(text) + 3
        assert cells[row, start].tolist() == [0, 0] and cells[row, start + 2].tolist() == [0, 2]
        assert cells[row, start + 3].tolist() == [-1, -1]  # the row end
        assert cells[row, start + 4].tolist() == [1, 0]


def test_cells_of_a_partial_grid_and_of_codes_outside_a_span(tokens: SpecialTokens) -> None:
    span = build_image_span(codes_of(tokens, 2, 2), tokens)[:-3]  # decoding stopped inside row 1
    stray = int(tokens.codes_to_ids([3])[0])
    cells = CodeCells(tokens)(torch.tensor([[stray, *span]]))
    assert cells[0, 0].tolist() == [-1, -1]  # a code before any image start has no cell
    assert cells[0, -1].tolist() == [1, 0]


# --------------------------------------------------------------------------------------------- model


def test_zero_tables_change_nothing_and_tables_add_exactly_their_rows(tokens: SpecialTokens) -> None:
    plain = grid_model(grid=0)
    gridded = grid_model(random_tables=False)
    missing, unexpected = gridded.load_state_dict(plain.state_dict(), strict=False)
    assert (
        sorted(missing)
        == ["code_grid_embedding.cols.weight", "code_grid_embedding.rows.weight", "vision.slot_embedding"]
        and not unexpected
    )
    span = build_image_span(codes_of(tokens, 3, 4), tokens, num_features=P)
    ids = torch.tensor([[tokens.bos, 300, *span, 301, tokens.end_of_turn]])
    mask = ids == tokens.feature
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    cells = CodeCells(tokens)(ids)
    with torch.no_grad():
        assert torch.equal(
            plain(ids, pixel_values=pixels, feature_mask=mask).logits,
            gridded(ids, pixel_values=pixels, feature_mask=mask, code_cells=cells).logits,
        )
        table = gridded.code_grid_embedding
        table.rows.weight[1:].normal_()
        table.cols.weight[1:].normal_()
        gridded.vision.slot_embedding.normal_()
        added = gridded.embed(ids, pixels, mask, code_cells=cells) - plain.embed(ids, pixels, mask)
    code = torch.from_numpy(tokens.is_code(ids[0].numpy()))
    first = 2 + 3  # <bos>, text, then the code grid after <image-start> <size-h> <size-w>
    assert torch.allclose(added[0, first + 5 + 2], table.rows.weight[2] + table.cols.weight[3])  # cell (1, 2)
    assert torch.allclose(added[0, mask[0]], gridded.vision.slot_embedding, atol=1e-6)
    assert (added[0, ~(code | mask[0])] == 0).all()  # text and structure tokens: nothing added
    assert table.rows.weight[0].abs().sum() == 0  # the "no cell" row


def test_the_model_asks_for_cells_it_needs_and_refuses_cells_it_has_no_table_for(tokens) -> None:
    ids = torch.tensor([[tokens.bos, 300]])
    with pytest.raises(ValueError, match="pass code_cells"):
        grid_model()(ids)
    with pytest.raises(ValueError, match="no grid positions"):
        grid_model(grid=0)(ids, code_cells=torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match=r"\[B, T, 2\]"):
        grid_model()(ids, code_cells=torch.full((1, 3, 2), -1))


def test_export_round_trip_keeps_the_tables(tmp_path: Path, tokens: SpecialTokens) -> None:
    model = grid_model()
    model.save_pretrained(tmp_path / "export")
    loaded = UnifiedModel.from_pretrained(tmp_path / "export")
    assert loaded.config.grid_positions == 32
    ids = torch.tensor([[tokens.bos, *build_image_span(codes_of(tokens, 2, 2), tokens)]])
    cells = CodeCells(tokens)(ids)
    with torch.no_grad():
        assert torch.equal(model(ids, code_cells=cells).logits, loaded(ids, code_cells=cells).logits)


# ------------------------------------------------------------------------------------------ decoding


def test_cached_decoding_reads_the_same_cells_as_a_full_forward(sp_tokenizer, tokens) -> None:
    """Greedy grids from the engine (KV cache, one new id a forward) and from Jacobi decoding equal a naive loop
    that runs the whole sequence through the model at every step, cells computed from scratch."""
    model = grid_model()
    engine = Engine(model, tokens)
    condition = sp_tokenizer.encode("a red circle")
    height, width = 3, 4
    ids = generation_prompt(condition, tokens, height, width)
    constraint = GridConstraint(tokens, size=(height, width))
    cells = CodeCells(tokens)
    with torch.no_grad():
        for _ in range(height * (width + 1)):
            seq = torch.tensor([ids])
            logits = model(seq, code_cells=cells(seq)).logits[:, -1].float()
            ids.append(int(constraint(seq, logits).argmax()))
    naive = tokens.ids_to_codes(
        np.asarray(ids[-height * (width + 1) :]).reshape(height, width + 1)[:, :width]
    )
    for window in (0, 5):
        grid = engine.generate_images(
            [condition], height=height, width=width, greedy=True, jacobi_window=window
        )
        assert np.array_equal(grid[0], naive), window
    # Prompts of different lengths (left padding) and guidance: Jacobi still equals sequential decoding.
    conditions = [condition, sp_tokenizer.encode("two blue squares at the top")]
    kw = {"height": height, "width": width, "greedy": True, "cfg_scale": 2.0}
    sequential = engine.generate_images(conditions, **kw)
    jacobi = engine.generate_images(conditions, jacobi_window=6, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(sequential, jacobi))


def test_understanding_prompt_prefill_uses_the_cells(tokens) -> None:
    """A prompt holding an image: the engine's first logits equal the full forward's last ones."""
    model = grid_model()
    span = build_image_span(codes_of(tokens, 2, 3), tokens, num_features=P)
    prompt = [tokens.bos, *span, 300, 301]
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    seq = torch.tensor([prompt])
    with torch.no_grad():
        full = model(
            seq, pixel_values=pixels, feature_mask=seq == tokens.feature, code_cells=CodeCells(tokens)(seq)
        )
    result = Engine(model, tokens).generate([prompt], max_new_tokens=1, pixel_values=pixels, stop_ids=())
    assert result.ids[0] == [int(full.logits[0, -1].argmax())]


# ----------------------------------------------------------------------------- training and config


def test_the_collator_adds_cells_when_asked(tokens: SpecialTokens) -> None:
    span = build_image_span(codes_of(tokens, 2, 2), tokens)
    sample = {
        "ids": np.asarray([tokens.bos, *span]),
        "labels": np.asarray([-100, *span]),
        "feature_mask": np.zeros(len(span) + 1, dtype=bool),
    }
    plain = Collator(tokens.pad, 64)([sample, sample])
    assert plain.code_cells is None
    batch = Collator(tokens.pad, 64, pack=True, code_cells=CodeCells(tokens))([sample, sample])
    assert torch.equal(batch.code_cells, CodeCells(tokens)(batch.input_ids))
    assert batch.code_cells[0, len(sample["ids"]) + 4].tolist() == [0, 0]  # the packed second sample


def test_stage1_freezes_the_code_table_and_trains_the_slot_embedding() -> None:
    config = load_config([REPO / "configs/train/tiny-stage1.yaml"], ["model.grid_positions=32"])
    names = [name for name, _ in UnifiedModel(config.model, device="meta").named_parameters()]
    rules = resolve_rules(names, config_rules(config))
    assert not rules["code_grid_embedding.rows.weight"].trainable
    assert rules["vision.slot_embedding"].trainable and rules["vision.slot_embedding"].lr_scale == 1.0


def test_config_checks_the_grid_covers_every_size_token() -> None:
    with pytest.raises(ConfigError, match=r"model.grid_positions.*largest code grid.*32"):
        load_config([REPO / "configs/quickstart.yaml"], ["model.grid_positions=16"])
    with pytest.raises(ConfigError, match=r"model\.grid_positions.*>= 0"):
        load_config([REPO / "configs/quickstart.yaml"], ["model.grid_positions=-1"])
    assert (
        load_config([REPO / "configs/quickstart.yaml"], ["model.grid_positions=32"]).model.grid_positions
        == 32
    )
