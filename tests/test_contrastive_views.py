"""The contrastive trainer's extra pairs (object views, hard negatives) and its world probes' labels."""

from __future__ import annotations

import numpy as np
import pytest

from unified_mllm.config import WorldConfig
from unified_mllm.data.contrastive_views import hard_negative, object_view, scene_of, scene_pair
from unified_mllm.data.shapes import Scene, SceneObject, make_record, make_sample, render
from unified_mllm.train.contrastive_probes import world_labels

WORLD = WorldConfig()  # 3x3 grid; shapes circle/square/triangle; six colours; small/large
SCENE = Scene(
    (SceneObject("circle", "red", "large", 0, 0), SceneObject("square", "blue", "small", 2, 1)), 64, 3
)


def test_a_world_record_gives_back_its_scene_and_others_give_none() -> None:
    record = make_record(WORLD, "train", 3)
    assert scene_pair(scene_of(record))[1] == record["caption"]
    assert np.array_equal(
        np.asarray(scene_pair(scene_of(record))[0]), np.asarray(make_sample(WORLD, "train", 3)[0])
    )
    assert scene_of({"caption": "a cat"}) is None
    assert scene_of({"objects": [{"shape": "circle"}]}) is None  # not the world's full record


def test_an_object_view_is_one_object_where_it_stands() -> None:
    view = object_view(SCENE, np.random.default_rng(0))
    assert len(view.objects) == 1 and view.objects[0] in SCENE.objects
    image, text = scene_pair(view)
    obj = view.objects[0]
    cell = {(0, 0): "top left", (2, 1): "bottom center"}[(obj.row, obj.col)]
    assert text == f"a {obj.size} {obj.color} {obj.shape} in the {cell}"
    assert np.array_equal(np.asarray(image), np.asarray(render(Scene((obj,), 64, 3))))


def test_a_hard_negative_changes_exactly_one_attribute_of_one_object() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = hard_negative(SCENE, WORLD, ["shape"], rng)
        first, second = text.split(" and ")
        words = first.split() + second.split()
        original = scene_pair(SCENE)[1].split(" and ")
        want = original[0].split() + original[1].split()
        changed = [(a, b) for a, b in zip(words, want) if a != b]
        assert len(words) == len(want) and len(changed) == 1
        assert changed[0][0] in WORLD.shapes and changed[0][1] in ("circle", "square")


def test_hard_negative_names_its_problems() -> None:
    one_size = WorldConfig(sizes=["large"])
    large_only = Scene(SCENE.objects[:1], 64, 3)  # its one object is large: no other size to swap in
    assert hard_negative(large_only, one_size, ["size"], np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['texture'\]"):
        hard_negative(SCENE, WORLD, ["texture"], np.random.default_rng(0))


def test_world_labels_say_what_is_where() -> None:
    objects = [o.to_json() for o in SCENE.objects]
    labels = world_labels(objects, WORLD, 3)
    # presence: colour-major over (red, green, blue, yellow, purple, orange) x (circle, square, triangle).
    assert labels["presence"] == [1, 0, 0, 0, 0, 0, 0, 1, 0] + [0] * 9
    # cells: 0 empty, else 1 + colour * 3 + shape: red circle at (0, 0) -> 1, blue square at (2, 1) -> 8.
    assert labels["cells"] == [1, 0, 0, 0, 0, 0, 0, 8, 0]
    assert "shape" not in labels  # two objects: no single-object question
    single = world_labels(objects[1:], WORLD, 3)
    assert single["shape"] == [1] and single["color"] == [2]
