"""Parameter groups by module path, the AdamW optimizer and its warm-up + cosine schedule.

``optim.param_groups`` is an ordered list of rules ``{match, lr_scale, trainable, weight_decay}`` (TRAIN.md). A
rule matches a parameter when its ``match`` is ``''`` or a whole-component prefix of the parameter's name
(``vision.tower`` matches ``vision.tower.encoder.layers.0.mlp.fc1.weight`` but not ``vision.towers.x``);
later rules override earlier ones. A rule that matches nothing is an error (a typo), unless it has
``required: false`` (the stage-1 recipe freezes ``code_embedder`` / ``code_heads``, which only code-stack
tokenizers build, that way). One rule always comes first: ``{match: vision.tower, lr_scale:
model.vision.lr_scale}`` (UniToken trains SigLIP at 0.01 of the LR); a later rule may override it.

Parameters that end up frozen get ``requires_grad=False`` and stay out of the optimizer. Matrices (``ndim >=
2``, except embeddings) get weight decay; biases, norm scales and embeddings do not, the usual LLM practice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unified_mllm.config import Config, ConfigError, OptimConfig, ParamGroupConfig
from unified_mllm.train.schedule import warmup_cosine


@dataclass(frozen=True)
class ParamRule:
    """What the rules say about one parameter."""

    trainable: bool = True
    lr_scale: float = 1.0
    weight_decay: float | None = None


def matches(name: str, prefix: str) -> bool:
    """Whether ``prefix`` is ``''`` or a whole dotted-component prefix of the parameter ``name``."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def config_rules(config: Config) -> list[ParamGroupConfig]:
    """The rules of a run: SigLIP's LR scale from ``model.vision.lr_scale``, then ``optim.param_groups``."""
    tower = ParamGroupConfig(match="vision.tower", lr_scale=config.model.vision.lr_scale)
    return [tower, *config.optim.param_groups]


def resolve_rules(names: Iterable[str], rules: Sequence[ParamGroupConfig]) -> dict[str, ParamRule]:
    """The effective rule of every parameter name; a rule that matches nothing is a config error (a typo)
    unless it says ``required: false``."""
    names = list(names)
    resolved = {name: ParamRule() for name in names}
    for i, rule in enumerate(rules):
        hit = [name for name in names if matches(name, rule.match)]
        if not hit and rule.required:
            roots = sorted({name.split(".")[0] for name in names})
            raise ConfigError(
                f"`optim.param_groups[{i}].match`: {rule.match!r} matches no parameter "
                f"(top-level modules: {', '.join(roots)})"
            )
        for name in hit:
            resolved[name] = ParamRule(rule.trainable, rule.lr_scale, rule.weight_decay)
    return resolved


def apply_param_rules(model: nn.Module, rules: Sequence[ParamGroupConfig]) -> dict[str, ParamRule]:
    """Set ``requires_grad`` from the rules; returns the per-parameter rules. Raises when nothing trains."""
    named = dict(model.named_parameters())
    resolved = resolve_rules(named, rules)
    for name, param in named.items():
        param.requires_grad_(resolved[name].trainable)
    if not any(rule.trainable for rule in resolved.values()):
        raise ConfigError("`optim.param_groups`: every parameter is frozen; nothing would train")
    return resolved


def param_groups(
    model: nn.Module, resolved: dict[str, ParamRule], optim: OptimConfig
) -> list[dict[str, object]]:
    """AdamW groups of the trainable parameters: one per distinct (lr, weight decay), names kept for logs.

    ``model`` may be wrapped (FSDP2 keeps parameter names; DDP adds ``module.``, which is stripped).
    """
    groups: dict[tuple[float, float], dict[str, object]] = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("module.")
        rule = resolved[name]
        if not rule.trainable:
            continue
        decay = 0.0  # biases, norm scales and embeddings
        if param.ndim >= 2 and "embed" not in name:
            decay = optim.weight_decay if rule.weight_decay is None else rule.weight_decay
        key = (optim.lr * rule.lr_scale, decay)
        group = groups.setdefault(key, {"params": [], "names": [], "lr": key[0], "weight_decay": decay})
        group["params"].append(param)  # type: ignore[union-attr]
        group["names"].append(name)  # type: ignore[union-attr]
    return list(groups.values())


def build_optimizer(groups: list[dict[str, object]], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``groups`` (their ``names`` entries are kept: torch ignores unknown group keys)."""
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,  # type: ignore[arg-type]
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: Any, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine (or constant) decay of every group's LR, stepped once per optimizer step;
    ``optim``: any trainer's config section with ``warmup_steps``, ``min_lr_ratio`` (and ``schedule``)."""
    factor = warmup_cosine(
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        min_ratio=optim.min_lr_ratio,
        shape=getattr(optim, "schedule", "cosine"),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def backward_and_step(
    loss: torch.Tensor,
    parameters: Iterable[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    accept: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
) -> None:
    """One update of the small trainers: zero the gradients, backpropagate ``loss``, clip the gradients of
    ``parameters`` to norm ``grad_clip`` (0: no clipping), step the optimizer (unless ``accept(loss, norm)``
    refuses the step: the divergence guard) and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Without clipping the norm is still measured (for the guard); an infinite bound scales by exactly 1.
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf)
    if accept is None or accept(loss, norm):
        optimizer.step()
    scheduler.step()


def trainable_summary(resolved: dict[str, ParamRule], model: nn.Module) -> dict[str, int]:
    """Parameter counts: trainable and frozen, per top-level module (for the start-of-run report)."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("module.")
        root = name.split(".")[0]
        state = "trainable" if resolved[name].trainable else "frozen"
        counts[f"{root}/{state}"] = counts.get(f"{root}/{state}", 0) + param.numel()
    return counts
