"""A VLMEvalKit model over an export: ``UnifiedMLLM(model_path=EXPORT)`` answers VLMEvalKit's messages.

VLMEvalKit is installed from its git repository (it is not on PyPI). When ``vlmeval`` is importable the class
subclasses its ``vlmeval.vlm.base.BaseModel`` (so ``model.generate`` checks and normalises the messages the
toolkit's way) and asks ``vlmeval.dataset.DATASET_TYPE`` what kind a dataset is; without it the class works on
its own, with the same methods and a table of the common multiple-choice and yes/no dataset names.

Register it in VLMEvalKit's ``vlmeval/config.py``::

    from functools import partial
    from unified_mllm.eval.adapters.vlmevalkit import UnifiedMLLM
    supported_VLM["unified_mllm"] = partial(UnifiedMLLM, model_path="/path/to/export")

and run ``python run.py --data MMBench_DEV_EN MME POPE --model unified_mllm`` from the VLMEvalKit checkout; or,
without editing the checkout, let this module register it and run that ``run.py``::

    python -m unified_mllm.eval.adapters.vlmevalkit --export /path/to/export --run VLMEvalKit/run.py \\
        -- --data MMBench_DEV_EN MME POPE --model unified_mllm

**Messages** (``generate_inner(message, dataset)``): VLMEvalKit's list of ``{"type": "image" | "text", "value":
...}`` in order; an image (a file path, or encoded bytes / a PIL image) becomes ``<|image|>`` where it stands
and the texts are joined by newlines, so ``[image, text]`` is the training form ``"<|image|>" + question``.
One turn, greedy, at most ``max_new_tokens`` new ids (default: the export's ``generation.max_new_tokens``).

**Prompts** (``use_custom_prompt`` / ``build_prompt``): for multiple-choice (``MCQ``) and yes/no (``Y/N``)
datasets the prompt is LLaVA-1.5's, as :mod:`unified_mllm.eval.benchmark` builds it: the hint, the question,
one ``A. text`` line per option and "Answer with the option's letter from the given choices directly." (the
Chinese instruction for a Chinese question); a multiple-choice row without options and a yes/no question get
"Answer the question using a single word or phrase.". Other datasets keep VLMEvalKit's own prompts; scoring
is always VLMEvalKit's (its exact matching, and its LLM judge where the dataset uses one).
"""

from __future__ import annotations

import argparse
import re
import runpy
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from unified_mllm.eval.adapters import load_solver
from unified_mllm.eval.benchmark import (
    MC_INSTRUCTION,
    MC_INSTRUCTION_CN,
    SHORT_ANSWER,
    choice_prompt,
    decode_base64_image,
    is_missing,
    options_of,
)
from unified_mllm.layout import IMAGE_PLACEHOLDER

try:  # VLMEvalKit installed (from git): its base class and its dataset types
    from vlmeval.dataset import DATASET_TYPE as _vlmeval_dataset_type
    from vlmeval.vlm.base import BaseModel as _VLMEvalBase

    HAVE_VLMEVAL = True
except ImportError:
    _vlmeval_dataset_type = None
    HAVE_VLMEVAL = False

    class _VLMEvalBase:  # type: ignore[no-redef]
        """The part of VLMEvalKit's ``BaseModel`` its inference calls, for use without VLMEvalKit."""

        INTERLEAVE = False
        allowed_types: ClassVar[list[str]] = ["text", "image", "video"]

        def __init__(self) -> None:
            self.dump_image_func: Callable[[Any], list[str]] | None = None

        def set_dump_image(self, dump_image_func: Callable[[Any], list[str]]) -> None:
            self.dump_image_func = dump_image_func

        def dump_image(self, line: Any, dataset: str | None) -> list[str]:
            assert self.dump_image_func is not None
            return self.dump_image_func(line)

        def generate(self, message: Any, dataset: str | None = None) -> str:
            """A string, one ``{"type", "value"}`` dict or a list of them (VLMEvalKit's accepted forms)."""
            if isinstance(message, str):
                message = [{"type": "text", "value": message}]
            elif isinstance(message, Mapping):
                message = [dict(message)]
            return self.generate_inner(list(message), dataset)  # type: ignore[attr-defined]


MODEL_NAME = "unified_mllm"
CHINESE = re.compile("[\u4e00-\u9fff]")
# Without VLMEvalKit: the dataset kinds of the common names (VLMEvalKit's DATASET_TYPE answers when installed).
MCQ_PREFIXES = (
    "MMBench", "SEEDBench", "ScienceQA", "MMT-Bench", "AI2D", "MMStar", "RealWorldQA", "BLINK", "CCBench",
    "MMMU", "A-OKVQA", "Q-Bench", "A-Bench", "MME-RealWorld",
)  # fmt: skip
YORN_NAMES = ("MME", "HallusionBench", "POPE", "AMBER", "VSR-zeroshot")


def dataset_type(dataset: str | None) -> str:
    """``"MCQ"``, ``"Y/N"`` or another VLMEvalKit type of a dataset name (``""``: unknown / none)."""
    if not dataset:
        return ""
    if _vlmeval_dataset_type is not None:
        return str(_vlmeval_dataset_type(dataset))
    if dataset in YORN_NAMES:
        return "Y/N"
    return "MCQ" if dataset.startswith(MCQ_PREFIXES) else ""


class UnifiedMLLM(_VLMEvalBase):
    """VLMEvalKit's model of an export (see the module docstring)."""

    INSTALL_REQ = False
    INTERLEAVE = True  # images may stand anywhere among the texts
    allowed_types: ClassVar[list[str]] = ["text", "image"]

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str | None = None,
        max_new_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"unknown arguments {sorted(kwargs)} for {MODEL_NAME}: model_path, device, dtype, max_new_tokens"
            )
        self.solver = load_solver(model_path, device, dtype)
        self.max_new_tokens = int(max_new_tokens or self.solver.config.generation.max_new_tokens)
        # UniToken's converted checkpoints place images without placeholders themselves (model.prompt_style).
        self.implicit = self.solver.config.model.prompt_style == "unitoken"

    # ------------------------------------------------------------------------------------- prompts

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return dataset_type(dataset) in ("MCQ", "Y/N")

    def build_prompt(self, line: Mapping[str, Any], dataset: str | None = None) -> list[dict[str, Any]]:
        """The message of a dataset row (VLMEvalKit's TSV columns: question, hint, A, B, ..., image /
        image_path): its images, then the LLaVA-style prompt (module docstring)."""
        if not self.use_custom_prompt(dataset):
            raise ValueError(
                f"{MODEL_NAME} builds prompts for multiple-choice and yes/no datasets, not {dataset}"
            )
        question = str(line["question"]).strip()
        if dataset_type(dataset) == "MCQ":
            hint = "" if "hint" not in line or is_missing(line["hint"]) else str(line["hint"])
            options = options_of(line)
            chinese = bool(CHINESE.search(question + hint))
            instruction = (MC_INSTRUCTION_CN if chinese else MC_INSTRUCTION) if options else SHORT_ANSWER
            prompt = choice_prompt(question, options, hint=hint, instruction=instruction)
        else:
            prompt = question if question.endswith(SHORT_ANSWER) else f"{question}\n{SHORT_ANSWER}"
        images = [{"type": "image", "value": v} for v in self._row_images(line, dataset)]
        return [*images, {"type": "text", "value": prompt}]

    def _row_images(self, line: Mapping[str, Any], dataset: str | None) -> list[Any]:
        """The row's images: VLMEvalKit's dump (files it writes from the TSV) when it set one up, else the
        ``image_path`` column (a path or a list of them), else the base64 ``image`` column decoded."""
        if getattr(self, "dump_image_func", None) is not None:
            paths = self.dump_image(line, dataset)
            return list(paths) if isinstance(paths, list | tuple) else [paths]
        if "image_path" in line and not is_missing(line["image_path"]):
            paths = line["image_path"]
            return list(paths) if isinstance(paths, list | tuple) else [paths]
        if "image" in line and not is_missing(line["image"]):
            return [decode_base64_image(str(line["image"]), f"row {line.get('index', '?')}")]
        return []

    # ---------------------------------------------------------------------------------- generation

    def generate_inner(self, message: Sequence[Mapping[str, Any]], dataset: str | None = None) -> str:
        """The answer to VLMEvalKit's message (module docstring)."""
        prompt, images = message_prompt(message, implicit=self.implicit)
        answer = self.solver.generate(images, [[prompt, None]], max_gen_len=self.max_new_tokens)
        return str(answer).strip()


def message_prompt(message: Sequence[Mapping[str, Any]], *, implicit: bool = False) -> tuple[str, list[Any]]:
    """``(prompt, images)`` of a VLMEvalKit message: ``<|image|>`` where each image stands, texts joined by
    newlines. ``implicit`` (UniToken's prompt style): no placeholders, the solver places the images."""
    parts: list[str] = []
    images: list[Any] = []
    last_text = False
    for item in message:
        kind, value = item.get("type"), item.get("value")
        if kind == "image":
            images.append(value)
            parts.append("" if implicit else IMAGE_PLACEHOLDER)
            last_text = False
        elif kind == "text":
            parts.append(("\n" if last_text else "") + str(value))
            last_text = True
        else:
            raise ValueError(f"{MODEL_NAME} reads text and images; the message has a {kind!r} item")
    return "".join(parts), images


def main(argv: Sequence[str] | None = None) -> None:
    """Register the model under ``--name`` in VLMEvalKit's ``supported_VLM`` and run its ``run.py`` with the
    arguments after ``--``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True, help="the export directory")
    parser.add_argument("--run", required=True, type=Path, help="VLMEvalKit's run.py (in its checkout)")
    parser.add_argument("--name", default=MODEL_NAME, help="the model name run.py's --model takes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    args, rest = parser.parse_known_args(argv)
    if not HAVE_VLMEVAL:
        parser.error(
            "vlmeval is not importable: install VLMEvalKit from its git repository (pip install -e .)"
        )
    from vlmeval.config import supported_VLM

    supported_VLM[args.name] = partial(
        UnifiedMLLM, model_path=args.export, device=args.device, dtype=args.dtype
    )
    sys.argv = [str(args.run), *[a for a in rest if a != "--"]]
    runpy.run_path(str(args.run), run_name="__main__")


if __name__ == "__main__":
    main()
