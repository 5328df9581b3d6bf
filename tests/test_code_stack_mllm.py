"""The unified model with code-stack tokenizers (UniTok, DualToken) end to end on a micro world: pre-tokenized
stacks, a training run whose depth heads learn, the export, and the solver's understanding and generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import spy_on_engine
from unified_mllm.config import Config, get_preset, load_config
from unified_mllm.data import pretokenize as P
from unified_mllm.data.conversation import IGNORE_INDEX
from unified_mllm.data.dataset import batch_stream
from unified_mllm.data.shapes import write_split
from unified_mllm.infer.engine import Engine
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.layout import generation_prompt, unconditional_prompt
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer
from unified_mllm.train.run_log import METRICS_FILE, read_metrics
from unified_mllm.train.trainer import train
from unified_mllm.vision.tokenizer_registry import build_visual_tokenizer

REPO = Path(__file__).resolve().parents[1]
STAGE2 = REPO / "configs" / "train" / "tiny-stage2.yaml"
# Small tokenizers at the world's 64 px (8 x 8 positions) and a short stage-2 run.
SMALL = {
    "unitok": [
        "model.vq.unitok.width=32",
        "model.vq.unitok.encoder_layers=1",
        "model.vq.unitok.decoder_layers=1",
        "model.vq.unitok.num_heads=2",
        "model.vq.unitok.projection_heads=2",
        "model.vq.unitok.text_width=16",
        "model.vq.unitok.text_layers=1",
        "model.vq.unitok.text_heads=2",
        "model.vq.unitok.clip_dim=16",
    ],
    "dualtoken": ["model.vq.dualtoken.pretrained=null"],
}
RUN = [
    "train.max_steps=4",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.wandb.mode=disabled",
    "train.precision=fp32",
    "checkpoint.every_steps=4",
    "data.max_seq_len=256",
    "data.shuffle_buffer=8",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "model.vision.pretrained=null",
    "checkpoint.init_from=null",
    "model.depth_head.num_layers=1",
    "model.depth_head.width=64",
]


def _config(kind: str, root: Path, sp_model: Path) -> Config:
    overrides = [
        f"output_root={root}",
        f"data.root={root}/shapes",
        f"tokenizer.path={sp_model}",
        "tokenizer.vocab_size=400",
        "tokenizer.num_size_tokens=9",
        f"model.vq.checkpoint={root}/vq",
        "data.world.num_train=12",
        "data.world.samples_per_shard=6",
        "data.pretokenize_batch_size=4",
        *SMALL[kind],
        *RUN,
    ]
    files = [str(STAGE2), str(REPO / "configs" / "tokenizer" / f"{kind}-tiny.yaml")]
    return load_config(files, overrides)


@pytest.fixture(scope="module", params=["unitok", "dualtoken"])
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sp_model: Path
) -> Config:
    """A random tokenizer of the kind, the world pre-tokenized with it, and a finished 4-step stage-2 run."""
    root = tmp_path_factory.mktemp(request.param)
    config = _config(request.param, root, sp_model)
    torch.manual_seed(0)
    build_visual_tokenizer(config.model.vq).save_pretrained(root / "vq")
    write_split(config.data.world, config.data.root, "train", progress=False)
    P.pretokenize(config, ["train"], device="cpu", progress=False)
    train(config, progress=False)
    return config


def test_batches_carry_the_stacks_of_every_code_position(trained: Config) -> None:
    batch = next(batch_stream(trained, with_features=True))
    depth = trained.model.vq.code_depth
    mask, targets, stacks = batch.code_mask, batch.code_targets, batch.code_stacks
    assert stacks.shape == (int(mask.sum()), depth)
    assert bool((targets <= mask).all()) and int(targets.sum()) > 0  # text-to-image samples supervise stacks
    assert bool((batch.labels[mask] == IGNORE_INDEX).all())  # the LM head never predicts stacked codes
    # A position's id is its stack's first code.
    tokens = TextTokenizer.from_config(trained.tokenizer, trained.model.vq.codebook_size).special_tokens()
    first = tokens.codes_to_ids(stacks[:, 0].numpy())
    assert np.array_equal(batch.input_ids[mask].numpy(), first)


def test_pretokenized_stacks_and_training_with_depth_heads(trained: Config) -> None:
    records = read_metrics(Path(trained.checkpoint.dir) / METRICS_FILE, "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    model = UnifiedModel.from_pretrained(trained.checkpoint.export_dir)
    assert model.code_heads is not None and model.code_embedder is not None
    assert model.code_heads.depth == trained.model.vq.code_depth


def test_depth_head_losses_are_per_position(trained: Config) -> None:
    batch = next(batch_stream(trained, with_features=True))
    model = UnifiedModel.from_pretrained(trained.checkpoint.export_dir).eval()
    inputs = batch.model_inputs()
    targets = inputs.pop("code_targets")
    with torch.no_grad():
        output = model(**inputs, code_targets=targets, return_hidden=True)
    # Entry i: the stack at the i-th target position (row-major), predicted from the hidden state before it.
    hidden = output.hidden_states.reshape(-1, model.config.lm.hidden_size)
    previous = torch.nonzero(targets.reshape(-1)).squeeze(1) - 1
    expected = model.code_heads.loss(hidden[previous], batch.code_stacks[targets[batch.code_mask]])
    assert output.code_losses.shape == (int(targets.sum()),) and output.code_losses.dtype == torch.float32
    torch.testing.assert_close(output.code_losses, expected)
    # No supervised stack (an understanding-only micro-batch): nothing to sum, yet every depth-head parameter
    # gets a (zero) gradient, so all ranks reduce the same parameters.
    model.train()
    none = model(**inputs, code_targets=torch.zeros_like(targets)).code_losses
    assert none.shape == (0,)
    (none.sum() + 0 * output.code_losses.sum()).backward()
    grads = [p.grad for p in model.code_heads.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_solver_understands_and_generates_with_code_stacks(trained: Config) -> None:
    solver = InferenceSolver.from_pretrained(trained.checkpoint.export_dir)
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    image[10:30, 10:30] = (220, 30, 30)
    picture = Image.fromarray(image)  # a red square
    answer = solver.generate([picture], [["<|image|>what color is the square?", None]], max_gen_len=4)
    assert isinstance(answer, str)
    images = solver.generate_img(["a large red square in the center", "a small blue circle"], cfg=2.0, seed=0)
    assert [i.size for i in images] == [(64, 64), (64, 64)]
    again = solver.generate_img(["a large red square in the center", "a small blue circle"], cfg=2.0, seed=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    with pytest.raises(ValueError, match="Jacobi decoding supports one code per position"):
        solver.generate_img("a small blue circle", jacobi_window=4)


def test_an_image_drawn_inside_an_answer_keeps_its_stacks(
    trained: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model biased to open an image: the drawn grid's stacks decode the picture and ride along as prompt
    stacks when decoding resumes, in the order of the code positions."""
    solver = InferenceSolver.from_pretrained(trained.checkpoint.export_dir)
    tokens = solver.tokens
    bias = torch.zeros(solver.model.config.lm.vocab_size)
    bias[tokens.image_start] = 1e4
    hook = solver.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    calls = spy_on_engine(solver, monkeypatch)
    grid = 3 + 8 * (8 + 1)  # <image-start> <size> <size> + 8 rows of 8 codes and <row-end>
    try:
        pieces = solver.generate_interleaved([], [["draw", None]], max_gen_len=grid + 5)
    finally:
        hook.remove()
    assert isinstance(pieces[0], Image.Image) and pieces[0].size == (64, 64)
    first, second = calls[:2]
    assert first["code_stacks"] is None  # a text prompt
    prompt = np.asarray(second["prompts"][0])
    stacks = second["code_stacks"].numpy()
    is_code = tokens.is_code(prompt)
    assert len(stacks) == is_code.sum() == 64
    np.testing.assert_array_equal(tokens.codes_to_ids(stacks[:, 0]), prompt[is_code])
    redrawn = solver.vq.codes_to_images([stacks.reshape(8, 8, -1)])[0]
    np.testing.assert_array_equal(np.asarray(redrawn), np.asarray(pieces[0]))


# ------------------------------------------------------------------------------------ engine vs by hand


@pytest.fixture(scope="module")
def stacked_model() -> UnifiedModel:
    """The tiny LM with a random 2-code stack per position (UniTok-style, 16 codes per sub-codebook)."""
    config = get_preset("tiny")
    config.vq.kind, config.vq.codebook_size, config.vq.embed_dim = "unitok", 16, 8
    config.vq.unitok.num_codebooks = 2
    config.depth_head.num_layers, config.depth_head.width = 1, 64
    torch.manual_seed(0)
    return UnifiedModel(config).eval()


def _grid_by_hand(
    model: UnifiedModel, tokens, prompts: list[list[int]], cfg: float, h: int, w: int
) -> np.ndarray:
    """Greedy guided stacks by full forwards without a cache: the reference the engine must reproduce."""
    ids = [list(p) for p in prompts]
    stacks: list[list[np.ndarray]] = [[] for _ in prompts]
    picked = []
    code_table = torch.as_tensor(tokens.codes_to_ids(np.arange(tokens.num_codes)))
    for step in range(h * (w + 1)):
        hidden = []
        for row, row_ids in enumerate(ids):
            x = torch.tensor([row_ids])
            mask = torch.as_tensor(tokens.is_code(x.numpy()))
            code_stacks = torch.as_tensor(np.stack(stacks[row])) if stacks[row] else None
            out = model(
                x,
                code_stacks=code_stacks,
                code_mask=mask if code_stacks is not None else None,
                return_hidden=True,
            )
            hidden.append(out.hidden_states[0, -1])
        if step % (w + 1) == w:
            new_ids, stack = [tokens.row_end] * len(ids), None
        else:

            def choose(logits: torch.Tensor, slot: int) -> torch.Tensor:
                guided = logits[1] + cfg * (logits[0] - logits[1]) if len(ids) == 2 else logits[0]
                return guided.argmax().repeat(len(ids))

            stack = model.code_heads.sample(torch.stack(hidden), choose)[0].numpy()
            new_ids = [int(code_table[stack[0]])] * len(ids)
        for row in range(len(ids)):
            ids[row].append(new_ids[row])
            if stack is not None:
                stacks[row].append(stack)
        if stack is not None:
            picked.append(stack)
    return np.stack(picked).reshape(h, w, -1)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_engine_samples_stacks_like_full_forwards(
    stacked_model: UnifiedModel, sp_tokenizer, cfg: float
) -> None:
    tokens = sp_tokenizer.special_tokens()
    condition = sp_tokenizer.encode("a red circle")
    grid = Engine(stacked_model, tokens).generate_images(
        [condition], height=2, width=3, cfg_scale=cfg, greedy=True
    )[0]
    assert grid.shape == (2, 3, 2)
    prompts = [generation_prompt(condition, tokens, 2, 3)]
    if cfg != 1.0:
        prompts.append(unconditional_prompt(tokens, 2, 3))
    assert np.array_equal(grid, _grid_by_hand(stacked_model, tokens, prompts, cfg, 2, 3))
