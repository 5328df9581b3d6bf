"""Extra contrastive pairs from the world's records: single-object views and one-attribute hard negatives.

A whole-scene caption names 1-4 objects with size, colour, shape and cell. In a batch of such pairs the
colours and cells nearly always tell the right caption from the others, so the sigmoid loss barely needs the
shapes, and the towers do not learn them (the trained tiny SigLIP's zero-shot shape accuracy stays near
chance while colour is ~100 %). Two cheap remedies, both exact because a record carries its scene:

* an **object view** re-renders one object of the scene alone, at its own place and size, captioned by that
  object's phrase ("a large red circle in the top left");
* a **hard negative** is the scene's caption with one attribute of one object changed ("... a large red
  square ..."), a text that matches no image of the batch, so telling it from the right one needs exactly
  that attribute.

Records without the world's ``objects`` (your own captioned shards) pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from unified_mllm.config import WorldConfig
from unified_mllm.data.shapes import Scene, SceneObject, caption, render

# Attributes a hard negative may change, and where the world keeps each one's vocabulary.
ATTRIBUTES = {"shape": "shapes", "color": "colors", "size": "sizes"}


def scene_of(meta: dict[str, Any]) -> Scene | None:
    """The scene a world record describes, or None for a record without (valid) ``objects``."""
    if not isinstance(meta.get("objects"), list) or not meta["objects"]:
        return None
    try:
        return Scene.from_json(meta)
    except (KeyError, TypeError, ValueError):
        return None


def object_view(scene: Scene, rng: np.random.Generator) -> Scene:
    """One object of ``scene`` (drawn from ``rng``) alone where it stands: render it with :func:`scene_pair`."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return Scene((obj,), scene.image_size, scene.grid_size)


def scene_pair(scene: Scene) -> tuple[Image.Image, str]:
    """The image and caption of ``scene``, as the world writes them."""
    return render(scene), caption(scene)


def hard_negative(
    scene: Scene, world: WorldConfig, attributes: Sequence[str], rng: np.random.Generator
) -> str | None:
    """The caption of ``scene`` with one attribute (drawn from ``attributes``) of one object changed to
    another value of the world's vocabulary; None when the vocabulary has no other value."""
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"hard negatives: unknown attribute(s) {unknown}; choose from {sorted(ATTRIBUTES)}")
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    attribute = attributes[int(rng.integers(len(attributes)))]
    others = [v for v in getattr(world, ATTRIBUTES[attribute]) if v != getattr(obj, attribute)]
    if not others:
        return None
    changed: SceneObject = dataclasses.replace(obj, **{attribute: others[int(rng.integers(len(others)))]})
    objects = (*scene.objects[:index], changed, *scene.objects[index + 1 :])
    return caption(Scene(objects, scene.image_size, scene.grid_size))
