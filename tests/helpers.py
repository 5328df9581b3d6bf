"""Plain helpers and constants shared by several test modules (fixtures live in conftest.py).

Test modules import from here, never from one another: a test module imported by another is collected twice
under two names, and its helpers are hard to find.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from unified_mllm.config import Config, get_preset, load_config
from unified_mllm.data import pretokenize as P
from unified_mllm.data.shapes import write_split
from unified_mllm.layout import SpecialTokens
from unified_mllm.model.export import unique_state_dict
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import CHAMELEON_SPECIAL_NAMES, chameleon_name_of_code
from unified_mllm.vision.vqgan import VQGAN

if TYPE_CHECKING:
    from unified_mllm.infer.solver import InferenceSolver

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------- vocabularies

# A hand-made vocabulary: 9 structural roles at 100.., 8 size tokens at 200.. (unit 1), 16 codes at 1000..
TOKENS = SpecialTokens(
    bos=100, eos=101, pad=102, image_start=103, image_end=104, row_end=105, separator=106,
    end_of_turn=107, feature=108, size_ids=tuple(range(200, 208)), size_unit=1,
    code_ids=tuple(range(1000, 1016)),
)  # fmt: skip

# The words of the test corpus (conftest's sentencepiece tokenizer) and of the fake Chameleon vocabulary.
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "circle",
    "square",
    "triangle",
    "small",
    "large",
    "left",
    "right",
    "above",
    "below",
    "top",
    "bottom",
    "center",
    "is",
    "there",
    "how",
    "many",
    "objects",
    "what",
    "colour",
    "shape",
    "yes",
    "no",
    "one",
    "two",
    "three",
    "four",
]


def write_fake_chameleon_vocab(path: Path, num_codes: int = 12, num_sizes: int = 40) -> Path:
    """A WordLevel tokenizers JSON laid out like Chameleon's: image tokens named IMGIMG…, reserved entries.

    The image-token entries are deliberately *not* in code order, so tests prove that the mapping is
    resolved by name rather than by position.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<s>", "<pad>", "</s>", "<unk>"]
    codes = list(range(num_codes))
    random.Random(1).shuffle(codes)
    names += [chameleon_name_of_code(c) for c in codes]
    names += [n for role, n in CHAMELEON_SPECIAL_NAMES.items() if role not in ("bos", "eos", "pad")]
    names += [f"<reserved{8800 + n:05d}>" for n in range(num_sizes)]
    names += [*sorted(set(WORDS)), "?"]
    vocab = {name: i for i, name in enumerate(names)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    json.loads(path.read_text())  # the file must be plain JSON, like Chameleon's
    return path


TAMING_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {embed_dim}
    n_embed: {codebook_size}
    ddconfig:
      double_z: false
      z_channels: {z_channels}
      resolution: {resolution}
      in_channels: 3
      out_ch: 3
      ch: {base_channels}
      ch_mult: {channel_mult}
      num_res_blocks: {num_res_blocks}
      attn_resolutions: {attn_resolutions}
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {{disc_conditional: false, disc_in_channels: 3, disc_start: 0, disc_weight: 0.8, codebook_weight: 1.0}}
"""


def write_chameleon_checkpoint(tmp_path: Path, model: VQGAN, **extra: object) -> Path:
    """A Lightning-style vqgan.ckpt (generator + loss.* keys + trainer state) and a taming vqgan.yaml."""
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    ckpt = {"state_dict": state, "epoch": 3, "global_step": 1000, "optimizer_states": [], **extra}
    path = tmp_path / "vqgan.ckpt"
    torch.save(ckpt, path)
    (tmp_path / "vqgan.yaml").write_text(TAMING_YAML.format(**dataclasses.asdict(model.config)))
    return path


# ------------------------------------------------------------------------------------ tokenized worlds


def save_random_vq(path: Path, seed: int = 0, **changes: object) -> Path:
    """A random tiny VQ-GAN written with save_pretrained (the layout from_checkpoint reads)."""
    torch.manual_seed(seed)
    return VQGAN.from_config(dataclasses.replace(get_preset("tiny").vq, **changes)).save_pretrained(path)


def world_config(root: Path, sp_model: Path, *extra: str) -> Config:
    """The tiny preset over a 5-scene world in 3 shards under ``root``, with the test tokenizer."""
    return load_config(
        overrides=[
            "model.preset=tiny",
            f"data.root={root}/shapes",
            f"tokenizer.path={sp_model}",
            f"model.vq.checkpoint={root}/vq",
            "data.world.num_train=5",
            "data.world.samples_per_shard=2",
            "data.pretokenize_batch_size=2",
            *extra,
        ]
    )


def make_tokenized_world(root: Path, sp_model: Path, *extra: str) -> Config:
    """Generate the train split, a random VQ and the tokenized shards; returns the config."""
    config = world_config(root, sp_model, *extra)
    save_random_vq(root / "vq")
    write_split(config.data.world, config.data.root, "train", progress=False)
    P.pretokenize(config, ["train"], device="cpu", progress=False)
    return config


# ------------------------------------------------------------------------------------------ training

STAGE0 = REPO / "configs" / "train" / "tiny-stage0.yaml"
# A short LM run on a tokenized world, exact enough to compare across backends and world sizes.
SMALL_RUN = (
    "train.max_steps=6",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.wandb.mode=disabled",
    "train.precision=fp32",  # exact comparisons across backends and world sizes
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=5",
    "data.max_seq_len=256",
    "data.shuffle_buffer=8",
    "optim.warmup_steps=2",
    "model.vision.pretrained=null",
    "checkpoint.init_from=null",
)


def overrides(world: Config, run_dir: Path, *extra: str) -> list[str]:
    """The overrides of a SMALL_RUN of the LM trainer on ``world`` (from make_tokenized_world) into ``run_dir``."""
    return [
        f"output_root={run_dir}",
        f"data.root={world.data.root}",
        f"tokenizer.path={world.tokenizer.path}",
        f"tokenizer.num_size_tokens={world.tokenizer.num_size_tokens}",
        f"model.vq.checkpoint={world.model.vq.checkpoint}",
        *SMALL_RUN,
        *extra,
    ]


def torchrun_tokenizer(overrides: list[str], *, recipe: str, timeout: float = 120) -> None:
    """The tokenizer trainer under ``torchrun`` with two gloo ranks (one thread each); fails with its output's
    tail."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "unified_mllm.train.tokenizer",
        "--config",
        recipe,
        "--no-progress",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ----------------------------------------------------------------------------------------- inference


def spy_on_engine(solver: InferenceSolver, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the prompts and arguments of every engine.generate call the solver makes."""
    calls: list[dict] = []
    generate = solver.engine.generate

    def spy(prompts, **kwargs):
        calls.append({"prompts": [list(p) for p in prompts], **kwargs})
        return generate(prompts, **kwargs)

    monkeypatch.setattr(solver.engine, "generate", spy)
    return calls


# ------------------------------------------------------------------------------------ end-to-end scripts

# The micro budget of the quickstart and compare-tokenizers smoke tests: every step runs, a few steps each.
MICRO = [
    "data.world.num_train=120",
    "data.world.num_val=10",
    "data.world.num_test=10",
    "data.world.samples_per_shard=60",
    "tokenizer.vocab_size=420",
    "vq_train.steps=4",
    "vq_train.batch_size=2",
    "vq_train.eval_images=4",
    "vq_train.checkpoint_every=4",
    "contrastive.max_steps=4",
    "contrastive.batch_size=8",
    "train.max_steps=3",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.wandb.mode=disabled",
    "checkpoint.every_steps=3",
]


# ---------------------------------------------------------- published UniTok / DualToken blocks, by hand


def ref_layer_norm(x: torch.Tensor, state: dict, name: str, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(
        x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps
    )


def ref_linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def ref_geglu(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    """The published GeGluMlp: LayerNorm (eps 1e-6) on the input, gelu_tanh(w0 x) * w1 x, then w2."""
    h = ref_layer_norm(x, state, f"{name}.norm", 1e-6)
    gated = torch.nn.functional.gelu(ref_linear(h, state, f"{name}.w0"), approximate="tanh")
    return ref_linear(gated * ref_linear(h, state, f"{name}.w1"), state, f"{name}.w2")


def ref_attn_projection(x: torch.Tensor, state: dict, name: str, *, causal: bool = False) -> torch.Tensor:
    """The published AttnProjection of UniTok and DualToken: nn.LayerNorm (eps 1e-5) norms, attention with a
    zero key bias over max(in, out) // min(in, out) heads (averaged when narrowing), and the GeGluMlp."""
    in_dim, out_dim = state[f"{name}.norm1.weight"].shape[0], state[f"{name}.norm2.weight"].shape[0]
    inner = max(in_dim, out_dim)
    heads = inner // min(in_dim, out_dim)
    b, n, _ = x.shape
    bias = torch.cat(
        [state[f"{name}.attn.q_bias"], state[f"{name}.attn.zero_k_bias"], state[f"{name}.attn.v_bias"]]
    )
    qkv = torch.nn.functional.linear(
        ref_layer_norm(x, state, f"{name}.norm1", 1e-5), state[f"{name}.attn.qkv.weight"], bias
    )
    q, k, v = qkv.reshape(b, n, 3, heads, inner // heads).permute(2, 0, 3, 1, 4)
    a = ref_attention(q, k, v, causal=causal)
    a = a.mean(dim=1) if in_dim > out_dim else a.transpose(1, 2).reshape(b, n, -1)
    y = ref_linear(ref_layer_norm(x, state, f"{name}.norm3", 1e-5), state, f"{name}.proj")
    y = y + ref_linear(a, state, f"{name}.attn.proj")
    return y + ref_geglu(ref_layer_norm(y, state, f"{name}.norm2", 1e-5), state, f"{name}.mlp")


def write_export(directory: Path, sp_model: Path, *overrides: str) -> Path:
    """A random-weight tiny export written by the trainer's own exporter (unified_mllm.train.export), which
    copies the tokenizers in and rewrites their paths in config.yaml relative to the export."""
    config = load_config(
        overrides=[
            "model.preset=tiny",
            f"tokenizer.path={sp_model}",
            f"model.vq.checkpoint={save_random_vq(directory.parent / 'vq-source')}",
            "tokenizer.num_size_tokens=9",  # the test tokenizer's <size-0> .. <size-8>
            "generation.image_size=32",
            "generation.max_new_tokens=6",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    model = UnifiedModel(config.model)
    from unified_mllm.train.export import export_run  # the training stack, only for the tests that need it

    return export_run(unique_state_dict(model), config, directory, summary={"steps": 0})


@contextmanager
def serving(export: Path, **options: Any) -> Iterator[str]:
    """A real uvicorn server (`python -m unified_mllm.serve`'s app) on a free loopback port, with its own
    solver and engine worker; yields its base URL."""
    import uvicorn

    from unified_mllm.infer.solver import InferenceSolver
    from unified_mllm.serve.app import ServerOptions, create_app

    app = create_app(InferenceSolver.from_pretrained(export), ServerOptions(**options))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
