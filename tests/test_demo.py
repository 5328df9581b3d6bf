"""The demo page (``python -m unified_mllm.serve.demo``): its conversation and drawing logic against a tiny
random export, the progress hook the page's bar is fed from, and the real page driven in a headless Chromium.

The browser test starts the command line on a free loopback port, uploads a rendered scene of the world, asks a
question, draws an image and checks that what the page shows is exactly what the solver gives for the same
inputs and slider values; no request may leave 127.0.0.1. It saves a screenshot: ``UMLLM_DEMO_SCREENSHOT=PATH``
names where (the README's ``docs/demo.png``), and ``UMLLM_DEMO_EXPORT=DIR`` runs it on another export (the
quickstart's, for that picture) instead of the random one.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, write_export
from unified_mllm.data.shapes import make_sample
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.layout import IMAGE_PLACEHOLDER
from unified_mllm.serve.demo import Conversation, ask, draw, main

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page, Route

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # the OS package's browser
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", sp_model)


@pytest.fixture(scope="module")
def solver(export: Path) -> InferenceSolver:
    return InferenceSolver.from_pretrained(export)


def scene(solver: InferenceSolver, index: int = 3) -> tuple[Image.Image, dict]:
    """A rendered scene of the export's world and its record (questions, prompts)."""
    return make_sample(solver.config.data.world, "test", index)


def pixels(image: Image.Image) -> list:
    return np.asarray(image.convert("RGB")).tolist()


# ------------------------------------------------------------------------------------------- progress hook


def test_progress_hears_every_id_of_the_grid_and_changes_nothing(solver: InferenceSolver) -> None:
    rows, cols = solver.grid_size()
    length = rows * (cols + 1)
    heard: list[tuple[int, int]] = []
    images = solver.generate_img([PROMPT, "a green square"], seed=5, progress=lambda *a: heard.append(a))
    assert heard == [(done, length) for done in range(1, length + 1)]
    plain = solver.generate_img([PROMPT, "a green square"], seed=5)
    assert [pixels(a) for a in images] == [pixels(b) for b in plain]


def test_progress_under_jacobi_decoding_rises_to_the_whole_grid(solver: InferenceSolver) -> None:
    rows, cols = solver.grid_size()
    length = rows * (cols + 1)
    heard: list[tuple[int, int]] = []
    images = solver.generate_img(PROMPT, seed=1, jacobi_window=4, progress=lambda *a: heard.append(a))
    done = [d for d, _ in heard]
    assert {total for _, total in heard} == {length} and done[-1] == length
    assert done == sorted(done) and len(done) <= length  # at least one id accepted per forward
    assert pixels(images[0]) == pixels(solver.generate_img(PROMPT, seed=1, jacobi_window=4)[0])


# ------------------------------------------------------------------------------------- the page's logic


def test_draw_reports_each_row_and_draws_what_the_solver_draws(solver: InferenceSolver) -> None:
    rows, _ = solver.grid_size()
    reported: list[tuple[int, int]] = []
    picture = draw(
        solver,
        f"  {PROMPT} ",
        cfg=2.0,
        image_top_k=0,
        temperature=0.8,
        seed=4,
        rows_done=lambda *a: reported.append(a),
    )
    assert reported == [(row, rows) for row in range(rows + 1)]
    expected = solver.generate_img(PROMPT, cfg=2.0, image_top_k=None, temperature=0.8, seed=4)[0]
    assert pixels(picture) == pixels(expected)
    with pytest.raises(ValueError, match="type a prompt"):
        draw(solver, "   ")


def test_ask_carries_images_and_answers_from_turn_to_turn(solver: InferenceSolver) -> None:
    first_image, record = scene(solver, 3)
    second_image, _ = scene(solver, 4)
    q1, q2 = record["vqa"][0]["question"], "is there a red triangle?"
    one = ask(solver, Conversation(), q1, [first_image], max_new_tokens=6)
    answer = solver.generate([first_image], [[IMAGE_PLACEHOLDER + q1, None]], max_gen_len=6)
    assert one.pieces == ([answer] if answer else [])
    assert one.conversation.qas == ((IMAGE_PLACEHOLDER + q1, answer),)
    two = ask(solver, one.conversation, q2, [second_image], max_new_tokens=6, temperature=0.7, seed=3)
    expected = solver.generate(
        [first_image, second_image],
        [[IMAGE_PLACEHOLDER + q1, answer], [IMAGE_PLACEHOLDER + q2, None]],
        max_gen_len=6,
        temperature=0.7,
        seed=3,
    )
    assert "".join(p for p in two.pieces if isinstance(p, str)) == expected.replace(IMAGE_PLACEHOLDER, "")
    assert len(two.conversation.images) == 2 + expected.count(IMAGE_PLACEHOLDER)
    assert [pixels(i) for i in two.conversation.images[:2]] == [pixels(first_image), pixels(second_image)]
    # a text-only follow-up sees both earlier images through the conversation
    three = ask(solver, two.conversation, "how many objects are there?", max_new_tokens=4)
    assert len(three.conversation.qas) == 3 and three.conversation.qas[2][0] == "how many objects are there?"


def test_ask_refuses_bad_turns_and_keeps_the_conversation(solver: InferenceSolver, tmp_path: Path) -> None:
    image, _ = scene(solver)
    start = ask(solver, Conversation(), "what color is it?", [image], max_new_tokens=2).conversation
    with pytest.raises(ValueError, match="type a question"):
        ask(solver, start, "  ", [image])
    with pytest.raises(ValueError, match="upload the image instead"):
        ask(solver, start, f"{IMAGE_PLACEHOLDER} what is this?")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png"):
        ask(solver, start, "and this one?", [tmp_path / "broken.png"])
    assert len(start.qas) == 1 and len(start.images) == 1  # frozen: a failed turn cannot have changed it


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^error: export directory not found: .*nowhere$"):
        main(["--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"^error: --port must lie in 1\.\.65535, got 70000$"):
        main(["--model", str(tmp_path), "--port", "70000"])


@pytest.mark.slow  # imports Gradio and builds the page (~8 s)
def test_a_taken_port_is_one_error_line(export: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"^error: cannot serve on 127\.0\.0\.1:{port} \(taken"):
            main(["--model", str(export), "--port", str(port)])


# --------------------------------------------------------------------------------------- in the browser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def page_export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """The random export with 64 px pictures (8x8 codes): a draw long enough (~1 s on 2 cores) for Gradio's
    progress updates (sent every 0.1 s) to reach the page."""
    return write_export(tmp_path_factory.mktemp("export64") / "export", sp_model, "generation.image_size=64")


@pytest.fixture
def page_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The demo's command line serving the export under test on a free loopback port: ``(url, export)``."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: install the OS package (apt-get install chromium) for the UI test")
    chosen = os.environ.get("UMLLM_DEMO_EXPORT")
    model = Path(chosen) if chosen else request.getfixturevalue("page_export")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "GRADIO_TEMP_DIR": str(tmp_path / "gr"),
    }
    log = (tmp_path / "demo.log").open("w")
    command = [sys.executable, "-m", "unified_mllm.serve.demo", "--model", str(model), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"the demo exited with {server.returncode}: {(tmp_path / 'demo.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer within 180 s: {(tmp_path / 'demo.log').read_text()}")
            time.sleep(0.5)
        yield url, model
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


# Records every text of the draw panel's status while it changes (the progress bar's "k/n rows" come and go).
PROGRESS_WATCH = """
window.progressSeen = [];
new MutationObserver(() => {
  const panel = document.querySelector('#drawn');
  const text = panel ? panel.innerText : '';
  if (text.includes(' rows')) window.progressSeen.push(text);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def shown(page: Page, locator: Locator) -> None:
    """Wait for ``locator``; on a timeout fail with the page's error toasts (what the user would read)."""
    try:
        locator.wait_for(timeout=60_000)
    except Exception as exc:  # Playwright's TimeoutError
        toasts = page.locator(".toast-body").all_inner_texts()
        raise AssertionError(f"the page showed no answer; its errors: {toasts}") from exc


@pytest.mark.slow
def test_the_page_answers_and_draws_in_a_browser(page_url: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, model = page_url
    solver = InferenceSolver.from_pretrained(model)
    gen = solver.config.generation
    image, record = scene(solver)
    upload = tmp_path / "scene.png"
    image.save(upload)
    question = next(qa["question"] for qa in record["vqa"] if qa["type"] == "count")
    prompt = record["t2i"][0]["prompt"]
    # What the page must show, from its sliders' defaults (chat greedy; the export's generation settings).
    budget = min(gen.max_new_tokens, solver.model.config.lm.max_position_embeddings)
    answer = solver.generate(
        [image], [[IMAGE_PLACEHOLDER + question, None]], max_gen_len=budget, seed=gen.seed
    )
    expected = solver.generate_img(
        prompt, cfg=gen.cfg_scale, image_top_k=gen.image_top_k, temperature=gen.temperature, seed=gen.seed
    )[0]

    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})

            def local_only(route: Route) -> None:
                if route.request.url.startswith("http://127.0.0.1"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.add_init_script(PROGRESS_WATCH)
            page.goto(url)
            page.locator("#chat-input input[type=file]").set_input_files(upload)
            page.locator("#chat-input textarea").fill(question)
            page.locator("#chat-input textarea").press("Enter")
            bot = page.locator('#chatbot [data-testid="bot"]').first
            shown(page, bot)
            shown_answer = bot.inner_text().strip()

            page.locator("#draw-prompt textarea").fill(prompt)
            page.locator("#draw-button").click()
            drawn = page.locator("#drawn img")
            shown(page, drawn)
            png = page.request.get(drawn.get_attribute("src")).body()
            page.wait_for_function("[...document.images].every((image) => image.complete)")
            shot = Path(os.environ.get("UMLLM_DEMO_SCREENSHOT") or tmp_path / "demo.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=shot)
            progress = page.evaluate("window.progressSeen")
        finally:
            browser.close()

    assert outside == []
    assert " ".join(shown_answer.split()) == (
        " ".join(answer.split()) or "(no answer: the model ended its turn at once)"
    )
    assert pixels(Image.open(io.BytesIO(png))) == pixels(expected)
    rows, _ = solver.grid_size()
    # the bar was fed row by row: the page showed "k/8 rows" while drawing
    seen = {int(k) for text in progress for k in re.findall(rf"(\d+)/{rows} rows", text)}
    assert seen and seen <= set(range(rows + 1)), progress
    assert Image.open(shot).size == (1280, 860)
