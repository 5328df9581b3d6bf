"""The MLP projector: shapes, structure, and the parameter count the presets report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unified_mllm.config import ConfigError, ProjectorConfig, get_preset
from unified_mllm.model.stats import count_parameters, parameter_counts, projector_parameter_count
from unified_mllm.vision.projector import MLPProjector, build_projector


def test_projector_maps_vision_width_to_lm_width() -> None:
    model = get_preset("tiny")
    projector = build_projector(model.vision, model.lm.hidden_size, model.projector)
    out = projector(torch.randn(3, 5, model.vision.hidden_size))
    assert out.shape == (3, 5, model.lm.hidden_size) == (3, 5, 256)


def test_default_projector_is_llava_mlp2x_gelu() -> None:
    projector = MLPProjector(16, 32)
    kinds = [type(layer) for layer in projector]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear]
    assert (projector[0].in_features, projector[0].out_features) == (16, 32)
    assert (projector[2].in_features, projector[2].out_features) == (32, 32)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_parameter_count_matches_presets_formula(depth: int) -> None:
    model = get_preset("tiny")
    projector = build_projector(model.vision, model.lm.hidden_size, ProjectorConfig(depth=depth))
    assert count_parameters(projector) == projector_parameter_count(
        model.vision.hidden_size, model.lm.hidden_size, depth
    )
    assert sum(isinstance(layer, nn.Linear) for layer in projector) == depth


def test_published_projector_on_meta_matches_presets() -> None:
    model = get_preset("chameleon-7b")
    projector = build_projector(model.vision, model.lm.hidden_size, model.projector, device="meta")
    assert all(p.device.type == "meta" for p in projector.parameters())
    # so400m width 1152 → Chameleon-7B width 4096, two layers: ~21.5M parameters.
    assert count_parameters(projector) == 1152 * 4096 + 4096 + 4096 * 4096 + 4096


def test_presets_report_the_built_projector() -> None:
    model = get_preset("tiny")
    built = build_projector(model.vision, model.lm.hidden_size, model.projector, device="meta")
    assert parameter_counts(model)["projector"] == count_parameters(built)


@pytest.mark.parametrize("activation, kind", [("gelu", nn.GELU), ("silu", nn.SiLU), ("relu", nn.ReLU)])
def test_activation_comes_from_config(activation: str, kind: type[nn.Module]) -> None:
    model = get_preset("tiny")
    projector = build_projector(model.vision, 64, ProjectorConfig(depth=3, activation=activation))  # type: ignore[arg-type]
    assert sum(isinstance(layer, kind) for layer in projector) == 2


def test_bad_depth_or_activation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.projector\.depth"):
        MLPProjector(4, 4, depth=0)
    with pytest.raises(ConfigError, match=r"model\.projector\.activation"):
        MLPProjector(4, 4, activation="tanh")
