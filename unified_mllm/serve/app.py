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
from starlette.exceptions import HTTPException as StarletteHTTPException

from unified_mllm.infer.batching import Sampling
from unified_mllm.infer.solver import InferenceSolver
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


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(solver: InferenceSolver, options: ServerOptions) -> FastAPI:
    """The app; its lifespan starts and stops the engine worker."""
    worker = EngineWorker(solver, max_batch=options.max_batch, max_queue=options.max_queue)
    created = int(time.time())
    limits = options.limits
    room = solver.model.config.lm.max_position_embeddings - 1
    max_prompt = min(room, limits.max_prompt_tokens or room)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="unified_mllm", lifespan=lifespan)
    app.state.worker = worker

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > limits.max_body_bytes:
            return _error(
                ApiError(
                    413,
                    f"the request body is {length} bytes; this server accepts at most {limits.max_body_bytes} "
                    "(--max-body-mb)",
                    code="request_too_large",
                )
            )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else f"invalid request body: {first['msg']}"
        return _error(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error(
            ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        )

    def check_model(model: str | None) -> None:
        if model is not None and model != options.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {options.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_n(n: int) -> None:
        if n > limits.max_n:
            raise bad_request(f"n is {n}; this server allows at most {limits.max_n} (--max-n)", "n")

    def submit(job: ChatJob | ImageJob) -> None:
        if not worker.alive:
            raise ApiError(503, "the engine worker is not running", kind="server_error", code="unavailable")
        try:
            worker.submit_chat(job) if isinstance(job, ChatJob) else worker.submit_image(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), kind="rate_limit_error", code="queue_full") from exc

    def timed_out() -> ApiError:
        return ApiError(
            408,
            f"the request took longer than this server's {options.timeout:g} s limit (--timeout)",
            kind="timeout_error",
            code="timeout",
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if worker.alive else "stopped",
            "model": options.model_name,
            "in_flight": worker.in_flight,
            "max_batch": options.max_batch,
            "steps": worker.steps,
        }

    def model_card() -> dict[str, Any]:
        return {"id": options.model_name, "object": "model", "created": created, "owned_by": "unified_mllm"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> JSONResponse | StreamingResponse:
        deadline = time.monotonic() + options.timeout
        check_model(body.model)
        check_n(body.n)
        stops = stop_strings(body.stop, limits)
        images, qas = conversation(body.messages, limits)
        gen = solver.config.generation
        budget = body.max_completion_tokens or body.max_tokens or min(gen.max_new_tokens, limits.max_tokens)
        if budget > limits.max_tokens:
            raise bad_request(
                f"max_tokens is {budget}; this server allows at most {limits.max_tokens} (--max-tokens)",
                "max_tokens",
            )
        try:
            answer = await asyncio.wait_for(
                run_in_threadpool(worker.batcher.prepare, images, qas, budget), options.timeout
            )
        except TimeoutError as exc:
            raise timed_out() from exc
        except ValueError as exc:  # the solver's own checks: placeholders, turns, unreadable images
            code = "context_length_exceeded" if "positions" in str(exc) else None
            raise bad_request(str(exc), "messages", code) from exc
        if len(answer.ids) > max_prompt:
            raise bad_request(
                f"the prompt is {len(answer.ids)} tokens (images included); this server accepts at most "
                f"{max_prompt} (--max-prompt-tokens and the model's positions)",
                "messages",
                "context_length_exceeded",
            )
        seed = secrets.randbits(31) if body.seed is None else body.seed
        temperature = gen.text_temperature if body.temperature is None else body.temperature
        sampling = [
            Sampling(
                temperature=temperature,
                top_p=gen.top_p if body.top_p is None else body.top_p,
                top_k=body.top_k,
                seed=seed + index,
                stop_ids=() if body.ignore_eos else None,
            )
            for index in range(body.n)
        ]
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = ChatJob(
            answer=answer,
            n=body.n,
            sampling=sampling,
            stop=stops,
            post=poster(asyncio.get_running_loop(), events),
            stream=body.stream,
        )
        submit(job)
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        prompt_tokens = len(answer.ids)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(
                    job, events, worker, ident, options.model_name, prompt_tokens, usage, deadline, timed_out
                ),
                media_type="text/event-stream",
            )
        texts, finishes = [""] * body.n, [None] * body.n
        try:
            while True:
                left = deadline - time.monotonic()
                event = await asyncio.wait_for(events.get(), max(left, 0.001))
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                    finishes[event.index] = event.finish or finishes[event.index]
                elif isinstance(event, Done):
                    break
        except TimeoutError as exc:
            worker.cancel(job)
            raise timed_out() from exc
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        if event.error:
            raise ApiError(500, event.error, kind="server_error", code="engine_error")
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": options.model_name,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": finishes[i],
                        "logprobs": None,
                    }
                    for i in range(body.n)
                ],
                "usage": _usage(prompt_tokens, event.completion_tokens),
            }
        )

    @app.post("/v1/images/generations", response_model=None)
    async def images(body: ImageRequest) -> JSONResponse:
        deadline = time.monotonic() + options.timeout
        check_model(body.model)
        check_n(body.n)
        if body.response_format != "b64_json":
            raise bad_request(
                "response_format must be 'b64_json': this server stores no files to link", "response_format"
            )
        size = None
        if body.size is not None:
            size = parse_size(body.size)
            if size[0] * size[1] > limits.max_image_pixels:
                raise bad_request(
                    f"size {body.size} exceeds --max-image-pixels {limits.max_image_pixels}", "size"
                )
            try:
                solver.grid_size(size)
            except ValueError as exc:
                raise bad_request(str(exc), "size") from exc
        options_ = {
            "cfg": body.cfg,
            "image_top_k": body.image_top_k,
            "temperature": body.temperature,
            "size": size,
            "seed": secrets.randbits(31) if body.seed is None else body.seed,
        }
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = ImageJob(body.prompt, body.n, options_, poster(asyncio.get_running_loop(), events))
        submit(job)
        try:
            result: Images = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError as exc:
            worker.cancel(job)
            raise timed_out() from exc
        if result.error:
            if result.client_error:
                raise bad_request(result.error)
            raise ApiError(500, result.error, kind="server_error", code="engine_error")
        data = []
        for picture in result.pictures:
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            data.append(
                {"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"), "revised_prompt": None}
            )
        return JSONResponse({"created": int(time.time()), "data": data})

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(
    job: ChatJob,
    events: asyncio.Queue[Any],
    worker: EngineWorker,
    ident: str,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    deadline: float,
    timed_out: Any,
) -> AsyncIterator[str]:
    """Server-sent events of a chat job: a role chunk per choice, a chunk per text delta, the finish chunks,
    the usage chunk when asked, ``[DONE]``. A timeout or an engine failure mid-stream ends it with an error
    event (the status line was sent already)."""
    created = int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse(
            {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
        )

    try:
        for index in range(job.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        while True:
            try:
                event = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                worker.cancel(job)
                yield _sse(timed_out().body())
                return
            if isinstance(event, Delta):
                if event.text:
                    yield chunk(event.index, {"content": event.text})
                if event.finish is not None:
                    yield chunk(event.index, {}, event.finish)
            elif isinstance(event, Done):
                if event.error:
                    yield _sse(ApiError(500, event.error, kind="server_error").body())
                    return
                if include_usage:
                    yield _sse(
                        {
                            "id": ident,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": _usage(prompt_tokens, event.completion_tokens),
                        }
                    )
                yield "data: [DONE]\n\n"
                return
    finally:
        if not job.ended:
            worker.cancel(job)
