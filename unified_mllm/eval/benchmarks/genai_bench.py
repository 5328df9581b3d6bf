"""GenAI-Bench (Li, Lin et al. 2024): compositional prompts with skill tags, scored by VQAScore (CLIP-FlanT5).

    python -m unified_mllm.eval --task genai-bench --model EXPORT --data datasets/GenAI-Image-1600 --output OUT

**Prompts**: ``genai_image.json`` of GenAI-Bench (huggingface.co/datasets/BaiqiL/GenAI-Bench-1600, or
zhiqiulin/GenAI-Bench-527 for the VQAScore paper's 527), ``{"00000": {"prompt": ..., ...}, ...}``, and its
``genai_skills.json`` (``{skill: [prompt index, ...]}``) beside it for the per-skill table; ``--data`` is the
folder holding them (``GenAI-Image-1600/``, where t2v_metrics puts them) or ``genai_image.json`` itself.

**Layout** (what t2v_metrics' ``genai_bench/evaluate.py`` reads: ``<output_dir>/<gen_model>/<id>.jpeg``)::

    OUT/images/<id>.jpeg      one image per prompt id (``--gen_model images``), JPEG (quality 95)

The scorer scores exactly one image per prompt (its own generation script draws one), so
``images_per_prompt`` is 1.

**Scorer** (t2v_metrics, run from the root of its clone; the papers' VQAScore model is ``clip-flant5-xxl``, kept in the legacy release
``pip install t2v-metrics==3.0``; ``DATA_ROOT`` is the folder holding ``GenAI-Image-1600/``)::

    python -m genai_bench.evaluate --model clip-flant5-xxl --root_dir DATA_ROOT --num_prompts 1600 \\
        --output_dir OUT --gen_model images --result_dir OUT/genai_bench_results

It saves the scores as a tensor (one row per prompt, in id order) to
``OUT/genai_bench_results/images/clip-flant5-xxl_1600_prompts.pt`` and prints them per skill.

**Summary** of that file (``--scores FILE``, or the newest ``*_prompts.pt`` there; a JSON list of scores or
``{id: score}`` is read too), as ``show_performance_per_skill`` computes it: the mean VQAScore per skill tag
of ``genai_skills.json`` (attribute, scene, spatial/action/part relation, counting, comparison,
differentiation, negation, universal, and the groups ``basic`` and ``advanced``), and ``overall`` over all
tagged prompts ("all"). The UniTok and DualToken papers' GenAI-Bench "Overall" is the ``advanced`` prompts'
mean, the headline here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_mllm import io
from unified_mllm.eval.generation_bench import (
    GenerationTask,
    GenPrompt,
    ImageFile,
    mean,
    signature_problem,
    stale_temporary_problems,
)
from unified_mllm.eval.tasks import markdown_table, register_task

PROMPTS_FILE = "genai_image.json"
SKILLS_FILE = "genai_skills.json"
RESULTS_DIR = "genai_bench_results"
# show_performance_per_skill's tag groups, in its order.
SKILLS = (
    "attribute",
    "scene",
    "spatial relation",
    "action relation",
    "part relation",
    "basic",
    "counting",
    "comparison",
    "differentiation",
    "negation",
    "universal",
    "advanced",
)
IMAGE = re.compile(r"(\d+)\.jpeg")


def _prompts_file(data: Path) -> Path:
    if data.is_file():
        return data
    for folder in (data, *sorted(data.glob("GenAI-Image-*"))):
        if (folder / PROMPTS_FILE).is_file():
            return folder / PROMPTS_FILE
    raise FileNotFoundError(f"genai-bench: no {PROMPTS_FILE} in {data} ({GenAIBench.files})")


def read_score_values(path: Path) -> list[float] | dict[str, float]:
    """The scorer's scores: a ``.pt`` tensor (one row per prompt; rows are averaged like the scorer's
    ``scores.mean(axis=1)``), or JSON: a list of numbers, or ``{id: number}``."""
    if path.suffix == ".pt":
        import torch

        scores = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2):
            raise ValueError(f"{path}: expected the scorer's tensor of shape [prompts, images]")
        return (scores.float().mean(dim=1) if scores.dim() == 2 else scores.float()).tolist()
    data = io.read_json(path)
    if isinstance(data, list) and all(isinstance(v, (int, float)) for v in data):
        return [float(v) for v in data]
    if isinstance(data, dict) and all(isinstance(v, (int, float)) for v in data.values()):
        return {str(k): float(v) for k, v in data.items()}
    raise ValueError(f"{path}: expected the scorer's .pt tensor, a JSON list of scores or {{id: score}}")


@register_task
class GenAIBench(GenerationTask):
    """GenAI-Bench (see the module docstring)."""

    name = "genai-bench"
    description = "GenAI-Bench: <id>.jpeg images for t2v_metrics' VQAScore; summary per skill of its scores"
    files = (
        "genai_image.json + genai_skills.json of huggingface.co/datasets/BaiqiL/GenAI-Bench-1600 (in a "
        "GenAI-Image-1600/ folder)"
    )
    default_images_per_prompt = 1
    max_images_per_prompt = 1
    image_format = "JPEG"
    headline = "advanced"
    reported = "UniTok 0.67 (overall)"
    scorer = "t2v_metrics' genai_bench/evaluate.py (VQAScore, clip-flant5-xxl)"

    def load_prompts(self, data: Path) -> list[GenPrompt]:
        path = _prompts_file(data)
        records = io.read_json(path)
        if not isinstance(records, dict):
            raise ValueError(f"{path}: expected GenAI-Bench's {{id: {{'prompt': ...}}}}")
        prompts = []
        for key, record in records.items():
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}: entry {key!r} has no string 'prompt'")
            if not key.isdigit():
                raise ValueError(f"{path}: entry {key!r}: GenAI-Bench ids are numbers ('00000')")
            skills = {k: record[k] for k in ("basic_skills", "advanced_skills") if k in record}
            prompts.append(GenPrompt(key, record["prompt"], "", skills))
        return prompts

    def image_files(self, prompts: Sequence[GenPrompt], images_per_prompt: int) -> list[ImageFile]:
        return [ImageFile(i, f"{p.id}.jpeg") for i, p in enumerate(prompts)]

    def check_layout(
        self,
        images_dir: Path,
        prompts: Sequence[GenPrompt] | None = None,
        images_per_prompt: int | None = None,
        *,
        partial: bool = False,
    ) -> list[str]:
        problems = stale_temporary_problems(images_dir, images_dir)
        stale = set(io.stale_temporaries(images_dir))
        ids = {p.id for p in prompts} if prompts is not None else None
        found = set()
        for entry in sorted(images_dir.iterdir()):
            if entry in stale:
                continue
            if not entry.is_file() or not IMAGE.fullmatch(entry.name):
                problems.append(f"{entry.name}: not an <id>.jpeg image (the scorer reads <id>.jpeg only)")
                continue
            if ids is not None and entry.stem not in ids:
                problems.append(f"{entry.name}: no prompt {entry.stem} in {PROMPTS_FILE}")
                continue
            found.add(entry.stem)
            if problem := signature_problem(entry, "JPEG"):
                problems.append(problem)
        if not found:
            problems.append(f"{images_dir} holds no <id>.jpeg image")
        if ids is not None and not partial:
            absent = sorted(ids - found)
            if absent:
                more = " ..." if len(absent) > 5 else ""
                problems.append(
                    f"{len(absent)} prompt(s) without an image: {', '.join(a + '.jpeg' for a in absent[:5])}{more} "
                    "(the scorer stops at the first)"
                )
        return problems

    def default_scores(self, output_dir: Path) -> Path | None:
        found = sorted(
            (output_dir / RESULTS_DIR / "images").glob("*_prompts.pt"), key=lambda p: p.stat().st_mtime
        )
        return found[-1] if found else None

    def skills(self) -> dict[str, list[int]] | None:
        """genai_skills.json beside the prompts file ({skill: [prompt index]}), or None."""
        if self.data is None:
            return None
        path = _prompts_file(self.data).with_name(SKILLS_FILE)
        data = io.read_json(path) if path.is_file() else None
        if data is None:
            return None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: expected GenAI-Bench's {{skill: [prompt index, ...]}}")
        return {str(k): [int(i) for i in v] for k, v in data.items()}

    def read_scores(self, path: Path, prompts: Sequence[GenPrompt]) -> dict[str, Any]:
        return genai_summary(read_score_values(path), [p.id for p in prompts], self.skills())

    def scorer_commands(self, output_dir: Path) -> list[str]:
        out = output_dir.resolve()
        # The scorer finds the prompts in <root_dir>/GenAI-Image-<num_prompts>/ (and downloads them when absent).
        folder = _prompts_file(self.data).parent.resolve() if self.data else None
        match = re.fullmatch(r"GenAI-Image-(\d+)", folder.name) if folder else None
        root = str(folder.parent) if match and folder else "DATA_ROOT"
        count = match.group(1) if match else "1600"
        return [
            "# t2v_metrics' legacy release for the papers' VQAScore model: pip install t2v-metrics==3.0, in a clone of",
            f"# github.com/linzhiqiu/t2v_metrics; {root} holds GenAI-Image-{count}/ (genai_image.json, genai_skills.json)",
            f'python -m genai_bench.evaluate --model clip-flant5-xxl --root_dir "{root}" --num_prompts {count} '
            f'--output_dir "{out}" --gen_model images --result_dir "{out}/{RESULTS_DIR}"',
        ]

    def format_scores(self, scores: dict[str, Any]) -> str:
        rows = [(skill, f"{v['score']:.4f}", v["prompts"]) for skill, v in scores["per_skill"].items()]
        rows.append(("**overall** (all prompts)", f"**{scores['overall']:.4f}**", scores["prompts"]))
        return markdown_table(("skill", "VQAScore", "prompts"), rows)


def genai_summary(
    values: list[float] | dict[str, float], ids: Sequence[str], skills: dict[str, list[int]] | None
) -> dict[str, Any]:
    """Mean score per skill (``per_skill``: GenAI-Bench's tags in its order, then any other), ``advanced`` and
    ``basic`` (those groups' means, when tagged), ``overall`` (every tagged prompt: the scorer's "all"; every
    scored prompt without a skills file). A list of scores is indexed by prompt number (the scorer's order)."""
    by_number = (
        {int(k): v for k, v in values.items()} if isinstance(values, dict) else dict(enumerate(values))
    )
    if isinstance(values, list) and len(values) != len(ids):
        raise ValueError(f"the scores hold {len(values)} prompts, the prompts file {len(ids)}")
    per_skill: dict[str, dict[str, Any]] = {}
    tagged: set[int] = set()
    if skills:
        for skill in [s for s in SKILLS if s in skills] + [s for s in skills if s not in SKILLS]:
            numbers = [i for i in skills[skill] if i in by_number]
            tagged.update(numbers)
            per_skill[skill] = {"score": mean([by_number[i] for i in numbers]), "prompts": len(numbers)}
    everyone = sorted(tagged) if tagged else sorted(by_number)
    return {
        "overall": mean([by_number[i] for i in everyone]),
        "advanced": per_skill.get("advanced", {}).get("score"),
        "basic": per_skill.get("basic", {}).get("score"),
        "prompts": len(everyone),
        "per_skill": per_skill,
    }
