"""LoRA (train.lora) end to end on a micro world: only the adapters train and sit in the optimizer, the base stays
bitwise as exported, the export holds the adapter alone (peft's format), merge-lora folds it into an export with
the same logits, the solver reads both alike, and FSDP2 on 2 gloo ranks resumes a killed LoRA run exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import make_tokenized_world, overrides
from unified_mllm.config import Config, ConfigError, load_config
from unified_mllm.convert.__main__ import convert
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.model import lora
from unified_mllm.model.export import unique_state_dict
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.train.checkpoint import list_checkpoints
from unified_mllm.train.export import SUMMARY_FILE, export_run
from unified_mllm.train.harness import CHECKPOINT_DIR, CRASH_ENV
from unified_mllm.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
STAGE2 = REPO / "configs" / "train" / "tiny-stage2.yaml"
# Rank 4 on every LM linear and on the projector; alpha / rank = 2.
LORA = ("train.lora.rank=4", "train.lora.alpha=8", "train.lora.projector=true", "optim.lr=3e-3")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Config:
    """16 tokenized scenes in 4 shards, a random tiny VQ-GAN and the test text tokenizer."""
    return make_tokenized_world(
        tmp_path_factory.mktemp("world"),
        sp_model,
        "data.world.num_train=16",
        "data.world.samples_per_shard=4",
    )


@pytest.fixture(scope="module")
def base(world: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight export of the world's tiny model (fp32): the base the adapters train on."""
    root = tmp_path_factory.mktemp("base")
    config = load_config([STAGE2], overrides(world, root))
    torch.manual_seed(1)
    model = UnifiedModel(config.model)
    return export_run(unique_state_dict(model), config, root / "export", summary={"steps": 0})


def lora_overrides(world: Config, root: Path, base: Path, *extra: str) -> list[str]:
    return overrides(world, root, f"checkpoint.init_from={base}", *LORA, *extra)


@pytest.fixture(scope="module")
def run(world: Config, base: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A finished one-process LoRA stage-2 run of 6 steps (SigLIP features on) from ``base``."""
    config = load_config([STAGE2], lora_overrides(world, tmp_path_factory.mktemp("lora"), base))
    train(config, progress=False)
    return config


def final_training_state(config: Config, tmp_path: Path) -> dict:
    """The model and optimizer state of the run's last checkpoint (DCP files read into one dict)."""
    step, path = list_checkpoints(Path(config.checkpoint.dir) / CHECKPOINT_DIR)[-1]
    assert step == config.train.max_steps
    dcp_to_torch_save(path / "dcp", tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=False)


def test_only_the_adapters_train_and_the_base_stays_bitwise(run: Config, base: Path, tmp_path: Path) -> None:
    state = final_training_state(run, tmp_path)
    model_state, optim_state = state["model"], state["optim"]
    exported = load_file(str(base / "model.safetensors"))
    base_part = {lora.base_name(k): v for k, v in model_state.items() if not lora.is_adapter_name(k)}
    assert base_part.keys() == exported.keys()
    changed = [k for k in exported if not torch.equal(base_part[k], exported[k])]
    assert not changed, changed[:5]
    # The adapters left their starting values: B from zero, A from init_adapter's draw.
    start = UnifiedModel(load_config([base / "config.yaml"]).model, device="meta")
    lora.add_adapter(start, run.train.lora, str(base))
    start.to_empty(device="cpu")
    lora.init_adapter(start, run.train.seed)
    adapters = {k: v for k, v in model_state.items() if lora.is_adapter_name(k)}
    assert adapters.keys() == lora.adapter_parameters(start).keys()
    assert len(adapters) == 2 * (7 * 4 + 2)  # A and B of 7 linears x 4 layers, and of the projector's 2
    for name, value in adapters.items():
        assert not torch.equal(value, lora.adapter_parameters(start)[name]), name
    # The optimizer holds the adapters' moments only.
    assert set(optim_state["state"]) == set(adapters)


def test_the_export_is_the_adapter_alone_in_peft_format(run: Config, base: Path) -> None:
    export = Path(run.checkpoint.export_dir)
    assert sorted(p.name for p in export.iterdir()) == [
        lora.ADAPTER_CONFIG,
        lora.ADAPTER_WEIGHTS,
        "config.yaml",
        SUMMARY_FILE,
    ]
    assert load_config([export / "config.yaml"]).train.lora == run.train.lora
    adapter_config = json.loads((export / lora.ADAPTER_CONFIG).read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["lora_alpha"] == 8 and adapter_config["base_model_name_or_path"] == str(base)
    tensors = load_file(str(export / lora.ADAPTER_WEIGHTS))
    assert all(
        k.startswith(lora.PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors
    )
    assert "base_model.model.lm.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.vision.projector.2.lora_B.weight" in tensors
    numel = sum(t.numel() for t in tensors.values())
    size = (export / lora.ADAPTER_WEIGHTS).stat().st_size
    assert numel * 4 <= size < numel * 4 + 16384  # fp32 adapter tensors and a header, nothing else
    assert size * 10 < (base / "model.safetensors").stat().st_size
    assert lora.base_export(export) == base


def test_merge_lora_gives_the_logits_of_base_plus_adapter(run: Config, base: Path, tmp_path: Path) -> None:
    adapter = Path(run.checkpoint.export_dir)
    merged_dir = convert(["merge-lora", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    for name in ("model.safetensors", "config.json", "config.yaml", "text.model", "lora_merge.json"):
        assert (merged_dir / name).is_file(), name
    assert not (merged_dir / lora.ADAPTER_CONFIG).exists()
    merged = UnifiedModel.from_pretrained(merged_dir)
    unmerged = UnifiedModel.from_pretrained(base)
    lora.apply_adapter(unmerged, adapter)
    assert not unmerged.training
    ids = torch.randint(0, merged.config.lm.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = unmerged(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Layers without an adapter are the base's, bit for bit; adapted ones moved.
    plain, stored = (
        load_file(str(base / "model.safetensors")),
        load_file(str(merged_dir / "model.safetensors")),
    )
    assert stored.keys() == plain.keys()
    moved = {k for k in plain if not torch.equal(plain[k], stored[k])}
    assert "lm.layers.0.mlp.down_proj.weight" in moved and "vision.projector.0.weight" in moved
    assert all(k.endswith("_proj.weight") or k.startswith("vision.projector.") for k in moved), moved


def test_the_solver_reads_the_adapter_export_as_the_merged_one(run: Config, tmp_path: Path) -> None:
    adapter = Path(run.checkpoint.export_dir)
    merged_dir = convert(["merge-lora", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    solvers = [InferenceSolver.from_pretrained(path) for path in (adapter, merged_dir)]
    for a, b in zip(unique_state_dict(solvers[0].model).items(), unique_state_dict(solvers[1].model).items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    answers = [
        s.generate([image], [["<|image|>how many shapes are there?", None]], max_gen_len=8) for s in solvers
    ]
    assert answers[0] == answers[1]


def test_merge_lora_refuses_what_is_not_an_adapter_export(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not an adapter export"):
        convert(["merge-lora", "--adapter", str(base), "--output", str(tmp_path / "out")])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("train.lora.target_modules=[q_proj,qkv_proj]",),
            "unknown module.*'qkv_proj'.*q_proj, k_proj, v_proj",
        ),
        (("train.lora.target_modules=[q_proj,q_proj]",), "lists a module twice"),
        (("train.lora.target_modules=[]",), "nothing to adapt"),
        (("train.lora.rank=-1",), "train.lora.rank.*>= 0"),
        (("train.lora.alpha=0",), "train.lora.alpha.*positive"),
        (("train.lora.dropout=1.0",), r"train.lora.dropout.*\[0, 1\)"),
        (("checkpoint.init_from=null",), "checkpoint.init_from.*LoRA"),
        (("model.vision.pretrained=/x",), "model.vision.pretrained.*null with LoRA"),
        (("train.parallel.backend=deepspeed",), "deepspeed is not supported"),
    ],
)
def test_bad_lora_settings_are_named(
    world: Config, tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    args = overrides(world, tmp_path, "checkpoint.init_from=/some/export", "train.lora.rank=4", *extra)
    with pytest.raises(ConfigError, match=message):
        load_config([STAGE2], args)


def test_rank_zero_is_plain_training(world: Config) -> None:
    config = load_config([STAGE2], overrides(world, Path("/unused")))
    assert config.train.lora.rank == 0 and not lora.enabled(config.train.lora)


# ---------------------------------------------------------------------------------------- two processes


def torchrun(args: list[str], *, crash_after: int = 0) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "unified_mllm.train", "--config", str(STAGE2), "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: str(crash_after)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode != 0) == bool(crash_after), result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_fsdp2_lora_run_killed_and_resumed_ends_with_the_same_adapter(
    world: Config, base: Path, run: Config, tmp_path: Path
) -> None:
    """Two gloo ranks, FSDP2 sharding base weights and adapters alike: a run killed after step 3 resumes from
    its step-2 checkpoint to the adapter of an uninterrupted run (the one-process run's names and shapes)."""
    straight = lora_overrides(world, tmp_path / "straight", base, "train.micro_batch_size=1")
    killed = lora_overrides(world, tmp_path / "killed", base, "train.micro_batch_size=1")
    torchrun(straight)
    torchrun(killed, crash_after=3)
    torchrun(killed)
    adapters = [
        load_file(str(Path(load_config([STAGE2], args).checkpoint.export_dir) / lora.ADAPTER_WEIGHTS))
        for args in (straight, killed)
    ]
    single = load_file(str(Path(run.checkpoint.export_dir) / lora.ADAPTER_WEIGHTS))
    assert adapters[0].keys() == adapters[1].keys() == single.keys()
    for key in single:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=0, atol=1e-6)
        assert adapters[0][key].shape == single[key].shape, key
