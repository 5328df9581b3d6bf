"""InferenceSolver over a real (random-weight) tiny export laid out like the trainer's: images of the requested
size, batched calls equal to single ones, seeded sampling, interleaved answers closed the way training wrote
them, and a clear error for each kind of bad input."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers import spy_on_engine, write_export
from unified_mllm.infer.processors import CFGProcessor, GridConstraint, ModalityTopK
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.layout import PlaceholderMismatchError, build_image_span
from unified_mllm.model.export import CheckpointMismatchError
from unified_mllm.vision.anyres import anyres_views

QUESTION = "<|image|>how many objects?"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", sp_model)


@pytest.fixture(scope="module")
def solver(export: Path) -> InferenceSolver:
    return InferenceSolver.from_pretrained(export)


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_from_pretrained_resolves_the_exports_relative_paths(solver: InferenceSolver, export: Path) -> None:
    written = OmegaConf.load(export / "config.yaml")  # as stored (load_config would resolve them)
    assert (written.tokenizer.path, written.model.vq.checkpoint) == ("text.model", "vq")
    assert Path(solver.config.tokenizer.path) == export / "text.model"
    assert Path(solver.config.model.vq.checkpoint) == export / "vq"
    assert solver.tokens == solver.tokenizer.special_tokens()
    assert not solver.model.training and solver.with_features


def test_generate_img_returns_images_of_the_requested_size(solver: InferenceSolver) -> None:
    images = solver.generate_img(["a red circle", "two blue squares left"], size=(32, 48), seed=3)
    assert [im.size for im in images] == [(48, 32), (48, 32)]  # PIL sizes are (width, height)
    assert [im.size for im in solver.generate_img("a red circle")] == [(32, 32)]  # generation.image_size
    again = solver.generate_img(["a red circle", "two blue squares left"], size=(32, 48), seed=3)
    assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in again]
    other = solver.generate_img(["a red circle"], size=(32, 48), seed=4)
    assert np.asarray(other[0]).tolist() != np.asarray(images[0]).tolist()


def test_batched_generate_img_equals_one_prompt_at_a_time(solver: InferenceSolver) -> None:
    prompts = ["a small green triangle", "red"]
    batched = solver.generate_img(prompts, temperature=0.0, cfg=2.5)
    single = [solver.generate_img(p, temperature=0.0, cfg=2.5)[0] for p in prompts]
    # Same codes; the VQ decoder's convolutions round differently for a batch of 2, by at most 1 level.
    for a, b in zip(batched, single):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_jacobi_generate_img_gives_the_sequential_greedy_images(solver: InferenceSolver) -> None:
    prompts = ["a small green triangle", "two red circles"]
    sequential = solver.generate_img(prompts, temperature=0.0, cfg=2.5)
    jacobi = solver.generate_img(prompts, temperature=0.0, cfg=2.5, jacobi_window=6)
    assert [np.asarray(a).tolist() for a in sequential] == [np.asarray(b).tolist() for b in jacobi]
    sampled = solver.generate_img(prompts, size=(32, 48), seed=5, jacobi_window=6)
    assert [im.size for im in sampled] == [(48, 32), (48, 32)]
    again = solver.generate_img(prompts, size=(32, 48), seed=5, jacobi_window=6)
    assert [np.asarray(a).tolist() for a in sampled] == [np.asarray(b).tolist() for b in again]


def test_generate_answers_one_conversation_or_a_batch(solver: InferenceSolver) -> None:
    one = solver.generate([picture(0)], [[QUESTION, None]])
    two_turns = [[QUESTION, "two"], ["what colour?", None]]
    other = solver.generate([picture(1), picture(2, (48, 64))], [["<|image|><|image|>same?", None]])
    assert isinstance(one, str) and isinstance(other, str)
    batch = solver.generate(
        [[picture(0)], [picture(0)], [picture(1), picture(2, (48, 64))]],
        [[[QUESTION, None]], two_turns, [["<|image|><|image|>same?", None]]],
    )
    assert batch[0] == one and batch[2] == other
    assert batch[1] == solver.generate([picture(0)], two_turns)
    assert (
        solver.generate([], [["what is a circle?", None]], max_gen_len=3)
        == solver.generate([[]], [[["what is a circle?", None]]], max_gen_len=3)[0]
    )


def test_sampled_answers_follow_the_seed(solver: InferenceSolver) -> None:
    def answer(seed: int) -> str:
        return solver.generate(
            [picture(0)], [[QUESTION, None]], max_gen_len=12, temperature=2.0, top_k=50, seed=seed
        )

    assert answer(5) == answer(5)
    assert len({answer(s) for s in range(4)}) > 1


def test_understanding_prompts_are_the_training_template(
    solver: InferenceSolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on_engine(solver, monkeypatch)
    solver.generate([picture(0)], [[QUESTION, "two"], ["what colour?", None]], max_gen_len=2)
    tokens, encode = solver.tokens, solver.tokenizer.encode
    span = build_image_span(
        solver.vq.images_to_codes([picture(0)])[0], tokens, solver.model.features_per_view
    )
    expected = [
        tokens.bos, *span, *encode("how many objects?"), tokens.end_of_turn,
        *encode("two"), tokens.end_of_turn, *encode("what colour?"), tokens.end_of_turn,
    ]  # fmt: skip
    assert calls[0]["prompts"] == [expected]
    assert tuple(calls[0]["pixel_values"].shape) == (1, 3, 64, 64)  # one SigLIP view (AnyRes off)
    assert calls[0]["max_new_tokens"] == [2]


GRID = 3 + 4 * (4 + 1)  # <image-start> <size-4> <size-4> + 4 rows of 4 codes and <row-end> (32 px images)


def answer_with_a_drawing(
    solver: InferenceSolver, monkeypatch: pytest.MonkeyPatch, images: list[Image.Image]
) -> tuple[list, str, list[dict]]:
    """Answer with a model biased to open an image whenever it writes text; returns the pieces, the text and
    the engine calls (prompts and arguments) made for the first answer."""
    bias = torch.zeros(solver.model.config.lm.vocab_size)
    bias[solver.tokens.image_start] = 1e4
    hook = solver.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    calls = spy_on_engine(solver, monkeypatch)
    question = [[QUESTION if images else "draw", None]]
    try:
        pieces = solver.generate_interleaved(images, question, max_gen_len=GRID + 5)
        text = solver.generate(images, question, max_gen_len=GRID + 5)
    finally:
        hook.remove()
    return pieces, text, calls[:2]


def test_an_image_inside_an_answer_is_drawn_closed_and_decoding_resumes(
    solver: InferenceSolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = solver.tokens
    pieces, text, (first, second) = answer_with_a_drawing(solver, monkeypatch, [picture(0)])
    assert len(pieces) == 1 and isinstance(pieces[0], Image.Image) and pieces[0].size == (32, 32)
    assert text == "<|image|>"
    assert first["stop_at_image_grid"] and first["pixel_values"].shape[0] == 1
    drawn = second["prompts"][0][len(first["prompts"][0]) :]
    features = solver.model.features_per_view
    assert len(drawn) == GRID + 1 + features + 1
    assert drawn[:3] == [tokens.image_start, tokens.size_token(4), tokens.size_token(4)]
    assert drawn[GRID:] == [tokens.separator, *[tokens.feature] * features, tokens.image_end]
    assert second["pixel_values"].shape[0] == 2  # the question's image and the drawn one
    assert second["max_new_tokens"] == [5]


def test_without_the_vision_branch_spans_carry_no_feature_slots(
    tmp_path: Path, sp_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    solver = InferenceSolver.from_pretrained(
        write_export(tmp_path / "export", sp_model, "model.vision.enabled=false")
    )
    tokens = solver.tokens
    assert not solver.with_features
    assert solver.create_logits_processor()[1].close_id == tokens.image_end
    answer = solver.generate([picture(0)], [[QUESTION, None]])  # an image prompt without features
    assert isinstance(answer, str)
    pieces, text, (first, second) = answer_with_a_drawing(solver, monkeypatch, [])
    assert [type(p) for p in pieces] == [Image.Image] and text == "<|image|>"
    drawn = second["prompts"][0][len(first["prompts"][0]) :]
    assert len(drawn) == GRID + 1 and drawn[-1] == tokens.image_end
    assert first["pixel_values"] is None and second["pixel_values"] is None


def test_create_logits_processor_uses_the_export_defaults(solver: InferenceSolver) -> None:
    processors = solver.create_logits_processor(cfg=4.0, image_top_k=7)
    assert processors[0].scale == 4.0 and isinstance(processors[0], CFGProcessor)
    grid = next(p for p in processors if isinstance(p, GridConstraint))
    assert grid.size == (4, 4) and grid.close_id == solver.tokens.separator
    top_k = next(p for p in processors if isinstance(p, ModalityTopK))
    assert (top_k.image, top_k.text) == (7, solver.config.generation.text_top_k)


def test_bad_input_gets_a_clear_error(solver: InferenceSolver) -> None:
    with pytest.raises(PlaceholderMismatchError, match=r"1 <\|image\|> placeholder"):
        solver.generate([picture(0), picture(1)], [[QUESTION, None]])
    with pytest.raises(PlaceholderMismatchError):
        solver.generate([], [[QUESTION, None]])
    with pytest.raises(ValueError, match="multiple of 8 px"):
        solver.generate_img("a red circle", size=36)
    with pytest.raises(ValueError, match="exceeds 64 px"):
        solver.generate_img("a red circle", size=(32, 72))
    with pytest.raises(ValueError, match="cfg must be >= 0"):
        solver.generate_img("a red circle", cfg=-1.0)
    with pytest.raises(ValueError, match="cfg must be finite, got inf"):  # not "NaN scores" steps later
        solver.generate_img("a red circle", cfg=float("inf"))
    for size in (64.0, "64", (32, 32.0), True):
        with pytest.raises(ValueError, match=r"whole pixels \(int\)"):
            solver.generate_img("a red circle", size=size)
    with pytest.raises(ValueError, match="image_top_k must be an integer >= 1"):
        solver.generate_img("a red circle", image_top_k=0)
    with pytest.raises(ValueError, match="jacobi_window must be >= 0"):
        solver.generate_img("a red circle", jacobi_window=-2)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        solver.generate([picture(0)], [[QUESTION, None]], top_k=0)
    with pytest.raises(ValueError, match=r"last qas pair must be \[question, None\]"):
        solver.generate([picture(0)], [[QUESTION, "two"]])
    with pytest.raises(ValueError, match="needs 2 image lists"):
        solver.generate([[picture(0)]], [[[QUESTION, None]], [[QUESTION, None]]])


@pytest.mark.parametrize(
    "missing", ["config.yaml", "text.model", "vq", "vq/model.safetensors", "model.safetensors", "config.json"]
)
def test_an_export_missing_a_file_names_it(export: Path, tmp_path: Path, missing: str) -> None:
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    target = copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=Path(missing).name):
        InferenceSolver.from_pretrained(copy)
    with pytest.raises(FileNotFoundError, match="export directory not found"):
        InferenceSolver.from_pretrained(tmp_path / "nowhere")


def test_a_truncated_weights_file_is_named(export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        CheckpointMismatchError, match=r"model\.safetensors is not a readable safetensors file"
    ):
        InferenceSolver.from_pretrained(copy)


def test_default_answer_length_fits_a_batch_of_prompts_of_different_lengths(solver: InferenceSolver) -> None:
    # The README's batched example: each prompt alone leaves room for a budget cut to it (asked for here; the
    # quickstart's default 512 is too), but left-padded together the shorter prompt's longer budget would run past
    # the model's positions.
    answers = solver.generate(
        [[picture(0)], [picture(1)]],
        [
            [["<|image|>what colour is the circle in the middle of the picture?", None]],
            [["<|image|>a square?", None]],
        ],
        max_gen_len=10_000,
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# ------------------------------------------------------------------------------------------- loglikelihood


def hand_loglikelihood(
    solver: InferenceSolver, pictures: list[Image.Image], question: str, continuation: list[int]
) -> tuple[float, bool]:
    """The score computed by hand: the training template's prompt + the continuation in one plain forward of
    the model (no padding, no cache), log_softmax of the logits before each continuation id."""
    tokens, encode = solver.tokens, solver.tokenizer.encode
    codes = solver.vq.images_to_codes(pictures)
    pieces = question.split("<|image|>")
    ids = [tokens.bos, *encode(pieces[0])] if pieces[0] else [tokens.bos]
    for grid, text in zip(codes, pieces[1:]):
        ids += build_image_span(grid, tokens, solver.model.features_per_view)
        ids += encode(text) if text else []
    ids += [tokens.end_of_turn]
    prompt = len(ids)
    full = torch.tensor([ids + continuation])
    views = [anyres_views(p, solver.config.model.vision)[0] for p in pictures]
    with torch.no_grad():
        logits = (
            solver.model(
                full,
                pixel_values=torch.cat(views) if views else None,
                feature_mask=full == tokens.feature,
            )
            .logits[0]
            .float()
        )
    before = logits[prompt - 1 : prompt - 1 + len(continuation)]
    logprobs = before.log_softmax(dim=-1)[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float(logprobs.sum()), bool((before.argmax(dim=-1) == torch.tensor(continuation)).all())


def test_loglikelihood_is_the_models_log_probability_of_the_answer(solver: InferenceSolver) -> None:
    continuation = solver.tokenizer.encode("two red circles")
    logprob, greedy = solver.loglikelihood([picture(0)], [[QUESTION, None]], "two red circles")
    expected, expected_greedy = hand_loglikelihood(solver, [picture(0)], QUESTION, continuation)
    # Bit-exact on the CPU; the tolerance allows for another kernel's summation order.
    assert logprob == pytest.approx(expected, rel=1e-6, abs=1e-5) and greedy == expected_greedy
    assert logprob < 0
    assert solver.loglikelihood([picture(0)], [[QUESTION, None]], continuation) == (logprob, greedy)
    # Two images in one question, and no image at all.
    two = "<|image|><|image|>same?"
    assert solver.loglikelihood([picture(1), picture(2, (48, 64))], [[two, None]], "yes")[0] == pytest.approx(
        hand_loglikelihood(solver, [picture(1), picture(2, (48, 64))], two, solver.tokenizer.encode("yes"))[
            0
        ],
        abs=1e-4,
    )
    assert solver.loglikelihood([], [["what is a circle?", None]], "a shape")[0] == pytest.approx(
        hand_loglikelihood(solver, [], "what is a circle?", solver.tokenizer.encode("a shape"))[0], abs=1e-4
    )
    assert solver.loglikelihood([picture(0)], [[QUESTION, None]], "") == (0.0, True)


def test_batched_loglikelihood_equals_one_conversation_at_a_time(solver: InferenceSolver) -> None:
    images = [[picture(0)], [picture(1), picture(2, (48, 64))], [], [picture(3)]]
    qas = [
        [[QUESTION, None]],
        [["<|image|><|image|>same?", None]],
        [["what is a circle?", None]],
        [[QUESTION, None]],
    ]
    conts = ["two", [solver.tokens.end_of_turn], "a small green triangle left of the square", ""]
    batch = solver.loglikelihood(images, qas, conts)
    single = [solver.loglikelihood(i, q[0:1], c) for i, q, c in zip(images, qas, conts)]
    assert [g for _, g in batch] == [g for _, g in single]
    assert [lp for lp, _ in batch] == pytest.approx([lp for lp, _ in single], abs=1e-4)
    assert batch[3] == (0.0, True)


def test_the_greedy_answer_is_greedy_under_loglikelihood(
    solver: InferenceSolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = []
    generate = solver.engine.generate

    def recording(*args, **kwargs):
        results.append(generate(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(solver.engine, "generate", recording)
    read_back = 0
    for images, question in (([picture(0)], QUESTION), ([], "what is a circle?")):
        results.clear()
        answer = solver.generate(images, [[question, None]], max_gen_len=5)
        ((ids, *_), (reason, *_)) = results[0].ids, results[0].finish
        assert len(results) == 1 and reason in ("stop", "length")  # no picture drawn: one engine run
        qas = [[question, None]]
        assert solver.loglikelihood(images, qas, ids)[1]  # with the stop id when it stopped
        answer_ids = ids[:-1] if reason == "stop" else ids
        assert solver.tokenizer.decode(answer_ids) == answer and answer_ids
        assert solver.loglikelihood(images, qas, answer_ids[:2])[1]  # a prefix of it too
        changed = [*answer_ids[:-1], (answer_ids[-1] + 1) % solver.tokenizer.vocab_size]
        assert not solver.loglikelihood(images, qas, changed)[1]
        text_ids = solver.tokenizer.encode(answer)
        if (
            text_ids and answer_ids[: len(text_ids)] == text_ids
        ):  # the text reads back as the ids it began with
            assert solver.loglikelihood(images, qas, answer)[1]
            read_back += 1
    assert read_back  # the random export answers the text question in words ("large")


def test_ablations_remove_exactly_their_branch_of_the_image_span(solver: InferenceSolver) -> None:
    """With both branches ablated the answer cannot depend on the image at all; with one ablated, the other
    branch still carries it; the codes' random draws follow the seed; leaving the block restores everything."""

    def score(image: Image.Image, *kinds: str, seed: int = 0) -> float:
        with contextlib.ExitStack() as stack:
            for kind in kinds:
                stack.enter_context(solver.ablation(kind, seed=seed))
            return solver.loglikelihood([image], [[QUESTION, None]], "two red circles")[0]

    a, b = picture(10), picture(11)
    assert score(a) != score(b)
    assert score(a, "features", "codes") == score(b, "features", "codes")  # nothing of the image is left
    assert score(a, "features") != score(b, "features")  # the codes still differ
    assert score(a, "codes") != score(b, "codes")  # the features still differ
    assert score(a, "features", "codes", seed=1) != score(a, "features", "codes", seed=0)
    assert score(a, "none") == score(a)
    with solver.ablation("features"):
        zeros = solver.model.vision(torch.rand(1, 3, 64, 64))
    assert not zeros.any()
    assert score(a) == solver.loglikelihood([a], [[QUESTION, None]], "two red circles")[0]  # restored
    with pytest.raises(ValueError, match="unknown ablation 'pixels'"), solver.ablation("pixels"):
        pass


def test_loglikelihood_bad_input_gets_a_clear_error(solver: InferenceSolver) -> None:
    with pytest.raises(ValueError, match="one per conversation"):
        solver.loglikelihood([[picture(0)]], [[[QUESTION, None]]], "two")
    with pytest.raises(ValueError, match="as many continuations"):
        solver.loglikelihood([[picture(0)]], [[[QUESTION, None]]], ["two", "three"])
    with pytest.raises(ValueError, match=r"must lie in \[0"):
        solver.loglikelihood([picture(0)], [[QUESTION, None]], [10**9])
    with pytest.raises(ValueError, match="positions"):
        solver.loglikelihood(
            [picture(0)], [[QUESTION, None]], [5] * solver.model.config.lm.max_position_embeddings
        )
