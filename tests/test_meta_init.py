"""The trainer's meta-device start: the meta build draws like a CPU build, parameters stay on ``meta`` until
sharded, and every rank's shards hold exactly the checkpoint's values (FSDP2 over 2 gloo processes)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from unified_mllm.config import Config, load_config
from unified_mllm.model.export import unique_state_dict
from unified_mllm.model.meta_init import build_meta_model
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.train import backend as backend_module
from unified_mllm.train import distributed, model_init
from unified_mllm.train.backend import build_backend
from unified_mllm.train.model_init import shard_region
from unified_mllm.train.optim import apply_param_rules, config_rules
from unified_mllm.train.trainer import build_model
from unified_mllm.vision.siglip import build_siglip_tower

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "configs" / "train" / "tiny-stage1.yaml"
VARIANTS = {
    "tiny": [],
    "grid-positions": ["model.grid_positions=32"],
    "unitok": ["--config", "configs/model/unitok-tiny.yaml"],
    "dualtoken": ["--config", "configs/model/dualtoken-tiny.yaml", "model.vq.dualtoken.pretrained=null"],
}


def variant_config(name: str, *extra: str) -> Config:
    files, overrides = [STAGE1], []
    args = iter(VARIANTS[name])
    for arg in args:
        if arg == "--config":
            files.append(REPO / next(args))
        else:
            overrides.append(arg)
    return load_config(files, [*overrides, *extra])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_meta_build_draws_like_a_cpu_build(name: str) -> None:
    config = variant_config(name).model
    torch.manual_seed(5)
    UnifiedModel(config, device="cpu")
    after_cpu = torch.get_rng_state()
    torch.manual_seed(5)
    model = build_meta_model(config)
    assert torch.equal(torch.get_rng_state(), after_cpu)
    assert all(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random export of the tiny model (seed 123) and a random SigLIP tower directory (seed 7)."""
    root = tmp_path_factory.mktemp("checkpoints")
    config = variant_config("tiny").model
    torch.manual_seed(123)
    UnifiedModel(config, device="cpu").save_pretrained(root / "export")
    torch.manual_seed(7)
    build_siglip_tower(config.vision, "cpu").save_pretrained(root / "siglip")
    return root / "export", root / "siglip"


def start_config(checkpoints: tuple[Path, Path], *extra: str) -> Config:
    export, siglip = checkpoints
    return variant_config(
        "tiny",
        f"checkpoint.init_from={export}",
        f"model.vision.pretrained={siglip}",
        "train.precision=fp32",
        "train.device=cpu",
        *extra,
    )


def expected_start(checkpoints: tuple[Path, Path]) -> dict[str, torch.Tensor]:
    """The step-0 weights the checkpoints define: the export, with the tower from the SigLIP directory."""
    export, siglip = checkpoints
    weights = load_file(str(export / "model.safetensors"))
    tower = load_file(str(siglip / "model.safetensors"))
    weights.update({f"vision.tower.{k}": v for k, v in tower.items() if f"vision.tower.{k}" in weights})
    return weights


def cpu_start(config: Config) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The step-0 weights and generator state of the CPU build (the trainer's path before the meta start)."""
    torch.manual_seed(config.train.seed)
    model = UnifiedModel(config.model, device="cpu")
    state = torch.get_rng_state()
    model_init.load_starting_weights(model, config)
    return {k: v.detach().clone() for k, v in unique_state_dict(model).items()}, state


def test_covered_checkpoints_start_on_meta_and_load_exactly(checkpoints: tuple[Path, Path]) -> None:
    config = start_config(checkpoints, "train.parallel.backend=none")
    reference, reference_rng = cpu_start(config)
    model, materialize = build_model(config, distributed.DistInfo(0, 1, 0, torch.device("cpu")))
    assert materialize is not None and all(p.is_meta for p in model.state_dict().values())
    assert torch.equal(torch.get_rng_state(), reference_rng)
    build_backend(
        model,
        apply_param_rules(model, config_rules(config)),
        config,
        distributed.DistInfo(0, 1, 0, torch.device("cpu")),
        materialize=materialize,
    )
    loaded = unique_state_dict(model)
    assert loaded.keys() == reference.keys()
    assert [k for k in reference if not torch.equal(loaded[k], reference[k])] == []
    expected = expected_start(checkpoints)
    assert all(torch.equal(loaded[k], expected[k].float()) for k in expected)
    assert torch.equal(model.lm.rotary_emb.inv_freq, UnifiedModel(config.model).lm.rotary_emb.inv_freq)


def test_uncovered_weights_keep_the_cpu_build(checkpoints: tuple[Path, Path]) -> None:
    config = start_config(checkpoints, "checkpoint.init_from=null")  # the projector is random: CPU build
    reference, reference_rng = cpu_start(config)
    model, materialize = build_model(config, distributed.DistInfo(0, 1, 0, torch.device("cpu")))
    assert materialize is None and torch.equal(torch.get_rng_state(), reference_rng)
    assert all(torch.equal(v, reference[k]) for k, v in unique_state_dict(model).items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank(
    rank: int, world_size: int, port: int, checkpoints: tuple[Path, Path], out: Path, extra: tuple[str, ...]
) -> None:
    """One rank: build, spy on the FSDP2 sharding step, materialise, then report what it holds."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    config = start_config(checkpoints, *extra)
    seen: dict[str, Any] = {}
    shard = backend_module.apply_fsdp

    def spy(model: torch.nn.Module, *args: Any) -> Any:
        seen["meta_before_sharding"] = all(p.is_meta for p in model.parameters())
        result = shard(model, *args)
        seen["meta_after_sharding"] = all(p.is_meta for p in model.parameters())
        return result

    backend_module.apply_fsdp = spy
    model, materialize = build_model(config, info)
    seen["rng"] = torch.get_rng_state()
    build_backend(
        model, apply_param_rules(model, config_rules(config)), config, info, materialize=materialize
    )
    expected = expected_start(checkpoints)
    seen["regions"] = {}
    seen["mismatches"] = []
    for name, tensor in unique_state_dict(model).items():
        shard = shard_region(tensor)
        local, region = (tensor, None) if shard is None else shard
        whole = expected[name].float() if name in expected else None
        if whole is None:
            continue
        part = whole if region is None else whole[tuple(slice(a, b) for a, b in region)]
        if not torch.equal(local, part):
            seen["mismatches"].append(name)
        seen["regions"][name] = region
    torch.save(seen, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_fsdp_ranks_shard_on_meta_and_read_their_slices(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    extra = ("train.parallel.backend=fsdp",)
    mp.spawn(_rank, args=(2, _free_port(), checkpoints, tmp_path, extra), nprocs=2, join=True)
    _, reference_rng = cpu_start(start_config(checkpoints))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for seen in ranks:
        assert seen["meta_before_sharding"] and seen["meta_after_sharding"]
        assert seen["mismatches"] == []
        assert torch.equal(seen["rng"], reference_rng)
    # Parameters are really split: the ranks hold disjoint halves of the embedding's rows.
    embed = [seen["regions"]["lm.embed_tokens.weight"] for seen in ranks]
    assert embed[0][0][1] == embed[1][0][0] and embed[0][0][0] == 0


def test_deepspeed_ranks_start_from_the_checkpoint(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    """DeepSpeed partitions materialised parameters: the meta model is allocated whole before it initialises."""
    pytest.importorskip("deepspeed")
    extra = (
        "train.parallel.backend=deepspeed",
        f"train.parallel.deepspeed_config={REPO}/configs/deepspeed/zero2.json",
    )
    mp.spawn(_rank, args=(2, _free_port(), checkpoints, tmp_path, extra), nprocs=2, join=True)
    _, reference_rng = cpu_start(start_config(checkpoints))
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "meta_before_sharding" not in seen  # FSDP2 never ran
        assert seen["mismatches"] == [] and len(seen["regions"]) > 0
        assert torch.equal(seen["rng"], reference_rng)
