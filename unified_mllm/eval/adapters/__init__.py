"""Adapters that let the evaluation toolkits people already use drive an export through
:class:`~unified_mllm.infer.solver.InferenceSolver`:

* :mod:`unified_mllm.eval.adapters.lmms_eval` — an lmms-eval model (``--model unified_mllm``): ``generate_until``,
  ``loglikelihood`` and ``generate_until_multi_round`` (needs lmms-eval: ``scripts/install_lmms_eval.sh``);
* :mod:`unified_mllm.eval.adapters.vlmevalkit` — a VLMEvalKit model (``generate_inner`` over VLMEvalKit's
  messages, the LLaVA-style prompts of its multiple-choice and yes/no datasets); a subclass of vlmeval's
  ``BaseModel`` when VLMEvalKit is installed, usable on its own otherwise.

This package itself imports neither toolkit (nor torch): each adapter module imports its own toolkit, and nothing
else in unified_mllm imports the adapters. What they share is here: where images go in a toolkit's prompt, how a
stop string cuts an answer, and loading the solver from string arguments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from unified_mllm.layout import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from unified_mllm.infer.solver import InferenceSolver

LMMS_EVAL_MODEL = "unified_mllm"
"""The name lmms-eval knows the adapter by (``--model unified_mllm``)."""
LMMS_EVAL_CLASS = "unified_mllm.eval.adapters.lmms_eval.UnifiedMLLM"

# The image placeholders the toolkits' prompts use: LLaVA's <image> (lmms-eval's tasks), and ours.
TOOLKIT_PLACEHOLDER = re.compile(r"<image>|" + re.escape(IMAGE_PLACEHOLDER))
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DTYPES |= {"float16": "float16", "fp16": "float16", "half": "float16"}


def lmms_eval_models() -> list[Any]:
    """lmms-eval's entry point (group ``lmms_eval.models``): the manifest that names the adapter's class.

    Kept here, away from the adapter module, because lmms-eval loads entry points while ``lmms_eval.models`` is
    still being imported: this only builds the manifest, and the class is imported when a run asks for it.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path=LMMS_EVAL_CLASS)]


def place_images(text: str, count: int, *, implicit: bool = False) -> str:
    """``text`` with exactly ``count`` ``<|image|>`` placeholders where the images go.

    Placeholders already in the text (ours, or LLaVA's ``<image>`` that lmms-eval's prompts carry) are kept in
    place when there is one per image; otherwise they are dropped and the images go first, ``"<|image|>" *
    count + text``, as training wrote them. ``implicit`` (``model.prompt_style`` unitoken): without
    placeholders the text is returned as it is, for the solver to place the images UniToken's way.
    """
    found = TOOLKIT_PLACEHOLDER.findall(text)
    if len(found) == count:
        return TOOLKIT_PLACEHOLDER.sub(IMAGE_PLACEHOLDER, text)
    text = TOOLKIT_PLACEHOLDER.sub("", text).strip() if found else text
    return text if implicit else IMAGE_PLACEHOLDER * count + text


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (the answer ends at ``<end-of-turn>`` anyway;
    the toolkits' extra stop strings are applied to the decoded text, as their Hugging Face models do)."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def load_solver(pretrained: str, device: str = "cpu", dtype: str | None = None) -> InferenceSolver:
    """The solver of an export directory, on ``device``, the LM and SigLIP in ``dtype`` (float32, bfloat16,
    float16; None or "auto": as stored)."""
    import torch

    from unified_mllm.infer.solver import InferenceSolver

    torch_dtype = None
    if dtype not in (None, "", "auto"):
        name = DTYPES.get(str(dtype).lower())
        if name is None:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
        torch_dtype = getattr(torch, name)
    return InferenceSolver.from_pretrained(pretrained, device=device, dtype=torch_dtype)
