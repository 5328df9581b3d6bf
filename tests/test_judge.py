"""The programmatic judge: exact read-back of rendered scenes, robustness, and GenEval's scoring rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unified_mllm.config import WorldConfig
from unified_mllm.data import shapes as S
from unified_mllm.eval import judge as J

WORLD = WorldConfig(seed=7)


def accuracy(world: WorldConfig, n: int, kind: str = "clean", split: str = "judge-test") -> float:
    correct = 0
    for index in range(n):
        scene = S.make_scene(world, split, index)
        image = S.render(scene)
        if kind != "clean":
            image = J.degrade(image, kind, S.world_rng(world.seed, split, index, kind))
        correct += J.matches_scene(J.read_scene(image, world), scene)
    return correct / n


def test_clean_scenes_are_read_exactly() -> None:
    assert accuracy(WORLD, 1000) == 1.0


@pytest.mark.parametrize("kind", J.DEGRADATIONS)
def test_degraded_scenes_are_read_almost_always(kind: str) -> None:
    assert accuracy(WORLD, 250, kind) >= 0.98


def test_extended_vocabulary_is_read_exactly() -> None:
    """Every registered shape, palette colour and size (not only the default world's)."""
    world = WorldConfig(shapes=list(S.SHAPES), colors=list(S.PALETTE), sizes=list(S.SIZES), max_objects=6)
    assert accuracy(world, 200) == 1.0
    assert accuracy(world, 100, "blur") >= 0.98


def test_detected_objects_carry_geometry() -> None:
    scene = S.make_scene(WORLD, "val", 11)
    objects = J.read_scene(S.render(scene), WORLD)
    for found, truth in zip(objects, scene.objects, strict=True):
        x, y = scene.center(truth)
        x0, y0, x1, y1 = found.bbox
        assert abs((x0 + x1) / 2 - x) < 1.0 and abs((y0 + y1) / 2 - y) < 1.0
        assert found.area == pytest.approx(S.SHAPES[truth.shape].fill * truth.extent(64, 3) ** 2, rel=0.1)
        assert found.shape_score > 0.8


@pytest.mark.parametrize("side", [48, 100, 256, 512])
def test_images_of_other_sizes_are_rescaled(side: int) -> None:
    for index in range(20):
        scene = S.make_scene(WORLD, "sizes", index)
        large = S.render(
            S.Scene(scene.objects, side, scene.grid_size)
        )  # the same layout at another resolution
        assert J.matches_scene(J.read_scene(large, WORLD), scene), (side, index)
    upscaled = S.render(scene).resize((200, 200), Image.Resampling.BICUBIC)
    assert J.matches_scene(J.read_scene(upscaled, WORLD), scene)


def test_array_rgba_and_off_white_inputs() -> None:
    scene = S.make_scene(WORLD, "val", 2)
    image = S.render(scene)
    array = np.asarray(image)
    assert J.matches_scene(J.read_scene(array, WORLD), scene)
    assert J.matches_scene(J.read_scene(array.astype(np.float32) / 255, WORLD), scene)
    assert J.matches_scene(J.read_scene(array.astype(np.float32), WORLD), scene)  # floats in 0..255
    assert J.matches_scene(J.read_scene(array.transpose(2, 0, 1) / 255.0, WORLD), scene)  # channels first
    assert J.matches_scene(J.read_scene(image.convert("RGBA"), WORLD), scene)
    dimmer = np.clip(array.astype(np.float32) * 0.9 + 8, 0, 255).astype(np.uint8)  # a greyish background
    assert J.matches_scene(J.read_scene(dimmer, WORLD), scene)


def test_specks_are_ignored_and_touching_objects_split() -> None:
    canvas = np.full((64, 64, 3), 255, np.uint8)
    canvas[30, 30] = (220, 30, 30)  # a one-pixel speck is no object
    assert J.read_scene(canvas, WORLD) == []
    canvas[6:22, 4:21] = (220, 30, 30)  # a red square in cell (0, 0) touching a blue one in cell (0, 1)
    canvas[6:22, 21:38] = (30, 70, 230)
    found = [o.key for o in J.read_scene(canvas, WORLD)]
    assert found == [("square", "red", "large", 0, 0), ("square", "blue", "large", 0, 1)]


# ---------------------------------------------------------------------------------------------- scoring


def objects(*specs: tuple[str, str, int, int]) -> list[J.DetectedObject]:
    """Hand-made detections: (shape, color, row, col), all large."""
    scene = S.Scene(tuple(S.SceneObject(s, c, "large", r, k) for s, c, r, k in specs), 64, 3)
    return J.scene_objects(scene)


def spec(category: str, *items: dict, exclude: tuple = ()) -> dict:
    return S.make_spec(category, list(items), list(exclude))


def check(found: list[J.DetectedObject], spec_: dict, expected: bool, reason: str = "") -> None:
    result = J.score(found, spec_, WORLD)
    assert result.correct is expected, result.reason
    assert reason in result.reason
    assert result.objects == found


def test_single_and_two_object_rules() -> None:
    scene = objects(("circle", "red", 0, 0), ("square", "blue", 1, 1))
    check(scene, spec("single_object", S.spec_item("circle")), True, "ok")
    check(scene, spec("single_object", S.spec_item("triangle")), False, "expected 1 triangle, found 0")
    check(scene, spec("two_object", S.spec_item("circle"), S.spec_item("square")), True)
    check(scene, spec("two_object", S.spec_item("circle"), S.spec_item("triangle")), False, "triangle")


def test_counting_is_exact() -> None:
    three = spec("counting", S.spec_item("triangle", 3), exclude=(S.spec_item("triangle", 4),))
    check(objects(*[("triangle", "red", 0, c) for c in range(3)]), three, True)
    check(
        objects(*[("triangle", "red", 0, c) for c in range(2)]), three, False, "expected 3 triangle, found 2"
    )
    four = objects(*[("triangle", "red", 0, c) for c in range(3)], ("triangle", "blue", 1, 0))
    check(four, three, False, "expected fewer than 4 triangle, found 4")
    check(objects(*[("triangle", "red", 0, c) for c in range(3)], ("circle", "red", 1, 0)), three, True)


def test_colors_rule() -> None:
    red_circle = spec("colors", S.spec_item("circle", color="red"))
    check(objects(("circle", "red", 0, 0)), red_circle, True)
    check(objects(("circle", "blue", 0, 0), ("circle", "red", 2, 2)), red_circle, True)  # one of them is red
    check(objects(("circle", "blue", 0, 0)), red_circle, False, "found circle colored blue")
    check(objects(("square", "red", 0, 0)), red_circle, False, "expected 1 red circle, found 0")


def test_position_rule() -> None:
    left = spec("position", S.spec_item("circle", position=("left of", 1)), S.spec_item("square"))
    above = spec("position", S.spec_item("circle", position=("above", 1)), S.spec_item("square"))
    check(objects(("circle", "red", 1, 0), ("square", "blue", 1, 2)), left, True)
    check(objects(("circle", "red", 1, 2), ("square", "blue", 1, 0)), left, False, "found ['right of']")
    check(objects(("circle", "red", 0, 0), ("square", "blue", 1, 1)), left, True)  # diagonal: left and above
    check(objects(("circle", "red", 0, 0), ("square", "blue", 2, 1)), left, False, "found ['above']")  # steep
    check(objects(("circle", "red", 0, 1), ("square", "blue", 2, 1)), above, True)
    check(objects(("circle", "red", 2, 1), ("square", "blue", 0, 1)), above, False, "below")
    check(objects(("circle", "red", 0, 1)), above, False, "expected 1 square, found 0")
    # Any circle–square pair in the relation will do.
    check(objects(("circle", "red", 1, 2), ("circle", "green", 0, 0), ("square", "blue", 0, 2)), left, True)


def test_color_attr_rule() -> None:
    wanted = spec("color_attr", S.spec_item("circle", color="red"), S.spec_item("square", color="blue"))
    check(objects(("circle", "red", 0, 0), ("square", "blue", 2, 2)), wanted, True)
    check(objects(("circle", "blue", 0, 0), ("square", "red", 2, 2)), wanted, False, "colored blue")
    check(
        objects(("circle", "red", 0, 0), ("square", "green", 2, 2)),
        wanted,
        False,
        "found square colored green",
    )


def test_score_reads_images_and_scenes() -> None:
    scene = S.Scene(
        (S.SceneObject("circle", "red", "small", 1, 0), S.SceneObject("square", "blue", "large", 1, 2)), 64, 3
    )
    left = spec("position", S.spec_item("circle", position=("left of", 1)), S.spec_item("square"))
    for source in (scene, S.render(scene), np.asarray(S.render(scene))):
        result = J.score(source, left, WORLD)
        assert result.correct, result.reason
        assert [o.key for o in result.objects] == [o.key for o in J.scene_objects(scene)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"category": "counting_objects", "include": [{"shape": "circle"}]}, "unknown category"),
        ({"category": "colors", "include": [{"shape": "circle", "color": "pink"}]}, "unknown color 'pink'"),
        ({"category": "single_object", "include": [{"shape": "star"}]}, "unknown shape 'star'"),
        ("a photo of a circle", "must be a dict"),
    ],
)
def test_bad_specs_raise(bad: object, message: str) -> None:
    with pytest.raises(J.SpecError, match=message):
        J.score(objects(("circle", "red", 0, 0)), bad, WORLD)  # type: ignore[arg-type]


def test_unknown_world_names_and_degradations_raise() -> None:
    image = S.render(S.make_scene(WORLD, "val", 0))
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        J.read_scene(image, dataclasses.replace(WORLD, colors=["red", "pink"]))
    with pytest.raises(ValueError, match="unknown degradation 'sepia'"):
        J.degrade(image, "sepia", 0)


def test_degrade_is_mild_and_seeded() -> None:
    image = S.render(S.make_scene(WORLD, "val", 1))
    for kind in J.DEGRADATIONS:
        a, b = J.degrade(image, kind, 3), J.degrade(image, kind, 3)
        assert a.size == image.size and a.mode == "RGB"
        assert a.tobytes() == b.tobytes()
        diff = np.abs(np.asarray(a, dtype=float) - np.asarray(image, dtype=float))
        assert 0 < diff.mean() < 20


# ------------------------------------------------------------------------------------------ self-check


def test_self_check_reports_accuracy_per_kind() -> None:
    results = J.self_check(WORLD, 30, seed=3)
    assert list(results) == ["clean", *J.DEGRADATIONS]
    assert results["clean"]["scene_accuracy"] == 1.0 and results["clean"]["prompt_accuracy"] == 1.0
    assert results["clean"]["scenes"] == 30 and results["clean"]["prompts"] > 30
    assert all(r["scene_accuracy"] >= 0.9 for r in results.values())
    table = J.format_self_check(results)
    assert "clean" in table and "100.00%" in table


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    J.main(["--self-check", "4"])
    out = capsys.readouterr().out
    assert "scenes exact" in out and "mixed" in out
    path = tmp_path / "scene.png"
    S.render(S.Scene((S.SceneObject("triangle", "orange", "large", 2, 2),), 64, 3)).save(path)
    J.main(["--read", str(path)])
    assert "triangle orange large 2 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        J.main([])
