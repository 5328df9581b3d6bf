"""Parameter rules by module path, AdamW groups (LR scale, weight decay) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unified_mllm.config import ConfigError, OptimConfig, ParamGroupConfig, load_config
from unified_mllm.train.optim import (
    apply_param_rules,
    build_optimizer,
    build_scheduler,
    config_rules,
    matches,
    param_groups,
    resolve_rules,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lm = nn.ModuleDict({"embed_tokens": nn.Embedding(4, 3), "proj": nn.Linear(3, 3)})
        self.lm_head = nn.Linear(3, 4, bias=False)
        self.vision = nn.ModuleDict({"tower": nn.Linear(2, 2), "projector": nn.Linear(2, 3)})


def test_matches_whole_path_components_only() -> None:
    assert matches("vision.tower.weight", "vision.tower") and matches("vision.tower.weight", "")
    assert matches("lm_head.weight", "lm_head") and not matches("lm_head.weight", "lm")
    assert not matches("vision.towers.weight", "vision.tower")


def test_later_rules_override_earlier_ones() -> None:
    names = ["lm.proj.weight", "vision.tower.weight", "vision.projector.bias"]
    rules = [
        ParamGroupConfig(match="vision", lr_scale=0.5),
        ParamGroupConfig(match="vision.tower", trainable=False),
    ]
    resolved = resolve_rules(names, rules)
    assert resolved["lm.proj.weight"].lr_scale == 1.0 and resolved["lm.proj.weight"].trainable
    assert not resolved["vision.tower.weight"].trainable
    assert resolved["vision.projector.bias"].lr_scale == 0.5


def test_stage1_rules_give_exact_groups() -> None:
    """LM frozen, tower at 0.01 x LR, projector at the LR; decay on matrices only."""
    model = Toy()
    config = load_config(["configs/train/stage1.yaml"])
    resolved = apply_param_rules(model, config_rules(config))
    assert not model.lm.proj.weight.requires_grad and not model.lm_head.weight.requires_grad
    groups = param_groups(model, resolved, config.optim)
    by_names = {tuple(g["names"]): (g["lr"], g["weight_decay"]) for g in groups}
    lr, decay = config.optim.lr, config.optim.weight_decay
    assert by_names == {
        ("vision.tower.weight",): (pytest.approx(lr * 0.01), decay),
        ("vision.tower.bias",): (pytest.approx(lr * 0.01), 0.0),
        ("vision.projector.weight",): (lr, decay),
        ("vision.projector.bias",): (lr, 0.0),
    }


def test_stage1_freezes_the_code_stack_modules_only_where_they_exist() -> None:
    """UniTok / DualToken models have code_embedder and code_heads beside the LM; stage 1 freezes them too,
    and its rules for them are optional, so a VQ-GAN model (the test above) trains under the same file."""
    model = Toy()
    model.code_embedder = nn.Linear(3, 3)
    model.code_heads = nn.Linear(3, 4)
    resolved = apply_param_rules(model, config_rules(load_config(["configs/train/stage1.yaml"])))
    frozen = {name for name, rule in resolved.items() if not rule.trainable}
    assert {"code_embedder.weight", "code_embedder.bias", "code_heads.weight", "code_heads.bias"} <= frozen
    assert not model.code_embedder.weight.requires_grad and model.vision.projector.weight.requires_grad


def test_embeddings_get_no_weight_decay() -> None:
    model = Toy()
    resolved = apply_param_rules(model, [])
    groups = param_groups(model, resolved, OptimConfig(weight_decay=0.1))
    decay_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert decay_of["lm.embed_tokens.weight"] == 0.0 and decay_of["lm_head.weight"] == 0.1


def test_typo_and_all_frozen_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"param_groups\[0\].*'lm_haed'.*top-level modules: lm, lm_head"):
        apply_param_rules(Toy(), [ParamGroupConfig(match="lm_haed")])
    optional = apply_param_rules(Toy(), [ParamGroupConfig(match="lm_haed", trainable=False, required=False)])
    assert all(rule.trainable for rule in optional.values())
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        apply_param_rules(Toy(), [ParamGroupConfig(match="", trainable=False)])


def test_schedule_warms_up_then_follows_the_cosine() -> None:
    model = Toy()
    optim = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.0)
    optimizer = build_optimizer(param_groups(model, apply_param_rules(model, []), optim), optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Warm-up starts at 1/warmup (the first step already moves the weights), then the cosine to 0.1 at step 6.
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(4)]
    assert seen == pytest.approx([0.5, 1.0, *cosine])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.95)
