"""The embedded shapes world: determinism, validation, derived text and the shard-writing CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unified_mllm.config import WorldConfig, load_config
from unified_mllm.data import shapes as S
from unified_mllm.data.shards import iter_samples
from unified_mllm.eval.judge import score

WORLD = WorldConfig()
N_SCENES = 300


def scenes(world: WorldConfig = WORLD, split: str = "train", n: int = N_SCENES) -> list[S.Scene]:
    return [S.make_scene(world, split, i) for i in range(n)]


def fingerprint(world: WorldConfig, split: str, index: int) -> str:
    """A digest of a sample's scene, pixels and record: equal digests mean identical samples."""
    image, record = S.make_sample(world, split, index)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ determinism


def test_same_inputs_give_the_same_scene_and_pixels() -> None:
    for index in (0, 5, 123):
        a, b = S.make_scene(WORLD, "train", index), S.make_scene(WORLD, "train", index)
        assert a == b
        assert S.render(a).tobytes() == S.render(b).tobytes()
        assert S.make_record(WORLD, "train", index) == S.make_record(WORLD, "train", index)


def test_different_inputs_give_different_scenes() -> None:
    train = scenes(n=50)
    assert len({s for s in train}) >= 45  # scenes are hashable; a few small ones may coincide by chance
    assert S.make_scene(WORLD, "train", 0) != S.make_scene(WORLD, "val", 0)
    other_seed = dataclasses.replace(WORLD, seed=1)
    assert [S.make_scene(other_seed, "train", i) for i in range(10)] != train[:10]


def test_samples_are_identical_in_another_process() -> None:
    code = (
        "import hashlib, json\n"
        "from unified_mllm.config import WorldConfig\n"
        "from unified_mllm.data.shapes import make_sample\n"
        "image, record = make_sample(WorldConfig(seed=3), 'test', 17)\n"
        "digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode())\n"
        "digest.update(image.tobytes())\n"
        "print(digest.hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fingerprint(WorldConfig(seed=3), "test", 17)


def test_generation_is_pinned() -> None:
    # A change here changes every generated dataset: bump WORLD_VERSION (stats.json then forces a rewrite).
    assert S.world_rng(0, "train", 0, "scene").integers(2**62) == 4569812325528342828
    assert S.make_scene(WORLD, "train", 0).to_json()["objects"] == [
        {"shape": "circle", "color": "green", "size": "large", "row": 0, "col": 1},
        {"shape": "circle", "color": "red", "size": "small", "row": 2, "col": 0},
        {"shape": "square", "color": "purple", "size": "small", "row": 2, "col": 1},
    ]
    assert S.sample_key("train", 42) == "shapes-train-00000042"


def test_functions_take_the_whole_config_too() -> None:
    config = load_config(overrides=["data.world.seed=4"])
    world = dataclasses.replace(WORLD, seed=4)
    assert S.make_scene(config, "val", 2) == S.make_scene(world, "val", 2)
    assert S.make_record(config, "val", 2) == S.make_record(world, "val", 2)
    assert S.geneval_prompts(config, 6) == S.geneval_prompts(world, 6)
    assert score(S.make_scene(config, "val", 2), S.geneval_prompts(world, 1)[0]["spec"], config).objects


def test_scenes_respect_the_world_settings() -> None:
    world = WorldConfig(
        grid_size=4, min_objects=2, max_objects=6, shapes=["circle", "cross"], colors=["cyan", "navy"]
    )
    for scene in scenes(world, n=100):
        assert 2 <= len(scene.objects) <= 6
        assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
        assert {o.shape for o in scene.objects} <= {"circle", "cross"}
        assert {o.color for o in scene.objects} <= {"cyan", "navy"}
    image = S.render(scene)
    assert image.mode == "RGB" and image.size == (64, 64)


def test_scene_json_round_trip_and_record_ground_truth() -> None:
    scene = S.make_scene(WORLD, "val", 3)
    assert S.Scene.from_json(json.loads(json.dumps(scene.to_json()))) == scene
    record = S.make_record(WORLD, "val", 3)
    assert S.Scene.from_json(record) == scene
    for obj, entry in zip(scene.objects, record["objects"], strict=True):
        assert entry["bbox"] == pytest.approx(scene.box(obj), abs=1e-3)
        assert entry["rgb"] == list(S.PALETTE[obj.color])
    for key in (
        "key",
        "split",
        "index",
        "seed",
        "image_size",
        "grid_size",
        "objects",
        "caption",
        "vqa",
        "t2i",
    ):
        assert key in record
    with pytest.raises(ValueError, match="share a grid cell"):
        S.Scene((S.SceneObject("circle", "red", "small", 0, 0),) * 2, 64, 3)


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colors": ["red", "pink"]}, r"unknown color 'pink'.*valid names: \['red', 'green'"),
        ({"shapes": ["circle", "hexagon"]}, r"unknown shape 'hexagon'.*'triangle'"),
        ({"sizes": ["tiny"]}, r"unknown size 'tiny'"),
        ({"colors": []}, r"colors is empty"),
        ({"colors": ["red", "red"]}, r"more than once"),
        ({"image_size": 32, "grid_size": 4}, r"px per cell"),
        ({"min_objects": 3, "max_objects": 2}, r"min_objects"),
    ],
)
def test_world_validation_names_the_problem(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S.check_world(dataclasses.replace(WORLD, **change))


def test_palette_has_ten_distinct_colours_far_apart() -> None:
    assert len(S.PALETTE) >= 10
    assert set(WORLD.colors) <= set(S.PALETTE)
    rgb = np.array(list(S.PALETTE.values()), dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert distances.min() > 75
    assert np.linalg.norm(rgb - np.array(S.BACKGROUND), axis=-1).min() > 200


def test_cli_rejects_an_unknown_colour(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^error: .*pink"):
        S.main([f"data.root={tmp_path}", "data.world.colors=[red,pink]", "--no-progress"])


# ----------------------------------------------------------------------------------------------- text


def resolve(ref: str, scene: S.Scene) -> list[S.SceneObject]:
    """The objects a question's reference ('the small red circle', 'the object in the top left') denotes."""
    ref = ref.removeprefix("the ")
    if ref.startswith("object in the "):
        cell = ref.removeprefix("object in the ")
        return [o for o in scene.objects if S.cell_name(o.row, o.col, scene.grid_size) == cell]
    words = ref.split()
    wanted = {}
    for word in words:
        for attr, vocab in (("size", S.SIZES), ("color", S.PALETTE), ("shape", S.SHAPES)):
            if word in vocab:
                wanted[attr] = word
    assert len(wanted) == len([w for w in words if w != "object"]), ref
    return [o for o in scene.objects if all(getattr(o, a) == v for a, v in wanted.items())]


def expected_answer(question: str, kind: str, scene: S.Scene) -> str:
    """Recompute a question's answer from ground truth (and check its references are unambiguous)."""
    if kind in ("color", "shape", "size"):
        ref = re.fullmatch(rf"what {kind} is (.+)\?", question).group(1)
        (obj,) = resolve(ref, scene)
        return getattr(obj, kind)
    if kind == "count":
        subject = re.fullmatch(r"how many (\w+) are there\?", question).group(1)
        if subject == "objects":
            return S.number_word(len(scene.objects))
        shape = next(s for s, k in S.SHAPES.items() if k.plural == subject)
        return S.number_word(sum(o.shape == shape for o in scene.objects))
    if kind == "existence":
        ref = re.fullmatch(r"is there an? (.+)\?", question).group(1)
        return "yes" if resolve(ref, scene) else "no"
    assert kind == "spatial"
    match = re.fullmatch(r"is (the .+) (left of|right of|above|below) (the .+)\?", question)
    (a,) = resolve(match.group(1), scene)
    (b,) = resolve(match.group(3), scene)
    return "yes" if match.group(2) in S.relations(scene.box(a), scene.box(b)) else "no"


def test_caption_mentions_every_object() -> None:
    for scene in scenes():
        text = S.caption(scene)
        for obj in scene.objects:
            assert f"{obj.size} {obj.color} {obj.shape} in the {S.cell_name(obj.row, obj.col, 3)}" in text
        assert text.count(" in the ") == len(scene.objects)
    assert S.caption(S.make_scene(WORLD, "train", 0)).startswith(("a ", "an "))


def test_every_vqa_answer_is_correct_and_unambiguous() -> None:
    types = Counter()
    for index, scene in enumerate(scenes()):
        for qa in S.make_record(WORLD, "train", index)["vqa"]:
            types[qa["type"]] += 1
            assert qa["answer"] == expected_answer(qa["question"], qa["type"], scene), qa
    assert set(types) == set(S.VQA_TYPES)


def test_existence_questions_are_balanced_pope_style() -> None:
    total = Counter()
    for index in range(N_SCENES):
        vqa = S.make_record(WORLD, "train", index)["vqa"]
        balance = Counter(q["answer"] for q in vqa if q["type"] == "existence")
        assert balance["yes"] == balance["no"]  # per scene, not just on average
        spatial = Counter(q["answer"] for q in vqa if q["type"] == "spatial")
        assert spatial["yes"] == spatial["no"]
        total.update(balance)
    assert total["yes"] > N_SCENES  # most scenes ask both a shape and a colour+shape pair


def test_t2i_prompts_from_a_scene_are_judged_correct_on_it() -> None:
    categories = Counter()
    for index, scene in enumerate(scenes(n=150)):
        image = S.render(scene)
        for entry in S.make_record(WORLD, "train", index)["t2i"]:
            categories[entry["category"]] += 1
            assert entry["prompt"] == S.prompt_for_spec(entry["spec"])
            assert score(scene, entry["spec"], WORLD).correct, entry
            result = score(image, entry["spec"], WORLD)
            assert result.correct, (entry, result.reason)
    assert set(categories) == set(S.CATEGORIES)


def test_prompt_texts() -> None:
    spec = S.make_spec("position", [S.spec_item("circle", position=("left of", 1)), S.spec_item("square")])
    assert S.prompt_for_spec(spec) == "a photo of a circle left of a square"
    spec = S.make_spec("counting", [S.spec_item("triangle", 3)], [S.spec_item("triangle", 4)])
    assert S.prompt_for_spec(spec) == "a photo of three triangles"
    spec = S.make_spec(
        "color_attr", [S.spec_item("circle", color="orange"), S.spec_item("square", color="blue")]
    )
    assert S.prompt_for_spec(spec) == "a photo of an orange circle and a blue square"


def test_geneval_prompts_are_balanced_and_deterministic() -> None:
    prompts = S.geneval_prompts(WORLD, 60, seed=0)
    assert Counter(p["category"] for p in prompts) == {c: 10 for c in S.CATEGORIES}
    assert S.geneval_prompts(WORLD, 60, seed=0) == prompts
    assert S.geneval_prompts(WORLD, 12, seed=0) == prompts[:12]
    assert S.geneval_prompts(WORLD, 60, seed=1) != prompts
    assert S.geneval_prompts(WORLD, 60, seed=0, split="test") == prompts  # test is the default set
    val = S.geneval_prompts(WORLD, 60, seed=0, split="val")  # an independent set, for choosing settings
    assert Counter(p["category"] for p in val) == {c: 10 for c in S.CATEGORIES}
    # the prompt space is small (a single-object prompt names one of 3 shapes), so only most prompts differ
    assert sum(v != t for v, t in zip(val, prompts, strict=True)) > 40
    with pytest.raises(ValueError, match="'val' or a 'test' set, got split 'train'"):
        S.geneval_prompts(WORLD, 6, split="train")
    for p in prompts:
        S.validate_spec(p["spec"], WORLD)
        assert p["prompt"].startswith("a photo of ")
        if p["category"] in ("two_object", "position", "color_attr"):
            assert p["spec"]["include"][0]["shape"] != p["spec"]["include"][1]["shape"]


def test_scene_for_prompt_holds_exactly_the_described_objects() -> None:
    for index, prompt in enumerate(S.geneval_prompts(WORLD, 120, seed=5)):
        spec = prompt["spec"]
        scene = S.scene_for_prompt(spec, index, WORLD)
        assert len(scene.objects) == sum(item["count"] for item in spec["include"])
        result = score(S.render(scene), spec, WORLD)
        assert result.correct, (prompt["prompt"], scene, result.reason)
    rng = np.random.default_rng(0)
    spec = S.geneval_prompts(WORLD, 1)[0]["spec"]
    assert isinstance(S.scene_for_prompt(spec, rng, WORLD), S.Scene)
    too_many = S.make_spec("counting", [S.spec_item("circle", 10)], [S.spec_item("circle", 11)])
    with pytest.raises(S.SpecError, match="only 9 cells"):
        S.scene_for_prompt(too_many, 0, WORLD)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), index=st.integers(0, 10**6))
def test_any_sample_is_consistent(seed: int, index: int) -> None:
    world = dataclasses.replace(WORLD, seed=seed)
    scene = S.make_scene(world, "train", index)
    record = S.record_for_scene(scene, world, "train", index)
    for qa in record["vqa"]:
        assert qa["answer"] == expected_answer(qa["question"], qa["type"], scene)
    for entry in record["t2i"]:
        assert score(scene, entry["spec"], world).correct


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"category": "portrait", "include": [{"shape": "circle"}]}, "unknown category 'portrait'"),
        ({"category": "colors", "include": [{"shape": "circle", "color": "pink"}]}, "unknown color 'pink'"),
        ({"category": "single_object", "include": [{"shape": "hexagon"}]}, "unknown shape 'hexagon'"),
        ({"category": "colors", "include": [{"shape": "circle", "color": "cyan"}]}, "unknown color 'cyan'"),
        ({"category": "single_object", "include": []}, "non-empty 'include'"),
        ({"category": "two_object", "include": [{"shape": "circle"}]}, "2 include entries"),
        ({"category": "colors", "include": [{"shape": "circle"}]}, "needs a color"),
        (
            {
                "category": "position",
                "include": [{"shape": "circle", "position": ["near", 1]}, {"shape": "square"}],
            },
            "position must be",
        ),
        ({"category": "counting", "include": [{"shape": "circle", "count": 0}]}, "count must be"),
        (
            {
                "category": "position",
                "include": [{"shape": "circle", "position": ["above", 0]}, {"shape": "square"}],
            },
            "another include entry",
        ),
        (
            {"category": "single_object", "include": [{"shape": "circle"}], "exclude": ["circle"]},
            "must be a dict",
        ),
    ],
)
def test_bad_specs_raise_clear_errors(spec: dict, message: str) -> None:
    with pytest.raises(S.SpecError, match=message):
        S.validate_spec(spec, WORLD)


def test_relations_follow_geneval() -> None:
    box = (0.0, 0.0, 10.0, 10.0)
    assert S.relations(box, (20.0, 0.0, 30.0, 10.0)) == {"left of"}
    assert S.relations((20.0, 0.0, 30.0, 10.0), box) == {"right of"}
    assert S.relations(box, (0.0, 20.0, 10.0, 30.0)) == {"above"}
    assert S.relations(box, (20.0, 20.0, 30.0, 30.0)) == {"left of", "above"}
    assert S.relations(box, (21.0, 42.0, 31.0, 52.0)) == {"above"}  # steep: not "left of"
    assert S.relations(box, (1.0, 0.0, 11.0, 10.0)) == set()  # overlapping: within the margin


def test_corpus_yields_all_text() -> None:
    lines = list(S.corpus(WORLD, "train", 3))
    records = [S.make_record(WORLD, "train", i) for i in range(3)]
    expected = [line for record in records for line in S.record_texts(record)]
    assert lines == expected
    assert records[0]["caption"] in lines and "yes" in lines
    assert all(line and "\n" not in line for line in lines)


# ------------------------------------------------------------------------------------------------- CLI


def small_args(root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        "data.world.num_train=30",
        "data.world.num_val=7",
        "data.world.num_test=5",
        "data.world.samples_per_shard=12",
        "--no-progress",
        *extra,
    ]


def test_cli_writes_readable_shards_and_reuses_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "world"
    S.main(small_args(root, "--stats"))
    out = capsys.readouterr().out
    assert "wrote train: 30 scenes in 3 shard(s)" in out
    assert "split train: 30 scenes in 3 shard(s)" in out
    assert "existence" in out and "objects_per_scene" in out and "t2i_category" in out
    world = load_config(overrides=small_args(root)[:5]).data.world

    samples = list(iter_samples(root / "train"))
    assert [s.key for s in samples] == [S.sample_key("train", i) for i in range(30)]
    for index, sample in enumerate(samples[:10]):
        image, record = S.make_sample(world, "train", index)
        assert sample.meta == json.loads(json.dumps(record))
        assert np.array_equal(np.asarray(sample.image.convert("RGB")), np.asarray(image))
    assert len(list(iter_samples(root / "val"))) == 7
    corpus_lines = (root / "corpus.txt").read_text().splitlines()
    assert corpus_lines == list(S.corpus(world, "train"))

    stats = json.loads((root / "train" / "stats.json").read_text())
    assert stats["num_scenes"] == 30 and len(stats["shards"]) == 3
    assert sum(stats["counts"]["objects_per_scene"].values()) == 30
    assert stats["counts"]["existence"]["yes"] == stats["counts"]["existence"]["no"]
    assert set(stats["counts"]["t2i_category"]) == set(S.CATEGORIES)

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    S.main(small_args(root))
    assert "reused train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes

    # Changing one split's size regenerates that split only; changing the world regenerates everything.
    S.main([*small_args(root), "data.world.num_val=9", "--splits", "val", "train"])
    out = capsys.readouterr().out
    assert "wrote val: 9 scenes" in out and "reused train" in out
    assert (root / "train" / "stats.json").stat().st_mtime_ns == mtimes[root / "train" / "stats.json"]
    S.main([*small_args(root), "data.world.seed=1", "--splits", "train"])
    assert "wrote train" in capsys.readouterr().out
    assert len(list((root / "train").glob("*.tar"))) == 3


def test_cli_rewrites_a_missing_corpus_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "world"
    S.main(small_args(root, "--splits", "train"))
    shard = root / "train" / "shapes-train-000000.tar"
    before = shard.stat().st_mtime_ns
    (root / "corpus.txt").unlink()
    S.main(small_args(root, "--splits", "train"))
    assert "reused train" in capsys.readouterr().out
    assert (root / "corpus.txt").is_file() and shard.stat().st_mtime_ns == before


def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "unified_mllm.data.shapes", *small_args(tmp_path / "w"), "--splits", "val"]
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, check=True)
    assert "wrote val: 7 scenes" in out.stdout
    assert (tmp_path / "w" / "val" / "shapes-val-000000.tar").is_file()
