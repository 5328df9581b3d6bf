"""Continuous batching over a real (random-weight) tiny export: rows that join and leave between steps write
exactly what the solver writes for them one at a time (greedy, and sampled with their own seed), a picture
drawn inside an answer leaves the batch and joins again, and the batch's width follows its active rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import write_export
from unified_mllm.infer.batching import ContinuousBatcher, Sampling
from unified_mllm.infer.solver import InferenceSolver

QUESTIONS = ["<|image|>how many objects?", "<|image|>what colour is it?", "<|image|>where?"]


@pytest.fixture(scope="module")
def solver(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> InferenceSolver:
    return InferenceSolver.from_pretrained(
        write_export(tmp_path_factory.mktemp("export") / "export", sp_model)
    )


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def conversations() -> list[tuple[list[Image.Image], list[list[str | None]]]]:
    return [
        ([picture(0)], [[QUESTIONS[0], None]]),
        ([picture(1, (48, 64))], [[QUESTIONS[1], None]]),
        ([], [["what is a circle?", None]]),
        ([picture(2)], [[QUESTIONS[0], "two"], ["and the colour?", None]]),
        ([picture(3), picture(4)], [["<|image|><|image|>same?", None]]),
        ([picture(5)], [[QUESTIONS[2], None]]),
    ]


def run(batcher: ContinuousBatcher, rows: list) -> None:
    while batcher.busy:
        batcher.step()


def test_rows_joining_and_leaving_write_what_the_solver_writes_alone(solver: InferenceSolver) -> None:
    convs = conversations()
    budgets = [3, 9, 5, 12, 2, 7]  # rows leave at different steps
    batcher = ContinuousBatcher(solver, max_batch=4)  # 6 rows through 4 slots: some wait for a free one
    rows = []
    for (images, qas), budget in zip(convs, budgets):
        rows.append(batcher.submit(batcher.prepare(images, qas, budget), Sampling(stop_ids=())))
        batcher.step()  # one joins per step while earlier ones decode
        assert len(batcher.rows) <= 4
    run(batcher, rows)
    compared = 0
    for row, (images, qas), budget in zip(rows, convs, budgets):
        assert row.written == budget and row.finish == "length"
        prompt = batcher.prepare(images, qas, budget)
        alone = solver.engine.generate(
            [prompt.ids],
            max_new_tokens=budget,
            stop_ids=(),
            pixel_values=torch.cat(prompt.views) if prompt.views else None,
        ).ids[0]
        if solver.tokens.image_start not in alone:  # (a drawn image leaves and rejoins: its own test)
            assert row.run == alone
            compared += 1
    assert compared >= 4
    # With the default stop ids the text is exactly solver.generate's.
    batcher = ContinuousBatcher(solver, max_batch=3)
    rows = [batcher.submit(batcher.prepare(i, q, 6)) for i, q in convs]
    run(batcher, rows)
    assert [batcher.text(r) for r in rows] == [solver.generate(i, q, max_gen_len=6) for i, q in convs]


def test_sampled_rows_follow_their_own_seed(solver: InferenceSolver) -> None:
    images, qas = conversations()[0]
    batcher = ContinuousBatcher(solver, max_batch=8)
    rows = [
        batcher.submit(batcher.prepare(images, qas, 10), Sampling(temperature=1.5, top_k=50, seed=seed))
        for seed in (7, 8, 7)
    ]
    batcher.submit(batcher.prepare(*conversations()[1], 10))  # a greedy neighbour
    run(batcher, rows)
    texts = [batcher.text(r) for r in rows]
    alone = [solver.generate(images, qas, max_gen_len=10, temperature=1.5, top_k=50, seed=s) for s in (7, 8)]
    assert texts == [alone[0], alone[1], alone[0]]


def test_a_picture_drawn_inside_an_answer_leaves_and_joins_again(solver: InferenceSolver) -> None:
    bias = torch.zeros(solver.model.config.lm.vocab_size)
    bias[solver.tokens.image_start] = 1e4  # the model opens an image whenever it writes text
    hook = solver.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    grid = 3 + 4 * (4 + 1)  # <image-start> <size> <size> + 4 rows of 4 codes and <row-end> (32 px)
    try:
        batcher = ContinuousBatcher(solver, max_batch=4)
        convs = conversations()[:3]
        rows = [batcher.submit(batcher.prepare(i, q, grid + 5)) for i, q in convs]
        run(batcher, rows)
        expected = [solver.generate_interleaved(i, q, max_gen_len=grid + 5) for i, q in convs]
    finally:
        hook.remove()
    for row, pieces in zip(rows, expected):
        assert batcher.text(row) == "<|image|>"
        (drawn,) = row.answer.pieces
        assert isinstance(drawn, Image.Image) and drawn.size == (32, 32)
        assert np.asarray(drawn).tolist() == np.asarray(pieces[0]).tolist()


def test_the_batch_is_as_wide_as_its_longest_active_row(solver: InferenceSolver) -> None:
    batcher = ContinuousBatcher(solver, max_batch=4)
    long = batcher.submit(batcher.prepare([picture(0)], [[QUESTIONS[0], None]], 20), Sampling(stop_ids=()))
    short = batcher.submit(batcher.prepare([], [["hi", None]], 20), Sampling(stop_ids=()))
    for _ in range(3):
        batcher.step()
    assert batcher._batch is not None and batcher._batch.length == len(long.answer.ids)
    batcher.cancel(long)
    batcher.step()
    assert batcher.rows == [short] and long.finish == "cancelled"
    assert batcher._batch.length == len(short.answer.ids) and not batcher._batch.padded
    run(batcher, [short])
    assert short.written == 20 and not batcher.busy and batcher._batch is None


def test_bad_settings_are_refused(solver: InferenceSolver) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        ContinuousBatcher(solver, max_batch=0)
    batcher = ContinuousBatcher(solver)
    answer = batcher.prepare([], [["hi", None]], 4)
    with pytest.raises(ValueError, match="top_p"):
        batcher.submit(answer, Sampling(top_p=0))
    with pytest.raises(ValueError, match="temperature"):
        batcher.submit(answer, Sampling(temperature=-1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        batcher.prepare([], [["hi", None]], 0)
