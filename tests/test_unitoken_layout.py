"""UniToken's published layouts as config (issue 15, item 2): the AnyRes feature layout, the solvers' prompts and
the VQ preprocessing, each checked against values worked out BY HAND from the seed repository's code
(SxJyJay/UniToken: tools/mm_utils.py, model/modeling_xllmx_chameleon_anyres.py, inference_solver_anyres.py,
data/item_processor.py), and the defaults left exactly as they were."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from tests.helpers import TOKENS, make_tokenized_world, save_random_vq, spy_on_engine
from unified_mllm.config import (
    UNITOKEN_ANYRES_GRIDS,
    UNITOKEN_PAD_COLOR,
    AnyResConfig,
    DataSourceConfig,
    ModelConfig,
    VisionConfig,
    get_preset,
    load_config,
    with_unitoken_layouts,
)
from unified_mllm.data.conversation import IGNORE_INDEX, Turn, t2i_answer_prefix_ids, tokenize_conversation
from unified_mllm.data.dataset import build_batches
from unified_mllm.data.pretokenize import CODES_MEMBER, load_vq, vq_fingerprint
from unified_mllm.data.samples import TokenizedRecord, t2i_sample
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.layout import (
    FeatureBlock,
    build_image_span,
    continuous_mask,
    generation_prompt,
    image_span_length,
    parse_image_span,
    unconditional_prompt,
)
from unified_mllm.model.export import unique_state_dict
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer
from unified_mllm.train.export import export_run
from unified_mllm.vision.anyres import (
    anyres_views,
    encode_images,
    feature_index,
    image_feature_block,
    image_grid,
    num_image_features,
    tile_views,
)
from unified_mllm.vision.image import halving_center_crop, image_to_tensor, preprocess, resize_center_crop
from unified_mllm.vision.vqgan import VQGAN

F, R = TOKENS.feature, TOKENS.row_end  # 108, 105
BOS, EOT, START, END, SEP = (
    TOKENS.bos,
    TOKENS.end_of_turn,
    TOKENS.image_start,
    TOKENS.image_end,
    TOKENS.separator,
)
UNITOKEN_ANYRES = AnyResConfig(
    enabled=True, grids=UNITOKEN_ANYRES_GRIDS, pad_color=UNITOKEN_PAD_COLOR, layout="unitoken"
)


def unitoken_keys(prefix_name: str) -> list[str]:
    """The overrides with_unitoken_layouts sets for an AnyRes checkpoint, VQ preprocessing aside."""
    return [
        "model.prompt_style=unitoken",
        f"model.t2i_answer_prefix={prefix_name}",
        "model.vision.anyres.enabled=true",
        "model.vision.anyres.layout=unitoken",
        "model.vision.anyres.grids=[[2,1],[1,2],[2,2],[3,1],[1,3]]",
        "model.vision.anyres.pad_color=[0,0,0]",
    ]


def tiny_vision(anyres: AnyResConfig | None = UNITOKEN_ANYRES) -> VisionConfig:
    """The tiny preset's SigLIP: 64 px views of 8 px patches, n = 8 patches a side, P = 64 features a view."""
    vision = get_preset("tiny").vision
    return dataclasses.replace(vision, anyres=anyres or AnyResConfig(enabled=False))


def seed_vision(anyres: AnyResConfig | None = UNITOKEN_ANYRES) -> VisionConfig:
    """The published SigLIP-so400m at 384 px: n = 384 // 14 = 27, P = 729."""
    return dataclasses.replace(VisionConfig(), anyres=anyres or AnyResConfig(enabled=False))


# --------------------------------------------------------------------------------- AnyRes: slot counts


def test_published_candidates_are_the_seeds_width_height_pinpoints_as_rows_cols() -> None:
    # image_grid_pinpoints (width, height): [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]
    pinpoints = [[384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]]
    assert [[h // 384, w // 384] for w, h in pinpoints] == UNITOKEN_ANYRES_GRIDS
    assert UNITOKEN_PAD_COLOR == [0, 0, 0]  # resize_and_pad_image: Image.new('RGB', ..., (0, 0, 0))


def test_one_call_sets_every_unitoken_key() -> None:
    base = get_preset("chameleon-7b")
    model = with_unitoken_layouts(base, anyres=True, t2i_answer_prefix="<prefix>")
    assert (model.prompt_style, model.t2i_answer_prefix, model.vq.preprocess) == (
        "unitoken",
        "<prefix>",
        "halving",
    )
    assert model.vision.anyres == UNITOKEN_ANYRES
    assert base == get_preset("chameleon-7b")  # a copy; the preset is untouched
    plain = with_unitoken_layouts(base, anyres=False, t2i_answer_prefix="<prefix>")
    assert plain.vision.anyres == base.vision.anyres and plain.prompt_style == "unitoken"


def test_small_wide_image_has_166_positions_in_unitokens_layout_and_192_in_ours() -> None:
    # A 100 x 40 (width x height) image, 64 px tiles. select_best_resolution over (w, h) candidates:
    #   64x128: scale min(.64, 3.2) = .64 -> 64 x 25 = 1600
    #   128x64: scale min(1.28, 1.6) = 1.28 -> 128 x 51 = 6528, capped at the image's 100*40 = 4000; waste 4192
    #   128x128: 4000, waste 12384;  64x192: 1600;  192x64: scale 1.6 -> 160 x 64, 4000, waste 8288
    # -> 128x64: 1 row, 2 columns of tiles. Merged feature grid 8 x 16; unpad_image with (w, h) = (100, 40):
    # 100/40 = 2.5 > 16/8 = 2 -> new_height = int(40 * 16/100) = int(6.4) = 6, padding = (8 - 6) // 2 = 1,
    # rows 1..7 kept: 6 rows of 16 features, each + the row-end embedding. 64 + 6 * 17 = 166.
    vision = tiny_vision()
    assert image_grid(vision, (40, 100)) == (1, 2)
    assert image_feature_block(vision, (40, 100)) == FeatureBlock(flat=64, rows=6, cols=16)
    assert num_image_features(vision, (40, 100)) == 166
    ours = tiny_vision(AnyResConfig(enabled=True))  # tiles layout, our grids: [1, 2] -> 3 views of 64
    assert num_image_features(ours, (40, 100)) == 192


def test_square_image_takes_the_first_of_two_equal_candidates_in_the_seeds_order() -> None:
    # 64 x 64: 64x128 and 128x64 both keep 4096 px with 4096 wasted; the earlier one, 64x128 (w x h), wins:
    # 2 rows, 1 column. Grid 16 x 8; 64/64 = 1 > 8/16 -> new_height = int(64 * 8/64) = 8, padding = (16-8)//2
    # = 4: rows 4..12, 8 rows of 8 features + row end. 64 + 8 * 9 = 136.
    vision = tiny_vision()
    assert image_grid(vision, (64, 64)) == (2, 1)
    assert num_image_features(vision, (64, 64)) == 136


def test_images_far_thinner_than_their_grid_keep_no_features_of_one_side() -> None:
    # 1000 x 10: 192x64 keeps int(1000 * .192) x int(10 * .192) = 192 x 1 px, the most -> 1 row, 3 columns.
    # Grid 8 x 24; 100 > 3 -> new_height = int(10 * 24/1000) = 0, padding 4: no row is kept. 64 positions.
    vision = tiny_vision()
    assert image_grid(vision, (10, 1000)) == (1, 3)
    assert image_feature_block(vision, (10, 1000)) == FeatureBlock(flat=64, rows=0, cols=24)
    assert num_image_features(vision, (10, 1000)) == 64
    assert feature_index(vision, (10, 1000)).tolist() == [[0, p] for p in range(64)]
    # 10 x 1000: 64x192 -> 3 rows, 1 column; grid 24 x 8; new_width = int(10 * 24/1000) = 0, padding 4: every
    # row keeps no feature but still gets its row end: 64 + 24 x (0 + 1) = 88, as UniToken's concatenation does.
    assert image_grid(vision, (1000, 10)) == (3, 1)
    assert image_feature_block(vision, (1000, 10)) == FeatureBlock(flat=64, rows=24, cols=0)
    assert num_image_features(vision, (1000, 10)) == 88
    span = build_image_span([[0]], TOKENS, image_feature_block(vision, (1000, 10)))
    assert span[5:] == [SEP, *[F] * 64, *[R] * 24, END] and continuous_mask(span, TOKENS).sum() == 88


def test_published_scale_counts() -> None:
    # Base UniToken (no AnyRes): 729 features, no row ends, as in ours.
    assert num_image_features(seed_vision(None), (400, 1000)) == 729
    # AnyRes, a 1000 x 400 image, 384 px tiles: 1152x384 scales by min(1.152, .96) = .96 -> 960 x 384 = 368640
    # (< 400000), more than every other candidate (768x384: 768 x 307 = 235776) -> 1 row, 3 columns.
    # Grid 27 x 81; 1000/400 = 2.5 < 81/27 = 3 -> new_width = int(1000 * 27/400) = int(67.5) = 67, padding =
    # (81 - 67) // 2 = 7: columns 7..74, 27 rows of 67 features + row end. 729 + 27 * 68 = 2565.
    vision = seed_vision()
    assert image_grid(vision, (400, 1000)) == (1, 3)
    assert image_feature_block(vision, (400, 1000)) == FeatureBlock(flat=729, rows=27, cols=67)
    assert num_image_features(vision, (400, 1000)) == 2565
    assert num_image_features(seed_vision(AnyResConfig(enabled=True)), (400, 1000)) == 4 * 729  # ours


# --------------------------------------------------------------------------------- AnyRes: span ids


def test_span_ids_of_a_base_and_an_anyres_prompt() -> None:
    codes = [[0, 1], [2, 3]]  # a 2 x 2 code grid: <size-2> = 202 in the test vocabulary
    grid_part = [START, 202, 202, 1000, 1001, R, 1002, 1003, R]
    # Base: <racm3:break> h w codes+row ends <sentinel:0> 64 features <eoss>
    base = build_image_span(codes, TOKENS, image_feature_block(tiny_vision(None), (40, 100)))
    assert base == [*grid_part, SEP, *[F] * 64, END]
    # AnyRes (the 100 x 40 image above): the base view's 64, then 6 rows of 16 features each closed by <row-end>
    block = image_feature_block(tiny_vision(), (40, 100))
    span = build_image_span(codes, TOKENS, block)
    assert span == [*grid_part, SEP, *[F] * 64, *([F] * 16 + [R]) * 6, END]
    assert len(span) == image_span_length(2, 2, block) == 9 + 1 + 166 + 1
    parsed = parse_image_span(span, TOKENS)
    assert parsed.codes.tolist() == codes and (parsed.num_features, parsed.feature_row_ends) == (160, 6)
    # Nothing of the continuous part is predicted; the grid's own row ends are.
    mask = continuous_mask(span, TOKENS)
    assert mask.sum() == 166 and not mask[:10].any() and not mask[-1]


def test_feature_index_reads_the_merged_grid_row_major() -> None:
    # Row y of the merged grid, column x: tile (y // 8, x // 8) = view 1 + x // 8 here, patch (y % 8) * 8 + x % 8.
    index = feature_index(tiny_vision(), (40, 100))
    assert index.shape == (160, 2)
    assert index[:64].tolist() == [[0, p] for p in range(64)]  # the base view first
    first_row = [[1, 8 + x] for x in range(8)] + [[2, 8 + x] for x in range(8)]  # kept rows start at y = 1
    last_row = [[1, 48 + x] for x in range(8)] + [[2, 48 + x] for x in range(8)]  # and end at y = 6
    assert index[64:80].tolist() == first_row and index[-16:].tolist() == last_row
    assert feature_index(tiny_vision(AnyResConfig(enabled=True)), (40, 100)) is None  # ours: in order


def test_tile_canvas_ceils_the_short_side_on_black() -> None:
    # resize_and_pad_image on a 128 x 64 canvas: 128/100 < 64/40 -> width 128, height min(ceil(40 * 1.28), 64)
    # = ceil(51.2) = 52, pasted at y = (64 - 52) // 2 = 6: rows 6..57 image, the rest black. Ours rounds: 51 rows.
    white = Image.new("RGB", (100, 40), (255, 255, 255))
    left = np.asarray(tile_views(white, (1, 2), 64, UNITOKEN_PAD_COLOR, unitoken=True)[0])
    assert left[5, 10].tolist() == [0, 0, 0] and left[6, 10].tolist() == [255, 255, 255]
    assert left[57, 10].tolist() == [255, 255, 255] and left[58, 10].tolist() == [0, 0, 0]
    ours = np.asarray(tile_views(white, (1, 2), 64, UNITOKEN_PAD_COLOR)[0])
    assert ours[56, 10].tolist() == [255, 255, 255] and ours[57, 10].tolist() == [0, 0, 0]
    pixels, grid = anyres_views(white, tiny_vision())
    assert grid == (1, 2) and tuple(pixels.shape) == (3, 3, 64, 64)
    assert torch.equal(pixels[1], image_to_tensor(Image.fromarray(left)))


def test_model_embeds_what_unitokens_forward_builds() -> None:
    """UnifiedModel.embed with the feature index equals UniToken's construction, redone here step by step:
    tiles -> (rows, cols, n, n, H) -> (H, rows*n, cols*n), unpadded, the row-end token's embedding appended to
    every row, flattened row-major, after the base view's features."""
    config = load_config(overrides=["model.preset=tiny"])
    config.model.vision = tiny_vision()
    torch.manual_seed(0)
    model = UnifiedModel(config.model).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    block = image_feature_block(model.vision.vision, (40, 100))
    ids = torch.tensor([[BOS, *build_image_span([[0, 1], [2, 3]], TOKENS, block), EOT]])
    pixels, _ = anyres_views(image, model.vision.vision)
    index = torch.from_numpy(feature_index(model.vision.vision, (40, 100)))
    with torch.no_grad():
        embeds = model.embed(ids, pixels, ids == F, feature_index=index)[0]
        features = model.vision(pixels)  # [3, 64, H]
        hidden = features.shape[-1]
        merged = features[1:].view(1, 2, 8, 8, hidden).permute(4, 0, 2, 1, 3).reshape(hidden, 8, 16)
        merged = merged[:, 1:7, :]  # unpad_image: rows 1..7 (see the 166 test)
        row_end = model.lm.get_input_embeddings()(torch.tensor(R))
        merged = torch.cat([merged, row_end[:, None, None].expand(hidden, 6, 1)], dim=-1)
        expected = torch.cat([features[0], merged.reshape(hidden, -1).T])  # [64 + 102, H]
        start = 1 + 9 + 1  # <bos>, the grid part, <sep>
        assert torch.allclose(embeds[start : start + 166], expected, atol=1e-6)
        tokens = model.lm.get_input_embeddings()(ids[0])
        assert torch.equal(embeds[:start], tokens[:start]) and torch.equal(embeds[-2:], tokens[-2:])
        kept = features.reshape(-1, hidden)[index[:, 0] * 64 + index[:, 1]]
        assert torch.allclose(encode_images(model.vision, [image])[0], kept)
    with pytest.raises(ValueError, match="one row per feature slot"):
        model.embed(ids, pixels, ids == F, feature_index=index[:-1])


# ------------------------------------------------------------------------------------------- prompts


def test_unitoken_t2i_prompt_and_unconditional_branch() -> None:
    # inference_solver_*.generate_img: <s> + prompt + <reserved08706>, then [16853, 8197] appended; the size
    # tokens follow (forced). CFG's unconditional ids are input_ids[image_start_index:]: <racm3:break> h w.
    prefix = (999,)
    assert generation_prompt([7, 8], TOKENS, 4, 4, prefix) == [BOS, 7, 8, EOT, 999, START, 204, 204]
    assert unconditional_prompt(TOKENS, 4, 4, "unitoken") == [START, 204, 204]
    # ours, unchanged
    assert generation_prompt([7, 8], TOKENS, 4, 4) == [BOS, 7, 8, EOT, START, 204, 204]
    assert unconditional_prompt(TOKENS, 4, 4) == [BOS, EOT, START, 204, 204]


def test_answer_prefix_is_looked_up_by_name(sp_tokenizer) -> None:
    native = ModelConfig(t2i_answer_prefix="<pad>")
    assert t2i_answer_prefix_ids(native, sp_tokenizer.token_to_id) == ()
    unitoken = ModelConfig(prompt_style="unitoken", t2i_answer_prefix="<pad>")
    assert t2i_answer_prefix_ids(unitoken, sp_tokenizer.token_to_id) == (sp_tokenizer.special_tokens().pad,)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        t2i_answer_prefix_ids(
            dataclasses.replace(unitoken, t2i_answer_prefix="<nope>"), sp_tokenizer.token_to_id
        )


def test_unitoken_t2i_training_samples() -> None:
    meta = {"caption": "cap", "pretokenized": {"image_hw": [40, 100], "caption": [1, 2, 3]}}
    record = TokenizedRecord("k", np.array([[1, 2], [3, 4]]), meta)
    block = image_feature_block(tiny_vision(), (40, 100))
    span = [START, 202, 202, 1001, 1002, R, 1003, 1004, R, SEP, *[F] * 64, *([F] * 16 + [R]) * 6, END]
    sample = t2i_sample(record, TOKENS, block, np.random.default_rng(0), 0.0, "unitoken", (999,))
    assert sample.ids.tolist() == [BOS, 1, 2, 3, EOT, 999, *span, EOT]
    answer = [999, *span[:10], *[IGNORE_INDEX] * 166, END, EOT]  # the continuous part carries no loss
    assert sample.labels.tolist() == [IGNORE_INDEX] * 5 + answer
    assert sample.feature_mask.sum() == 160
    dropped = t2i_sample(record, TOKENS, block, np.random.default_rng(0), 1.0, "unitoken", (999,))
    assert dropped.ids.tolist() == [*span, EOT]  # starts at <image-start>, like the unconditional CFG row
    assert dropped.labels.tolist() == [*span[:10], *[IGNORE_INDEX] * 166, END, EOT]
    ours = t2i_sample(record, TOKENS, 3, np.random.default_rng(0), 1.0)
    assert ours.ids.tolist()[:2] == [BOS, EOT]  # ours, unchanged: the empty conversation


def test_default_conversation_labels_are_unchanged() -> None:
    span = build_image_span([[0]], TOKENS, 2)
    sample = tokenize_conversation([Turn("user", "<|image|>"), Turn("assistant", "<|image|>")], [span, span],
                                   lambda text: [], TOKENS)  # fmt: skip
    assert sample.ids.tolist() == [BOS, *span, EOT, *span, EOT]
    assert sample.labels.tolist() == [IGNORE_INDEX] * 11 + [
        START,
        201,
        201,
        1000,
        R,
        SEP,
        -100,
        -100,
        END,
        EOT,
    ]


# ----------------------------------------------------------------------------------- VQ preprocessing


def test_halving_preprocessing_of_a_1000x600_image_by_hand() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 1000, 3), dtype=np.uint8))
    # Target 64: 1000x600 -> 500x300 -> 250x150 -> 125x75 (BOX; 125 < 128 stops it); scale max(64/125, 64/75)
    # = .8533 -> bicubic to (round(106.67), round(64.0)) = (107, 64); centre crop left (107 - 64) // 2 = 21.
    step = image
    for size in [(500, 300), (250, 150), (125, 75)]:
        step = step.resize(size, Image.Resampling.BOX)
    step = step.resize((107, 64), Image.Resampling.BICUBIC).crop((21, 0, 85, 64))
    assert np.array_equal(np.asarray(halving_center_crop(image, 64)), np.asarray(step))
    assert torch.equal(preprocess([image], 64, "halving"), image_to_tensor(step)[None])
    # Target 512: 1000 < 2 * 512, no halving; scale .8533 -> (853, 512), crop left (853 - 512) // 2 = 170.
    step = image.resize((853, 512), Image.Resampling.BICUBIC).crop((170, 0, 682, 512))
    assert np.array_equal(np.asarray(halving_center_crop(image, 512)), np.asarray(step))
    # Ours (the default) differs at 64 px: one resize of the original.
    assert not np.array_equal(
        np.asarray(resize_center_crop(image, 64)), np.asarray(halving_center_crop(image, 64))
    )
    assert torch.equal(preprocess([image], 64), image_to_tensor(resize_center_crop(image, 64))[None])


def test_preprocess_is_not_part_of_the_tokenizer_files(tmp_path: Path) -> None:
    path = save_random_vq(tmp_path / "vq")
    stored = json.loads((path / "config.json").read_text())["vq"]
    assert "preprocess" not in stored and "layout" not in stored["dualtoken"]["backbone"]["anyres"]
    vq = VQGAN.from_checkpoint(path)
    # The default leaves the fingerprint of already pre-tokenized data as it was computed before the key.
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(vq.config).items() if k not in ("checkpoint", "preprocess")}
    del settings["dualtoken"]["backbone"]["anyres"]["layout"]  # the new keys, left out at their defaults
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(vq.state_to_save().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert vq_fingerprint(vq) == digest.hexdigest()
    vq.config.preprocess = "halving"
    assert vq_fingerprint(vq) != digest.hexdigest()


# ------------------------------------------------------------------------------------ through the solver


def write_export(directory: Path, sp_model: Path, *overrides: str) -> Path:
    config = load_config(
        overrides=[
            "model.preset=tiny",
            f"tokenizer.path={sp_model}",
            f"model.vq.checkpoint={save_random_vq(directory.parent / 'vq-source')}",
            "tokenizer.num_size_tokens=9",
            "generation.image_size=32",
            "generation.max_new_tokens=2",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    return export_run(unique_state_dict(UnifiedModel(config.model)), config, directory, summary={"steps": 0})


@pytest.fixture(scope="module")
def prefix_name(sp_model: Path) -> str:
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    return processor.IdToPiece(processor.EncodeAsIds("the")[0])  # a text piece, looked up by its name


@pytest.fixture(scope="module")
def unitoken_solver(
    tmp_path_factory: pytest.TempPathFactory, sp_model: Path, prefix_name: str
) -> InferenceSolver:
    export = write_export(
        tmp_path_factory.mktemp("unitoken") / "export",
        sp_model,
        *unitoken_keys(prefix_name),
        "model.vq.preprocess=halving",
    )
    return InferenceSolver.from_pretrained(export)


def test_solver_t2i_rows_in_unitoken_style(
    unitoken_solver: InferenceSolver, prefix_name: str, monkeypatch
) -> None:
    solver, tokens = unitoken_solver, unitoken_solver.tokens
    calls = spy_on_engine(solver, monkeypatch)
    (image,) = solver.generate_img(["the red circle"], cfg=3.0, seed=0)
    assert image.size == (32, 32)
    size = tokens.size_token(4)  # 32 px / 8x downsampling
    prefix = solver.tokenizer.token_to_id(prefix_name)
    cond = [tokens.bos, *solver.tokenizer.encode("the red circle"), tokens.end_of_turn, prefix]
    assert calls[0]["prompts"] == [[*cond, tokens.image_start, size, size], [tokens.image_start, size, size]]


def test_solver_understanding_in_unitoken_layout(unitoken_solver: InferenceSolver, monkeypatch) -> None:
    solver, tokens = unitoken_solver, unitoken_solver.tokens
    calls = spy_on_engine(solver, monkeypatch)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    solver.generate([image], [["<|image|>how many objects?", None]], max_gen_len=2)
    # No placeholder: UniToken's item processor puts "<|image|> " before the first question.
    solver.generate([image], [["how many objects?", None]], max_gen_len=2)
    codes = solver.vq.images_to_codes([halving_center_crop(image, 64)], preprocess="center_crop")[0]
    feature, row_end = tokens.feature, tokens.row_end
    block = [*[feature] * 64, *([feature] * 16 + [row_end]) * 6]
    span = [*build_image_span(codes, tokens)[:-1], tokens.separator, *block, tokens.image_end]
    encode = solver.tokenizer.encode
    assert calls[0]["prompts"] == [[tokens.bos, *span, *encode("how many objects?"), tokens.end_of_turn]]
    assert calls[1]["prompts"] == [[tokens.bos, *span, *encode(" how many objects?"), tokens.end_of_turn]]
    assert tuple(calls[0]["pixel_values"].shape) == (3, 3, 64, 64)
    assert calls[0]["feature_index"].tolist() == feature_index(solver.config.model.vision, (40, 100)).tolist()


def test_solver_codes_come_from_the_halving_preprocessing(
    unitoken_solver: InferenceSolver, monkeypatch
) -> None:
    solver = unitoken_solver
    calls = spy_on_engine(solver, monkeypatch)
    # 1000 x 400 at 64 px: BOX to 500x200, 250x100 (100 < 128 stops), bicubic to (160, 64), centre crop.
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (400, 1000, 3), dtype=np.uint8))
    assert not np.array_equal(
        np.asarray(halving_center_crop(image, 64)), np.asarray(resize_center_crop(image, 64))
    )
    solver.generate([image], [["<|image|>how many objects?", None]], max_gen_len=1)
    start = calls[0]["prompts"][0].index(solver.tokens.image_start)
    end = calls[0]["prompts"][0].index(solver.tokens.image_end) + 1
    parsed = parse_image_span(calls[0]["prompts"][0][start:end], solver.tokens)
    halved = solver.vq.images_to_codes([halving_center_crop(image, 64)], preprocess="center_crop")[0]
    assert parsed.codes.tolist() == halved.tolist()


def test_solver_defaults_are_unchanged(tmp_path: Path, sp_model: Path, monkeypatch) -> None:
    solver = InferenceSolver.from_pretrained(write_export(tmp_path / "export", sp_model))
    model = solver.config.model
    assert (model.prompt_style, model.vision.anyres.layout, model.vq.preprocess) == (
        "native",
        "tiles",
        "center_crop",
    )
    tokens = solver.tokens
    calls = spy_on_engine(solver, monkeypatch)
    solver.generate_img(["the red circle"], cfg=3.0, seed=0)
    size = tokens.size_token(4)
    cond = [tokens.bos, *solver.tokenizer.encode("the red circle"), tokens.end_of_turn]
    uncond = [tokens.bos, tokens.end_of_turn]
    assert calls[0]["prompts"] == [
        [*cond, tokens.image_start, size, size],
        [*uncond, tokens.image_start, size, size],
    ]
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    solver.generate([image], [["<|image|>how many objects?", None]], max_gen_len=2)
    codes = solver.vq.images_to_codes([resize_center_crop(image, 64)])[0]
    span = build_image_span(codes, tokens, 64)
    encode = solver.tokenizer.encode
    assert calls[1]["prompts"] == [[tokens.bos, *span, *encode("how many objects?"), tokens.end_of_turn]]
    assert calls[1]["feature_index"] is None


# ------------------------------------------------------------------------------------ through the data path


def test_training_batches_in_unitoken_style(tmp_path: Path, sp_model: Path, prefix_name: str) -> None:
    config = make_tokenized_world(
        tmp_path,
        sp_model,
        "data.max_seq_len=512",
        *unitoken_keys(prefix_name),
        "data.cfg_dropout=0.0",
    )
    path = f"{config.data.tokenized_root}/{{split}}"
    config.data.sources = [
        DataSourceConfig(path=path, task="t2i"),
        DataSourceConfig(path=path, task="caption"),
    ]
    tokenizer = TextTokenizer.from_config(config.tokenizer, config.model.vq.codebook_size)
    tokens = tokenizer.special_tokens()
    batch = next(iter(build_batches(config, with_features=True, rows=4, tokenizer=tokenizer)))
    # Every world image is 64 x 64: grid (2, 1), 64 + 8 rows of 8 features + row ends = 136 positions.
    assert image_feature_block(config.model.vision, (64, 64)) == FeatureBlock(flat=64, rows=8, cols=8)
    images = len(batch.num_views)
    assert batch.num_views.tolist() == [3] * images and images > 0
    assert batch.feature_mask.sum() == 128 * images and tuple(batch.feature_index.shape) == (128 * images, 2)
    one = torch.from_numpy(feature_index(config.model.vision, (64, 64)))
    assert torch.equal(batch.feature_index[:128], one)
    assert torch.equal(batch.feature_index[128:256], one + torch.tensor([3, 0])) or images == 1
    ids = batch.input_ids
    in_blocks = torch.from_numpy(np.stack([continuous_mask(row, tokens) for row in ids.numpy()]))
    assert in_blocks.sum() == 136 * images and (batch.labels[in_blocks] == IGNORE_INDEX).all()
    prefix = tokenizer.token_to_id(prefix_name)
    assert set(batch.tasks) == {"t2i", "caption"}
    for row, task in zip(ids.tolist(), batch.tasks):
        start = row.index(tokens.image_start)
        assert (row[start - 2 : start] == [tokens.end_of_turn, prefix]) == (task == "t2i")
    torch.manual_seed(0)
    model = UnifiedModel(config.model)
    logits = model(**batch.model_inputs()).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_pretokenization_codes_follow_the_halving_preprocessing(tmp_path: Path, sp_model: Path) -> None:
    # 256 px scenes, 64 px VQ input: halving BOX-halves 256 -> 128 -> 64 (no resize left); ours is one bicubic.
    config = make_tokenized_world(
        tmp_path, sp_model, "data.world.image_size=256", "model.vq.preprocess=halving"
    )
    shard = sorted((Path(config.data.tokenized_root) / "train").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        key = next(n for n in names if n.endswith(".png")).removesuffix(".png")
        image = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).convert("RGB")
        stored = np.load(io.BytesIO(tar.extractfile(f"{key}.{CODES_MEMBER}").read()))
    assert image.size == (256, 256)
    halved = image.resize((128, 128), Image.Resampling.BOX).resize((64, 64), Image.Resampling.BOX)
    assert np.array_equal(np.asarray(halving_center_crop(image, 64)), np.asarray(halved))
    vq = load_vq(config)
    assert vq.config.preprocess == "halving"
    expected = vq.images_to_codes([halved], preprocess="center_crop")[0]  # already 64 px: no further resize
    assert stored.tolist() == expected.tolist()
    assert (
        stored.tolist() != vq.images_to_codes([image], preprocess="center_crop")[0].tolist()
    )  # the key matters
