"""``python -m unified_mllm.serve.demo --model EXPORT``: a browser page in front of one export (Gradio).

Two panels side by side. **Chat**: upload images and ask about them, turn after turn; each uploaded image goes
before its question as ``<|image|>`` (where training put it) and a picture the model draws inside an answer
shows in the chat and stays in the conversation. **Text to image**: a prompt, the sampling knobs as sliders
(cfg scale, image top-k, temperature, seed) and a progress bar that advances row by row as the engine decodes
the code grid. Both call :class:`~unified_mllm.infer.solver.InferenceSolver` directly and share one queue:
one model answers one request at a time.

Nothing leaves the machine: Gradio's telemetry and version check are off, no share link is made, server-side
rendering (a Node process) is off, and the page uses the fonts Gradio ships.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from unified_mllm.cli import add_debug_argument, one_line_errors
from unified_mllm.infer.solver import InferenceSolver, Piece
from unified_mllm.layout import IMAGE_PLACEHOLDER
from unified_mllm.vision.image import ImageSource, load_image

if TYPE_CHECKING:
    import gradio

# Every event that runs the model shares this queue: one model on one device, requests take turns on it.
MODEL_QUEUE = "model"
# Small pictures (64 px on the tiny preset) are shown scaled up, with square pixels rather than a blur.
CSS = """
#drawn img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#chatbot img { min-width: 160px; min-height: 160px; object-fit: contain; image-rendering: pixelated; }
"""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED_MAX = 9999


@dataclass(frozen=True)
class Conversation:
    """What the model has seen so far: the images in the order of their ``<|image|>`` placeholders (uploads and
    pictures it drew) and the ``[question, answer]`` pairs, placeholders included."""

    images: tuple[Image.Image, ...] = ()
    qas: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Reply:
    """One turn: the conversation after it and the answer's pieces (text and drawn pictures, in order)."""

    conversation: Conversation
    pieces: list[Piece] = field(default_factory=list)


def ask(
    solver: InferenceSolver,
    conversation: Conversation,
    question: str,
    images: Sequence[ImageSource] = (),
    *,
    temperature: float = 0.0,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> Reply:
    """Answer ``question`` about ``images`` (uploaded with it) after the turns of ``conversation``.

    The conversation given is left as it was (a failed turn changes nothing); the reply carries the new one.
    """
    question = question.strip()
    if not question:
        raise ValueError("type a question (an image alone asks nothing)")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(f"{IMAGE_PLACEHOLDER} marks where an uploaded image goes: upload the image instead")
    pictures = [load_image(source) for source in images]
    prompt = IMAGE_PLACEHOLDER * len(pictures) + question
    pieces = solver.generate_interleaved(
        [*conversation.images, *pictures],
        [*conversation.qas, (prompt, None)],
        max_gen_len=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    drawn = [piece for piece in pieces if isinstance(piece, Image.Image)]
    answer = "".join(IMAGE_PLACEHOLDER if isinstance(piece, Image.Image) else piece for piece in pieces)
    after = Conversation(
        images=(*conversation.images, *pictures, *drawn), qas=(*conversation.qas, (prompt, answer))
    )
    return Reply(after, list(pieces))


def draw(
    solver: InferenceSolver,
    prompt: str,
    *,
    cfg: float | None = None,
    image_top_k: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    rows_done: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """One picture for ``prompt``; ``rows_done(rows, all rows)`` hears each completed row of the code grid.
    ``image_top_k`` 0 or None samples from every code."""
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("type a prompt to draw")
    rows, cols = solver.grid_size()
    reported = [-1]

    def on_ids(done: int, total: int) -> None:
        row = done // (cols + 1)  # a grid row is its codes and a <row-end>
        if rows_done is not None and row != reported[0]:
            reported[0] = row
            rows_done(row, rows)

    return solver.generate_img(
        prompt,
        cfg=cfg,
        image_top_k=image_top_k or None,
        temperature=temperature,
        seed=seed,
        progress=on_ids,
    )[0]


def chat_messages(question: str, uploads: Sequence[str], pieces: Sequence[Piece]) -> list[dict[str, Any]]:
    """The chat's messages for one turn (Gradio's ``{"role", "content"}`` form): the uploads, the question,
    then the answer's text and pictures in order."""
    import gradio as gr

    messages: list[dict[str, Any]] = [
        {"role": "user", "content": gr.Image(value=path, type="filepath", buttons=["download"])}
        for path in uploads
    ]
    messages.append({"role": "user", "content": question})
    for piece in pieces:
        content = (
            gr.Image(value=piece, type="pil", format="png", buttons=["download"])
            if isinstance(piece, Image.Image)
            else piece
        )
        messages.append({"role": "assistant", "content": content})
    if not pieces:  # the model ended its turn at once: say so rather than show nothing
        messages.append({"role": "assistant", "content": "*(no answer: the model ended its turn at once)*"})
    return messages


@dataclass(frozen=True)
class ChatPanel:
    """The chat column's inputs and outputs."""

    chatbot: gradio.Chatbot
    question: gradio.MultimodalTextbox
    temperature: gradio.Slider
    max_new_tokens: gradio.Slider
    new_chat: gradio.Button


@dataclass(frozen=True)
class DrawPanel:
    """The text-to-image column's inputs and output; its seed slider serves the chat too."""

    prompt: gradio.Textbox
    button: gradio.Button
    drawn: gradio.Image
    cfg: gradio.Slider
    top_k: gradio.Slider
    temperature: gradio.Slider
    seed: gradio.Slider


def build_demo(solver: InferenceSolver, title: str = "unified_mllm demo") -> gradio.Blocks:
    """The page: the chat and text-to-image panels wired to ``solver`` (not launched)."""
    gr = _gradio()
    gen = solver.config.generation
    height, width = solver.grid_size()
    side = gen.image_size if isinstance(gen.image_size, int) else max(gen.image_size)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nChat about images on the left, draw from text on the right "
            f"({side} px pictures, {height}x{width} codes)."
        )
        conversation = gr.State(Conversation())
        with gr.Row(equal_height=False):
            chat = _chat_column(solver)
            drawing = _draw_column(solver)
        _wire(solver, chat, drawing, conversation)
    return demo


def _wire(solver: InferenceSolver, chat: ChatPanel, drawing: DrawPanel, conversation: gradio.State) -> None:
    """The page's events, inside the open Blocks: every event that runs the model joins :data:`MODEL_QUEUE`."""
    chat.question.submit(
        _ask_handler(solver),
        [chat.question, chat.chatbot, conversation, chat.temperature, chat.max_new_tokens, drawing.seed],
        [chat.chatbot, conversation, chat.question],
        concurrency_limit=1,
        concurrency_id=MODEL_QUEUE,
    )
    chat.new_chat.click(lambda: ([], Conversation()), None, [chat.chatbot, conversation])
    on_draw = _draw_handler(solver)
    for event in (drawing.button.click, drawing.prompt.submit):
        event(
            on_draw,
            [drawing.prompt, drawing.cfg, drawing.top_k, drawing.temperature, drawing.seed],
            drawing.drawn,
            concurrency_limit=1,
            concurrency_id=MODEL_QUEUE,
        )


def _chat_column(solver: InferenceSolver) -> ChatPanel:
    """The chat column, laid out inside the open Blocks: conversation, question box, sliders, reset."""
    gr = _gradio()
    limit = solver.model.config.lm.max_position_embeddings
    with gr.Column():
        gr.Markdown("## Chat")
        chatbot = gr.Chatbot(
            label="Conversation", elem_id="chatbot", height=420, buttons=["copy", "copy_all"]
        )
        question = gr.MultimodalTextbox(
            placeholder="Upload an image (clip) and ask about it; Enter sends",
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            show_label=False,
            elem_id="chat-input",
        )
        with gr.Row():
            temperature = gr.Slider(
                0, 2, value=0, step=0.05, label="temperature (0: greedy)", elem_id="chat-temperature"
            )
            max_new = gr.Slider(
                1,
                limit,
                value=min(solver.config.generation.max_new_tokens, limit),
                step=1,
                label="max new tokens",
            )
        new_chat = gr.Button("New conversation", elem_id="new-chat")
    return ChatPanel(chatbot, question, temperature, max_new, new_chat)


def _draw_column(solver: InferenceSolver) -> DrawPanel:
    """The text-to-image column, laid out inside the open Blocks: prompt, button, picture, sampling sliders."""
    gr = _gradio()
    gen = solver.config.generation
    codebook = solver.vq.config.codebook_size
    with gr.Column():
        gr.Markdown("## Text to image")
        prompt = gr.Textbox(
            label="Prompt", placeholder="a red circle above a blue square", elem_id="draw-prompt"
        )
        button = gr.Button("Draw", variant="primary", elem_id="draw-button")
        drawn = gr.Image(
            label="Drawn image",
            type="pil",
            format="png",
            interactive=False,
            height=320,
            buttons=["download", "fullscreen"],
            elem_id="drawn",
        )
        with gr.Row():
            cfg = gr.Slider(
                0, max(10.0, gen.cfg_scale), value=gen.cfg_scale, step=0.5, label="cfg scale (1: none)"
            )
            top_k = gr.Slider(
                0,
                codebook,
                # k beyond the codebook keeps every code, as the whole codebook does
                value=min(gen.image_top_k or 0, codebook),
                step=1,
                label="image top-k (0: every code)",
            )
        with gr.Row():
            temperature = gr.Slider(0, 2, value=gen.temperature, step=0.05, label="temperature (0: greedy)")
            seed = gr.Slider(
                0, SEED_MAX, value=min(gen.seed, SEED_MAX), step=1, label="seed (also the chat's)"
            )
    return DrawPanel(prompt, button, drawn, cfg, top_k, temperature, seed)


def _ask_handler(solver: InferenceSolver) -> Callable[..., tuple[list[dict[str, Any]], Conversation, Any]]:
    """The chat's event: one turn of :func:`ask`; a question the model refuses is a toast, not a turn."""
    gr = _gradio()

    def on_ask(
        message: dict[str, Any],
        history: list[dict[str, Any]],
        conversation: Conversation,
        temperature: float,
        max_new_tokens: float,
        seed: float,
    ) -> tuple[list[dict[str, Any]], Conversation, Any]:
        uploads = [str(path) for path in message.get("files") or []]
        text = message.get("text") or ""
        try:
            reply = ask(
                solver,
                conversation,
                text,
                uploads,
                temperature=temperature,
                max_new_tokens=int(max_new_tokens),
                seed=int(seed),
            )
        except ValueError as exc:  # the user's to fix: a toast, and the conversation stays as it was
            raise gr.Error(str(exc)) from exc
        history = [*history, *chat_messages(text.strip(), uploads, reply.pieces)]
        return history, reply.conversation, gr.MultimodalTextbox(value=None)

    return on_ask


def _draw_handler(solver: InferenceSolver) -> Callable[..., Image.Image]:
    """The drawing's event: :func:`draw` with Gradio's progress bar advancing a grid row at a time."""
    gr = _gradio()
    height = solver.grid_size()[0]
    bar = gr.Progress()  # a marker default: Gradio hands each call its own tracker in its place

    def on_draw(
        prompt: str,
        cfg: float,
        image_top_k: float,
        temperature: float,
        seed: float,
        progress: gradio.Progress = bar,
    ) -> Image.Image:
        progress((0, height), desc="drawing", unit="rows")

        def rows_done(row: int, rows: int) -> None:
            progress((row, rows), desc=f"drawing row {min(row + 1, rows)} of {rows}", unit="rows")

        try:
            return draw(
                solver,
                prompt,
                cfg=cfg,
                image_top_k=int(image_top_k),
                temperature=temperature,
                seed=int(seed),
                rows_done=rows_done,
            )
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc

    return on_draw


def launch(demo: gradio.Blocks, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve ``demo`` on ``host:port`` until interrupted: local only (no share link, no SSR, no MCP)."""
    try:
        demo.queue(max_size=32).launch(
            server_name=host,
            server_port=port,
            share=False,
            ssr_mode=False,
            mcp_server=False,
            show_error=True,
            footer_links=[],
            css=CSS,
        )
    except OSError as exc:  # Gradio's own text speaks of launch() arguments: name the command's options
        raise OSError(
            f"cannot serve on {host}:{port} (taken or not allowed): choose another --port or --host"
        ) from exc


def _gradio() -> Any:
    """Gradio, imported on use: it is the ``serve`` extra, not the core install."""
    # Before the first import: no telemetry and no version check (nothing leaves the machine).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as exc:
        raise ImportError(
            "the demo needs Gradio: pip install 'unified_mllm[serve]' (or pip install gradio)"
        ) from exc
    return gradio


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mllm.serve.demo",
        description="A browser demo of an export: chat about images and text-to-image (Gradio, local only).",
    )
    parser.add_argument(
        "--model", required=True, help="the export directory (config.yaml, weights, tokenizers)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ..."
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default: as stored)")
    add_debug_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # A port already taken is the user's to fix (OSError), as is a bad export or a missing extra.
    with one_line_errors((ValueError, ImportError, OSError), debug=args.debug):
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must lie in 1..65535, got {args.port}")
        solver = InferenceSolver.from_pretrained(args.model, device=args.device, dtype=DTYPES.get(args.dtype))
        name = "/".join(Path(args.model).expanduser().resolve().parts[-2:])  # e.g. quickstart-stage2/export
        launch(build_demo(solver, title=f"unified_mllm · {name}"), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
