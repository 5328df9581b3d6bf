"""unified_mllm.io: atomic files and directories, finished-output reuse; unified_mllm.progress off a terminal."""

from __future__ import annotations

import io as std_io
import json
from pathlib import Path

import pytest

from unified_mllm import io
from unified_mllm.progress import LineProgress, progress


def test_a_writer_that_raises_leaves_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    io.write_json(target, {"steps": 1})
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half a docu")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"steps": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left behind


def test_write_json_replaces_and_reads_back(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "a.json"
    io.write_json(target, {"b": [1, 2]}, indent=1, sort_keys=True)
    io.write_json(target, {"b": [3]})
    assert io.read_json(target) == {"b": [3]} and target.read_text().endswith("\n")
    (tmp_path / "cut.json").write_text('{"b": ')
    assert io.read_json(tmp_path / "cut.json") is None and io.read_json(tmp_path / "missing.json") is None


def test_atomic_directory_replaces_a_directory_whole(tmp_path: Path) -> None:
    target = tmp_path / "export"
    with io.atomic_directory(target) as tmp:
        (tmp / "old.bin").write_bytes(b"1")
    with io.atomic_directory(target) as tmp:
        assert not target.joinpath("new.bin").exists()  # nothing shows under the final name before the end
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.bin").write_bytes(b"2")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/new.bin"]
    with pytest.raises(KeyboardInterrupt), io.atomic_directory(target) as tmp:
        (tmp / "partial.bin").write_bytes(b"3")
        raise KeyboardInterrupt
    assert (target / "sub" / "new.bin").read_bytes() == b"2" and not (target / "partial.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_stale_temporaries_are_found_by_their_target_name(tmp_path: Path) -> None:
    tmp = io.begin_directory(tmp_path / "step-00000002")
    (tmp_path / "step-00000001").mkdir()
    other = io.begin_directory(tmp_path / "export")
    assert io.stale_temporaries(tmp_path, "step-") == [tmp]
    assert io.remove_stale_temporaries(tmp_path) == sorted([tmp, other])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_finished_output_is_reused_only_with_the_same_settings(tmp_path: Path) -> None:
    record = tmp_path / "train_summary.json"
    assert io.finished_output(record, {"fingerprint": {"lr": 1}}) is None  # nothing written yet
    (tmp_path / "model.safetensors").write_bytes(b"w")
    io.write_json(record, {"fingerprint": {"lr": 1, "sizes": [1, 2]}, "steps": 5})
    same = {"fingerprint": {"lr": 1, "sizes": (1, 2)}}  # tuples compare as JSON reads them back
    assert io.finished_output(record, same, ("model.safetensors",)) == {
        "fingerprint": {"lr": 1, "sizes": [1, 2]},
        "steps": 5,
    }
    assert io.finished_output(record, {"fingerprint": {"lr": 2, "sizes": [1, 2]}}) is None
    assert io.finished_output(record, same, ("model.safetensors", "config.json")) is None
    assert io.finished_output(record, same, lambda r: [f"shard-{r['steps']}.tar"]) is None


def test_progress_off_a_terminal_prints_a_line_every_few_percent() -> None:
    out = std_io.StringIO()
    bar = progress(total=1000, desc="train", unit="step", file=out, every_percent=5)
    assert isinstance(bar, LineProgress)
    for step in range(1000):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 21  # 0 %, then every 5 % up to 100 %
    assert lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%")
    assert "1000/1000" in lines[-1] and "loss=0.001" in lines[-1]
    assert max(len(line) for line in lines) <= 120


def test_progress_over_an_iterable_resumed_and_disabled() -> None:
    out = std_io.StringIO()
    assert list(progress(range(7), desc="x", file=out, every_percent=50)) == list(range(7))
    assert [line.split("|")[0] for line in out.getvalue().splitlines()] == ["x:   0%", "x:  57%", "x: 100%"]
    out = std_io.StringIO()
    bar = progress(total=10, initial=4, desc="resumed", file=out)
    bar.update(3)  # the final count is printed on close even between two percent marks
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and " 4/10 " in lines[0] and " 7/10 " in lines[1]
    out = std_io.StringIO()
    bar = progress(total=10, desc="off", file=out, disable=True)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""


def test_progress_on_a_terminal_is_plain_tqdm() -> None:
    class Terminal(std_io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    bar = progress(total=3, desc="tty", file=out)
    bar.update(3)
    bar.close()
    assert not isinstance(bar, LineProgress) and "\r" in out.getvalue()
