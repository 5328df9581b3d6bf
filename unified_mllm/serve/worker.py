"""The engine worker: one thread owns the model and runs the continuous batcher; HTTP handlers talk to it.

Handlers (on the event loop) submit *jobs* and read their events from an ``asyncio.Queue``; the worker posts
to that queue with ``call_soon_threadsafe``. A chat job is ``n`` rows of the
:class:`~unified_mllm.infer.batching.ContinuousBatcher`, decoded together with every other active row; after each
step the worker turns a streamed request's new ids into text deltas (holding back text that may be the start
of a stop string) and ends a row at a stop string; a request that is not streamed gets each choice's text
once, when it ends (no event-loop wake-up per token). An image job is one ``generate_img`` call (its ``n`` images in one
batch), run between two chat steps.

Admission is bounded: at most ``max_batch + max_queue`` jobs are in flight; one more is refused
(:class:`QueueFull`, a 429) instead of waiting without bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from unified_mllm.infer.batching import ContinuousBatcher, Row, Sampling
from unified_mllm.infer.solver import Answer, InferenceSolver

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests in flight."""


@dataclass(frozen=True)
class Delta:
    """New text of one choice; ``finish`` is set on the choice's last delta."""

    index: int
    text: str
    finish: str | None = None


@dataclass(frozen=True)
class Done:
    """The job ended: ids written per choice; ``error`` when the engine failed."""

    completion_tokens: int
    error: str | None = None


@dataclass(frozen=True)
class Images:
    """The pictures of an image job, or the error it met."""

    pictures: list[Image.Image]
    error: str | None = None
    client_error: bool = False


@dataclass(eq=False)
class ChatJob:
    answer: Answer
    n: int
    sampling: list[Sampling]
    stop: list[str]
    post: Callable[[Any], None]
    stream: bool = True
    """False: the client wants the whole answer; no text is decoded or posted before a choice ends."""
    rows: list[Row] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    open_rows: int = 0
    cancelled: bool = False
    ended: bool = False


@dataclass(eq=False)
class ImageJob:
    prompt: str
    n: int
    options: dict[str, Any]
    post: Callable[[Any], None]
    cancelled: bool = False
    ended: bool = False


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (not sent yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class EngineWorker:
    """The thread that decodes (module docstring). ``start()`` it, ``stop()`` it on shutdown."""

    def __init__(self, solver: InferenceSolver, *, max_batch: int, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.solver = solver
        self.batcher = ContinuousBatcher(solver, max_batch=max_batch)
        self.capacity = max_batch + max_queue
        self.max_batch = max_batch
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._images: deque[ImageJob] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self.steps = 0

    # ----------------------------------------------------------------------------- handler side (any thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _admit(self) -> None:
        with self._lock:
            if self._in_flight >= self.capacity:
                raise QueueFull(
                    f"the server is at capacity ({self.capacity} requests in flight: --max-batch "
                    f"{self.max_batch} + --max-queue {self.capacity - self.max_batch}); retry later"
                )
            self._in_flight += 1

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def submit_chat(self, job: ChatJob) -> None:
        """Queue a chat job (QueueFull when at capacity); its events go to ``job.post``."""
        self._admit()
        self._inbox.put(lambda: self._start_chat(job))

    def submit_image(self, job: ImageJob) -> None:
        self._admit()
        self._inbox.put(lambda: self._images.append(job))

    def cancel(self, job: ChatJob | ImageJob) -> None:
        """Stop a job (timeout, client gone); safe from any thread, a no-op once it ended."""
        self._inbox.put(lambda: self._cancel(job))

    # ---------------------------------------------------------------------------------- worker thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=not (self.batcher.busy or self._images))
            if self._images:
                self._run_image(self._images.popleft())
                continue
            if not self.batcher.busy:
                continue
            try:
                stepped = self.batcher.step()
            except Exception as exc:  # an engine failure must end every request, never leave one hanging
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(exc).__name__}: {exc}")
                continue
            self.steps += 1
            for row in stepped:
                self._progress(row)

    def _drain(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        self._do(command)
        while True:
            try:
                self._do(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _do(self, command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:  # a bad command must not take the worker (and every later request) down
            log.exception("engine worker command failed")

    def _start_chat(self, job: ChatJob) -> None:
        if job.cancelled:
            job.ended = True
            self._release()
            return
        try:
            self._add_rows(job)
        except Exception as exc:
            log.exception("could not start a chat job")
            for row in job.rows:
                self.batcher.cancel(row)
            self._finish(job, Done(0, error=f"could not start the request: {type(exc).__name__}: {exc}"))

    def _add_rows(self, job: ChatJob) -> None:
        for index in range(job.n):
            # Every choice decodes its own copy of the prompt state (ids grow, images may be drawn).
            answer = dataclasses.replace(
                job.answer,
                ids=list(job.answer.ids),
                views=list(job.answer.views),
                indices=list(job.answer.indices),
                pieces=[],
                stacks=list(job.answer.stacks),
            )
            job.rows.append(self.batcher.submit(answer, job.sampling[index], key=(job, index)))
            job.sent.append("")
        job.open_rows = job.n

    def _progress(self, row: Row) -> None:
        job, index = row.key
        if row.finish is None and not job.stream and not job.stop:
            return  # nothing to send or check yet: spare the event loop a wake-up per token
        text = self.batcher.text(row)
        finish = row.finish
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0 and (finish is None or finish == "length"):
            text, finish = text[:cut], "stop"
            if row.finish is None:
                self.batcher.cancel(row)
        if finish is None:
            # Hold back a possible stop-string start and an unfinished multi-byte character.
            text = text[: len(text) - held_back(text, job.stop)].rstrip("\ufffd")
        sent = job.sent[index]
        if not text.startswith(sent):  # decoding a longer prefix changed earlier text: wait for it to settle
            if finish is None:
                return
            text = sent + text[len(sent) :]
        delta = text[len(sent) :]
        job.sent[index] = text
        if delta or finish is not None:
            job.post(
                Delta(index, delta, None if finish is None else ("length" if finish == "length" else "stop"))
            )
        if finish is not None:
            job.open_rows -= 1
            if job.open_rows == 0:
                self._finish(job, Done(sum(r.written for r in job.rows)))

    def _finish(self, job: ChatJob | ImageJob, event: Any) -> None:
        if not job.ended:
            job.ended = True
            self._release()
            job.post(event)

    def _cancel(self, job: ChatJob | ImageJob) -> None:
        job.cancelled = True
        if isinstance(job, ChatJob):
            for row in job.rows:
                self.batcher.cancel(row)
            if job.rows:
                self._finish(job, Done(sum(r.written for r in job.rows), error="cancelled"))
        elif job in self._images:
            self._images.remove(job)
            self._finish(job, Images([], error="cancelled"))

    def _run_image(self, job: ImageJob) -> None:
        try:
            pictures = self.solver.generate_img([job.prompt] * job.n, **job.options)
            event = Images(pictures)
        except ValueError as exc:
            event = Images([], error=str(exc), client_error=True)
        except Exception as exc:
            log.exception("image generation failed")
            event = Images([], error=f"image generation failed: {type(exc).__name__}: {exc}")
        self._finish(job, event)

    def _fail_all(self, message: str) -> None:
        jobs = {row.key[0] for row in [*self.batcher.rows, *self.batcher.waiting]}
        self.batcher = ContinuousBatcher(self.solver, max_batch=self.batcher.max_batch)
        for job in jobs:
            self._finish(job, Done(0, error=message))


def poster(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Any]) -> Callable[[Any], None]:
    """A thread-safe ``post(event)`` into ``events`` on ``loop`` (a no-op once the loop closed)."""

    def post(event: Any) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(events.put_nowait, event)

    return post
