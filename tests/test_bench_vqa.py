"""POPE and the open-answer VQA benchmarks (VQAv2, GQA, TextVQA): the official VQA normalisation and accuracy,
each benchmark's released formats (made here, a few rows each), exact metrics through a fake solver, and the
driver end to end on a random tiny export."""

from __future__ import annotations

import base64
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers import write_export
from unified_mllm.config import Config, load_config
from unified_mllm.eval.__main__ import evaluate
from unified_mllm.eval.benchmark import PREDICTIONS_FILE, SHORT_ANSWER
from unified_mllm.eval.benchmarks.pope import Pope, first_sentence
from unified_mllm.eval.benchmarks.vqa import GQA, TextVQA, VQAv2, answer_list, gqa_correct, gqa_normalize
from unified_mllm.eval.benchmarks.vqa import OCR_LINE as OCR
from unified_mllm.eval.metrics import pope_metrics
from unified_mllm.eval.tasks import get_task
from unified_mllm.eval.vqa_normalize import (
    evalai_normalize,
    normalize_vqa_answer,
    process_punctuation,
    textvqa_accuracy,
    vqa_accuracy,
)
from unified_mllm.layout import IMAGE_PLACEHOLDER

# ------------------------------------------------------------------------------------ the VQA normaliser


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("Two.", "2"),  # number word, final period
        ("none", "0"),
        ("Ten dogs", "10 dogs"),
        ("The Dog", "dog"),  # articles go, case folds
        ("a man", "man"),
        ("left-hand", "left hand"),  # a hyphen inside a word becomes a space
        ("yes, it is!", "yes it is"),  # a comma before a space is deleted, the glued "!" becomes a space
        ("hello (world)", "hello world"),
        ("1,000", "1000"),  # digit,digit: every mark is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g.", "eg"),
        ("dont", "don't"),  # the contractions table
        ("isnt it", "isn't it"),
        ("Ive", "ive"),  # the table's capitalised keys never match (words are lower-cased first)
        ("  red\tcar\n", "red car"),
    ],
)
def test_the_official_normalisation(text: str, normal: str) -> None:
    assert normalize_vqa_answer(text) == normal


def test_the_evalai_processor_and_the_punctuation_step() -> None:
    assert evalai_normalize("The man's hat, I think?") == "man 's hat i think"
    assert evalai_normalize("Coca-Cola") == "coca cola"
    assert evalai_normalize("Two") == "2"
    # The punctuation step alone keeps the ends (the official code strips nothing there).
    assert process_punctuation("yes!") == "yes "
    assert process_punctuation("no.") == "no"


@pytest.mark.parametrize(
    ("agree", "accuracy"),
    # Leave-one-out over the 10 humans: with k agreeing, k subsets hold k-1 matches and 10-k hold k; each
    # subset scores min(1, matches/3). k=1: (1*0 + 9*1/3)/10 = 0.3; k=2: (2*1/3 + 8*2/3)/10 = 0.6;
    # k=3: (3*2/3 + 7*1)/10 = 0.9; k>=4: 1.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(agree: int, accuracy: float) -> None:
    answers = ["cat"] * agree + ["dog"] * (10 - agree) if agree < 10 else ["cat"] * 10
    assert vqa_accuracy("cat", answers) == accuracy


def test_vqa_accuracy_normalises_like_the_official_code() -> None:
    assert vqa_accuracy("Two.", ["2", "2"] + ["3"] * 8) == 0.6  # the prediction is normalised
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    # Disagreeing humans get the punctuation step: "yes." -> "yes" matches 3 of them.
    assert vqa_accuracy("Yes", ["yes."] * 3 + ["no"] * 7) == 0.9
    # Humans who all agree are compared as released, so a stray period in them never matches (the official
    # behaviour; released annotations are already in normal form).
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    assert vqa_accuracy("isnt", ["isn't"] * 2 + ["no"] * 8) == 0.6  # contractions restored
    # Fewer than 10 answers: the same rule over n subsets; 3 equal answers leave 2 matches each: 2/3.
    assert vqa_accuracy("a", ["a", "a", "a"]) == 0.0  # "a" is an article: the prediction becomes ""
    assert vqa_accuracy("b", ["b", "b", "b"]) == pytest.approx(2 / 3, abs=1e-15)


def test_textvqa_accuracy_normalises_both_sides() -> None:
    assert textvqa_accuracy("Nokia", ["nokia", "NOKIA"] + ["samsung"] * 8) == 0.6
    assert textvqa_accuracy("Coca-Cola", ["coca cola"] * 10) == 1.0
    assert textvqa_accuracy("STOP.", ["stop"] * 3 + ["go"] * 7) == 0.9


def test_gqa_and_pope_reading_rules() -> None:
    assert gqa_normalize("Yes.") == "yes"
    assert gqa_normalize("The left one") == "the left one"  # no article removal in GQA
    assert first_sentence("No. There is a dog, not a cat.") == "No"
    assert answer_list("['a', 'b']") == ["a", "b"]
    assert answer_list("plain") == ["plain"]
    assert gqa_correct("Left.", "left") and gqa_correct("right", ["left", "right"])
    assert not gqa_correct("yes!", "yes")


# ---------------------------------------------------------------------------------- fixture files


def save_image(path: Path, color: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="JPEG")


def png_base64(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    header = list(rows[0])
    lines = ["\t".join(header)] + ["\t".join(str(r[c]) for c in header) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# POPE: per split two "yes" and two "no" questions, each naming its own object, with the answers the fake
# model# gives (hand-scored in test_pope_metrics_per_split_and_averaged).
POPE_ROWS = {
    "random": [
        ("dog", "yes", "Yes"),
        ("cat", "no", "No"),
        ("car", "yes", "Yes. It is not red."),  # first sentence only: "yes" (the whole answer says "not")
        ("kite", "no", "Yes, there is"),
    ],
    "popular": [
        ("bus", "yes", "No. There is a bus"),
        ("cup", "no", "no"),
        ("tie", "yes", "yes"),
        ("bed", "no", "There is not."),
    ],
    "adversarial": [
        ("fork", "yes", "yes"),
        ("sink", "no", "yes"),
        ("oven", "yes", "yes"),
        ("vase", "no", "yes"),
    ],
}


def pope_question(obj: str) -> str:
    return f"Is there a {obj} in the image?"


def make_pope(root: Path) -> Path:
    for split, rows in POPE_ROWS.items():
        lines = []
        for number, (obj, label, _) in enumerate(rows, 1):
            image = f"COCO_val2014_{number:012d}.jpg"
            save_image(root / "val2014" / image)
            row = {"question_id": number, "image": image, "text": pope_question(obj), "label": label}
            lines.append(json.dumps(row))
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def make_pope_tsv(path: Path) -> Path:
    rows = []
    for split, split_rows in POPE_ROWS.items():
        for obj, label, _ in split_rows:
            index = len(rows)
            # VLMEvalKit stores a shared image once: later rows name the index of the row that holds it.
            image = png_base64("blue") if index == 0 else "0"
            rows.append(
                {
                    "index": index,
                    "question": pope_question(obj),
                    "answer": label.title(),
                    "category": split,
                    "image": image,
                }
            )
    return write_tsv(path, rows)


POPE_ANSWERS = {pope_question(obj): said for rows in POPE_ROWS.values() for obj, _, said in rows}

# VQAv2: (question, answer type, question type, 10 answers, the fake model's answer, its accuracy by hand).
VQA_ROWS = [
    ("Is the sky blue?", "yes/no", "is the", ["yes"] * 10, "Yes", 1.0),
    ("How many dogs are there?", "number", "how many", ["2"] * 2 + ["3"] * 8, "two", 0.6),
    ("What color is the car?", "other", "what color is the", ["red"] + ["blue"] * 9, "Red.", 0.3),
    ("What animal is this?", "other", "what animal is", ["dog"] * 10, "cat", 0.0),
]


def make_vqav2(root: Path, *, test_dev: bool = False) -> Path:
    subtype, images = ("test-dev2015", "test2015") if test_dev else ("val2014", "val2014")
    questions = []
    annotations = []
    for number, (question, answer_type, question_type, answers, _, _) in enumerate(VQA_ROWS, 1):
        image_id = 100 + number
        save_image(root / images / f"COCO_{images}_{image_id:012d}.jpg")
        qid = image_id * 1000
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": question_type,
                "answer_type": answer_type,
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i}
                    for i, a in enumerate(answers, 1)
                ],
            }
        )
    head = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    payload = {**head, "data_subtype": subtype, "questions": questions}
    (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(payload), encoding="utf-8")
    if test_dev:  # the full test set: the test-dev questions and one more
        extra = {"image_id": 999, "question": "Why?", "question_id": 999000}
        full = {**head, "data_subtype": "test2015", "questions": [*questions, extra]}
        (root / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(full), encoding="utf-8")
    else:
        ann = {**head, "data_subtype": subtype, "annotations": annotations}
        (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(ann), encoding="utf-8")
    return root


VQA_ANSWERS = {row[0]: row[4] for row in VQA_ROWS}

# GQA: (question, answer, structural type, semantic type, the fake model's answer).
GQA_ROWS = [
    ("Is the man on the left?", "yes", "verify", "rel", "Yes."),
    ("What color is the shirt?", "red", "query", "attr", "Red"),
    ("Is the cup left or right?", "left", "choose", "attr", "The left one"),
    ("Is there both a car and a bus?", "no", "logical", "obj", "no"),
]


def make_gqa(root: Path) -> Path:
    questions = {}
    for number, (question, answer, structural, semantic, _) in enumerate(GQA_ROWS, 1):
        image_id = f"n{number}"
        save_image(root / "images" / f"{image_id}.jpg")
        questions[f"20{number}"] = {
            "semantic": [],
            "entailed": [],
            "equivalent": [],
            "question": question,
            "imageId": image_id,
            "isBalanced": True,
            "groups": {"global": None, "local": "x"},
            "answer": answer,
            "semanticStr": "",
            "annotations": {},
            "types": {"detailed": "x", "semantic": semantic, "structural": structural},
            "fullAnswer": f"{answer}.",
        }
    questions["299"] = {**questions["201"], "isBalanced": False}  # scored by nobody: left out
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions), encoding="utf-8")
    return root


def make_gqa_tsv(path: Path) -> Path:
    rows = [
        {"index": i, "image": png_base64("green") if i == 0 else "0", "question": q, "answer": a}
        for i, (q, a, *_) in enumerate(GQA_ROWS)
    ]
    return write_tsv(path, rows)


GQA_ANSWERS = {row[0]: row[4] for row in GQA_ROWS}

# TextVQA: (question, image id, OCR tokens, answers, the fake model's answer, its accuracy by hand).
TEXTVQA_ROWS = [
    (
        "what brand is the phone?",
        "abc1",
        ["nokia", "3310"],
        ["nokia", "NOKIA"] + ["samsung"] * 8,
        "Nokia",
        0.6,
    ),
    ("what drink is this?", "abc2", [], ["coca cola"] * 10, "Coca-Cola", 1.0),
]


def make_textvqa(root: Path, *, ocr: str = "") -> Path:
    """``ocr``: "" (no OCR tokens), "rosetta" (TextVQA's OCR file) or "llava" (LLaVA's question file)."""
    data = []
    for number, (question, image_id, _, answers, _, _) in enumerate(TEXTVQA_ROWS, 1):
        save_image(root / "train_images" / f"{image_id}.jpg")
        data.append({"question": question, "image_id": image_id, "question_id": number, "answers": answers})
    payload = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(payload), encoding="utf-8")
    if ocr == "rosetta":
        entries = [{"image_id": r[1], "ocr_tokens": r[2], "ocr_info": []} for r in TEXTVQA_ROWS]
        (root / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(
            json.dumps({"data": entries}), encoding="utf-8"
        )
    if ocr == "llava":
        lines = [
            json.dumps(
                {"question_id": n, "image": f"{r[1]}.jpg", "text": f"{r[0]}\nLLAVA PROMPT", "category": "x"}
            )
            for n, r in enumerate(TEXTVQA_ROWS, 1)
        ]
        (root / "llava_textvqa_val_v051_ocr.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def make_textvqa_tsv(path: Path) -> Path:
    rows = [
        {"index": i, "image": png_base64("white"), "question": r[0], "answer": str(r[3])}
        for i, r in enumerate(TEXTVQA_ROWS)
    ]
    return write_tsv(path, rows)


TEXTVQA_ANSWERS = {row[0]: row[4] for row in TEXTVQA_ROWS}


# ------------------------------------------------------------------------------- a fake solver


class FakeSolver:
    """Answers each prompt with the answer given for the question it contains ("?" when none)."""

    def __init__(self, answers: dict[str, str], config: Config) -> None:
        self.answers = answers
        self.config = config
        self.prompts: list[str] = []

    def generate(
        self, images: list, qas: list, max_gen_len: int = 0, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        prompts = [conversation[-1][0] for conversation in qas]
        assert all(len(i) == p.count(IMAGE_PLACEHOLDER) == 1 for i, p in zip(images, prompts, strict=True))
        self.prompts += prompts
        return [next((a for q, a in self.answers.items() if q in p), "?") for p in prompts]


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(overrides=["model.preset=tiny"])


def run_fake(
    task_name: str, data: Path, answers: dict[str, str], config: Config, out: Path
) -> tuple[dict, FakeSolver]:
    solver = FakeSolver(answers, config)
    task = get_task(task_name, data=data)
    result = task.run(solver, config, limit=None, batch_size=3, output_dir=out, progress=False)
    return result, solver


# ------------------------------------------------------------------------------------------- POPE


def test_pope_metrics_per_split_and_averaged(tmp_path: Path, config: Config) -> None:
    result, solver = run_fake("pope", make_pope(tmp_path / "pope"), POPE_ANSWERS, config, tmp_path / "out")
    metrics = result["metrics"]
    split = metrics["per_split"]
    assert list(split) == ["random", "popular", "adversarial"]
    # random: read yes, no, yes, yes against yes, no, yes, no -> tp 2, fp 1, tn 1, fn 0.
    assert (split["random"]["tp"], split["random"]["fp"], split["random"]["tn"], split["random"]["fn"]) == (
        2,
        1,
        1,
        0,
    )
    assert split["random"]["accuracy"] == 0.75
    assert split["random"]["precision"] == pytest.approx(2 / 3, abs=1e-15)
    assert split["random"]["recall"] == 1.0
    assert split["random"]["f1"] == pytest.approx(0.8, abs=1e-15)  # 2 * (2/3) * 1 / (2/3 + 1)
    assert split["random"]["yes_ratio"] == 0.75
    # popular: read no, no, yes, no -> tp 1, fp 0, tn 2, fn 1: precision 1, recall 1/2, F1 2/3.
    assert (split["popular"]["accuracy"], split["popular"]["precision"], split["popular"]["recall"]) == (
        0.75,
        1,
        0.5,
    )
    assert split["popular"]["f1"] == pytest.approx(2 / 3, abs=1e-15)
    assert split["popular"]["yes_ratio"] == 0.25
    # adversarial: always yes -> accuracy 1/2, precision 1/2, recall 1, F1 2/3, yes-ratio 1.
    assert (split["adversarial"]["accuracy"], split["adversarial"]["yes_ratio"]) == (0.5, 1.0)
    assert split["adversarial"]["f1"] == pytest.approx(2 / 3, abs=1e-15)
    # The headline: the mean F1 of the three splits, (0.8 + 2/3 + 2/3) / 3 = 32/45.
    assert metrics["f1_average"] == pytest.approx(32 / 45, abs=1e-15)
    assert result["headline"]["metric"] == "f1_average"
    assert metrics["accuracy_average"] == pytest.approx(2 / 3, abs=1e-15)  # (3/4 + 3/4 + 1/2) / 3
    # All twelve pooled: tp 5, fp 3, tn 3, fn 1 -> precision 5/8, recall 5/6, F1 5/7, accuracy 8/12.
    assert metrics["pooled_f1"] == pytest.approx(5 / 7, abs=1e-15)
    assert metrics["pooled_accuracy"] == pytest.approx(2 / 3, abs=1e-15)
    assert metrics["questions"] == 12 and metrics["splits"] == "random, popular, adversarial"
    # LLaVA's prompt; the splits are asked interleaved.
    assert solver.prompts[0] == f"{IMAGE_PLACEHOLDER}Is there a dog in the image?\n{SHORT_ANSWER}"
    assert [r["id"] for r in result["records"][:4]] == ["random-1", "popular-1", "adversarial-1", "random-2"]
    table = (tmp_path / "out" / "pope.md").read_text()
    assert "| f1_average | 71.11% |" in table and "| adversarial |" in table


def test_pope_reads_the_tsv_and_one_split_file(tmp_path: Path, config: Config) -> None:
    tsv = make_pope_tsv(tmp_path / "POPE.tsv")
    result, _ = run_fake("pope", tsv, POPE_ANSWERS, config, tmp_path / "out-tsv")
    assert result["metrics"]["f1_average"] == pytest.approx(
        32 / 45, abs=1e-15
    )  # same answers, "Yes"/"No" labels
    assert result["errors"] == 0
    root = make_pope(tmp_path / "pope")
    one, _ = run_fake("pope", root / "coco_pope_popular.json", POPE_ANSWERS, config, tmp_path / "out-one")
    assert one["metrics"]["splits"] == "popular"
    assert one["metrics"]["f1_average"] == pytest.approx(2 / 3, abs=1e-15)


def test_pope_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"coco_pope_<split>\.json"):
        Pope(tmp_path / "empty").load(tmp_path / "empty")
    root = make_pope(tmp_path / "pope")
    for image in (root / "val2014").iterdir():
        image.unlink()
    with pytest.raises(FileNotFoundError, match=r"image COCO_val2014_000000000001\.jpg not found"):
        Pope(root).load(root)


# ------------------------------------------------------------------------------------------ VQAv2


def test_vqav2_scores_by_answer_type_and_writes_the_results_file(tmp_path: Path, config: Config) -> None:
    result, solver = run_fake("vqav2", make_vqav2(tmp_path / "vqav2"), VQA_ANSWERS, config, tmp_path / "out")
    metrics = result["metrics"]
    assert metrics["accuracy"] == pytest.approx((1.0 + 0.6 + 0.3 + 0.0) / 4, abs=1e-15)
    per_type = metrics["per_answer_type"]
    assert list(per_type) == ["yes/no", "number", "other"]
    assert per_type["yes/no"] == {"accuracy": 1.0, "questions": 1}
    assert per_type["number"] == {"accuracy": 0.6, "questions": 1}
    assert per_type["other"]["accuracy"] == pytest.approx(0.15, abs=1e-15)
    assert metrics["per_question_type"]["how many"]["accuracy"] == 0.6
    assert solver.prompts[0] == f"{IMAGE_PLACEHOLDER}Is the sky blue?\n{SHORT_ANSWER}"
    results = json.loads(Path(result["files"]["results"]).read_text())
    assert Path(result["files"]["results"]).name == "v2_OpenEnded_mscoco_val2014_results.json"
    assert results == [
        {"question_id": 101000, "answer": "yes"},
        {"question_id": 102000, "answer": "2"},
        {"question_id": 103000, "answer": "red"},
        {"question_id": 104000, "answer": "cat"},
    ]


def test_vqav2_test_dev_writes_the_submission_without_a_score(tmp_path: Path, config: Config) -> None:
    root = make_vqav2(tmp_path / "vqav2", test_dev=True)
    result, _ = run_fake("vqav2", root, VQA_ANSWERS, config, tmp_path / "out")
    assert result["metrics"]["accuracy"] is None and "EvalAI" in result["metrics"]["note"]
    assert result["headline"]["value"] is None
    path = Path(result["files"]["results"])
    assert path.name == "v2_OpenEnded_mscoco_test-dev2015_results.json"
    submission = json.loads(path.read_text())
    # The run's four answers, then the test2015 question outside test-dev with an empty answer.
    assert [r["answer"] for r in submission] == ["yes", "2", "red", "cat", ""]
    assert submission[-1]["question_id"] == 999000


# -------------------------------------------------------------------------------------------- GQA


def test_gqa_exact_match_and_question_types(tmp_path: Path, config: Config) -> None:
    result, solver = run_fake("gqa", make_gqa(tmp_path / "gqa"), GQA_ANSWERS, config, tmp_path / "out")
    metrics = result["metrics"]
    assert metrics["questions"] == 4  # the unbalanced question is left out
    assert metrics["accuracy"] == 0.75  # "The left one" is not "left"
    assert metrics["accuracy_binary"] == pytest.approx(2 / 3, abs=1e-15)  # verify, choose, logical
    assert metrics["accuracy_open"] == 1.0  # query
    assert metrics["per_structural_type"]["choose"] == {"accuracy": 0.0, "questions": 1}
    assert metrics["per_semantic_type"]["attr"] == {"accuracy": 0.5, "questions": 2}
    assert solver.prompts[1] == f"{IMAGE_PLACEHOLDER}What color is the shirt?\n{SHORT_ANSWER}"
    tsv, _ = run_fake(
        "gqa", make_gqa_tsv(tmp_path / "GQA_TestDev_Balanced.tsv"), GQA_ANSWERS, config, tmp_path / "t"
    )
    assert tsv["metrics"] == {"accuracy": 0.75, "questions": 4}
    assert tsv["errors"] == 0


# ---------------------------------------------------------------------------------------- TextVQA


@pytest.mark.parametrize("ocr", ["", "rosetta", "llava"])
def test_textvqa_accuracy_and_llavas_ocr_prompt(tmp_path: Path, config: Config, ocr: str) -> None:
    root = make_textvqa(tmp_path / "textvqa", ocr=ocr)
    result, solver = run_fake("textvqa", root, TEXTVQA_ANSWERS, config, tmp_path / "out")
    assert result["metrics"]["accuracy"] == pytest.approx((0.6 + 1.0) / 2, abs=1e-15)
    first, second = solver.prompts
    if ocr == "rosetta":
        assert first == f"{IMAGE_PLACEHOLDER}what brand is the phone?\n{OCR}nokia, 3310\n{SHORT_ANSWER}"
        assert second == f"{IMAGE_PLACEHOLDER}what drink is this?\n{SHORT_ANSWER}"  # no tokens: no OCR line
        assert result["metrics"]["ocr_prompts"] == 1
    elif ocr == "llava":
        assert first == f"{IMAGE_PLACEHOLDER}what brand is the phone?\nLLAVA PROMPT"
    else:
        assert first == f"{IMAGE_PLACEHOLDER}what brand is the phone?\n{SHORT_ANSWER}"
        assert result["metrics"]["ocr_prompts"] == 0


def test_textvqa_reads_vlmevalkits_tsv(tmp_path: Path, config: Config) -> None:
    result, _ = run_fake(
        "textvqa", make_textvqa_tsv(tmp_path / "TextVQA_VAL.tsv"), TEXTVQA_ANSWERS, config, tmp_path
    )
    assert result["metrics"]["accuracy"] == pytest.approx(0.8, abs=1e-15)
    assert result["records"][0]["answer"] == ["nokia", "NOKIA"] + ["samsung"] * 8


# ------------------------------------------------------------------------ the driver, a random export


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("bench-vqa") / "export", sp_model)


@pytest.fixture(scope="module")
def solver(export: Path) -> Any:
    from unified_mllm.infer.solver import InferenceSolver

    return InferenceSolver.from_pretrained(export)


def recomputed(name: str, records: list[dict[str, Any]]) -> Any:
    """The headline recomputed from the records' answers and predictions."""
    if name == "vqav2":
        return statistics.fmean(vqa_accuracy(evalai_normalize(r["prediction"]), r["answer"]) for r in records)
    if name == "gqa":
        return statistics.fmean(float(gqa_normalize(r["prediction"]) == r["answer"]) for r in records)
    if name == "textvqa":
        return statistics.fmean(textvqa_accuracy(r["prediction"], r["answer"]) for r in records)
    splits = sorted({r["meta"]["split"] for r in records})
    return statistics.fmean(
        pope_metrics(
            [r["answer"] for r in records if r["meta"]["split"] == s],
            [first_sentence(r["prediction"]) for r in records if r["meta"]["split"] == s],
        )["f1"]
        for s in splits
    )


def test_the_driver_runs_every_benchmark_on_a_random_export(
    tmp_path: Path, export: Path, solver: Any
) -> None:
    root = tmp_path / "benchmarks"
    make_pope(root / "pope")
    make_vqav2(root / "vqav2")
    make_gqa(root / "gqa")
    make_textvqa(root / "textvqa", ocr="rosetta")
    assert Pope.find_data(root) == root / "pope" and VQAv2.find_data(root) == root / "vqav2"
    assert GQA.find_data(root) == root / "gqa" and TextVQA.find_data(root) == root / "textvqa"
    out = tmp_path / "out"
    summary = evaluate(
        "all-understanding",
        export,
        data=root,
        limit=3,
        batch_size=2,
        output=out,
        progress=False,
        solver=solver,
    )
    assert sorted(summary["benchmarks"]) == ["gqa", "pope", "textvqa", "vqav2"]
    for name in ("gqa", "pope", "textvqa", "vqav2"):
        result = json.loads((out / name / f"{name}.json").read_text())
        asked = 2 if name == "textvqa" else 3  # --limit 3; the TextVQA fixture has two questions
        assert result["questions"] == result["samples"] == asked
        assert (out / name / f"{name}.md").is_file()
        lines = (out / name / PREDICTIONS_FILE).read_text().splitlines()
        assert len(lines) == 1 + asked  # the settings line, then one answer per question
        assert result["headline"]["value"] == pytest.approx(recomputed(name, result["records"]), abs=1e-12)
        assert summary["benchmarks"][name] == result["headline"]
    assert (out / "vqav2" / "v2_OpenEnded_mscoco_val2014_results.json").is_file()
    pope = json.loads((out / "pope" / "pope.json").read_text())
    # Interleaved splits: --limit 3 asks one question of each.
    assert pope["metrics"]["splits"] == "random, popular, adversarial"
    # A TSV through the single-task driver: the same counts and consistency.
    tsv = make_pope_tsv(tmp_path / "POPE.tsv")
    result = evaluate(
        "pope", export, data=tsv, limit=4, batch_size=4, output=tmp_path / "t", progress=False, solver=solver
    )
    assert result["samples"] == 4 and result["errors"] == 0
    assert result["headline"]["value"] == pytest.approx(recomputed("pope", result["records"]), abs=1e-12)


@pytest.mark.parametrize(
    ("task", "what"),
    [("vqav2", "VQAv2 questions file"), ("gqa", "GQA questions file"), ("textvqa", "TextVQA annotations")],
)
def test_a_folder_without_the_files_is_named(tmp_path: Path, task: str, what: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no {what}"):
        get_task(task, data=tmp_path).load(tmp_path)


def test_missing_images_and_annotations_are_named(tmp_path: Path) -> None:
    root = make_vqav2(tmp_path / "vqav2")
    for image in (root / "val2014").iterdir():
        image.unlink()
    with pytest.raises(FileNotFoundError, match=r"image COCO_val2014_000000000101\.jpg not found; looked in"):
        VQAv2(root).load(root)
    root = make_gqa(tmp_path / "gqa")
    (root / "testdev_balanced_questions.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a GQA questions file"):
        GQA(root).load(root)
