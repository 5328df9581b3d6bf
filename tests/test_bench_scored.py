"""OCRBench, HallusionBench, MathVista and MME: their official file formats read, their own scoring rules on
real-looking answers, every metric against hand-computed values, and the driver end to end on a tiny
export."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers import write_export
from unified_mllm.config import Config
from unified_mllm.eval.__main__ import evaluate
from unified_mllm.eval.benchmark import TsvImages, UnderstandingTask
from unified_mllm.eval.benchmarks.hallusionbench import hallusion_scores, read_yes_no, strip_punctuation
from unified_mllm.eval.benchmarks.mathvista import (
    build_query,
    extract_answer,
    mathvista_correct,
    mathvista_scores,
    normalize_extracted,
)
from unified_mllm.eval.benchmarks.mme import mme_prompt, mme_scores, mme_yes_no
from unified_mllm.eval.benchmarks.ocrbench import HME, ocrbench_match, ocrbench_scores
from unified_mllm.eval.tasks import get_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

# ------------------------------------------------------------------------------------------------ helpers


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(colour: tuple[int, int, int]) -> str:
    return base64.b64encode(png(colour)).decode()


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


class FakeSolver:
    """Answers each prompt (its text after the image placeholder) from a table; records the image counts."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.config = Config()
        self.answers = answers
        self.image_counts: list[int] = []

    def generate(
        self, images: list, qas: list, max_gen_len: int = 16, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        out = []
        for row, ((prompt, answer),) in zip(images, qas, strict=True):
            assert answer is None and prompt.count(IMAGE_PLACEHOLDER) == len(row)
            self.image_counts.append(len(row))
            out.append(self.answers.get(prompt.replace(IMAGE_PLACEHOLDER, ""), ""))
        return out

    def generate_img(self, prompts: list[str], **kwargs: Any) -> list[Image.Image]:
        raise AssertionError("understanding benchmarks draw nothing")


def run_fake(name: str, data: Path, answers: dict[str, str], out: Path) -> dict[str, Any]:
    task = get_task(name, data=data)
    assert isinstance(task, UnderstandingTask)
    return task.run(FakeSolver(answers), Config(), limit=None, batch_size=3, output_dir=out, progress=False)


# ------------------------------------------------------------------------------------------------ OCRBench

OCR_ROWS = [  # (type, answers, question, prediction, right?)
    ("Regular Text Recognition", ["CENTRE"], "what is written in the image?", "The word is Centre.", True),
    ("Irregular Text Recognition", ["coffee"], "what is the irregular word?", "cof fee", False),
    ("Digit String Recognition", ["2019", "twenty nineteen"], "which year?", "In twenty nineteen", True),
    ("Scene Text-centric VQA", ["stop"], "what does the sign say?", "STOP", True),
    ("Doc-oriented VQA", ["line one\nline two"], "what is the address?", "Line one line two, Paris", True),
    ("Key Information Extraction", ["$12.50"], "what is the total?", "12.50", False),
    (HME, ["x ^ { 2 } + 1"], "write the expression in LaTeX", "The answer: x^{2}+1", True),
    (HME, ["X^2"], "write the second expression in LaTeX", "x^2", False),
]


def test_ocrbench_matching_per_type() -> None:
    for kind, answers, _, prediction, right in OCR_ROWS:
        assert ocrbench_match(prediction, answers, kind) is right, (kind, prediction)
    # Handwritten math keeps case; the others do not. Newlines in the prediction count as spaces.
    assert not ocrbench_match("x^2", ["X^2"], HME)
    assert ocrbench_match("X^2", ["x^2"], "Regular Text Recognition")
    assert ocrbench_match("line one\nline two", ["line one line two"], "Doc-oriented VQA")


def test_ocrbench_buckets_and_score_of_1000() -> None:
    types = [r[0] for r in OCR_ROWS]
    metrics = ocrbench_scores(types, [r[1] for r in OCR_ROWS], [r[3] for r in OCR_ROWS])
    # Right: regular, digit (Text Recognition 2), scene 1, doc 1, KIE 0, HME 1 -> 5.
    assert metrics["Text Recognition"] == 2
    assert (metrics["Scene Text-centric VQA"], metrics["Doc-oriented VQA"]) == (1, 1)
    assert (metrics["Key Information Extraction"], metrics[HME]) == (0, 1)
    assert metrics["final_score"] == 5 and metrics["final_score_norm"] == 0.5
    assert metrics["accuracy"] == 5 / 8
    assert metrics["per_type"][HME] == {"right": 1, "total": 2, "accuracy": 0.5}
    assert metrics["per_type"]["Irregular Text Recognition"]["right"] == 0


def write_ocrbench(root: Path) -> Path:
    rows = []
    for n, (kind, answers, question, _, _) in enumerate(OCR_ROWS):
        relative = f"set{n % 2}/{n}.png"
        (root / "OCRBench_Images" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "OCRBench_Images" / relative).write_bytes(png((n * 30, 0, 0)))
        answer: Any = answers if n % 3 else answers[0]  # the release mixes lists and strings
        rows.append(
            # ids repeat across the release's source datasets, as here
            {"dataset_name": "HME100k" if kind == HME else "IIIT5K", "id": n % 4, "image_path": relative}
            | {"question": question, "answers": answer, "type": kind}
        )
    (root / "OCRBench.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


def test_ocrbench_json_and_tsv_through_run(tmp_path: Path) -> None:
    answers = {r[2]: r[3] for r in OCR_ROWS}
    folder = write_ocrbench(tmp_path / "OCRBench")
    result = run_fake("ocrbench", folder, answers, tmp_path / "out-json")
    assert result["samples"] == 8 and result["errors"] == 0
    assert result["metrics"]["final_score"] == 5 and result["headline"]["value"] == 5
    # The GitHub layout: the json in json_files/, the images beside that folder.
    (folder / "json_files").mkdir()
    (folder / "OCRBench.json").rename(folder / "json_files" / "OCRBench.json")
    result = run_fake("ocrbench", folder, answers, tmp_path / "out-github")
    assert (result["errors"], result["metrics"]["final_score"]) == (0, 5)
    tsv = write_tsv(
        tmp_path / "OCRBench.tsv",
        [
            {"index": n, "image": b64((n, n, n)), "question": q, "answer": str(a), "category": k}
            for n, (k, a, q, _, _) in enumerate(OCR_ROWS)
        ],
    )
    result = run_fake("ocrbench", tsv, answers, tmp_path / "out-tsv")
    assert result["metrics"]["final_score"] == 5 and result["metrics"]["Text Recognition"] == 2
    assert "Text Recognition" in Path(result["files"]["markdown"]).read_text()


# ------------------------------------------------------------------------------------------ HallusionBench

# (category, subcategory, set, figure, question, visual_input, gt, prediction): two VD figures asked the same
# two questions; a VS question asked without its figure (figure 0) and with it.
HB_ROWS = [
    ("VD", "illusion", "0", "0", "0", "1", "1", "Yes."),  # right
    ("VD", "illusion", "0", "0", "1", "1", "0", "No"),  # right
    ("VD", "illusion", "0", "1", "0", "1", "0", "Yes, they are the same length."),  # wrong
    ("VD", "illusion", "0", "1", "1", "1", "0", "no"),  # right
    ("VS", "chart", "0", "0", "0", "0", "1", "I cannot tell without the chart."),  # unknown: wrong
    ("VS", "chart", "0", "1", "0", "1", "0", "No, it does not."),  # right
]


def hb_metas() -> list[dict[str, str]]:
    keys = ("category", "subcategory", "set_id", "figure_id", "question_id")
    return [dict(zip(keys, row[:5], strict=True)) for row in HB_ROWS]


def test_hallusionbench_yes_no_reading() -> None:
    assert [read_yes_no(p) for p in ("Yes.", "No, it is not.", "yes or no?", "Nope", "(yes)")] == [
        "yes",
        "no",
        "unknown",
        "unknown",
        "yes",
    ]
    assert read_yes_no("yes-it is") == "yes"  # an unspaced hyphen becomes a space
    assert read_yes_no("No. Yes, a little.") == "unknown"
    assert strip_punctuation("3.5 and 1,000 points.") == "3.5 and 1000 points"


def test_hallusionbench_accuracies_by_hand() -> None:
    answers = ["yes" if r[6] == "1" else "no" for r in HB_ROWS]
    m = hallusion_scores(hb_metas(), answers, [r[7] for r in HB_ROWS])
    assert m["aAcc"] == 4 / 6
    # Figures: VD f0 all right, VD f1 not, VS f1 right (VS f0, asked without its figure, is left out) -> 2/3.
    assert m["fAcc"] == 2 / 3 and m["figures"] == 3
    # Questions: VD q0 (right on f0, wrong on f1) no, VD q1 yes, VS q0 (wrong without, right with) no -> 1/3.
    assert m["qAcc"] == 1 / 3 and m["question_pairs"] == 3
    assert m["overall"] == pytest.approx(5 / 9)
    assert m["unknown_answers"] == 1
    vd, vs = m["per_category"]["VD"], m["per_category"]["VS"]
    assert (vd["aAcc"], vd["fAcc"], vd["qAcc"]) == (3 / 4, 1 / 2, 1 / 2)
    assert (vs["aAcc"], vs["fAcc"], vs["qAcc"]) == (1 / 2, 1.0, 0.0)
    assert set(m["per_subcategory"]) == {"VD/illusion", "VS/chart"}


def hb_question(row: tuple[str, ...]) -> str:
    return f"Is claim {row[1]} {row[2]} {row[4]} true for figure {row[3]}?"


def write_hallusionbench(root: Path) -> Path:
    rows = []
    for row in HB_ROWS:
        category, sub, set_id, figure, question, visual, gt, _ = row
        filename = None if visual == "0" else f"./hallusion_bench/{category}/{sub}/{set_id}_{figure}.png"
        if filename:
            (root / filename).parent.mkdir(parents=True, exist_ok=True)
            (root / filename).write_bytes(png((int(figure) * 90, 10, 10)))
        rows.append(
            {"category": category, "subcategory": sub, "visual_input": visual, "set_id": set_id}
            | {"figure_id": figure, "sample_note": "", "question_id": question, "question": hb_question(row)}
            | {"gt_answer_details": "", "gt_answer": gt, "filename": filename}
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "HallusionBench.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


def test_hallusionbench_json_and_tsv_through_run(tmp_path: Path) -> None:
    answers = {hb_question(r): r[7] for r in HB_ROWS}
    folder = write_hallusionbench(tmp_path / "HallusionBench")
    task = get_task("hallusionbench", data=folder)
    solver = FakeSolver(answers)
    result = task.run(solver, Config(), limit=None, batch_size=4, output_dir=tmp_path / "o1", progress=False)
    assert solver.image_counts == [1, 1, 1, 1, 0, 1]  # the VS question without its figure is asked as text
    assert (result["metrics"]["aAcc"], result["metrics"]["fAcc"]) == (4 / 6, 2 / 3)
    assert result["headline"] == {"metric": "aAcc", "value": 4 / 6, "scale": "percent"}
    assert "66.67%" in Path(result["files"]["markdown"]).read_text()
    # VLMEvalKit's TSV: ids carry set/figure/question, Yes/No answers, repeated images by reference.
    tsv_rows: list[dict[str, Any]] = []
    for row in HB_ROWS:
        index = f"{row[0]}_{row[1]}_{row[5]}_{row[2]}_{row[3]}_{row[4]}"
        image = "" if row[5] == "0" else b64((int(row[3]), 0, 0)) if row[4] == "0" else tsv_rows[-1]["index"]
        tsv_rows.append(
            {"index": index, "image": image, "question": hb_question(row)}
            | {"answer": "Yes" if row[6] == "1" else "No", "category": row[0], "l2-category": row[1]}
        )
    result = run_fake(
        "hallusionbench", write_tsv(tmp_path / "HallusionBench.tsv", tsv_rows), answers, tmp_path / "o2"
    )
    assert (result["metrics"]["aAcc"], result["metrics"]["fAcc"], result["metrics"]["qAcc"]) == (
        4 / 6,
        2 / 3,
        1 / 3,
    )


# ------------------------------------------------------------------------------------------------------- MME

# subtask -> image -> [(question, truth, prediction)]
MME_DATA = {
    "existence": {
        "a": [("Is there a dog in this image?", "Yes", "Yes"), ("Is there a cat in this image?", "No", "No")],
        "b": [("Is there a car in this image?", "Yes", "no"), ("Is there a bus in this image?", "No", "No.")],
    },
    "count": {
        "c": [
            ("Are there two apples in the image?", "Yes", "yes, there are two"),
            ("Are there five apples in the image?", "No", "There is none"),  # "ther": other, wrong
        ]
    },
    "code_reasoning": {
        "d": [("Is the output of the code 3?", "Yes", "Yes"), ("Is the output of the code 4?", "No", "no")],
    },
}
MME_ANSWERS = {
    f"{q}\nAnswer the question using a single word or phrase.": p
    for images in MME_DATA.values()
    for qas in images.values()
    for q, _, p in qas
}


def test_mme_reading_and_prompt() -> None:
    assert [mme_yes_no(p) for p in ("Yes", "No.", "yes, two", "Not at all", "The answer is yes", "none")] == [
        "yes",
        "no",
        "yes",
        "no",
        "other",
        "no",  # calculation.py reads the first four characters only
    ]
    assert mme_prompt("Is there a dog?  Please answer yes or no.") == (
        f"{IMAGE_PLACEHOLDER}Is there a dog?\nAnswer the question using a single word or phrase."
    )


def test_mme_acc_plus_and_sums_by_hand() -> None:
    rows = [
        (s, f"{s}/{i}", t, p)
        for s, images in MME_DATA.items()
        for i, qas in images.items()
        for _, t, p in qas
    ]
    m = mme_scores(*(list(column) for column in zip(*rows, strict=True)))
    existence = m["per_subtask"]["existence"]
    # existence: 3 of 4 right; image a both right, b not -> acc+ 1/2; score 75 + 50.
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (0.75, 0.5, 125.0)
    assert m["per_subtask"]["count"]["score"] == 50.0  # acc 1/2, acc+ 0
    assert m["per_subtask"]["code_reasoning"]["score"] == 200.0
    assert (m["perception"], m["cognition"]) == (175.0, 200.0)
    assert m["accuracy"] == 6 / 8 and m["other_answers"] == 1
    assert list(m["per_subtask"]) == ["existence", "count", "code_reasoning"]  # MME's order


def write_mme_folder(root: Path) -> Path:
    """The release's two layouts: images/ + questions_answers_YN/ (count) and side by side (the others), one
    level down as some copies unpack."""
    base = root / "MME_Benchmark_release_version" / "MME_Benchmark"
    for subtask, images in MME_DATA.items():
        for n, (image, qas) in enumerate(images.items()):
            lines = "".join(f"{q} Please answer yes or no.\t{t}\n" for q, t, _ in qas)
            if subtask == "count":
                (base / subtask / "images").mkdir(parents=True, exist_ok=True)
                (base / subtask / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
                (base / subtask / "images" / f"{image}.jpg").write_bytes(png((n, 50, 50)))
                (base / subtask / "questions_answers_YN" / f"{image}.txt").write_text(lines)
            else:
                (base / subtask).mkdir(parents=True, exist_ok=True)
                (base / subtask / f"{image}.png").write_bytes(png((n, 90, 0)))
                (base / subtask / f"{image}.txt").write_text(lines)
    return root / "MME_Benchmark_release_version"


def write_mme_tsv(path: Path) -> Path:
    rows = []
    for subtask, images in MME_DATA.items():
        for qas in images.values():
            owner = len(rows)
            for q, t, _ in qas:
                reference = b64((owner, 1, 2)) if len(rows) == owner else str(owner)
                rows.append(
                    {"index": len(rows), "image": reference, "question": f"{q} Please answer yes or no."}
                    | {"answer": t, "category": subtask}
                )
    return write_tsv(path, rows)


def test_mme_folder_and_tsv_through_run(tmp_path: Path) -> None:
    for data in (write_mme_folder(tmp_path), write_mme_tsv(tmp_path / "MME.tsv")):
        result = run_fake("mme", data, MME_ANSWERS, tmp_path / f"out-{data.suffix or 'dir'}")
        assert result["samples"] == 8 and result["questions"] == 4 and result["errors"] == 0
        assert (result["metrics"]["perception"], result["metrics"]["cognition"]) == (175.0, 200.0)
        assert result["headline"] == {"metric": "perception", "value": 175.0, "scale": "raw"}
    # --limit counts images: both questions of an image stay together (acc+ needs them).
    task = get_task("mme", data=tmp_path / "MME.tsv")
    solver = FakeSolver(MME_ANSWERS)
    result = task.run(solver, Config(), limit=1, batch_size=2, output_dir=tmp_path / "lim", progress=False)
    assert result["samples"] == 2 and result["metrics"]["per_subtask"]["existence"]["acc_plus"] == 1.0


def test_tsv_image_reference_to_nothing_is_named() -> None:
    rows = [{"index": "0", "image": "7"}]
    with pytest.raises(ValueError, match="row 0: the image cell '7' names no row that holds an image"):
        TsvImages(rows, Path("MME.tsv")).get("0")


# -------------------------------------------------------------------------------------------------- MathVista

CHOICES = ["135°", "140°", "145°", "150°"]


def test_mathvista_extraction_on_real_looking_answers() -> None:
    def scored(response: str, answer: str, **meta: Any) -> bool:
        return mathvista_correct(response, answer, {"choices": [], "precision": None} | meta)[1]

    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": CHOICES}
    assert scored("C", "145°", **mc)
    assert scored("(C) 145°", "145°", **mc)
    assert scored("A triangle's angles add up to 180°, so ∠BOC = 145°. The answer is C.", "145°", **mc)
    assert scored("Answer: (C)", "145°", **mc)
    assert scored("145°", "145°", **mc)
    assert not scored("The answer is B.", "145°", **mc)
    assert (
        extract_answer("The answer is a triangle", "multi_choice", "text", CHOICES) != "A"
    )  # "a" is no letter
    # Nothing names an option: the official normalisation takes the nearest option by edit distance.
    assert normalize_extracted("about 152°", CHOICES, "multi_choice", "text", None) == "150°"
    integer = {"question_type": "free_form", "answer_type": "integer"}
    assert scored("The number missing in the sequence is 14.", "14", **integer)
    assert scored("Total: 1,000 people", "1000", **integer)
    assert scored("The peak lies in 2007-2008", "2008", **integer)
    assert scored("The temperature falls to -3, then rises to -4", "-4", **integer)
    assert extract_answer("points (3,4) and 5,", "free_form", "integer", []) == "5"
    assert scored("3.7", "3", **integer)  # str(int(float(x))) truncates, as the official does
    assert not scored("There are 4 objects.", "3", **integer)
    assert not scored("I do not know.", "3", **integer)
    floats = {"question_type": "free_form", "answer_type": "float"}
    assert scored("The fraction is 0.6, which means six out of ten.", "0.6", precision=1.0, **floats)
    assert scored("Luca needs $1.45 to buy both candies.", "1.45", precision=2, **floats)
    assert scored("d = 1.21 m", "1.2", precision=1, **floats)
    listed = {"question_type": "free_form", "answer_type": "list"}
    assert scored("The peak is between [2007,2008].", "[2007, 2008]", **listed)


def test_mathvista_built_query_matches_the_official_form() -> None:
    query = build_query("Find $m\\angle H$", ["97", "102"], None, "multi_choice", "text", None)
    assert query == (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
        "end.\n"
        "Question: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102"
    )
    assert build_query("How heavy?", None, "g", "free_form", "float", 2).startswith(
        "Hint: Please answer the question requiring a floating-point number with two decimal places"
    )
    assert build_query("How heavy?", None, "g", "free_form", "integer", None).endswith(
        "Question: How heavy? (Unit: g)"
    )


# pid -> (question, choices, answer, question_type, answer_type, precision, task, skills, response)
MV_ROWS = {
    "1": ("Find the angle BOC.", CHOICES, "145°", "multi_choice", "text", None, "geometry problem solving",
          ["geometry reasoning", "arithmetic reasoning"], "The answer is C."),
    "2": ("Which number is missing?", None, "14", "free_form", "integer", None, "figure question answering",
          ["logical reasoning"], "The missing number is 14."),
    "3": ("By what distance is the spring compressed?", None, "1.2", "free_form", "float", 1.0,
          "textbook question answering", ["scientific reasoning"], "1.21"),
    "4": ("Between which two years is the peak?", None, "[2007, 2008]", "free_form", "list", None,
          "figure question answering", ["statistical reasoning"], "between [2007,2008]"),
    "5": ("How many objects are there?", None, "3", "free_form", "integer", None, "figure question answering",
          ["arithmetic reasoning"], "There are 4 objects."),
}  # fmt: skip


def mv_query(pid: str) -> str:
    question, choices, _, qtype, atype, precision, *_ = MV_ROWS[pid]
    return build_query(question, choices, None, qtype, atype, precision)


def test_mathvista_metrics_by_hand() -> None:
    metas = [
        {"question_type": r[3], "answer_type": r[4], "choices": r[1] or [], "precision": r[5], "task": r[6]}
        | {"skills": r[7], "grade": None, "context": None, "source": None}
        for r in MV_ROWS.values()
    ]
    m = mathvista_scores(metas, [r[2] for r in MV_ROWS.values()], [r[8] for r in MV_ROWS.values()])
    assert (m["accuracy"], m["correct"], m["total"]) == (4 / 5, 4, 5)
    assert m["per_question_type"]["free_form"] == {"accuracy": 3 / 4, "correct": 3, "total": 4}
    assert m["per_skill"]["arithmetic reasoning"] == {"accuracy": 1 / 2, "correct": 1, "total": 2}
    assert m["per_task"]["figure question answering"]["accuracy"] == 2 / 3
    assert m["per_answer_type"]["integer"]["accuracy"] == 1 / 2 and m["per_grade"] == {}


def write_mathvista_json(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    problems, queries = {}, {}
    for pid, (question, choices, answer, qtype, atype, precision, task, skills, _) in MV_ROWS.items():
        (root / "images" / f"{pid}.jpg").write_bytes(png((int(pid), 0, 0)))
        problems[pid] = {"question": question, "image": f"images/{pid}.jpg", "choices": choices, "unit": None}
        problems[pid] |= {
            "precision": precision,
            "answer": answer,
            "question_type": qtype,
            "answer_type": atype,
        }
        problems[pid] |= {"pid": pid, "metadata": {"split": "testmini", "task": task, "skills": skills}}
        if pid != "5":  # query.json lacks one: that query is built
            queries[pid] = mv_query(pid)
    (root / "testmini.json").write_text(json.dumps(problems), encoding="utf-8")
    (root / "query.json").write_text(json.dumps(queries), encoding="utf-8")
    return root


def test_mathvista_json_tsv_through_run(tmp_path: Path) -> None:
    answers = {mv_query(pid): r[8] for pid, r in MV_ROWS.items()}
    result = run_fake("mathvista", write_mathvista_json(tmp_path / "MathVista"), answers, tmp_path / "o1")
    assert (result["samples"], result["errors"], result["metrics"]["accuracy"]) == (5, 0, 4 / 5)
    assert result["metrics"]["per_skill"]["arithmetic reasoning"]["correct"] == 1
    tsv_rows = [
        {"index": pid, "image": b64((1, 2, 3)), "question": mv_query(pid) if pid != "2" else r[0]}
        | {"answer": "C" if pid == "1" else r[2], "question_type": r[3], "answer_type": r[4]}
        | {"choices": str(r[1]) if r[1] else "", "precision": r[5] or "", "unit": "", "task": r[6]}
        | {"skills": str(r[7])}
        for pid, r in MV_ROWS.items()
    ]  # one bare question (pid 2), one letter answer (pid 1): both read as the official ones
    result = run_fake(
        "mathvista", write_tsv(tmp_path / "MathVista_MINI.tsv", tsv_rows), answers, tmp_path / "o2"
    )
    assert result["metrics"]["accuracy"] == 4 / 5
    assert result["metrics"]["per_task"]["geometry problem solving"]["accuracy"] == 1.0


def test_mathvista_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip(
        "pyarrow", reason="reading the Hugging Face parquet needs pyarrow (the bench extra)"
    )
    import pyarrow.parquet as pq

    rows = [
        {
            "pid": pid,
            "question": r[0],
            "image": f"images/{pid}.jpg",
            "decoded_image": {"bytes": png((5, 5, 5)), "path": None},
        }
        | {"choices": r[1], "unit": None, "precision": r[5], "answer": r[2], "question_type": r[3]}
        | {"answer_type": r[4], "metadata": {"task": r[6], "skills": r[7]}, "query": mv_query(pid)}
        for pid, r in MV_ROWS.items()
    ]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "testmini-00000-of-00001.parquet")
    result = run_fake("mathvista", tmp_path, {mv_query(p): r[8] for p, r in MV_ROWS.items()}, tmp_path / "o")
    assert result["metrics"]["accuracy"] == 4 / 5


# ------------------------------------------------------------------------------------------ driver end to end


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", sp_model)


def _recompute_ocrbench(records: list[dict]) -> dict:
    return ocrbench_scores(
        [r["meta"]["type"] for r in records],
        [r["answer"] for r in records],
        [r["prediction"] for r in records],
    )


def _recompute_hallusionbench(records: list[dict]) -> dict:
    return hallusion_scores(
        [r["meta"] for r in records], [r["answer"] for r in records], [r["prediction"] for r in records]
    )


def _recompute_mme(records: list[dict]) -> dict:
    return mme_scores(
        [r["meta"]["subtask"] for r in records],
        [r["meta"]["image"] for r in records],
        [r["answer"] for r in records],
        [r["prediction"] for r in records],
    )


def _recompute_mathvista(records: list[dict]) -> dict:
    return mathvista_scores(
        [r["meta"] for r in records], [r["answer"] for r in records], [r["prediction"] for r in records]
    )


# (task, fixture writer, metrics from records, --limit, prompts asked): HallusionBench's first five hold the
# question asked without its figure; MME's limit counts images (two questions each).
DRIVER_CASES: list[tuple[str, Callable[[Path], Path], Callable[[list[dict]], dict], int, int]] = [
    ("ocrbench", write_ocrbench, _recompute_ocrbench, 2, 2),
    ("hallusionbench", write_hallusionbench, _recompute_hallusionbench, 5, 5),
    ("mme", write_mme_folder, _recompute_mme, 2, 4),
    ("mathvista", write_mathvista_json, _recompute_mathvista, 2, 2),
]


@pytest.mark.parametrize(
    ("name", "write", "recompute", "limit", "samples"), DRIVER_CASES, ids=[c[0] for c in DRIVER_CASES]
)
def test_driver_end_to_end_on_a_tiny_export(
    tmp_path: Path,
    export: Path,
    name: str,
    write: Callable[[Path], Path],
    recompute: Callable[[list[dict]], dict],
    limit: int,
    samples: int,
) -> None:
    result = evaluate(
        name,
        export,
        data=write(tmp_path / "data"),
        limit=limit,
        batch_size=3,  # HallusionBench: its text-only question shares a batch with an image question
        output=tmp_path / "out",
        progress=False,
    )
    assert result["samples"] == samples and result["errors"] == 0
    for label in ("json", "markdown", "predictions"):
        assert Path(result["files"][label]).is_file()
    assert result["metrics"] == recompute(result["records"])
    stored = json.loads(Path(result["files"]["json"]).read_text())
    assert stored["headline"]["value"] == result["metrics"][stored["headline"]["metric"]]
