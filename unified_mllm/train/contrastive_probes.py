"""Linear probes of a contrastive SigLIP's image side on the world: what the frozen tower sees, text aside.

Zero-shot accuracy mixes two things, what the image tower encodes and whether the text tower names it; the
probes measure the first alone (:mod:`unified_mllm.probe`: one linear classifier per question, fitted on the
train split's scenes, scored on the evaluation split's). On two representations:

* ``pooled``: the tower's pooled, L2-normalised embedding (what zero-shot compares with the prompts);
* ``patches``: the per-patch features the unified model's projector reads (``last_hidden_state``, flattened
  in row-major patch order), so a probe there says what the LM can get.

Questions, from the records' ``objects``:

* ``shape`` / ``color``: the one object's shape / colour, on single-object scenes;
* ``presence``: "is there a <colour> <shape>" for every pair of the world's vocabularies, on all scenes
  (yes/no heads; F1 of "yes" beside accuracy, since most answers are "no");
* ``cells``: what each grid cell holds (empty, or which colour and shape), on all scenes: which object is
  where.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import SiglipModel

from unified_mllm.config import VisionConfig, WorldConfig
from unified_mllm.data.shards import Sample
from unified_mllm.probe import run_probe
from unified_mllm.progress import progress as progress_bar
from unified_mllm.vision.contrastive import image_pixels

# Representations probed; "patches" is skipped for questions whose fit would be slow on 2 cores.
REPRESENTATIONS = ("pooled", "patches")


def world_labels(
    objects: Sequence[dict[str, Any]], world: WorldConfig, grid_size: int
) -> dict[str, list[int]]:
    """The probe questions' answers for one scene's ``objects`` (records' dicts with shape/color/row/col).

    ``presence``: one 0/1 per (colour, shape) pair, colour-major; ``cells``: one class per grid cell in
    row-major order, 0 for empty and ``1 + colour_index * len(shapes) + shape_index`` otherwise; ``shape`` and
    ``color``: the object's index, only for a single-object scene.
    """
    colors, shapes = list(world.colors), list(world.shapes)
    present = {(o["color"], o["shape"]) for o in objects}
    cells = [0] * (grid_size * grid_size)
    for o in objects:
        cells[int(o["row"]) * grid_size + int(o["col"])] = (
            1 + colors.index(o["color"]) * len(shapes) + (shapes.index(o["shape"]))
        )
    labels = {"presence": [int((c, s) in present) for c in colors for s in shapes], "cells": cells}
    if len(objects) == 1:
        labels |= {"shape": [shapes.index(objects[0]["shape"])], "color": [colors.index(objects[0]["color"])]}
    return labels


def _usable(sample: Sample, world: WorldConfig) -> bool:
    """Whether a record's ``objects`` fit the world's vocabularies and grid (the probes' label space)."""
    objects = sample.meta.get("objects")
    return isinstance(objects, list) and all(
        isinstance(o, dict)
        and o.get("color") in world.colors
        and o.get("shape") in world.shapes
        and 0 <= int(o.get("row", -1)) < world.grid_size
        and 0 <= int(o.get("col", -1)) < world.grid_size
        for o in objects
    )


@torch.no_grad()
def image_features(
    model: SiglipModel,
    samples: Sequence[Sample],
    vision: VisionConfig,
    batch_size: int,
    what: str = "",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{"pooled": (N, D) L2-normalised, "patches": (N, P * D)}`` of the samples' images, fp32 on the CPU."""
    device = model.logit_scale.device
    pooled, patches = [], []
    starts = range(0, len(samples), batch_size)
    for start in progress_bar(
        starts, desc=f"probe features {what}".strip(), total=len(starts), disable=not progress
    ):
        images = [s.image for s in samples[start : start + batch_size]]
        out = model.vision_model(pixel_values=image_pixels(images, vision.image_size).to(device))
        pooled.append(torch.nn.functional.normalize(out.pooler_output, dim=-1).float().cpu())
        patches.append(out.last_hidden_state.flatten(1).float().cpu())
    return {"pooled": torch.cat(pooled), "patches": torch.cat(patches)}


def _table(samples: Sequence[Sample], world: WorldConfig) -> list[dict[str, list[int]]]:
    return [world_labels(s.meta["objects"], world, world.grid_size) for s in samples]


def probe_eval(
    model: SiglipModel,
    train_samples: Iterable[Sample],
    test_samples: Iterable[Sample],
    vision: VisionConfig,
    world: WorldConfig,
    *,
    batch_size: int = 64,
    l2: float = 1e-3,
    patch_questions: Sequence[str] = ("shape", "color", "presence"),
    progress: bool = True,
) -> dict[str, Any] | None:
    """Fit every probe on ``train_samples`` and score it on ``test_samples`` (records without the world's
    ``objects`` are skipped). Returns ``{representation: {question: scores}}`` (:func:`run_probe`) plus
    ``num_train_scenes`` / ``num_test_scenes``, or None when either side has no such record;
    ``patch_questions`` limits the (wide, slower) patch probes."""
    model.eval()
    train = [s for s in train_samples if _usable(s, world)]
    test = [s for s in test_samples if _usable(s, world)]
    if not train or not test:
        return None
    features = {
        "train": image_features(model, train, vision, batch_size, "train", progress),
        "test": image_features(model, test, vision, batch_size, "test", progress),
    }
    labels = {"train": _table(train, world), "test": _table(test, world)}
    classes = {
        "shape": len(world.shapes),
        "color": len(world.colors),
        "presence": 2,
        "cells": 1 + len(world.colors) * len(world.shapes),
    }
    result: dict[str, Any] = {"num_train_scenes": len(train), "num_test_scenes": len(test)}
    for representation in REPRESENTATIONS:
        scores: dict[str, Any] = {}
        for question, num_classes in classes.items():
            if representation == "patches" and question not in patch_questions:
                continue
            sides = []
            for side in ("train", "test"):
                rows = [i for i, row in enumerate(labels[side]) if question in row]
                sides.append(
                    (
                        features[side][representation][rows],
                        torch.tensor([labels[side][i][question] for i in rows]),
                    )
                )
            if min(len(side[1]) for side in sides) == 0:
                continue  # e.g. no single-object scene among the ones read
            positive = 1 if question == "presence" else None
            scores[question] = run_probe(sides[0], sides[1], num_classes, l2=l2, positive=positive)
        result[representation] = scores
    return result


def format_probes(result: dict[str, Any], split: str) -> str:
    """One line per representation for the console."""
    lines = []
    for representation in REPRESENTATIONS:
        scores = result.get(representation, {})
        parts = [f"{q} {100 * s['accuracy']:.1f}%" for q, s in scores.items() if q != "presence"]
        if "presence" in scores:
            presence = scores["presence"]
            parts.append(
                f"presence {100 * presence['accuracy']:.1f}% (F1 {100 * presence['f1']:.1f}%, "
                f"scenes all right {100 * presence['all_heads']:.1f}%)"
            )
        lines.append(
            f"linear probes on {split}, {representation} features (fit on {result['num_train_scenes']} "
            f"train scenes): " + ", ".join(parts)
        )
    return "\n".join(lines)
