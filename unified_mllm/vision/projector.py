"""The MLP projector that maps SigLIP patch features into the LM's embedding space (LLaVA-1.5 / UniToken).

With the default ``depth=2`` it is ``Linear(vision → LM) → GELU → Linear(LM → LM)``, LLaVA-1.5's
``mlp2x_gelu``, which UniToken keeps. ``depth=1`` is the single linear map of the original LLaVA; larger
depths add ``activation → Linear(LM → LM)`` pairs. Every linear layer has a bias, so the parameter count is
:func:`unified_mllm.model.stats.projector_parameter_count`.

The projector is shape-agnostic over leading dimensions: ``(..., vision_hidden) → (..., lm_hidden)``.
"""

from __future__ import annotations

import torch
from torch import nn

from unified_mllm.config import ConfigError, ProjectorConfig, VisionConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


class MLPProjector(nn.Sequential):
    """``depth`` linear layers with ``activation`` between them: ``(..., in_features) → (..., out_features)``."""

    def __init__(self, in_features: int, out_features: int, depth: int = 2, activation: str = "gelu") -> None:
        if depth < 1:
            raise ConfigError(f"`model.projector.depth`: must be >= 1, got {depth}")
        if activation not in _ACTIVATIONS:
            raise ConfigError(
                f"`model.projector.activation`: unknown {activation!r}; choose from {sorted(_ACTIVATIONS)}"
            )
        layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
        for _ in range(depth - 1):
            layers += [_ACTIVATIONS[activation](), nn.Linear(out_features, out_features)]
        super().__init__(*layers)
        self.in_features, self.out_features = in_features, out_features


def build_projector(
    vision: VisionConfig, lm_hidden: int, projector: ProjectorConfig, device: str | torch.device = "cpu"
) -> MLPProjector:
    """The projector from SigLIP's width (``vision.hidden_size``) to ``lm_hidden``, built on ``device`` (no I/O).

    ``device="meta"`` allocates nothing (for parameter counts of the published sizes).
    """
    with torch.device(device):
        return MLPProjector(vision.hidden_size, lm_hidden, projector.depth, projector.activation)
