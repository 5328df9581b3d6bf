"""The OpenAI-compatible server, live on 127.0.0.1, driven by the real ``openai`` client: chat with an image,
multi-turn, streaming, n > 1, stop strings, image generation, the model list and health; every refusal as a 4xx
with OpenAI's error body; concurrent greedy requests (decoded in one continuous batch) answer exactly what
the same requests answer one at a time."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.helpers import serving as serve_export
from tests.helpers import write_export
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.serve.__main__ import main
from unified_mllm.serve.protocol import Limits

NAME = "tiny-test"
QUESTION = "how many objects?"
TEXT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", sp_model)


@pytest.fixture(scope="module")
def solver(export: Path) -> InferenceSolver:
    return InferenceSolver.from_pretrained(export)


def serving(export: Path, **options: Any) -> Any:
    return serve_export(export, model_name=NAME, **options)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def url(export: Path) -> Iterator[str]:
    limits = Limits(
        max_image_pixels=128 * 128, max_prompt_tokens=200, max_tokens=64, max_n=4, max_body_bytes=2**20
    )
    with serving(export, max_batch=8, limits=limits) as base:
        yield base


@pytest.fixture(scope="module")
def one_at_a_time(export: Path) -> Iterator[str]:
    """No batching, one request waiting at most: for the sequential reference and the full queue."""
    with serving(export, max_batch=1, max_queue=1, limits=Limits(max_tokens=500)) as base:
        yield base


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def asking(image: Image.Image, question: str = QUESTION) -> list[dict[str, Any]]:
    """One user message: the image part first (where training puts it), then the question."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


def chat(url: str, **request: Any) -> Any:
    return client(url).chat.completions.create(model=NAME, **request)


def test_chat_with_an_image_answers_what_the_solver_answers(url: str, solver: InferenceSolver) -> None:
    reply = chat(url, messages=asking(picture(0)), max_tokens=6)
    expected = solver.generate([picture(0)], [["<|image|>" + QUESTION, None]], max_gen_len=6)
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert reply.model == NAME and reply.object == "chat.completion"
    prompt = solver.prepare_answers([[picture(0)]], [[["<|image|>" + QUESTION, None]]], 6)[0]
    assert reply.usage.prompt_tokens == len(prompt.ids)
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 6 else "stop")


def test_multi_turn_conversation_is_the_solvers_qas(url: str, solver: InferenceSolver) -> None:
    messages = [
        *asking(picture(1)),
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "what colour?"},
    ]
    reply = chat(url, messages=messages, max_tokens=5)
    qas = [["<|image|>" + QUESTION, "two"], ["what colour?", None]]
    assert reply.choices[0].message.content == solver.generate([picture(1)], qas, max_gen_len=5)


def test_streaming_sends_the_answer_token_by_token(url: str) -> None:
    # (the random model writes visible text after "hi"; after the image questions mostly ids without text)
    request = {"messages": TEXT, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    whole = chat(url, **request)
    chunks = list(chat(url, stream=True, stream_options={"include_usage": True}, **request))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1  # more than one event: the text arrived as it was decoded
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_n_choices_are_seeded_samples(url: str, solver: InferenceSolver) -> None:
    request = {"messages": asking(picture(3)), "max_tokens": 8, "n": 3, "temperature": 1.5, "seed": 11}
    reply = chat(url, **request, extra_body={"top_k": 50})
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    qas = [["<|image|>" + QUESTION, None]]
    alone = [
        solver.generate([picture(3)], qas, max_gen_len=8, temperature=1.5, top_k=50, seed=11 + i)
        for i in range(3)
    ]
    assert texts == alone  # choice i is the solver's sample with seed + i
    again = chat(url, **request, extra_body={"top_k": 50})
    assert [c.message.content for c in again.choices] == texts


def test_a_stop_string_cuts_the_answer(url: str) -> None:
    request = {"messages": TEXT, "max_tokens": 20, "extra_body": {"ignore_eos": True}}
    text = chat(url, **request).choices[0].message.content
    assert len(text) >= 4, "the random model's greedy answer is long enough to cut"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text[: text.index(stop)]
    reply = chat(url, stop=[stop], **request)
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 20  # the row left the batch at the stop string
    streamed = chat(url, stop=stop, stream=True, **request)
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(pieces) == cut  # nothing of the stop string leaked out before it was complete


def test_image_generation_returns_pngs_of_the_requested_size(url: str, solver: InferenceSolver) -> None:
    openai_client = client(url)
    result = openai_client.images.generate(
        model=NAME,
        prompt="a red circle",
        n=2,
        size="48x32",
        response_format="b64_json",
        extra_body={"seed": 3},
    )
    pictures = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [(p.format, p.size) for p in pictures] == [("PNG", (48, 32)), ("PNG", (48, 32))]
    expected = solver.generate_img(["a red circle"] * 2, size=(32, 48), seed=3)
    assert [np.asarray(p).tolist() for p in pictures] == [np.asarray(e).tolist() for e in expected]
    guided = openai_client.images.generate(
        model=NAME, prompt="a red circle", extra_body={"seed": 3, "cfg": 1.0, "image_top_k": 1}
    )
    (only,) = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in guided.data]
    assert only.size == (32, 32)  # the export's generation.image_size
    top1 = solver.generate_img("a red circle", size=32, seed=3, cfg=1.0, image_top_k=1)[0]
    assert np.asarray(only).tolist() == np.asarray(top1).tolist()


def test_models_and_health(url: str) -> None:
    models = client(url).models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client(url).models.retrieve(NAME).id == NAME
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["max_batch"] == 8


def error_of(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    assert isinstance(body["message"], str) and body["message"]
    return caught.value.status_code, body


BAD_CHATS = {
    "http image url": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}
            ]
        },
        400,
        "invalid_image_url",
        "downloads nothing",
    ),
    "bad base64": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}],
                }
            ]
        },
        400,
        "invalid_image_url",
        "base64",
    ),
    "too many pixels": ({"messages": asking(picture(0, (200, 100)))}, 400, "image_too_large", "200x100"),
    "n too large": ({"messages": TEXT, "n": 5}, 400, None, "at most 4"),
    "prompt too long": (
        {"messages": [{"role": "user", "content": "circle " * 300}]},
        400,
        "context_length_exceeded",
        "200",
    ),
    "max_tokens too large": ({"messages": TEXT, "max_tokens": 65}, 400, None, "at most 64"),
    "unknown model": ({"messages": TEXT, "model": "gpt-4o"}, 404, "model_not_found", "gpt-4o"),
    "no messages": ({"messages": []}, 400, None, "messages"),
    "assistant last": (
        {"messages": [*TEXT, {"role": "assistant", "content": "yo"}]},
        400,
        None,
        "end with a user",
    ),
    "tool role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, None, "tool"),
    "negative temperature": ({"messages": TEXT, "temperature": -1}, 400, None, "temperature"),
    "top_k zero": ({"messages": TEXT, "extra_body": {"top_k": 0}}, 400, None, "top_k"),
    "seed out of range": ({"messages": TEXT, "seed": 2**64}, 400, None, "seed"),
    "too many stops": ({"messages": TEXT, "stop": list("abcde")}, 400, None, "stop"),
    "placeholder without image": (
        {"messages": [{"role": "user", "content": "<|image|>hi"}]},
        400,
        None,
        "image",
    ),
}


@pytest.mark.parametrize("case", BAD_CHATS, ids=list(BAD_CHATS))
def test_bad_chat_requests_get_openai_errors(url: str, case: str) -> None:
    request, status, code, words = BAD_CHATS[case]
    request = {"model": NAME, **request}
    got, body = error_of(lambda: client(url).chat.completions.create(**request))
    assert (got, body["code"]) == (status, code), body
    assert words in body["message"], body


@pytest.mark.parametrize(
    ("request_", "param", "words"),
    [
        ({"size": "50x50"}, "size", "multiple of"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"size": "4096x4096"}, "size", "max-image-pixels"),
        ({"n": 9}, "n", "at most 4"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"model": "dall-e-3"}, "model", "dall-e-3"),
    ],
)
def test_bad_image_requests_get_openai_errors(url: str, request_: dict, param: str, words: str) -> None:
    status, body = error_of(
        lambda: client(url).images.generate(**{"prompt": "a red circle", "model": NAME, **request_})
    )
    assert status in (400, 404) and body["param"] == param and words in body["message"], body


def test_malformed_bodies_and_routes_get_openai_errors(url: str) -> None:
    for body, param in [
        (b"{not json", None),
        (b'{"model": "x"}', "messages"),
        (b'{"model": 1, "messages": 2}', "model"),
    ]:
        reply = httpx.post(
            f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400, reply.text
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        assert param is None or reply.json()["error"]["param"] == param
    huge = {"model": NAME, "messages": [{"role": "user", "content": "x" * 2**20}]}
    reply = httpx.post(f"{url}/v1/chat/completions", json=huge)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)]:
        reply = httpx.request(method, f"{url}{path}")
        assert reply.status_code == status and reply.json()["error"]["message"]


def wait_until_idle(url: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").json()["in_flight"]:
        assert time.monotonic() < deadline, "requests stayed in flight"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_full_queue_is_a_429_and_frees_up(one_at_a_time: str) -> None:
    long = {"messages": TEXT, "max_tokens": 200, "extra_body": {"ignore_eos": True}}
    # decoding for a while (480 steps): the batch of 1 is full
    stream = chat(one_at_a_time, stream=True, **{**long, "max_tokens": 480})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, one_at_a_time, **long)  # the one place in the queue
        deadline = time.monotonic() + 10
        while httpx.get(f"{one_at_a_time}/health").json()["in_flight"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        status, body = error_of(lambda: chat(one_at_a_time, messages=TEXT, max_tokens=2))
        assert (status, body["code"], body["type"]) == (429, "queue_full", "rate_limit_error")
        stream.close()  # the client goes away: its row is cancelled and the waiting request runs
        assert waiting.result().usage.completion_tokens == 200
    wait_until_idle(one_at_a_time)
    assert chat(one_at_a_time, messages=TEXT, max_tokens=2).usage.completion_tokens <= 2


def test_a_request_over_its_time_is_a_408(export: Path) -> None:
    with serving(export, timeout=0.1, limits=Limits(max_tokens=480)) as base:
        status, body = error_of(
            lambda: chat(base, messages=TEXT, max_tokens=480, extra_body={"ignore_eos": True})
        )
        assert (status, body["code"]) == (408, "timeout") and "0.1 s" in body["message"]
        wait_until_idle(base)  # the cancelled request left the batch and freed its place
        assert chat(base, messages=TEXT, max_tokens=2).choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_concurrent_greedy_requests_answer_as_sequential_ones(url: str, one_at_a_time: str) -> None:
    requests = [
        {
            "messages": asking(picture(10 + i, (64, 48 + 8 * i)), QUESTION if i % 2 else "what colour?"),
            "max_tokens": 3 + 2 * i,
        }
        for i in range(8)
    ]
    requests += [{"messages": [{"role": "user", "content": "what is a red circle?"}], "max_tokens": 9}]
    for request in requests:
        request["extra_body"] = {
            "ignore_eos": True
        }  # budgets differ: rows leave the batch at different steps
    sequential = [chat(one_at_a_time, **r).choices[0].message.content for r in requests]
    before = httpx.get(f"{url}/health").json()["steps"]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(lambda r: chat(url, **r).choices[0].message.content, requests))
    steps = httpx.get(f"{url}/health").json()["steps"] - before
    assert concurrent == sequential
    assert steps < sum(r["max_tokens"] for r in requests)  # rows shared steps: they were decoded together


def test_the_command_line_refuses_bad_flags(export: Path) -> None:
    with pytest.raises(SystemExit, match="--max-batch must be >= 1"):
        main(["--model", str(export), "--max-batch", "0"])
    with pytest.raises(SystemExit, match="export directory not found"):
        main(["--model", str(export / "missing")])


@pytest.mark.slow
def test_the_command_line_serves(export: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unified_mllm.serve",
            "--model",
            str(export),
            "--port",
            "0",
            "--model-name",
            NAME,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, "the server exited"
            if "Uvicorn running on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
        assert port is not None
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        assert chat(base, messages=TEXT, max_tokens=2).model == NAME
    finally:
        process.terminate()
        process.wait(timeout=30)
