"""OpenAI's request and error shapes, and their translation into the solver's terms.

Request bodies are pydantic models that accept extra fields (clients send more than we read; our own knobs,
``cfg``, ``image_top_k``, ``top_k``, ``ignore_eos``, ride along as extra body fields). Messages become the
solver's ``qas`` pairs: each user message's content parts in order, an image part standing as ``<|image|>``
where it is (training puts it first: send the image part before the text). Images come only as ``data:`` URLs:
the server downloads nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from unified_mllm.layout import IMAGE_PLACEHOLDER


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**62), le=2**62)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    top_k: int | None = Field(None, ge=1)
    ignore_eos: bool = False


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    cfg: float | None = Field(None, ge=0)
    image_top_k: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2**62), le=2**62)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's flags)."""

    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int | None = None
    """None: whatever the model's positions allow."""
    max_tokens: int = 512
    max_n: int = 8
    max_stop: int = 4
    max_body_bytes: int = 64 * 2**20
    """Largest request body (Content-Length); more is a 413 before the body is read."""


_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.DOTALL
)


def decode_image_url(url: str, param: str, limits: Limits) -> bytes:
    """The encoded image bytes of a ``data:`` URL; ApiError for any other URL, bad base64, an unreadable image
    or one over ``limits.max_image_pixels`` (read from the header, before decoding the pixels)."""
    if re.match(r"https?://", url, re.IGNORECASE):
        raise bad_request(
            "image URLs are not fetched by this server (it downloads nothing); send the image inline as a "
            "data: URL, e.g. data:image/png;base64,<base64 bytes>",
            param,
            "invalid_image_url",
        )
    found = _DATA_URL.fullmatch(url.strip())
    if not found:
        raise bad_request(
            "image_url.url must be a base64 data: URL (data:image/png;base64,...)", param, "invalid_image_url"
        )
    try:
        data = base64.b64decode(found["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(
            f"the data: URL's base64 payload is invalid: {exc}", param, "invalid_image_url"
        ) from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise bad_request(f"the data: URL holds no readable image: {exc}", param, "invalid_image") from exc
    if width * height > limits.max_image_pixels:
        raise bad_request(
            f"the image is {width}x{height} = {width * height} pixels; this server accepts at most "
            f"{limits.max_image_pixels} (--max-image-pixels)",
            param,
            "image_too_large",
        )
    return data


def _text_of(
    content: str | list[dict[str, Any]] | None, param: str, images: list[bytes] | None, limits: Limits
) -> str:
    """One message's content as text; image parts become ``<|image|>`` and their bytes go to ``images``
    (None: this role may not carry images)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request("a text content part needs a string 'text'", f"{where}.text")
            pieces.append(part["text"])
        elif kind == "image_url":
            if images is None:
                raise bad_request("only user messages may carry images", where)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_request("an image_url part needs image_url.url (a data: URL)", f"{where}.image_url")
            images.append(decode_image_url(url, f"{where}.image_url.url", limits))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise bad_request(
                f"content part type {kind!r} is not supported (text, image_url)", f"{where}.type"
            )
    return "".join(pieces)


def conversation(messages: list[Message], limits: Limits) -> tuple[list[bytes], list[list[str | None]]]:
    """``(images, qas)`` for the solver: the user/assistant turns as ``[question, answer]`` pairs ending with
    ``[question, None]``. System (or developer) text goes before the first question; consecutive user
    messages are joined by a newline. ApiError for any other shape."""
    images: list[bytes] = []
    system: list[str] = []
    qas: list[list[str | None]] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}].content"
        if message.role in ("system", "developer"):
            system.append(_text_of(message.content, param, None, limits))
        elif message.role == "user":
            text = _text_of(message.content, param, images, limits)
            if qas and qas[-1][1] is None:
                qas[-1][0] = f"{qas[-1][0]}\n{text}"
            else:
                qas.append([text, None])
        elif message.role == "assistant":
            if not qas or qas[-1][1] is not None:
                raise bad_request(
                    "an assistant message must follow a user message", f"messages[{index}].role"
                )
            qas[-1][1] = _text_of(message.content, param, None, limits)
        else:
            raise bad_request(
                f"message role {message.role!r} is not supported (system, developer, user, assistant)",
                f"messages[{index}].role",
            )
    if not qas or qas[-1][1] is not None:
        raise bad_request("the conversation must end with a user message (the one answered)", "messages")
    if system:
        qas[0][0] = "\n".join(system) + "\n" + str(qas[0][0])
    return images, qas


def stop_strings(stop: str | list[str] | None, limits: Limits) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop:
        raise bad_request(f"at most {limits.max_stop} stop strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    return stops


def parse_size(size: str, param: str = "size") -> tuple[int, int]:
    """``(height, width)`` from OpenAI's ``"WxH"``."""
    found = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
    if not found:
        raise bad_request(f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '64x64'), got {size!r}", param)
    return int(found[2]), int(found[1])
