"""The multiple-choice paper benchmarks (MMBench EN/CN, SEED-Bench, MMStar, AI2D, MMMU) on tiny fixtures in each
released format, written here: readers, prompts, CircularEval, MMMU's parsing rules, hand-computed metrics
through ``task.run`` with a fake solver, and the driver end to end on a random tiny export."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers import write_export
from unified_mllm.config import Config
from unified_mllm.eval.__main__ import evaluate
from unified_mllm.eval.benchmark import MC_INSTRUCTION, MC_INSTRUCTION_CN, SHORT_ANSWER, match_choice
from unified_mllm.eval.benchmarks import mmbench, mmmu
from unified_mllm.eval.benchmarks.mmstar import options_in_question
from unified_mllm.eval.tasks import get_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

# ----------------------------------------------------------------------------------------- fixture helpers


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(color: tuple[int, int, int]) -> str:
    return base64.b64encode(png(color)).decode()


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> Path:
    header = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows([[row.get(k, "") for k in header] for row in rows])
    return path


def options_in_prompt(prompt: str) -> dict[str, str]:
    """The ``A. text`` lines of a prompt."""
    return dict(re.findall(r"^([A-H])\. (.*)$", prompt, flags=re.M))


class ScriptedSolver:
    """A fake solver: ``answer(prompt, images)`` gives each answer; records what it was asked."""

    def __init__(self, answer: Callable[[str, list[Image.Image]], str]) -> None:
        self.config = Config()
        self.answer = answer
        self.prompts: list[str] = []

    def generate(
        self, images: list, qas: list, max_gen_len: int = 16, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        assert temperature == 0.0 and len(images) == len(qas)
        out = []
        for row, ((prompt, answer),) in zip(images, qas, strict=True):
            assert answer is None and prompt.count(IMAGE_PLACEHOLDER) == len(row)
            self.prompts.append(prompt)
            out.append(self.answer(prompt, row))
        return out

    def generate_img(self, prompts: list[str], **kwargs: Any) -> list[Image.Image]:
        raise AssertionError("understanding benchmarks draw nothing")


def run_task(name: str, data: Path, solver: ScriptedSolver, out: Path, limit: int | None = None) -> dict:
    task = get_task(name, data=data)
    return task.run(solver, solver.config, limit=limit, batch_size=3, output_dir=out, progress=False)


# ------------------------------------------------------------------------------------------------ MMBench


def mmbench_rows() -> list[dict[str, Any]]:
    """VLMEvalKit's layout: question 0 (four options, answer B) and question 1 (two options, answer A), each
    followed at index + r * 1e6 by its rotations, whose image cells name the original row."""
    q0 = {
        "question": "What colour is the square?",
        "hint": "A picture.",
        "category": "color",
        "l2-category": "FP",
    }
    q1 = {"question": "Is it a cat?", "hint": "nan", "category": "animal", "l2-category": "FP"}
    rows = [
        {
            "index": 0,
            **q0,
            "A": "red",
            "B": "green",
            "C": "blue",
            "D": "black",
            "answer": "B",
            "image": b64(GREEN),
        },
        {"index": 1, **q1, "A": "yes", "B": "no", "C": "nan", "D": "nan", "answer": "A", "image": b64(RED)},
    ]
    texts = ["red", "green", "blue", "black"]
    for r in (1, 2, 3):
        rotated = {letter: texts[(i + r) % 4] for i, letter in enumerate("ABCD")}
        answer = "ABCD"[(1 - r) % 4]
        rows.append({"index": r * 1_000_000, **q0, **rotated, "answer": answer, "image": "0"})
    rows.append(
        {"index": 1_000_001, **q1, "A": "no", "B": "yes", "C": "nan", "D": "nan", "answer": "B", "image": "1"}
    )
    return rows


def right_text_except(wrong_prompts: set[str]) -> Callable[[str, list], str]:
    """Answers the letter of the right text ("green" / "yes"), but "A" where the prompt's first option line is
    in ``wrong_prompts``."""

    def answer(prompt: str, images: list) -> str:
        options = options_in_prompt(prompt)
        right = next(letter for letter, text in options.items() if text in ("green", "yes"))
        first = f"A. {options['A']}"
        if first in wrong_prompts and right != "A":
            return "A"
        if first in wrong_prompts:
            return "B"
        return f"{right}."

    return answer


def test_mmbench_circular_eval_by_hand(tmp_path: Path) -> None:
    data = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    # question 1 is answered wrong on its second pass ("A. no" first): 1 of 2 questions right circularly
    solver = ScriptedSolver(right_text_except({"A. no"}))
    result = run_task("mmbench-en", data, solver, tmp_path / "out")
    metrics = result["metrics"]
    assert (result["samples"], result["questions"]) == (6, 2)
    assert metrics["circular_accuracy"] == 0.5 and metrics["vanilla_accuracy"] == 1.0
    assert metrics["per_category"] == {
        "animal": {"circular_accuracy": 0.0, "vanilla_accuracy": 1.0, "questions": 1},
        "color": {"circular_accuracy": 1.0, "vanilla_accuracy": 1.0, "questions": 1},
    }
    assert metrics["per_l2_category"] == {
        "FP": {"circular_accuracy": 0.5, "vanilla_accuracy": 1.0, "questions": 2}
    }
    assert metrics["unmatched"] == 0 and result["headline"]["value"] == 0.5
    # LLaVA's prompt: the image, the hint, the question, the options, the instruction
    assert solver.prompts[0] == (
        f"{IMAGE_PLACEHOLDER}\nA picture.\nWhat colour is the square?\nA. red\nB. green\nC. blue\nD. black\n"
        f"{MC_INSTRUCTION}"
    )
    assert "nan" not in solver.prompts[4]  # question 1's hint is missing
    # the submission: every row asked, original columns without the image, plus the prediction
    submission = Path(result["files"]["submission"])
    assert submission.suffix == ".xlsx"
    openpyxl = pytest.importorskip("openpyxl")
    sheet = openpyxl.load_workbook(submission).active
    table = [list(r) for r in sheet.iter_rows(values_only=True)]
    assert "image" not in table[0] and table[0][-1] == "prediction"
    assert [r[table[0].index("index")] for r in table[1:]] == [
        0,
        1_000_000,
        2_000_000,
        3_000_000,
        1,
        1_000_001,
    ]
    assert table[-1][-1] == "A"  # question 1's second pass, answered wrong


def test_mmbench_all_rotations_wrong_and_unmatched(tmp_path: Path) -> None:
    data = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    # wrong on question 0's third pass only, and an unreadable answer to question 1's first pass
    answers = {"A. blue": "A", "A. yes": "I am unsure"}
    solver = ScriptedSolver(
        lambda p, _: answers.get(f"A. {options_in_prompt(p)['A']}") or right_text_except(set())(p, _)
    )
    metrics = run_task("mmbench-en", data, solver, tmp_path / "out")["metrics"]
    assert metrics["circular_accuracy"] == 0.0 and metrics["vanilla_accuracy"] == 0.5
    assert metrics["unmatched"] == 1


def test_mmbench_makes_rotations_when_the_file_has_none(tmp_path: Path) -> None:
    rows = [r for r in mmbench_rows() if r["index"] < 1_000_000]
    data = write_tsv(tmp_path / "questions.tsv", rows)
    task = get_task("mmbench-en", data=data)
    samples = task.load(data)
    assert [s.id for s in samples] == ["0", "1000000", "2000000", "3000000", "1", "1000001"]
    assert [s.answer for s in samples] == ["B", "A", "D", "C", "A", "B"]
    assert samples[1].meta["options"] == {"A": "green", "B": "blue", "C": "black", "D": "red"}
    assert {s.group for s in samples[:4]} == {"0"}
    # the same rows as VLMEvalKit's file, so the same metrics
    solver = ScriptedSolver(right_text_except({"A. no"}))
    result = run_task("mmbench-en", data, solver, tmp_path / "out", limit=1)
    assert result["samples"] == 4 and result["metrics"]["circular_accuracy"] == 1.0  # --limit keeps rotations


def test_mmbench_cn_prompt_and_test_split_without_answers(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in mmbench_rows()]
    data = write_tsv(tmp_path / "MMBench_TEST_CN.tsv", rows)
    solver = ScriptedSolver(lambda p, _: "A")
    result = run_task("mmbench-cn", data, solver, tmp_path / "out")
    assert all(p.endswith(f"\n{MC_INSTRUCTION_CN}") for p in solver.prompts)
    assert MC_INSTRUCTION_CN == "请直接回答选项字母。"  # LLaVA's model_vqa_mmbench --lang cn
    assert result["metrics"]["circular_accuracy"] is None and "no answers" in result["metrics"]["note"]
    assert Path(result["files"]["submission"]).is_file()


def test_mmbench_image_reference_to_nothing_is_named(tmp_path: Path) -> None:
    rows = mmbench_rows()
    rows[2]["image"] = "7"
    data = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    with pytest.raises(ValueError, match="names no row that holds an image"):
        get_task("mmbench-en", data=data).load(data)


def test_write_table_falls_back_to_tsv_without_openpyxl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # import openpyxl -> ImportError
    path = mmbench.write_table(tmp_path / "sub", ["index", "prediction"], [[1, "A"], [2, "B\x01"]])
    assert path.suffix == ".tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# openpyxl is not installed") and lines[1:3] == ["index\tprediction", "1\tA"]


def test_rotate_moves_the_answer() -> None:
    options = {"A": "a", "B": "b", "C": "c"}
    assert mmbench.rotate(options, "A", 1) == ({"A": "b", "B": "c", "C": "a"}, "C")
    assert mmbench.rotate(options, "C", 2) == ({"A": "c", "B": "a", "C": "b"}, "A")
    assert mmbench.rotate(options, None, 1)[1] is None


# ---------------------------------------------------------------------------------------------- SEED-Bench


def write_seed_release(root: Path) -> Path:
    """SEED-Bench.json (two Scene Understanding questions, one Text Understanding, one video question) and
    SEED-Bench-image/."""
    (root / "SEED-Bench-image").mkdir(parents=True)
    for name, color in (("1_a.jpg", RED), ("2_b.jpg", GREEN)):
        Image.new("RGB", (8, 8), color).save(root / "SEED-Bench-image" / name)

    def q(qid: str, dim: int, answer: str, data_id: str = "1_a.jpg", data_type: str = "image") -> dict:
        question = {"question_id": qid, "question": f"Q{qid}?", "answer": answer, "data_id": data_id}
        question.update({f"choice_{c}": f"{c}-{qid}" for c in "abcd"})
        question.update({"data_type": data_type, "question_type_id": dim})
        return question

    questions = [
        q("101", 1, "A"),
        q("102", 1, "C", "2_b.jpg"),
        q("103", 9, "B"),
        q("104", 10, "A", "v.mp4", "video"),
    ]
    names = {"Scene Understanding": 1, "Text Understanding": 9, "Action Recognition": 10}
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": names}))
    return root


def test_seed_bench_release_by_hand(tmp_path: Path) -> None:
    root = write_seed_release(tmp_path / "seed")
    # 101 right as "(A)", 102 wrong ("B"), 103 right by its option text
    answers = {"Q101?": "(A)", "Q102?": "B", "Q103?": "b-103"}
    solver = ScriptedSolver(lambda p, _: answers[re.search(r"Q\d+\?", p).group()])
    result = run_task("seed-bench", root, solver, tmp_path / "out")
    metrics = result["metrics"]
    assert result["samples"] == 3  # the video question is skipped
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["exact_letter_accuracy"] == 0.0
    assert metrics["per_dimension"] == {
        "Scene Understanding": {"accuracy": 0.5, "correct": 1, "total": 2},
        "Text Understanding": {"accuracy": 1.0, "correct": 1, "total": 1},
    }
    assert (
        solver.prompts[0]
        == f"{IMAGE_PLACEHOLDER}\nQ101?\nA. a-101\nB. b-101\nC. c-101\nD. d-101\n{MC_INSTRUCTION}"
    )


def test_seed_bench_tsv(tmp_path: Path) -> None:
    rows = [
        {"index": 7, "question": "Q7?", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "D"}
        | {"category": "Instances Counting", "image": b64(RED)},
        {"index": 8, "question": "Q8?", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "A"}
        | {"category": "Instance Location", "image": b64(BLUE)},
    ]
    data = write_tsv(tmp_path / "SEEDBench_IMG.tsv", rows)
    metrics = run_task("seed-bench", tmp_path, ScriptedSolver(lambda p, _: "D"), tmp_path / "out")["metrics"]
    assert metrics["accuracy"] == 0.5 and data.is_file()
    assert list(metrics["per_dimension"]) == ["Instance Location", "Instances Counting"]  # SEED's order


# -------------------------------------------------------------------------------------------------- MMStar


def test_options_in_question() -> None:
    question = "Which is right?\nOptions: A: The cat, B: sits., C: Two: three, D: 4, E: x"
    assert options_in_question(question) == {
        "A": "The cat",
        "B": "sits.",
        "C": "Two: three",
        "D": "4",
        "E": "x",
    }
    assert options_in_question("Options: A: a, C: c, B: b") == {"A": "a, C: c", "B": "b"}
    assert options_in_question("No options here") == {}


def mmstar_rows(with_options_in_question: bool) -> list[dict[str, Any]]:
    rows = []
    for i, (cat, l2, answer) in enumerate(
        [
            ("math", "geometry", "A"),
            ("math", "statistical reasoning", "B"),
            ("coarse perception", "image emotion", "C"),
        ]
    ):
        opts = {"A": f"a{i}", "B": f"b{i}", "C": f"c{i}", "D": f"d{i}"}
        question = f"Question {i}?"
        if with_options_in_question:
            question += "\nOptions: " + ", ".join(f"{k}: {v}" for k, v in opts.items())
        rows.append(
            {"index": i, "question": question, **({} if with_options_in_question else opts)}
            | {"answer": answer, "category": cat, "l2-category": l2, "image": b64(RED)}
        )
    return rows


@pytest.mark.parametrize("inline", [True, False])
def test_mmstar_tsv_by_hand(tmp_path: Path, inline: bool) -> None:
    data = write_tsv(tmp_path / "MMStar.tsv", mmstar_rows(inline))
    solver = ScriptedSolver(
        lambda p, _: {"0": "A", "1": "The answer is c1", "2": "C"}[p.split("Question ")[1][0]]
    )
    metrics = run_task("mmstar", data, solver, tmp_path / "out")["metrics"]
    # the same prompt from either form
    assert solver.prompts[0] == (
        f"{IMAGE_PLACEHOLDER}\nQuestion 0?\nOptions: A: a0, B: b0, C: c0, D: d0\n{MC_INSTRUCTION[:-1]}"
    )
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["per_category"] == {
        "coarse perception": {"accuracy": 1.0, "correct": 1, "total": 1},
        "math": {"accuracy": 0.5, "correct": 1, "total": 2},
    }
    assert list(metrics["per_l2_category"]) == ["image emotion", "geometry", "statistical reasoning"]
    assert metrics["macro_l2_accuracy"] == pytest.approx(2 / 3)


def test_mmstar_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="reading .parquet needs pyarrow (the 'bench' extra)")
    import pyarrow.parquet as pq

    rows = mmstar_rows(True)
    for row in rows:
        row["image"] = {"bytes": png(GREEN), "path": None}
        row["l2_category"] = row.pop("l2-category")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmstar.parquet")
    solver = ScriptedSolver(lambda p, _: "A")
    metrics = run_task("mmstar", tmp_path, solver, tmp_path / "out")["metrics"]
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["per_l2_category"]["geometry"]["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------- AI2D


def test_ai2d_tsv_by_hand(tmp_path: Path) -> None:
    rows = [
        {
            "index": i,
            "question": f"Diagram {i}?",
            "A": "sun",
            "B": "moon",
            "C": "earth",
            "D": "nan",
            "answer": ans,
        }
        | {"image": b64(BLUE)}
        for i, ans in enumerate("ABCA")
    ]
    data = write_tsv(tmp_path / "AI2D_TEST.tsv", rows)
    solver = ScriptedSolver(lambda p, _: "moon" if "Diagram 1" in p else "A")
    result = run_task("ai2d", data, solver, tmp_path / "out")
    assert result["metrics"]["accuracy"] == 0.75 and result["metrics"]["split"] == "test"
    assert (
        solver.prompts[0] == f"{IMAGE_PLACEHOLDER}\nDiagram 0?\nA. sun\nB. moon\nC. earth\n{MC_INSTRUCTION}"
    )


def test_ai2d_release_folder_with_test_ids(tmp_path: Path) -> None:
    root = tmp_path / "ai2d"
    (root / "questions").mkdir(parents=True)
    (root / "images").mkdir()
    for image in ("1", "2"):
        Image.new("RGB", (8, 8), RED).save(root / "images" / f"{image}.png")
        questions = {
            f"What is {image}-{q}?": {
                "answerTexts": ["w", "x", "y", "z"],
                "correctAnswer": q,
                "abcLabel": False,
            }
            | {"questionId": f"{image}.png-{q}"}
            for q in range(2)
        }
        (root / "questions" / f"{image}.png.json").write_text(
            json.dumps({"imageName": f"{image}.png", "questions": questions})
        )
    solver = ScriptedSolver(lambda p, _: "B")
    result = run_task("ai2d", root, solver, tmp_path / "all")
    assert result["samples"] == 4 and result["metrics"]["split"] == "all"
    assert result["metrics"]["accuracy"] == 0.5
    (tmp_path / "ai2d_test_ids.csv").write_text("2\n")
    result = run_task("ai2d", tmp_path, solver, tmp_path / "test")
    assert [r["id"] for r in result["records"]] == ["2.png-0", "2.png-1"]
    assert result["metrics"]["split"] == "test"
    assert result["metrics"]["accuracy"] == 0.5


# ---------------------------------------------------------------------------------------------------- MMMU

ABCD = {"A": "Baroque", "B": "Rococo", "C": "Gothic", "D": "Renaissance"}


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is (B).", "B"),
        ("A. Baroque", "A"),  # "A." form
        ("I think C is right, but D is also possible", "D"),  # several: the one written last
        ("(A) or maybe (B)? I would say (A)", "A"),  # brackets win; the last one written
        ("The painting is an example of the Gothic style", "C"),  # more than five words: the option's text
        ("Gothic", None),  # five words or fewer and no letter: a random pick
    ],
)
def test_mmmu_multiple_choice_parsing(response: str, letter: str | None) -> None:
    picked, guessed = mmmu.parse_multi_choice_response(response, ABCD, random.Random("mmmu:x"))
    assert guessed == (letter is None)
    if letter is not None:
        assert picked == letter


def test_mmmu_random_pick_is_seeded_by_question() -> None:
    picks = {
        mmmu.parse_multi_choice_response("no idea", ABCD, random.Random(f"mmmu:{q}"))[0] for q in range(40)
    }
    again = {
        mmmu.parse_multi_choice_response("no idea", ABCD, random.Random(f"mmmu:{q}"))[0] for q in range(40)
    }
    assert picks == again and len(picks) > 1


def test_mmmu_open_parsing() -> None:
    assert mmmu.parse_open_response("The answer is 3.5 m") == ["3.5 m", 3.5]
    assert mmmu.eval_open("3.50", mmmu.parse_open_response("The answer is 3.5 m"))
    assert mmmu.eval_open("1000", mmmu.parse_open_response("so the total is 1,000 dollars"))
    assert mmmu.eval_open(["24", "twenty-four"], mmmu.parse_open_response("Twenty-four"))
    assert not mmmu.eval_open("2", mmmu.parse_open_response("The result is 12"))
    assert mmmu.key_subresponses("x = 5\ny is 7") == ["7"]  # "=" counts only in the last part
    assert mmmu.key_subresponses("Therefore, it is 4 = 2 + 2") == ["2 + 2"]  # the shortest tail
    assert mmmu.normalize_str("c") == [" c", "c "]  # one letter must stand alone
    assert not mmmu.eval_open("c", mmmu.parse_open_response("cat"))
    # MMMU's three patterns, quirks included: the plain pattern also finds "234" and the "3" of "5e3"
    assert mmmu.extract_numbers("1,234 and 5e3 and -7.5") == ["1,234", "5e3", "234", "3", "-7.5"]


def test_mmmu_images_follow_their_markers() -> None:
    images = {1: "one", 2: "two", 3: "three"}
    prompt, placed = mmmu.place_images("Compare <image 2> with <image 1>; again <image 2>.", images, "q")
    assert (
        prompt
        == f"{IMAGE_PLACEHOLDER}\nCompare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER}; again {IMAGE_PLACEHOLDER}."
    )
    assert placed == ("three", "two", "one", "two")
    with pytest.raises(ValueError, match="no such image"):
        mmmu.place_images("See <image 4>", images, "q")


def mmmu_tsv_rows() -> list[dict[str, Any]]:
    two = str([b64(RED), b64(GREEN)])
    return [
        {
            "index": 1,
            "id": "dev_Art_1",
            "split": "dev",
            "question": "skip",
            "A": "x",
            "B": "y",
            "answer": "A",
            "image": b64(RED),
        },
        {"index": 2, "id": "validation_Art_1", "split": "validation", "question": "Which style is <image 1>?"}
        | {"A": "Baroque", "B": "Rococo", "answer": "B", "image": b64(RED)},
        {
            "index": 3,
            "id": "validation_Math_1",
            "split": "validation",
            "question": "Sum of <image 1> and <image 2>?",
        }
        | {"A": "nan", "B": "nan", "answer": "3.5", "image": two},
        {
            "index": 4,
            "id": "validation_Computer_Science_2",
            "split": "validation",
            "question": "Which option?",
        }
        | {"A": "<image 1>", "B": "<image 2>", "answer": "A", "image": two},
    ]


def test_mmmu_tsv_by_hand(tmp_path: Path) -> None:
    data = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", mmmu_tsv_rows())
    answers = {"Which style": "(B) Rococo", "Sum of": "The sum is 3.50", "Which option": "B"}
    solver = ScriptedSolver(lambda p, _: next(a for k, a in answers.items() if k in p))
    result = run_task("mmmu", data, solver, tmp_path / "out")
    metrics = result["metrics"]
    assert result["samples"] == 3 and (metrics["multiple_choice"], metrics["open"]) == (2, 1)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["random_picks"] == 0
    assert metrics["per_discipline"] == {
        "Art & Design": {"accuracy": 1.0, "correct": 1, "total": 1},
        "Science": {"accuracy": 1.0, "correct": 1, "total": 1},
        "Tech & Engineering": {"accuracy": 0.0, "correct": 0, "total": 1},
    }
    assert list(metrics["per_subject"]) == ["Art", "Math", "Computer_Science"]
    assert (
        solver.prompts[0] == f"Which style is {IMAGE_PLACEHOLDER}?\nA. Baroque\nB. Rococo\n\n{MC_INSTRUCTION}"
    )
    assert solver.prompts[1] == f"Sum of {IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}?\n\n{SHORT_ANSWER}"
    assert solver.prompts[2].count(IMAGE_PLACEHOLDER) == 2  # the options' markers too


def test_mmmu_tsv_subject_from_category(tmp_path: Path) -> None:
    rows = [
        {"index": 5, "split": "validation", "question": "Q <image 1>", "A": "x", "B": "y", "answer": "A"}
        | {"category": "Art Theory", "l2-category": "Art & Design", "image": b64(RED)},
        {"index": 6, "split": "validation", "question": "Q2 <image 1>", "A": "x", "B": "y", "answer": "B"}
        | {"category": "Astronomy", "l2-category": "Science", "image": b64(RED)},
    ]
    data = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)
    metrics = run_task("mmmu", data, ScriptedSolver(lambda p, _: "A"), tmp_path / "out")["metrics"]
    assert list(metrics["per_subject"]) == ["Art_Theory", "Astronomy"]
    assert metrics["per_discipline"] == {
        "Art & Design": {"accuracy": 1.0, "correct": 1, "total": 1},
        "Science": {"accuracy": 0.0, "correct": 0, "total": 1},
    }


def test_mmmu_parquet_folder(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="reading .parquet needs pyarrow (the 'bench' extra)")
    import pyarrow.parquet as pq

    for subject, rows in {
        "Art": [("validation_Art_1", "Style of <image 1>?", "['Baroque', 'Rococo']", "B", "multiple-choice")],
        "Math": [("validation_Math_1", "Compute <image 2> minus <image 1>", "[]", "2", "open")],
    }.items():
        records = [
            {"id": i, "question": q, "options": o, "answer": a, "question_type": t, "subfield": "s"}
            | {f"image_{k}": ({"bytes": png(RED), "path": None} if k <= 2 else None) for k in range(1, 8)}
            for i, q, o, a, t in rows
        ]
        (tmp_path / "MMMU" / subject).mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist(records), tmp_path / "MMMU" / subject / "validation-00000-of-00001.parquet"
        )
    solver = ScriptedSolver(lambda p, _: "B" if "Style" in p else "It is 2")
    result = run_task("mmmu", tmp_path / "MMMU", solver, tmp_path / "out")
    assert result["metrics"]["accuracy"] == 1.0 and result["samples"] == 2
    # image 2 is named only in the Art question's data, not its text: it goes first
    assert solver.prompts[0].startswith(f"{IMAGE_PLACEHOLDER}\nStyle of {IMAGE_PLACEHOLDER}?")
    assert get_task("mmmu").find_data(tmp_path) == tmp_path / "MMMU"


# ------------------------------------------------------------------------------- the driver, end to end


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", sp_model)


def recomputed_accuracy(records: list[dict]) -> float:
    hits = [match_choice(r["prediction"], r["meta"]["options"]) == r["answer"] for r in records]
    return sum(hits) / len(hits)


def test_driver_end_to_end(tmp_path: Path, export: Path) -> None:
    fixtures = {
        "mmbench-en": write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows()),
        "seed-bench": write_seed_release(tmp_path / "seed"),
        "mmstar": write_tsv(tmp_path / "MMStar.tsv", mmstar_rows(False)),
        "ai2d": write_tsv(
            tmp_path / "AI2D_TEST.tsv",
            [{"index": 0, "question": "Q?", "A": "a", "B": "b", "answer": "B", "image": b64(RED)}],
        ),
        "mmmu": write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", mmmu_tsv_rows()),
    }
    for name, data in fixtures.items():
        out = tmp_path / f"out-{name}"
        result = evaluate(name, export, data=data, limit=2, batch_size=2, progress=False, output=out)
        assert result["errors"] == 0, result["error_examples"]
        assert Path(result["files"]["json"]).is_file() and Path(result["files"]["markdown"]).is_file()
        records, metrics = result["records"], result["metrics"]
        assert result["questions"] <= 2 and len(records) == result["samples"]
        lines = Path(result["files"]["predictions"]).read_text(encoding="utf-8").splitlines()
        assert len(lines) == 1 + result["samples"]  # the settings line, then one answer per prompt
        if name == "mmbench-en":
            assert result["samples"] == 6 and Path(result["files"]["submission"]).is_file()
            by_question: dict[int, list[bool]] = {}
            for r in records:
                hit = match_choice(r["prediction"], r["meta"]["options"]) == r["answer"]
                by_question.setdefault(r["meta"]["question"], []).append(hit)
            assert metrics["circular_accuracy"] == sum(map(all, by_question.values())) / 2
        elif name == "mmmu":
            rng = lambda r: random.Random(f"mmmu:{r['id']}")  # noqa: E731
            hits = [
                mmmu.eval_multi_choice(
                    r["answer"],
                    mmmu.parse_multi_choice_response(r["prediction"], r["meta"]["options"], rng(r))[0],
                )
                if r["meta"]["options"]
                else mmmu.eval_open(r["answer"], mmmu.parse_open_response(r["prediction"]))
                for r in records
            ]
            assert metrics["accuracy"] == sum(hits) / len(hits)
        else:
            assert metrics["accuracy"] == pytest.approx(recomputed_accuracy(records))
        assert result["headline"]["value"] == metrics[result["headline"]["metric"]]


def test_all_understanding_finds_the_files(tmp_path: Path) -> None:
    write_tsv(tmp_path / "MMBench_DEV_CN.tsv", mmbench_rows())
    write_tsv(tmp_path / "AI2D_TEST.tsv", mmbench_rows()[:1])
    write_seed_release(tmp_path / "seed")
    found = {
        name
        for name in ("mmbench-cn", "mmbench-en", "ai2d", "seed-bench", "mmstar", "mmmu")
        if get_task(name).find_data(tmp_path) is not None
    }
    assert found == {"mmbench-cn", "ai2d", "seed-bench"}
