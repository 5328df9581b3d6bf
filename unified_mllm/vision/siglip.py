"""The continuous branch: the SigLIP vision tower from transformers, and :class:`VisionEncoder` (tower + projector).

A view yields one feature vector per whole ``patch_size`` patch, row-major; pixels that do not fill a patch
are dropped (so400m at 384 px, 14 px patches: 27 x 27 = 729, the last 6 pixel rows and columns unread).

The tower is built **without** SigLIP's attention-pooling head (``vision_use_head=False``): the unified model
projects every patch feature into the LM, so the pooled embedding would be ~15M parameters that receive no
gradient (dead weight in optimizer state and checkpoints, and an "unused parameter" error under DDP). The
published so400m vision tower, head included, has ~428M parameters; without the head it has ~413M.
``use_head=True`` builds the full published module when a caller needs it.

Building does no I/O (design convention 5); weights come in through :func:`load_siglip_pretrained`. To
materialise a ``meta`` tower call ``tower.to_empty(device=...)`` then ``tower.init_weights()``, also before
loading a state dict: ``init_weights`` refills the non-persistent ``position_ids`` buffer, which ``to_empty``
leaves uninitialised and a state dict does not carry.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from unified_mllm.config import ConfigError, ProjectorConfig, VisionConfig
from unified_mllm.vision.projector import MLPProjector, build_projector

# Our field → transformers' SiglipVisionConfig attribute; used to build the config and to check a checkpoint.
_FIELD_MAP: dict[str, str] = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}


def num_patches_per_side(vision: VisionConfig) -> int:
    """Patches along one side of a view: ``image_size // patch_size`` (384 / 14 → 27, remainder dropped)."""
    return vision.image_size // vision.patch_size


def features_per_view(vision: VisionConfig) -> int:
    """Feature vectors SigLIP yields for one view: ``num_patches_per_side ** 2`` (so400m at 384 px: 729)."""
    return num_patches_per_side(vision) ** 2


def siglip_hf_config(vision: VisionConfig, *, use_head: bool = False) -> SiglipVisionConfig:
    """The transformers config of the SigLIP vision tower described by ``vision`` (activation: transformers'
    default, SigLIP's own ``gelu_pytorch_tanh``); ``use_head`` adds the attention-pooling head."""
    return SiglipVisionConfig(
        **{hf_name: getattr(vision, ours) for ours, hf_name in _FIELD_MAP.items()},
        layer_norm_eps=vision.layer_norm_eps,
        num_channels=3,
        vision_use_head=use_head,
    )


def build_siglip_tower(
    vision: VisionConfig, device: str | torch.device = "cpu", *, use_head: bool = False
) -> SiglipVisionModel:
    """A randomly initialised SigLIP vision tower for ``vision``, built directly on ``device`` ("meta" allocates
    nothing). ``vision.pretrained`` is deliberately ignored here; use :func:`load_siglip_pretrained`."""
    with torch.device(device):
        return SiglipVisionModel(siglip_hf_config(vision, use_head=use_head))


def load_siglip_pretrained(
    path: str | Path,
    vision: VisionConfig | None = None,
    *,
    use_head: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SiglipVisionModel:
    """Load a SigLIP vision tower from a local ``from_pretrained`` directory (the one place weights are read).

    ``path`` may hold a vision-only checkpoint or a full SigLIP (vision + text) one; transformers picks the
    vision part. Without ``use_head`` the pooling head's weights are skipped (transformers logs them as
    unused). The weights come back in ``dtype`` — float32 by default because training keeps fp32 master
    weights, whereas transformers would otherwise keep the checkpoint's (often bf16) dtype. When ``vision``
    is given, the checkpoint's shapes must match it, so a config and a checkpoint cannot silently disagree.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"SigLIP checkpoint not found: {path}")
    # Check the shapes before reading ~1.6 GB of weights that would then be thrown away.
    config = SiglipVisionConfig.from_pretrained(str(path), vision_use_head=use_head)
    mismatches = [
        f"model.vision.{ours}={getattr(vision, ours)} but {path} has {hf_name}={getattr(config, hf_name)}"
        for ours, hf_name in _FIELD_MAP.items()
        if vision is not None and getattr(vision, ours) != getattr(config, hf_name)
    ]
    if mismatches:
        raise ConfigError("SigLIP checkpoint does not match the config: " + "; ".join(mismatches))
    model, info = SiglipVisionModel.from_pretrained(
        str(path), config=config, dtype=dtype, output_loading_info=True
    )
    # transformers fills a tensor the files lack with random values and only logs it; a tower is all or nothing.
    # A tensor of the vision tower's namespace that no parameter takes is as wrong (a renamed or extra layer):
    # only the text tower, the contrastive scale/bias and (without use_head) the pooling head may be left over.
    missing = sorted(info["missing_keys"])
    left_over = ("text_model.", "logit_scale", "logit_bias", *(() if use_head else ("head.",)))
    unexpected = sorted(
        k for k in info["unexpected_keys"] if not k.removeprefix("vision_model.").startswith(left_over)
    )
    problems = [
        f"{title} {len(keys)} tensor(s) of the vision tower: {'; '.join(keys[:20])}"
        + (f"; ... and {len(keys) - 20} more" if len(keys) > 20 else "")
        for title, keys in (("lacks", missing), ("has unexpected", unexpected))
        if keys
    ]
    if problems:
        raise ConfigError(f"SigLIP checkpoint {path} " + " | ".join(problems))
    return model


def siglip_shapes(path: Path) -> dict[str, int | float]:
    """The :class:`VisionConfig` shape fields of a SigLIP ``from_pretrained`` folder (vision or full SigLIP)."""
    config = SiglipVisionConfig.from_pretrained(str(path))
    return {ours: getattr(config, hf_name) for ours, hf_name in _FIELD_MAP.items()} | {
        "layer_norm_eps": config.layer_norm_eps
    }


# ---------------------------------------------------------------------------------------- vision encoder


def check_feature_layer(vision: VisionConfig) -> None:
    """Raise :class:`ConfigError` unless ``vision.feature_layer`` names one of the tower's hidden states.

    transformers returns ``num_layers + 1`` hidden states (the patch embeddings, then each layer's output),
    so valid values are ``-(num_layers + 1) .. num_layers``; ``-1`` is special (after the post-layernorm).
    """
    layer, count = vision.feature_layer, vision.num_layers + 1
    if not -count <= layer < count:
        raise ConfigError(
            f"`model.vision.feature_layer`: {layer} is outside -{count}..{count - 1} "
            f"(the tower has {vision.num_layers} layers)"
        )


class VisionEncoder(nn.Module):
    """SigLIP tower + MLP projector: ``pixel_values (N_views, 3, S, S) → features (N_views, P, lm_hidden)``.

    ``P`` is :func:`features_per_view`, the patch grid in row-major order. Which hidden state is projected is
    ``vision.feature_layer``: ``-1`` takes ``last_hidden_state`` (after SigLIP's post-layernorm, as UniToken
    does); any other value asks the tower for ``output_hidden_states`` and picks that entry (LLaVA's ``-2`` is
    the penultimate layer, before any norm). Layers past the chosen one still run; they (and the
    post-layernorm) then get no gradient, so freeze them when training with DDP-style unused-parameter checks.

    Building does no I/O; :meth:`load_pretrained_tower` reads published or pre-trained weights explicitly.
    To turn a list of images into per-image feature sequences, see :func:`unified_mllm.vision.anyres.encode_images`.
    """

    def __init__(
        self,
        vision: VisionConfig,
        lm_hidden: int,
        projector: ProjectorConfig,
        device: str | torch.device = "cpu",
        slot_positions: bool = False,
    ) -> None:
        super().__init__()
        check_feature_layer(vision)
        self.vision = vision
        self.feature_layer = vision.feature_layer
        self.tower: SiglipVisionModel = build_siglip_tower(vision, device)
        self.projector: MLPProjector = build_projector(vision, lm_hidden, projector, device)
        # model.grid_positions: one learned LM-width embedding per slot of a view, added after the projector
        # (zero at the start: see unified_mllm.model.grid_positions).
        self.slot_embedding: nn.Parameter | None = None
        if slot_positions:
            self.slot_embedding = nn.Parameter(
                torch.zeros(features_per_view(vision), lm_hidden, device=device)
            )

    @property
    def features_per_view(self) -> int:
        return features_per_view(self.vision)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selected SigLIP hidden state before projection: ``(N_views, P, vision.hidden_size)``."""
        if self.feature_layer == -1:
            return self.tower(pixel_values=pixel_values).last_hidden_state
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values (N_views, 3, S, S)`` in [-1, 1] → projected features ``(N_views, P, lm_hidden)``."""
        expected = (3, self.vision.image_size, self.vision.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"expected pixel_values of shape (N, *{expected}), got {tuple(pixel_values.shape)}"
            )
        # Cast to the tower's dtype so that fp32 pixels from preprocessing work on a bf16 tower.
        pixels = pixel_values.to(self.tower.embeddings.patch_embedding.weight.dtype)
        features = self.projector(self.patch_features(pixels))
        if self.slot_embedding is not None:
            features = features + self.slot_embedding.to(features.dtype)
        return features

    def load_pretrained_tower(self, path: str | Path) -> None:
        """Replace the tower's weights with a ``from_pretrained`` checkpoint (shapes checked against the config)."""
        loaded = load_siglip_pretrained(path, self.vision, dtype=self.tower.dtype)
        self.tower.load_state_dict(loaded.state_dict())
