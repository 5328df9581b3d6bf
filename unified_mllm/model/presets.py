"""Named model shapes: a registry of :class:`~unified_mllm.config.ModelConfig` presets (design convention 3).

``load_config`` applies the preset named by ``model.preset`` underneath the YAML files and command-line
overrides, so a preset only supplies defaults. Built-in presets:

* ``chameleon-7b`` — UniToken-7B / Lumina-mGPT-7B: Chameleon-7B LM, SigLIP-so400m at 384 px, Chameleon VQ-GAN.
* ``chameleon-34b`` — the same with the Chameleon-34B LM.
* ``tiny`` — the whole pipeline at a size that trains on 2 CPU cores in minutes (tests, CI, quickstart).

Importing this module is cheap (no torch / transformers): config loading goes through :func:`get_preset`.
``python -m unified_mllm.model.presets [name ...]`` builds each preset on the ``meta`` device (no memory)
and prints its parameter counts.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence

from unified_mllm.config import (
    ConfigError,
    LMConfig,
    ModelConfig,
    ProjectorConfig,
    VisionConfig,
    VQConfig,
)

PresetSource = ModelConfig | Callable[[], ModelConfig]

_REGISTRY: dict[str, PresetSource] = {}


def register_preset(name: str, preset: PresetSource, *, overwrite: bool = False) -> None:
    """Register ``preset`` (a :class:`ModelConfig`, or a zero-argument factory returning one) under ``name``.

    A config object is deep-copied on every :func:`get_preset`, so callers can never mutate the registry.
    Registering an existing name is an error unless ``overwrite`` is set, so that two modules cannot
    silently shadow each other's presets.
    """
    if not name or name != name.strip():
        raise ValueError(f"preset name must be non-empty without surrounding spaces, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"preset {name!r} is already registered (pass overwrite=True to replace it)")
    if not (isinstance(preset, ModelConfig) or callable(preset)):
        raise TypeError(f"preset {name!r} must be a ModelConfig or a factory, got {type(preset).__name__}")
    _REGISTRY[name] = preset


def list_presets() -> list[str]:
    """The registered preset names, sorted."""
    return sorted(_REGISTRY)


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for preset ``name``, with its ``preset`` field set to ``name``.

    Raises :class:`ConfigError` listing the known names when ``name`` is not registered.
    """
    source = _REGISTRY.get(name)
    if source is None:
        raise ConfigError(
            f"`model.preset`: unknown preset {name!r}; known presets: {', '.join(list_presets())}"
        )
    # Copy factory results too: a factory may hand out a shared object, and `preset` is set below.
    config = copy.deepcopy(source if isinstance(source, ModelConfig) else source())
    if not isinstance(config, ModelConfig):
        raise TypeError(f"preset {name!r} factory returned {type(config).__name__}, not ModelConfig")
    config.preset = name
    return config


def describe_preset(name: str) -> str:
    """The preset factory's docstring on one line ('' for presets registered as plain config objects)."""
    get_preset(name)  # raises the usual ConfigError for unknown names
    source = _REGISTRY[name]
    doc = None if isinstance(source, ModelConfig) else getattr(source, "__doc__", None)
    return " ".join((doc or "").split())


# --------------------------------------------------------------------------------------------- presets


def chameleon_7b() -> ModelConfig:
    """UniToken-7B: Chameleon-7B LM + SigLIP-so400m-384 + Chameleon VQ-GAN, as in the published configs."""
    # The config tree's dataclass defaults are exactly these published shapes: the LM from
    # facebook/chameleon-7b config.json (Team Chameleon 2024), the tower from google/siglip-so400m-patch14-384
    # (Zhai et al. 2023, "Getting ViT in shape"), the tokenizer from Chameleon's vqgan.yaml.
    return ModelConfig()


def chameleon_34b() -> ModelConfig:
    """Chameleon-34B LM (facebook/chameleon-30b config.json) with chameleon-7b's SigLIP and VQ-GAN."""
    return ModelConfig(
        lm=LMConfig(
            swin_norm=True,  # Chameleon-34B normalises each branch's output before the residual add
            hidden_size=8192,
            intermediate_size=22016,
            num_layers=48,
            num_heads=64,
            num_kv_heads=8,
            vocab_size=65536,
        )
    )


def tiny() -> ModelConfig:
    """Toy shapes that train on 2 CPU cores in minutes (tests, CI, quickstart); ours, not published."""
    # Every part keeps the 7B design (Chameleon blocks, SigLIP, 2-layer projector, VQ-GAN) at 64 px images.
    return ModelConfig(
        lm=LMConfig(
            arch="chameleon",
            # 512 sentencepiece pieces (tokenizer.vocab_size) + 512 VQ codes (vq.codebook_size).
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=512,
            residual_dropout=0.05,
        ),
        # 64 px / 8 px patches → 8 x 8 = 64 feature slots per view.
        vision=VisionConfig(
            image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4
        ),
        projector=ProjectorConfig(depth=2),
        # Four levels → 8x downsampling: a 64 px image becomes 8 x 8 codes.
        vq=VQConfig(
            codebook_size=512,
            embed_dim=32,
            z_channels=32,
            base_channels=32,
            channel_mult=[1, 1, 2, 2],
            num_res_blocks=1,
            attn_resolutions=[],
            resolution=64,
        ),
    )


register_preset("chameleon-7b", chameleon_7b)
register_preset("chameleon-34b", chameleon_34b)
register_preset("tiny", tiny)


# ------------------------------------------------------------------------------------------------- CLI


def projector_parameter_count(vision_hidden: int, lm_hidden: int, depth: int) -> int:
    """Parameters of the MLP projector: Linear(vision→LM), then ``depth - 1`` x Linear(LM→LM), with biases."""
    first = vision_hidden * lm_hidden + lm_hidden
    return first + (depth - 1) * (lm_hidden * lm_hidden + lm_hidden)


def parameter_counts(config: ModelConfig) -> dict[str, int | None]:
    """Parameter counts of each part of ``config``, built on the ``meta`` device (no memory, no I/O).

    Keys: ``lm`` (backbone + head; a tied head is counted once), ``siglip`` (the tower as the model uses it,
    without the pooling head), ``projector``, ``vq`` (the image tokenizer of ``vq.kind``: all its parameters,
    e.g. UniTok's text tower and DualToken's frozen teacher included).
    """
    # Heavy imports live here so that importing this module (every config load) stays light.
    from torch import nn

    from unified_mllm.model.backbone import build_lm_backbone, build_lm_head
    from unified_mllm.model.stats import count_parameters
    from unified_mllm.vision.siglip import build_siglip_tower
    from unified_mllm.vision.visual_tokenizer import build_visual_tokenizer

    backbone = build_lm_backbone(config.lm, device="meta")
    head = build_lm_head(config.lm, device="meta", embedding=backbone.get_input_embeddings())
    lm = count_parameters(nn.ModuleDict({"backbone": backbone, "head": head}))
    siglip = count_parameters(build_siglip_tower(config.vision, device="meta"))
    projector = projector_parameter_count(
        config.vision.hidden_size, config.lm.hidden_size, config.projector.depth
    )
    vq = count_parameters(build_visual_tokenizer(config.vq, device="meta"))
    return {"lm": lm, "siglip": siglip, "projector": projector, "vq": vq}


_PART_LABELS = {
    "lm": "LM (backbone + head)",
    "siglip": "SigLIP tower (without pooling head)",
    "projector": "projector",
    "vq": "VQ tokenizer",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the parameter counts of model presets (built on meta)."
    )
    parser.add_argument(
        "names", nargs="*", help=f"presets to show (default: all of {', '.join(list_presets())})"
    )
    args = parser.parse_args(argv)
    from unified_mllm.model.stats import format_count

    for name in args.names or list_presets():
        try:
            config = get_preset(name)
        except ConfigError as exc:
            parser.error(str(exc))
        counts = parameter_counts(config)
        print(f"{name}: {describe_preset(name)}")
        total = sum(n for n in counts.values() if n is not None)
        for part, n in counts.items():
            shown = f"{'n/a':>9}" if n is None else f"{format_count(n):>9} ({n:,})"
            print(f"  {_PART_LABELS[part]:<36}{shown}")
        unknown = " + vq" if counts["vq"] is None else ""
        print(f"  {'total':<36}{format_count(total):>9} ({total:,}){unknown}")


if __name__ == "__main__":
    main()
