"""Sequences per task (exact ids and labels) and the streaming mixture: determinism, ratios, rank split, exact
resume (also at another world size), drops, pixels, micro-batches with workers, and errors that name the cause."""

from __future__ import annotations

import copy
import dataclasses
import io
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.helpers import TOKENS, make_tokenized_world
from unified_mllm.config import Config, DataSourceConfig, VisionConfig
from unified_mllm.data.conversation import IGNORE_INDEX
from unified_mllm.data.dataset import (
    DataError,
    MixtureDataset,
    batch_stream,
    build_batches,
    build_dataset,
    build_plan,
    mixture_draws,
)
from unified_mllm.data.samples import (
    RecordError,
    SampleBuilder,
    TokenizedRecord,
    caption_sample,
    conversation_sample,
    t2i_sample,
    vqa_sample,
)
from unified_mllm.layout import build_image_span, generation_prompt, unconditional_prompt
from unified_mllm.text import train_sentencepiece
from unified_mllm.train.trainer import supervised_tokens
from unified_mllm.vision.anyres import anyres_views

# ------------------------------------------------------------------------------- sequences per task


def enc(text: str) -> list[int]:
    return [ord(c) for c in text]  # one id per character keeps expected values readable


CODES = np.array([[1, 2], [3, 4]])
QAS = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
META = {
    "caption": "cap",
    "vqa": [{"question": q, "answer": a} for q, a in QAS],
    "t2i": [{"prompt": "p0"}, {"prompt": "p1"}],
}
TOKEN_IDS = {
    "image_hw": [64, 64],
    "caption": enc("cap"),
    "vqa": [[enc(q), enc(a)] for q, a in QAS],
    "t2i": [enc("p0"), enc("p1")],
}
RECORD = TokenizedRecord("k", CODES, {**META, "pretokenized": TOKEN_IDS})
EOT = TOKENS.end_of_turn


def supervised_text(labels: np.ndarray) -> str:
    """Supervised ids as text, end-of-turn as '|'."""
    kept = labels[labels != IGNORE_INDEX].tolist()
    return "".join("|" if t == EOT else chr(t) for t in kept)


def test_caption_sample_is_exact() -> None:
    sample = caption_sample(RECORD, TOKENS, 2, ("Hi", enc("Hi")))
    span = build_image_span(CODES, TOKENS, 2)
    assert sample.ids.tolist() == [TOKENS.bos, *span, *enc("Hi"), EOT, *enc("cap"), EOT]
    assert sample.labels.tolist() == [IGNORE_INDEX] * (len(span) + 4) + [*enc("cap"), EOT]
    assert sample.feature_mask.sum() == 2


def test_vqa_is_one_image_with_a_seeded_subset_of_turns() -> None:
    sample = vqa_sample(RECORD, TOKENS, 0, np.random.default_rng(5), max_turns=2)
    order = np.random.default_rng(5).permutation(3)[:2]
    questions, answers = [QAS[i][0] for i in order], [QAS[i][1] for i in order]
    span = build_image_span(CODES, TOKENS)
    expected = [TOKENS.bos, *span, *enc(questions[0]), EOT, *enc(answers[0]), EOT]
    expected += [*enc(questions[1]), EOT, *enc(answers[1]), EOT]
    assert sample.ids.tolist() == expected
    assert supervised_text(sample.labels) == f"{answers[0]}|{answers[1]}|"
    every = vqa_sample(RECORD, TOKENS, 0, np.random.default_rng(5))
    assert sorted(supervised_text(every.labels).split("|")[:-1]) == ["a1", "a2", "a3"]


def test_t2i_supervises_the_span_but_not_feature_slots() -> None:
    sample = t2i_sample(RECORD, TOKENS, 3, np.random.default_rng(0), cfg_dropout=0.0)
    rng = np.random.default_rng(0)
    rng.random()
    prompt = ["cap", "p0", "p1"][int(rng.integers(3))]
    span = build_image_span(CODES, TOKENS, 3)
    assert sample.ids.tolist() == [TOKENS.bos, *enc(prompt), EOT, *span, EOT]
    assert sample.ids.tolist()[: len(enc(prompt)) + 5] == generation_prompt(enc(prompt), TOKENS, 2, 2)
    start = len(enc(prompt)) + 2
    assert (sample.labels[:start] == IGNORE_INDEX).all()
    assert (sample.labels[sample.feature_mask] == IGNORE_INDEX).all() and sample.feature_mask.sum() == 3
    kept = sample.labels[start:][~sample.feature_mask[start:]].tolist()
    assert kept == [t for t in span if t != TOKENS.feature] + [EOT]  # size, codes, row-ends, <sep>, end


def test_dropped_condition_is_exactly_the_unconditional_prompt() -> None:
    sample = t2i_sample(RECORD, TOKENS, 3, np.random.default_rng(0), cfg_dropout=1.0)
    prompt = unconditional_prompt(TOKENS, 2, 2)
    assert sample.ids.tolist()[: len(prompt)] == prompt
    assert sample.ids.tolist() == [TOKENS.bos, EOT, *build_image_span(CODES, TOKENS, 3), EOT]
    rates = [t2i_sample(RECORD, TOKENS, 0, np.random.default_rng(i), 0.25).ids[1] == EOT for i in range(400)]
    assert 0.19 < np.mean(rates) < 0.31


def test_conversation_turns_as_given() -> None:
    turns = [{"from": "human", "value": "x<|image|>y"}, {"from": "gpt", "value": "z"}]
    pieces = [[enc("x"), enc("y")], [enc("z")]]
    record = TokenizedRecord(
        "c", CODES, {"conversations": turns, "pretokenized": {"image_hw": [8, 8], "conversations": pieces}}
    )
    sample = conversation_sample(record, TOKENS, 1)
    assert sample.ids.tolist() == [
        TOKENS.bos,
        ord("x"),
        *build_image_span(CODES, TOKENS, 1),
        ord("y"),
        EOT,
        ord("z"),
        EOT,
    ]
    assert supervised_text(sample.labels) == "z|"


def test_builder_counts_features_and_names_missing_fields() -> None:
    vision = VisionConfig(image_size=64, patch_size=8)
    builder = SampleBuilder(TOKENS, vision, True, (("Hi", tuple(enc("Hi"))),))
    assert builder.num_features(RECORD) == 64
    anyres = dataclasses.replace(
        vision, anyres=dataclasses.replace(vision.anyres, enabled=True, grids=[[1, 2]])
    )
    assert dataclasses.replace(builder, vision=anyres).num_features(RECORD) == 3 * 64
    assert dataclasses.replace(builder, with_features=False).num_features(RECORD) == 0
    first = builder.build("vqa", RECORD, np.random.default_rng(3))
    assert np.array_equal(first.ids, builder.build("vqa", RECORD, np.random.default_rng(3)).ids)
    bare = TokenizedRecord("bare", CODES, {"pretokenized": {"image_hw": [64, 64]}})
    with pytest.raises(RecordError, match="record 'bare' has no `caption`, which task 'caption' needs"):
        builder.build("caption", bare, np.random.default_rng(0))
    with pytest.raises(RecordError, match="unknown task 'ocr'"):
        builder.build("ocr", RECORD, np.random.default_rng(0))


# ------------------------------------------------------------------------------------ the stream


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Config:
    config = make_tokenized_world(tmp_path_factory.mktemp("ds"), sp_model, "data.max_seq_len=512")
    return mix(config, ("vqa", 2.0), ("caption", 1.0), ("t2i", 2.0))


def mix(config: Config, *sources: tuple[str, float], **data: Any) -> Config:
    """A copy of ``config`` with the given (task, ratio) sources over its tokenized `{split}` and data fields."""
    config = copy.deepcopy(config)
    path = f"{config.data.tokenized_root}/{{split}}"
    config.data.sources = [DataSourceConfig(path=path, task=t, ratio=r) for t, r in sources]
    config.data = dataclasses.replace(config.data, **data)
    return config


def signature(item: dict[str, Any]) -> tuple:
    pixels = item["pixel_values"]
    return (
        item["key"],
        item["task"],
        tuple(item["ids"].tolist()),
        None if pixels is None else float(pixels.sum()),
    )


def take(dataset: MixtureDataset, n: int) -> list[tuple]:
    return [signature(item) for item in islice(iter(dataset), n)]


def test_resume_continues_exactly(world: Config) -> None:
    whole = take(build_dataset(world, with_features=True), 14)
    first = build_dataset(world, with_features=True)
    assert take(first, 7) == whole[:7]
    state = first.state_dict()
    assert all(isinstance(v, int) or all(isinstance(x, int) for x in v) for v in state.values())
    assert state["items"] == 7 and sum(state["positions"]) == state["draws"]
    assert take(build_dataset(world, with_features=True, state=state), 7) == whole[7:]
    assert take(first, 7) == whole[7:]  # iterating again continues too


def test_ranks_deal_the_global_stream_round_robin(world: Config) -> None:
    whole = take(build_dataset(world, with_features=False), 12)
    ranks = [build_dataset(world, rank=r, world_size=2, with_features=False) for r in (0, 1)]
    parts = [take(d, 3) for d in ranks]
    assert parts[0] == whole[0:6:2] and parts[1] == whole[1:6:2]
    assert ranks[0].state_dict() == ranks[1].state_dict()  # same samples consumed: the same position
    resumed = build_dataset(world, rank=1, world_size=2, with_features=False, state=ranks[1].state_dict())
    assert take(resumed, 3) == whole[7:12:2]
    # Another world size: the global position carries over, the items from there are dealt anew.
    single = build_dataset(world, with_features=False, state=ranks[0].state_dict())
    assert take(single, 6) == whole[6:12]


def test_mixture_follows_the_ratios_and_the_seed(world: Config) -> None:
    draws = list(islice(mixture_draws([3.0, 1.0], seed=0), 4200))
    assert 0.72 < draws.count(0) / 4200 < 0.78
    # Resuming anywhere, also across the generator's 4096-draw blocks, continues the same draws.
    assert list(islice(mixture_draws([3.0, 1.0], seed=0, start=4090), 20)) == draws[4090:4110]
    config = mix(world, ("caption", 3.0), ("t2i", 1.0))
    plan = build_plan(config, with_features=False)
    tasks = [p.task for p in islice(plan.iterate(plan.initial_state()), 40)]
    assert tasks == ["caption" if d == 0 else "t2i" for d in draws[:40]]
    reseeded = build_plan(
        dataclasses.replace(config, train=dataclasses.replace(config.train, seed=1)), with_features=False
    )
    keys = [p.key for p in islice(plan.iterate(plan.initial_state()), 10)]
    assert keys != [p.key for p in islice(reseeded.iterate(reseeded.initial_state()), 10)]


def test_every_epoch_visits_every_record_once(world: Config) -> None:
    plan = build_plan(mix(world, ("caption", 1.0)), with_features=False)
    items = list(islice(plan.iterate(plan.initial_state()), 15))
    epochs = [[p.key for p in items[i : i + 5]] for i in (0, 5, 10)]
    assert all(sorted(e) == [f"shapes-train-{i:08d}" for i in range(5)] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # the order is reshuffled per epoch
    assert items[-1].state["positions"] == [15]


def test_too_long_samples_are_dropped_and_counted(world: Config) -> None:
    config = mix(world, ("caption", 1.0), ("vqa", 1.0), max_seq_len=150)
    dataset = build_dataset(config, with_features=False)
    items = list(islice(iter(dataset), 20))
    assert all(len(i["ids"]) <= 150 for i in items) and {i["task"] for i in items} == {"caption"}
    state = dataset.state_dict()
    assert dataset.dropped == {"caption:0": 0, "vqa:1": state["positions"][1]} and state["positions"][1] > 0
    assert state["draws"] == 20 + state["dropped"][1]


def test_items_carry_the_image_views(world: Config) -> None:
    item = next(iter(build_dataset(mix(world, ("caption", 1.0)), with_features=True)))
    tokenized = Path(world.data.tokenized_root) / "train"
    raw = next(p for p in tokenized.glob("*.tar") if item["key"] in str(_names(p)))
    image = Image.open(io.BytesIO(_names(raw)[f"{item['key']}.png"]))
    expected, _ = anyres_views(image, world.model.vision)
    assert item["pixel_values"].shape == (1, 3, 64, 64) and torch.equal(item["pixel_values"], expected)
    assert item["feature_mask"].sum() == 64 and item["feature_mask"].dtype == bool
    anyres = copy.deepcopy(world)
    anyres.model.vision.anyres.enabled, anyres.model.vision.anyres.grids = True, [[1, 2]]
    wide = next(iter(build_dataset(mix(anyres, ("t2i", 1.0)), with_features=True)))
    assert wide["pixel_values"].shape == (3, 3, 64, 64) and wide["feature_mask"].sum() == 3 * 64
    plain = next(iter(build_dataset(mix(world, ("t2i", 1.0)), with_features=False)))
    assert plain["pixel_values"] is None and not plain["feature_mask"].any()


def test_items_and_batches_carry_their_source_loss_weight(world: Config) -> None:
    config = mix(world, ("vqa", 1.0), ("t2i", 1.0))
    config.data.sources[0].loss_weight = 4.0
    items = list(islice(iter(build_dataset(config, with_features=False)), 12))
    assert {(i["task"], i["loss_weight"]) for i in items} == {("vqa", 4.0), ("t2i", 1.0)}
    batch = next(iter(build_batches(config, with_features=False, rows=6)))  # padded: a sample per row
    assert not config.data.pack and {"vqa", "t2i"} <= set(batch.tasks)
    per_row = torch.tensor([4.0 if task == "vqa" else 1.0 for task in batch.tasks])
    assert torch.equal(batch.loss_weights, batch.attention_mask * per_row[:, None])
    supervised = batch.labels[:, 1:] != IGNORE_INDEX
    assert supervised_tokens(batch) == float((supervised * per_row[:, None]).sum())
    assert supervised_tokens(dataclasses.replace(batch, loss_weights=None)) == float(supervised.sum())


def _names(shard: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_cfg_dropout_on_real_records(world: Config) -> None:
    config = mix(world, ("t2i", 1.0), cfg_dropout=1.0)
    plan = build_plan(config, with_features=True)
    prompt = unconditional_prompt(plan.builder.tokens, 8, 8)
    for planned in islice(plan.iterate(plan.initial_state()), 6):
        assert planned.sample.ids[: len(prompt)].tolist() == prompt


def batches_signature(batch: dict[str, Any]) -> tuple:
    return tuple(batch.input_ids.flatten().tolist()), tuple(batch.tasks)


def test_micro_batches_match_the_sample_stream_and_resume(world: Config) -> None:
    samples = build_dataset(world, rank=1, world_size=2, with_features=True)
    batches = build_batches(world, rank=1, world_size=2, with_features=True, rows=2)
    for batch in islice(iter(batches), 2):
        pair = list(islice(iter(samples), 2))
        assert [r[: len(s["ids"])].tolist() for r, s in zip(batch.input_ids, pair)] == [
            s["ids"].tolist() for s in pair
        ]
        assert batch.data_state == samples.state_dict()
        assert torch.equal(batch.pixel_values, torch.cat([s["pixel_values"] for s in pair]))


def test_packed_batches_are_global_and_resume_from_their_state(world: Config) -> None:
    config = mix(world, ("vqa", 2.0), ("caption", 1.0), ("t2i", 2.0), pack=True)
    ranks = [
        list(islice(iter(build_batches(config, rank=r, world_size=2, with_features=True, rows=2)), 3))
        for r in (0, 1)
    ]
    assert [b.data_state for b in ranks[0]] == [b.data_state for b in ranks[1]]
    for batch in ranks[0]:
        assert batch.input_ids.shape[0] == 2 and batch.attention_mask is None
        assert batch.input_ids.shape[1] <= 512
    resumed = build_batches(
        config, rank=0, world_size=2, with_features=True, rows=2, state=ranks[0][0].data_state
    )
    assert [batches_signature(b) for b in islice(iter(resumed), 2)] == [
        batches_signature(b) for b in ranks[0][1:]
    ]


def test_workers_give_the_same_batches_in_order(world: Config) -> None:
    config = mix(world, ("caption", 1.0), ("t2i", 1.0), pack=True, num_workers=2)
    config.train.micro_batch_size = 2
    serial = [batches_signature(b) for b in islice(iter(build_batches(config, with_features=True)), 5)]
    stream = batch_stream(config, with_features=True)
    assert [batches_signature(b) for b in islice(stream, 5)] == serial
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(DataLoader(build_dataset(world, with_features=False), batch_size=2, num_workers=1)))


def test_bad_sources_and_states_are_named(world: Config, tmp_path: Path, corpus_lines: list[str]) -> None:
    with pytest.raises(DataError, match=r"`data\.sources` is empty"):
        build_dataset(mix(world), with_features=False)
    raw = mix(world, ("caption", 1.0))
    raw.data.sources[0].path = f"{world.data.root}/train"
    with pytest.raises(DataError, match="no pre-tokenization manifest"):
        build_dataset(raw, with_features=False)
    missing = mix(world, ("caption", 1.0))
    with pytest.raises(DataError, match="--split val"):
        build_dataset(missing, split="val", with_features=False)
    other = train_sentencepiece(
        corpus_lines[::2], tmp_path / "other.model", vocab_size=390, num_size_tokens=9
    )
    changed = mix(world, ("caption", 1.0))
    changed.tokenizer.path = str(other)
    with pytest.raises(DataError, match="pre-tokenized with another text tokenizer"):
        build_plan(changed, with_features=False)
    state = build_dataset(world, with_features=False).state_dict()
    with pytest.raises(DataError, match=r"has 3 source\(s\) but `data\.sources` has 1"):
        build_dataset(mix(world, ("caption", 1.0)), with_features=False, state=state)
