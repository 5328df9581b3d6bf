"""The lmms-eval adapter under lmms-eval's own evaluator: local tasks defined by YAML over a JSONL file with image
paths (made here), a random tiny export, metrics equal to the ones recomputed from the solver's own answers and
log-likelihoods; the requests through the adapter directly as lmms-eval's Instance objects; and the command
line ``python -m lmms_eval --model unified_mllm`` resolving the model through the package's entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Nothing may download: lmms-eval reads the local JSONL through datasets' packaged json builder.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip(
    "lmms_eval.evaluator",
    reason="lmms-eval is not installed: run scripts/install_lmms_eval.sh (keeps the installed torch)",
)

from lmms_eval.api.instance import Instance
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from tests.helpers import REPO, write_export
from unified_mllm.eval.adapters import lmms_eval_models, place_images
from unified_mllm.eval.adapters.lmms_eval import UnifiedMLLM
from unified_mllm.infer.solver import InferenceSolver

CHOICES = ["yes", "no", "large"]

TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    prediction = results[0].strip()
    return {"exact": float(prediction == doc["answer"]), "chars": float(len(prediction))}


def rounds_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                       previous_round_info=None):
    if round_idx is None:  # the first round's context
        return doc["question"]
    terminal = round_idx >= 2
    return [], "what is a circle?", terminal, list(previous_output), {"round": round_idx}


def rounds_process_results(doc, results):
    return {"rounds": float(len(results[0]))}
"""

GEN_TASK = """
task: um_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
  - metric: chars
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

MC_TASK = """
task: um_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: {choices}
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", sp_model)


@pytest.fixture(scope="module")
def model(export: Path) -> UnifiedMLLM:
    return UnifiedMLLM.create_from_arg_string(
        f"pretrained={export},device=cpu,batch_size=3", {"batch_size": 1}
    )


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, model: UnifiedMLLM) -> list[dict]:
    """Five questions (one without an image); the answers of rows 0 and 3 are the model's own greedy answers,
    so the exact-match mean is 2/5 whatever the random weights say; the choice of each row is the model's
    most likely choice on rows 1 and 4 only."""
    folder = tmp_path_factory.mktemp("data")
    questions = [
        "how many objects?",
        "what colour?",
        "what is a circle?",
        "is there a square?",
        "<image>same?",
    ]
    rows = []
    for i, question in enumerate(questions):
        path = ""
        if i != 2:
            path = str(folder / f"image{i}.png")
            picture(i).save(path)
        rows.append({"id": i, "question": question, "image": path})
    solver = model.solver
    for row in rows:
        images = [Image.open(row["image"]).convert("RGB")] if row["image"] else []
        prompt = place_images(row["question"], len(images))
        row["own"] = solver.generate(images, [[prompt, None]], max_gen_len=4).strip()
        lls = solver.loglikelihood([images] * len(CHOICES), [[[prompt, None]]] * len(CHOICES), CHOICES)
        # lmms-eval's multiple_choice picks the smallest loss: the mean negative log-likelihood per id
        losses = [-ll / len(solver.tokenizer.encode(c)) for (ll, _), c in zip(lls, CHOICES)]
        row["best"] = int(np.argmin(losses))
    for i, row in enumerate(rows):
        row["answer"] = row["own"] if i in (0, 3) else row["own"] + " not this"
        row["gold"] = row["best"] if i in (1, 4) else (row["best"] + 1) % len(CHOICES)
    return rows


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory, rows: list[dict]) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    (folder / "um_local_gen.yaml").write_text(GEN_TASK.format(data=data))
    (folder / "um_local_mc.yaml").write_text(MC_TASK.format(data=data, choices=json.dumps(CHOICES)))
    rounds = GEN_TASK.format(data=data).replace("um_local_gen", "um_local_rounds")
    rounds = rounds.replace("generate_until", "generate_until_multi_round")
    rounds = rounds.replace("utils.doc_to_text", "utils.rounds_doc_to_text")
    rounds = rounds.replace("utils.process_results", "utils.rounds_process_results")
    rounds = rounds.split("metric_list:")[0] + "metric_list:\n  - metric: rounds\n    aggregation: mean\n"
    (folder / "um_local_rounds.yaml").write_text(rounds + "metadata:\n  version: 0.0\n")
    return folder


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_lmms_evals_evaluator_scores_our_answers(export: Path, tasks: Path, rows: list[dict]) -> None:
    results = simple_evaluate(
        model="unified_mllm",
        model_args=f"pretrained={export},device=cpu,batch_size=2",
        tasks=["um_local_gen", "um_local_mc"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    assert results is not None
    gen, mc = results["results"]["um_local_gen"], results["results"]["um_local_mc"]
    assert [len(results["samples"][t]) for t in ("um_local_gen", "um_local_mc")] == [5, 5]
    assert gen["exact,none"] == pytest.approx(2 / 5)
    assert gen["chars,none"] == pytest.approx(np.mean([len(r["own"]) for r in rows]))
    assert mc["acc,none"] == pytest.approx(2 / 5)
    predictions = {s["doc"]["id"]: s["filtered_resps"][0] for s in results["samples"]["um_local_gen"]}
    assert [predictions[r["id"]].strip() for r in rows] == [r["own"] for r in rows]


def test_multi_round_requests_go_round_after_round(model: UnifiedMLLM, tasks: Path) -> None:
    results = simple_evaluate(
        model=model,
        tasks=["um_local_rounds"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    assert results is not None
    assert results["results"]["um_local_rounds"]["rounds,none"] == 2.0  # rounds 0 and 1; round 2 is terminal
    sample = results["samples"]["um_local_rounds"][2]
    assert sample["resps"][0][0][1] == model.solver.generate([], [["what is a circle?", None]], max_gen_len=4)


def instance(kind: str, arguments: tuple, doc_id: int = 0) -> Instance:
    return Instance(kind, arguments, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_the_adapter_answers_lmms_evals_instances(model: UnifiedMLLM) -> None:
    solver: InferenceSolver = model.solver
    docs = [{"image": picture(0)}, {"image": picture(1)}, {"image": None}]
    model.task_dict = {"t": {"test": docs}}

    def visual(doc: dict) -> list:
        return [doc["image"]] if doc["image"] is not None else []

    greedy = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "until": ["\n"]}
    sampled = {"max_new_tokens": 3, "temperature": 1.5, "top_k": 20, "do_sample": True}
    requests = [
        instance("generate_until", ("how many?", greedy, visual, 0, "t", "test"), 0),
        instance("generate_until", ("<image>\nwhat colour?", sampled, visual, 1, "t", "test"), 1),
        instance("generate_until", ("what is a circle?", greedy, visual, 2, "t", "test"), 2),
    ]
    answers = model.generate_until(requests)
    assert answers[0] == solver.generate([picture(0)], [["<|image|>how many?", None]], max_gen_len=3)
    assert answers[1] == solver.generate(
        [picture(1)], [["<|image|>\nwhat colour?", None]], max_gen_len=3, temperature=1.5, top_k=20, seed=0
    )
    assert answers[2] == solver.generate([], [["what is a circle?", None]], max_gen_len=3)
    # until cuts the decoded answer
    cut = model.generate_until(
        [
            instance(
                "generate_until", ("what is a circle?", {**greedy, "until": "a"}, visual, 2, "t", "test"), 2
            )
        ]
    )
    assert cut == [answers[2].split("a")[0]]

    scored = [
        r.text
        for r in model.loglikelihood(
            [
                instance("loglikelihood", ("how many?", " two", visual, 0, "t", "test"), 0),
                instance(
                    "loglikelihood", ("what is a circle?", lambda doc: "large", visual, 2, "t", "test"), 2
                ),
                # lmms-eval's unconditional requests (acc_mutual_info): a context and a choice only
                instance("loglikelihood", ("", "yes")),
            ]
        )
    ]
    expected = [
        solver.loglikelihood([picture(0)], [["<|image|>how many?", None]], "two"),
        solver.loglikelihood([], [["what is a circle?", None]], "large"),
        solver.loglikelihood([], [["", None]], "yes"),
    ]
    counts = [len(solver.tokenizer.encode(c)) for c in ("two", "large", "yes")]
    # lmms-eval's loss; the batch of three is padded, so equal to single calls up to float rounding
    assert [g for _, g in scored] == [g for _, g in expected]
    assert [v for v, _ in scored] == pytest.approx(
        [-lp / n for (lp, _), n in zip(expected, counts)], rel=1e-5
    )
    assert scored[1][1]  # "large" is the random export's greedy answer to that question
    model.score_kind = "logprob"
    (logprob,) = model.loglikelihood([instance("loglikelihood", ("what is a circle?", " large"))])
    assert logprob.text == expected[1]
    model.score_kind = "loss"

    def two_rounds(doc, previous_output=None, round_idx=None, previous_round_info=None):
        return [], f"round {round_idx}", round_idx >= 2, previous_output, None

    rounds = model.generate_until_multi_round(
        [instance("generate_until_multi_round", ("how many?", greedy, visual, two_rounds, 0, "t", "test"), 0)]
    )
    assert rounds == [[answers[0], solver.generate([], [["round 1", None]], max_gen_len=3)]]


def test_model_args_and_what_it_refuses(model: UnifiedMLLM, export: Path) -> None:
    assert model.batch_size == 3  # model_args win over lmms-eval's --batch_size
    assert place_images("<image>\nwhat?", 1) == "<|image|>\nwhat?"
    assert place_images("what?", 2) == "<|image|><|image|>what?"
    assert place_images("<image> a <image> b", 1) == "<|image|>a  b"
    assert place_images("what?", 1, implicit=True) == "what?"
    with pytest.raises(ValueError, match="unknown model_args"):
        UnifiedMLLM(pretrained=str(export), temprature=0)
    model.task_dict = {"t": {"test": [{}]}}
    video = instance("generate_until", ("q", {}, lambda doc: ["clip.mp4"], 0, "t", "test"))
    with pytest.raises(ValueError, match="images only"):
        model.generate_until([video])
    (manifest,) = lmms_eval_models()
    assert manifest.model_id == "unified_mllm"
    assert manifest.simple_class_path == f"{UnifiedMLLM.__module__}.{UnifiedMLLM.__name__}"


def test_the_command_line_finds_the_model_by_its_entry_point(
    export: Path, tasks: Path, tmp_path: Path
) -> None:
    # What pyproject's [project.entry-points."lmms_eval.models"] installs, laid out by hand on PYTHONPATH.
    site = tmp_path / "site"
    info = site / "unified_mllm_entry-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unified-mllm-entry\nVersion: 0.0\n")
    entry = "unified_mllm = unified_mllm.eval.adapters:lmms_eval_models\n"
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{entry}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1"}
    env["LMMS_EVAL_DATASETS_CACHE"] = str(tmp_path / "datasets")
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "unified_mllm",
        "--model_args", f"pretrained={export},device=cpu,batch_size=2", "--tasks", "um_local_gen",
        "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--limit", "3",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = list((tmp_path / "out").rglob("*results.json"))
    assert written, done.stdout[-2000:]
    results = json.loads(written[0].read_text())
    assert results["n-samples"]["um_local_gen"]["effective"] == 3
    assert "exact,none" in results["results"]["um_local_gen"]
