"""The understanding-benchmark base: released-file readers, multiple-choice matching, --limit by question,
the resumable prediction cache, per-sample errors, and the driver's --data / options / all-understanding."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from unified_mllm.config import Config, load_config, save_config
from unified_mllm.eval.__main__ import CONFIG_YAML, evaluate, main
from unified_mllm.eval.benchmark import (
    PREDICTIONS_FILE,
    Sample,
    UnderstandingTask,
    choice_prompt,
    decode_base64_image,
    limit_groups,
    match_choice,
    options_of,
    read_records,
)
from unified_mllm.eval.tasks import TASKS, get_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

OPTIONS = {"A": "a red circle", "B": "a blue square", "C": "cat"}


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("(C) cat", "C"),
        ("Answer: A.", "A"),
        ("The answer is [B]", "B"),
        ("A or B", None),  # two letters: unsettled
        ("It shows a blue square.", "B"),  # no letter: the one option text it contains
        ("a dog", None),  # neither
        ("a", None),  # a lower-case article is not the letter A
        ("cat or a red circle", None),  # two option texts
    ],
)
def test_match_choice_follows_the_toolkits_rule(prediction: str, letter: str | None) -> None:
    assert match_choice(prediction, OPTIONS) == letter


def test_choice_prompt_and_options_of_a_tsv_row() -> None:
    row = {"question": "What is it? ", "A": "cat", "B": "dog", "C": "nan", "D": "bird"}
    options = options_of(row)
    assert options == {"A": "cat", "B": "dog"}  # a missing cell ends the options
    assert choice_prompt("What is it?", options, hint="Look.", instruction="Pick.") == (
        "Look.\nWhat is it?\nA. cat\nB. dog\nPick."
    )


def png_bytes(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_records_reads_every_released_format(tmp_path: Path) -> None:
    big = base64.b64encode(png_bytes() * 20_000).decode()  # far past csv's 128 KiB field limit
    (tmp_path / "a.tsv").write_text(f"index\timage\n0\t{big}\n", encoding="utf-8")
    rows = read_records(tmp_path / "a.tsv")
    assert rows == [{"index": "0", "image": big}]
    assert decode_base64_image(rows[0]["image"], "row 0") == png_bytes() * 20_000
    (tmp_path / "b.jsonl").write_text('{"q": 1}\n\n{"q": 2}\n', encoding="utf-8")
    assert read_records(tmp_path / "b.jsonl") == [{"q": 1}, {"q": 2}]
    (tmp_path / "c.json").write_text('{"k1": {"q": 1}, "k2": {"id": "x", "q": 2}}', encoding="utf-8")
    assert read_records(tmp_path / "c.json") == [{"id": "k1", "q": 1}, {"id": "x", "q": 2}]
    pq = pytest.importorskip("pyarrow.parquet", reason="the bench extra (pyarrow) is not installed")
    import pyarrow as pa

    pq.write_table(
        pa.table({"q": [1, 2], "image": [{"bytes": b"x"}, {"bytes": b"y"}]}), tmp_path / "d.parquet"
    )
    assert read_records(tmp_path / "d.parquet") == [
        {"q": 1, "image": {"bytes": b"x"}},
        {"q": 2, "image": {"bytes": b"y"}},
    ]


def test_read_records_names_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tsv"):
        read_records(tmp_path / "nowhere.tsv")
    (tmp_path / "x.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.json is not a readable json file"):
        read_records(tmp_path / "x.json")
    (tmp_path / "x.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported benchmark file type .\.txt."):
        read_records(tmp_path / "x.txt")


def test_a_sample_needs_one_placeholder_per_image() -> None:
    with pytest.raises(
        ValueError, match=r"sample q1: the prompt has 0 <\|image\|> placeholder\(s\) but 1 image"
    ):
        Sample("q1", "what is it?", images=(png_bytes(),))
    assert Sample("q1", "hi").group == "q1"


def test_limit_keeps_whole_questions() -> None:
    samples = [Sample(f"{g}-{k}", "p", group=g) for g in "xyz" for k in range(2)]
    assert [s.id for s in limit_groups(samples, 2)] == ["x-0", "x-1", "y-0", "y-1"]
    assert limit_groups(samples, None) == samples


# ------------------------------------------------------------------------------------------ a toy task


class ToyTask(UnderstandingTask):
    """Rows of a JSONL file: {"id", "question", "answer", "color"} asked with one image of that colour; two
    rotations per question (group), right when both are."""

    name = "toy-bench"
    description = "Toy benchmark"
    files = "toy.jsonl"
    data_names = ("toy/*.jsonl",)
    reported = "Paper 50.0"

    def load(self, path: Path) -> list[Sample]:
        return [
            Sample(
                f"{row['id']}-{turn}",
                IMAGE_PLACEHOLDER + row["question"] + "?" * turn,
                images=(png_bytes(row["color"]) if row["color"] != "broken" else b"not an image",),
                answer=row["answer"],
                group=row["id"],
            )
            for row in read_records(path)
            for turn in range(2)
        ]

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        right: dict[str, bool] = {}
        for sample, prediction in zip(samples, predictions):
            right[sample.group] = right.get(sample.group, True) and prediction == sample.answer
        return {"accuracy": sum(right.values()) / len(right), "right": sum(right.values())}


class FakeSolver:
    """Answers by prompt from a table ("?" if absent); refuses prompts holding "LONG"; records each batch."""

    def __init__(self, answers: dict[str, str], config: Config) -> None:
        self.answers = answers
        self.config = config
        self.batches: list[list[str]] = []

    def generate(
        self, images: list, qas: list, max_gen_len: int = 0, temperature: float = 0.0, seed: int = 0
    ):
        prompts = [conversation[-1][0] for conversation in qas]
        assert all(len(i) == p.count(IMAGE_PLACEHOLDER) for i, p in zip(images, prompts))
        if any("LONG" in p for p in prompts):
            raise ValueError("the prompt has 900 ids; the model reads at most 512 positions")
        self.batches.append(prompts)
        return [" " + self.answers.get(p, "?") + " " for p in prompts]


ROWS = [
    {"id": "q1", "question": "colour", "answer": "red", "color": "red"},
    {"id": "q2", "question": "shape", "answer": "circle", "color": "blue"},
    {"id": "q3", "question": "LONG", "answer": "x", "color": "blue"},
    {"id": "q4", "question": "count", "answer": "2", "color": "broken"},
]


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(TASKS, ToyTask.name, ToyTask)
    path = tmp_path / "data" / "toy" / "toy.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    path = tmp_path / "export"
    path.mkdir()
    save_config(load_config(overrides=["model.preset=tiny"]), path / CONFIG_YAML)
    return path


def fake(export_dir: Path) -> FakeSolver:
    answers = {
        f"{IMAGE_PLACEHOLDER}colour": "red",
        f"{IMAGE_PLACEHOLDER}colour?": "red",
        f"{IMAGE_PLACEHOLDER}shape": "circle",
        f"{IMAGE_PLACEHOLDER}shape?": "square",  # q2 fails its second rotation
    }
    return FakeSolver(answers, load_config([export_dir / CONFIG_YAML]))


def test_a_task_scores_caches_and_records_errors(toy: Path, export_dir: Path, tmp_path: Path) -> None:
    solver = fake(export_dir)
    result = evaluate("toy-bench", export_dir, data=toy, batch_size=3, solver=solver, progress=False)
    assert result["metrics"] == {"accuracy": 0.25, "right": 1}
    assert result["headline"] == {"metric": "accuracy", "value": 0.25, "scale": "percent"}
    assert (result["samples"], result["questions"], result["asked"]) == (8, 4, 8)
    # q3's prompts do not fit and q4's image does not decode: four errors, the other samples answered.
    assert result["errors"] == 4
    assert set(result["error_examples"]) == {"q3-0", "q3-1", "q4-0", "q4-1"}
    assert "512 positions" in result["error_examples"]["q3-0"]
    assert result["error_examples"]["q4-0"].startswith("unreadable image <12 bytes>")
    assert [r["prediction"] for r in result["records"]] == ["red", "red", "circle", "square", "", "", "", ""]
    out = export_dir / "eval" / "toy-bench"
    assert json.loads((out / "toy-bench.json").read_text())["metrics"]["right"] == 1
    assert "| accuracy | 25.00% |" in (out / "toy-bench.md").read_text()
    lines = (out / PREDICTIONS_FILE).read_text().splitlines()
    assert json.loads(lines[0])["settings"]["task"] == "toy-bench"
    assert len(lines) == 1 + 8


def test_a_killed_run_continues_and_a_changed_prompt_is_asked_again(
    toy: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = fake(export_dir)
    evaluate("toy-bench", export_dir, data=toy, limit=2, batch_size=2, solver=first, progress=False)
    assert sum(len(b) for b in first.batches) == 4
    cache = export_dir / "eval" / "toy-bench" / PREDICTIONS_FILE
    # A kill in the middle of an append leaves half a line: that answer is asked again.
    cache.write_text(cache.read_text()[:-20], encoding="utf-8")
    second = fake(export_dir)
    result = evaluate("toy-bench", export_dir, data=toy, batch_size=2, solver=second, progress=False)
    asked = [p for b in second.batches for p in b]
    assert asked == [f"{IMAGE_PLACEHOLDER}shape?"]  # q2-1 (cut) + q3/q4 fail before reaching the fake
    assert result["metrics"]["right"] == 1
    # The same ids with other prompts are asked again.
    monkeypatch.setattr(ToyTask, "load", lambda self, path: [Sample("q1-0", "new prompt", answer="red")])
    third = fake(export_dir)
    evaluate("toy-bench", export_dir, data=toy, solver=third, progress=False)
    assert third.batches == [["new prompt"]]


def test_a_cache_of_other_settings_is_refused_unless_restarted(
    toy: Path, export_dir: Path, tmp_path: Path
) -> None:
    evaluate("toy-bench", export_dir, data=toy, limit=1, solver=fake(export_dir), progress=False)
    other = fake(export_dir)
    with pytest.raises(ValueError, match=r"other settings \(seed differ\); pass --restart"):
        evaluate("toy-bench", export_dir, data=toy, limit=1, solver=other, overrides=["generation.seed=7"])
    evaluate(
        "toy-bench",
        export_dir,
        data=toy,
        limit=1,
        solver=other,
        overrides=["generation.seed=7"],
        options={"restart": True},
        progress=False,
    )
    assert sum(len(b) for b in other.batches) == 2


def test_all_understanding_runs_what_it_finds_and_summarises(
    toy: Path, export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = evaluate(
        "all-understanding", export_dir, data=tmp_path / "data", solver=fake(export_dir), progress=False
    )
    assert summary["benchmarks"] == {"toy-bench": {"metric": "accuracy", "value": 0.25, "scale": "percent"}}
    table = (export_dir / "eval" / "summary.md").read_text()
    assert "| toy-bench | accuracy | 25.0 | 8 | Paper 50.0 |" in table
    assert (export_dir / "eval" / "toy-bench" / "toy-bench.json").is_file()
    with pytest.raises(FileNotFoundError, match="no understanding benchmark's files under"):
        evaluate("all-understanding", export_dir, data=tmp_path / "export", solver=fake(export_dir))


def test_the_driver_names_missing_data_and_options_a_task_does_not_take(
    toy: Path, export_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(
        SystemExit, match=r"error: toy-bench reads its released files: pass --data PATH \(toy.jsonl\)"
    ):
        main(["--task", "toy-bench", "--model", str(export_dir)])
    with pytest.raises(SystemExit, match=r"error: toy-bench: --data .*nowhere does not exist"):
        main(["--task", "toy-bench", "--model", str(export_dir), "--data", str(toy.parent / "nowhere")])
    with pytest.raises(SystemExit, match="error: task 'shapesbench' takes no option data"):
        main(["--task", "shapesbench", "--model", str(export_dir), "--data", str(toy)])
    with pytest.raises(ValueError, match="takes no option scores"):
        get_task("toy-bench", scores="x.jsonl")
