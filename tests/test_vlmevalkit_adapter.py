"""The VLMEvalKit adapter on its own (VLMEvalKit is not installed here): messages in VLMEvalKit's format answered
as the solver answers the same prompt, the LLaVA-style prompts of multiple-choice and yes/no rows (TSV columns),
images from VLMEvalKit's dump function, a path column or base64, and what it refuses."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_export
from unified_mllm.eval.adapters import vlmevalkit
from unified_mllm.eval.adapters.vlmevalkit import UnifiedMLLM, dataset_type, message_prompt


def picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> UnifiedMLLM:
    export = write_export(tmp_path_factory.mktemp("export") / "export", sp_model)
    return UnifiedMLLM(model_path=str(export), max_new_tokens=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(2):
        paths.append(str(folder / f"{i}.png"))
        picture(i).save(paths[-1])
    return paths


def test_messages_are_answered_like_the_same_prompt(model: UnifiedMLLM, images: list[str]) -> None:
    solver = model.solver
    message = [{"type": "image", "value": images[0]}, {"type": "text", "value": "how many objects?"}]
    expected = solver.generate([images[0]], [["<|image|>how many objects?", None]], max_gen_len=4).strip()
    assert model.generate_inner(message, dataset="MMBench_DEV_EN") == expected
    assert model.generate(message) == expected  # the base class's entry point
    interleaved = [
        {"type": "text", "value": "first"},
        {"type": "image", "value": images[0]},
        {"type": "text", "value": "then"},
        {"type": "text", "value": "same?"},
        {"type": "image", "value": images[1]},
    ]
    assert message_prompt(interleaved) == ("first<|image|>then\nsame?<|image|>", images)
    assert model.generate_inner(interleaved) == solver.generate(
        images, [["first<|image|>then\nsame?<|image|>", None]], max_gen_len=4
    )
    assert model.generate("what is a circle?") == solver.generate(
        [], [["what is a circle?", None]], max_gen_len=4
    )
    assert message_prompt(interleaved, implicit=True)[0] == "firstthen\nsame?"


def test_multiple_choice_and_yes_no_rows_get_llava_prompts(model: UnifiedMLLM, images: list[str]) -> None:
    row = {"index": 3, "question": "What colour is the circle?", "hint": "A picture.", "A": "red", "B": "blue",
           "C": float("nan"), "image_path": images[0]}  # fmt: skip
    assert model.use_custom_prompt("MMBench_DEV_EN") and model.use_custom_prompt("POPE")
    assert not model.use_custom_prompt("TextVQA_VAL") and not model.use_custom_prompt(None)
    assert model.build_prompt(row, "MMBench_DEV_EN") == [
        {"type": "image", "value": images[0]},
        {
            "type": "text",
            "value": "A picture.\nWhat colour is the circle?\nA. red\nB. blue\n"
            "Answer with the option's letter from the given choices directly.",
        },
    ]
    chinese = {"question": "圆是什么颜色？", "A": "红", "B": "蓝", "hint": float("nan")}
    assert (
        model.build_prompt(chinese, "MMBench_DEV_CN")[-1]["value"]
        == "圆是什么颜色？\nA. 红\nB. 蓝\n请直接回答选项字母。"
    )
    no_options = {"question": "Which colour?", "image_path": [images[0], images[1]]}
    built = model.build_prompt(no_options, "SEEDBench_IMG")
    assert [m["value"] for m in built] == [
        *images,
        "Which colour?\nAnswer the question using a single word or phrase.",
    ]
    yorn = {"question": "Is there a red circle in the image? Please answer yes or no."}
    assert model.build_prompt(yorn, "MME")[-1]["value"] == (
        "Is there a red circle in the image? Please answer yes or no.\n"
        "Answer the question using a single word or phrase."
    )
    # VLMEvalKit's dump of the TSV's images wins; without one, base64 in the image column is decoded
    model.set_dump_image(lambda line: [images[1]])
    assert model.build_prompt(yorn, "POPE")[0] == {"type": "image", "value": images[1]}
    model.dump_image_func = None
    buffer = io.BytesIO()
    picture(0).save(buffer, format="PNG")
    encoded = {"question": "Is it red?", "image": base64.b64encode(buffer.getvalue()).decode()}
    message = model.build_prompt(encoded, "POPE")
    assert message[0]["value"] == buffer.getvalue()
    assert model.generate_inner(message) == model.solver.generate(
        [picture(0)],
        [["<|image|>Is it red?\nAnswer the question using a single word or phrase.", None]],
        max_gen_len=4,
    )


def test_dataset_kinds_and_what_it_refuses(model: UnifiedMLLM) -> None:
    assert not vlmevalkit.HAVE_VLMEVAL or dataset_type("MME") == "Y/N"
    assert [dataset_type(d) for d in ("MME", "HallusionBench", "MMStar", "MMMU_DEV_VAL", "MME-RealWorld")] == [
        "Y/N", "Y/N", "MCQ", "MCQ", "MCQ",
    ]  # fmt: skip
    assert dataset_type("TextVQA_VAL") == "" and dataset_type(None) == ""
    with pytest.raises(ValueError, match="multiple-choice and yes/no"):
        model.build_prompt({"question": "what?"}, "TextVQA_VAL")
    with pytest.raises(ValueError, match="'video' item"):
        model.generate_inner([{"type": "video", "value": "clip.mp4"}])
    with pytest.raises(ValueError, match="unknown arguments"):
        UnifiedMLLM(model_path="unused", temperature=0.5)
