"""The benchmark task interface and its registry: every benchmark plugs into ``python -m unified_mllm.eval``.

A task is a :class:`Task` subclass (``name``, ``description``, ``run``, ``format_table`` and optionally
``check``, which fails on missing inputs before the model loads) registered with the :func:`register_task`
class decorator. ``run`` returns a JSON-able dict whose ``"files"`` entry maps a label to each file written.
Tasks talk to the model only through the :class:`Solver` protocol (the methods of
:class:`unified_mllm.infer.solver.InferenceSolver` they use), so tests drive them with small fakes. Tasks that
need user data (GenEval's COCO-based prompts, POPE on COCO, MMBench) take its paths from their constructor or
the config and say in :meth:`Task.check` which path is missing.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from PIL import Image

from unified_mllm.config import Config


@runtime_checkable
class Solver(Protocol):
    """What a task may ask of the model (the InferenceSolver's public methods)."""

    config: Config

    def generate(
        self,
        images: list[list[Image.Image]],
        qas: list[list[list[str | None]]],
        max_gen_len: int = ...,
        temperature: float = ...,
        top_k: int | None = ...,
        seed: int = ...,
    ) -> list[str]:
        """One answer per conversation row: the reply to its last question (whose answer is None)."""

    def generate_img(
        self,
        prompts: list[str],
        *,
        cfg: float | None = None,
        image_top_k: int | None = None,
        temperature: float | None = None,
        size: int | None = None,
        seed: int | None = None,
        jacobi_window: int | None = None,
    ) -> list[Image.Image]:
        """One image per prompt."""


class Task(ABC):
    """One benchmark: asks a solver, scores the answers, writes its files, returns every number."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def check(self, config: Config) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Raise FileNotFoundError / ValueError naming what is missing, before any model is loaded."""

    @abstractmethod
    def run(
        self,
        solver: Solver,
        config: Config,
        *,
        limit: int | None,
        batch_size: int,
        output_dir: Path,
        progress: bool = True,
        model_name: str = "",
    ) -> dict[str, Any]:
        """Evaluate ``solver``; ``limit`` caps the samples of each part; files go under ``output_dir``.

        ``model_name`` (the export directory, for the driver) is written into the outputs.
        """

    @abstractmethod
    def format_table(self, result: dict[str, Any]) -> str:
        """The result of :meth:`run` as a markdown table."""

    def ablated(self) -> Task:
        """The task to run under a solver ablation (``--ablate``): its understanding part only."""
        return self

    def understanding_row(self, result: dict[str, Any]) -> dict[str, float | None]:
        """The understanding figures of a result, one row of the ablation table (``--ablate``)."""
        raise ValueError(f"task {self.name!r} has no understanding figures to compare under --ablate")


class UnknownTaskError(ValueError):
    """A task name that no benchmark registered; the message lists the known ones."""


TASKS: dict[str, type[Task]] = {}
# Modules whose import registers the built-in tasks (imported on first lookup: they import this module), and
# the package whose every module is a benchmark (the paper benchmarks: one module each).
BUILTIN_TASK_MODULES = ("unified_mllm.eval.shapesbench",)
BENCHMARK_PACKAGE = "unified_mllm.eval.benchmarks"
TaskType = TypeVar("TaskType", bound=type[Task])


def register_task(cls: TaskType) -> TaskType:
    """Class decorator: make a task available to the driver under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    if name in TASKS and TASKS[name] is not cls:
        raise ValueError(f"task name {name!r} is taken by {TASKS[name].__qualname__}")
    TASKS[name] = cls
    return cls


def _load_builtin_tasks() -> None:
    for module in BUILTIN_TASK_MODULES:
        importlib.import_module(module)
    package = importlib.import_module(BENCHMARK_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{BENCHMARK_PACKAGE}.{info.name}")


def task_names() -> list[str]:
    """Names of every registered task, the built-in ones included."""
    _load_builtin_tasks()
    return sorted(TASKS)


def get_task(name: str, **options: Any) -> Task:
    """A fresh instance of the task registered as ``name`` (``options`` go to its constructor; one it does not
    take is a ValueError naming it)."""
    _load_builtin_tasks()
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; available tasks: {', '.join(task_names()) or 'none'}")
    accepted = inspect.signature(TASKS[name]).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(
            f"task {name!r} takes no option {', '.join(unknown)} (it takes: {', '.join(accepted) or 'none'})"
        )
    return TASKS[name](**options)


# ----------------------------------------------------------------------------------------------- helpers


def check_limit(limit: int | None, batch_size: int) -> None:
    """``limit`` (None: everything) and ``batch_size`` must be >= 1."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for everything), got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def percent(value: float | None) -> str:
    """'93.10%', or 'n/a' for an empty group (None) or a figure that is not finite."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
