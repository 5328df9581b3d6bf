"""The FastAPI application: OpenAI's routes over one export, decoded by the engine worker.

Every refusal is a 4xx with OpenAI's error body (:class:`~unified_mllm.serve.protocol.ApiError`): a malformed
body (400, pydantic's complaint with the field as ``param``), a limit exceeded (400), an unknown model (404), a
full queue (429), a request over its time (408). Work that may block (reading and VQ-encoding the prompt's
images) runs in the thread pool; decoding runs in the engine worker.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from unified_mllm.infer.batching import Sampling
from unified_mllm.infer.solver import Answer, InferenceSolver
from unified_mllm.serve.protocol import (
    ApiError,
    ChatRequest,
    ImageRequest,
    Limits,
    bad_request,
    conversation,
    parse_size,
    stop_strings,
)
from unified_mllm.serve.worker import ChatJob, Delta, Done, EngineWorker, ImageJob, Images, QueueFull, poster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """The server's flags (``python -m unified_mllm.serve --help``)."""

    model_name: str
    max_batch: int = 32
    max_queue: int = 64
    timeout: float = 300.0
    """Seconds a request may take, queueing included."""
    limits: Limits = field(default_factory=Limits)


def create_app(solver: InferenceSolver, options: ServerOptions) -> FastAPI:
    """The app; its lifespan starts and stops the engine worker."""
    api = Api(solver, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        api.worker.start()
        yield
        api.worker.stop()

    app = FastAPI(title="unified_mllm", lifespan=lifespan)
    app.state.worker = api.worker
    app.middleware("http")(api.body_limit)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model}", api.model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"], response_model=None)
    app.add_api_route("/v1/images/generations", api.images, methods=["POST"], response_model=None)
    return app


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's first complaint about the body, with the field it names as OpenAI's ``param``."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else f"invalid request body: {first['msg']}"
    return _error(bad_request(message, param))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (an unknown route, a wrong method) in OpenAI's error shape."""
    code = "not_found" if exc.status_code == 404 else None
    return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))


class Api:
    """The routes' work over one solver and its engine worker: the checks every request gets, the chat and
    image jobs (prepared, submitted, awaited) and the responses they make."""

    def __init__(self, solver: InferenceSolver, options: ServerOptions) -> None:
        self.solver = solver
        self.options = options
        self.limits = options.limits
        self.worker = EngineWorker(solver, max_batch=options.max_batch, max_queue=options.max_queue)
        self.created = int(time.time())
        room = solver.model.config.lm.max_position_embeddings - 1
        self.max_prompt = min(room, self.limits.max_prompt_tokens or room)

    # ---- checks shared by the routes ----

    async def body_limit(self, request: Request, call_next: Any) -> Any:
        """Middleware: a body over ``--max-body-mb`` (or of no stated length) is refused before it is read."""
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.limits.max_body_bytes:
            return _error(
                ApiError(
                    413,
                    f"the request body is {length} bytes; this server accepts at most "
                    f"{self.limits.max_body_bytes} (--max-body-mb)",
                    code="request_too_large",
                )
            )
        return await call_next(request)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.options.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.options.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_n(self, n: int) -> None:
        if n > self.limits.max_n:
            raise bad_request(f"n is {n}; this server allows at most {self.limits.max_n} (--max-n)", "n")

    def submit(self, job: ChatJob | ImageJob) -> None:
        if not self.worker.alive:
            raise ApiError(503, "the engine worker is not running", kind="server_error", code="unavailable")
        try:
            self.worker.submit_chat(job) if isinstance(job, ChatJob) else self.worker.submit_image(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), kind="rate_limit_error", code="queue_full") from exc

    def timed_out(self) -> ApiError:
        return ApiError(
            408,
            f"the request took longer than this server's {self.options.timeout:g} s limit (--timeout)",
            kind="timeout_error",
            code="timeout",
        )

    async def next_event(self, job: ChatJob | ImageJob, events: asyncio.Queue[Any], deadline: float) -> Any:
        """The job's next event; past ``deadline`` the job is cancelled and the request times out (408)."""
        try:
            return await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError as exc:
            self.worker.cancel(job)
            raise self.timed_out() from exc

    # ---- GET routes ----

    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.worker.alive else "stopped",
            "model": self.options.model_name,
            "in_flight": self.worker.in_flight,
            "max_batch": self.options.max_batch,
            "steps": self.worker.steps,
        }

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.options.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "unified_mllm",
        }

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model: str) -> dict[str, Any]:
        self.check_model(model)
        return self.model_card()

    # ---- chat completions ----

    async def chat(self, body: ChatRequest) -> JSONResponse | StreamingResponse:
        deadline = time.monotonic() + self.options.timeout
        job, events = await self.prepare_chat(body)
        self.submit(job)
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                self.stream_chat(job, events, ident, usage, deadline), media_type="text/event-stream"
            )
        return await self.collect_chat(job, events, ident, deadline)

    async def prepare_chat(self, body: ChatRequest) -> tuple[ChatJob, asyncio.Queue[Any]]:
        """The checked request as a job (its prompt read and encoded) and the queue its events will come to."""
        self.check_model(body.model)
        self.check_n(body.n)
        stops = stop_strings(body.stop, self.limits)
        images, qas = conversation(body.messages, self.limits)
        answer = await self.prompt(images, qas, self.token_budget(body))
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = ChatJob(
            answer=answer,
            n=body.n,
            sampling=self.sampling(body),
            stop=stops,
            post=poster(asyncio.get_running_loop(), events),
            stream=body.stream,
        )
        return job, events

    def token_budget(self, body: ChatRequest) -> int:
        """The completion's token budget: the request's, else the config's (capped by ``--max-tokens``)."""
        limit = self.limits.max_tokens
        budget = (
            body.max_completion_tokens
            or body.max_tokens
            or min(self.solver.config.generation.max_new_tokens, limit)
        )
        if budget > limit:
            raise bad_request(
                f"max_tokens is {budget}; this server allows at most {limit} (--max-tokens)", "max_tokens"
            )
        return budget

    async def prompt(self, images: list[bytes], qas: list[list[str | None]], budget: int) -> Answer:
        """The conversation as the solver renders it (images read and VQ-encoded in the thread pool), within
        ``--max-prompt-tokens`` and the model's positions."""
        try:
            answer = await asyncio.wait_for(
                run_in_threadpool(self.worker.batcher.prepare, images, qas, budget), self.options.timeout
            )
        except TimeoutError as exc:
            raise self.timed_out() from exc
        except ValueError as exc:  # the solver's own checks: placeholders, turns, unreadable images
            code = "context_length_exceeded" if "positions" in str(exc) else None
            raise bad_request(str(exc), "messages", code) from exc
        if len(answer.ids) > self.max_prompt:
            raise bad_request(
                f"the prompt is {len(answer.ids)} tokens (images included); this server accepts at most "
                f"{self.max_prompt} (--max-prompt-tokens and the model's positions)",
                "messages",
                "context_length_exceeded",
            )
        return answer

    def sampling(self, body: ChatRequest) -> list[Sampling]:
        """Each choice's sampling: the request's knobs over the config's, seeds ``seed``, ``seed + 1``, ..."""
        gen = self.solver.config.generation
        seed = secrets.randbits(31) if body.seed is None else body.seed
        temperature = gen.text_temperature if body.temperature is None else body.temperature
        return [
            Sampling(
                temperature=temperature,
                top_p=gen.top_p if body.top_p is None else body.top_p,
                top_k=body.top_k,
                seed=seed + index,
                stop_ids=() if body.ignore_eos else None,
            )
            for index in range(body.n)
        ]

    async def collect_chat(
        self, job: ChatJob, events: asyncio.Queue[Any], ident: str, deadline: float
    ) -> JSONResponse:
        """Await the whole answer of every choice, then one ``chat.completion`` body."""
        texts, finishes = [""] * job.n, [None] * job.n
        try:
            while True:
                event = await self.next_event(job, events, deadline)
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                    finishes[event.index] = event.finish or finishes[event.index]
                elif isinstance(event, Done):
                    break
        except asyncio.CancelledError:
            self.worker.cancel(job)
            raise
        if event.error:
            raise ApiError(500, event.error, kind="server_error", code="engine_error")
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "finish_reason": finishes[i],
                "logprobs": None,
            }
            for i in range(job.n)
        ]
        header = _Chunks(ident, int(time.time()), self.options.model_name)
        return JSONResponse(
            {
                **header.fields("chat.completion"),
                "choices": choices,
                "usage": _usage(len(job.answer.ids), event.completion_tokens),
            }
        )

    async def stream_chat(
        self, job: ChatJob, events: asyncio.Queue[Any], ident: str, include_usage: bool, deadline: float
    ) -> AsyncIterator[str]:
        """Server-sent events of a chat job: a role chunk per choice, a chunk per text delta, the finish chunks,
        the usage chunk when asked, ``[DONE]``. A timeout or an engine failure mid-stream ends it with an error
        event (the status line was sent already)."""
        chunks = _Chunks(ident, int(time.time()), self.options.model_name)
        try:
            for index in range(job.n):
                yield chunks.choice(index, {"role": "assistant", "content": ""})
            while True:
                try:
                    event = await self.next_event(job, events, deadline)
                except ApiError as exc:  # the timeout, after the job was cancelled
                    yield _sse(exc.body())
                    return
                if isinstance(event, Delta):
                    if event.text:
                        yield chunks.choice(event.index, {"content": event.text})
                    if event.finish is not None:
                        yield chunks.choice(event.index, {}, event.finish)
                elif isinstance(event, Done):
                    if event.error:
                        yield _sse(ApiError(500, event.error, kind="server_error").body())
                        return
                    if include_usage:
                        yield chunks.usage(len(job.answer.ids), event.completion_tokens)
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not job.ended:
                self.worker.cancel(job)

    # ---- image generations ----

    async def images(self, body: ImageRequest) -> JSONResponse:
        deadline = time.monotonic() + self.options.timeout
        self.check_model(body.model)
        self.check_n(body.n)
        if body.response_format != "b64_json":
            raise bad_request(
                "response_format must be 'b64_json': this server stores no files to link", "response_format"
            )
        options = {
            "cfg": body.cfg,
            "image_top_k": body.image_top_k,
            "temperature": body.temperature,
            "size": self.image_size(body.size),
            "seed": secrets.randbits(31) if body.seed is None else body.seed,
        }
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = ImageJob(body.prompt, body.n, options, poster(asyncio.get_running_loop(), events))
        self.submit(job)
        result: Images = await self.next_event(job, events, deadline)
        if result.error:
            if result.client_error:
                raise bad_request(result.error)
            raise ApiError(500, result.error, kind="server_error", code="engine_error")
        return JSONResponse({"created": int(time.time()), "data": [_png_entry(p) for p in result.pictures]})

    def image_size(self, text: str | None) -> tuple[int, int] | None:
        """The request's ``size`` as (height, width), or None for the config's; within
        ``--max-image-pixels`` and a size the VQ grid can take."""
        if text is None:
            return None
        size = parse_size(text)
        if size[0] * size[1] > self.limits.max_image_pixels:
            raise bad_request(
                f"size {text} exceeds --max-image-pixels {self.limits.max_image_pixels}", "size"
            )
        try:
            self.solver.grid_size(size)
        except ValueError as exc:
            raise bad_request(str(exc), "size") from exc
        return size


def _png_entry(picture: Image.Image) -> dict[str, Any]:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return {"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"), "revised_prompt": None}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@dataclass(frozen=True)
class _Chunks:
    """What every body of one completion carries (id, created, model), and its stream's chunks."""

    ident: str
    created: int
    model: str

    def fields(self, kind: str) -> dict[str, Any]:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model}

    def choice(self, index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse({**self.fields("chat.completion.chunk"), "choices": [choice]})

    def usage(self, prompt: int, completion: int) -> str:
        return _sse(
            {**self.fields("chat.completion.chunk"), "choices": [], "usage": _usage(prompt, completion)}
        )
