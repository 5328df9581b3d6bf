"""Chameleon's VQ-GAN image tokenizer (taming-transformers ``VQModel`` architecture), encoder *and* decoder.

The module tree and parameter names are those of taming-transformers, which Chameleon's ``vqgan.ckpt`` uses,
so its ``state_dict`` loads unchanged (do not rename modules). As in taming, ``decoder.up.{i}`` runs at the
same resolution as ``encoder.down.{i}``: ``up.{levels-1}`` is the lowest resolution and runs first.
transformers' ``ChameleonVQVAE`` implements the same encoder and quantizer (it has no decoder); the tests
check that both give the same codes for the same weights.

Pixels are ``[B, 3, H, W]`` in [-1, 1] with ``H`` and ``W`` multiples of the downsampling factor
(``2 ** (levels - 1)``: 16 for Chameleon, 512 px → 32 x 32 codes); codes are ``[B, H / f, W / f]`` (long).

Building does no I/O (design convention 5): :meth:`VQGAN.from_config` random-initialises, also on the
``meta`` device. Weights come in through :meth:`VQGAN.from_checkpoint`, which reads either Chameleon's /
taming's files (a Lightning checkpoint, ``loss.*`` keys ignored, or a plain state dict, with the taming
``vqgan.yaml`` beside it) or our own :meth:`VQGAN.save_pretrained` directory (see :mod:`.visual_tokenizer`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from unified_mllm.config import VQConfig
from unified_mllm.pickles import UnsafePickleError, torch_load_restricted
from unified_mllm.vision.quantizer import QuantizerOutput, VectorQuantizer
from unified_mllm.vision.visual_tokenizer import (
    TokenizerOutput,
    VisualTokenizer,
    VQCheckpointError,
    quantizer_options,
    read_tokenizer_config,
    resolve_checkpoint_paths,
    typed_vq_config,
)

# Training-only parts of a taming/Chameleon checkpoint (discriminator, LPIPS): not part of the tokenizer.
IGNORED_PREFIXES = ("loss.",)
# VQConfig fields that a taming yaml determines; the others (beta, EMA, ...) come from the base config.
_TAMING_FIELDS = {
    "codebook_size": ("n_embed",),
    "embed_dim": ("embed_dim",),
    "z_channels": ("ddconfig", "z_channels"),
    "base_channels": ("ddconfig", "ch"),
    "channel_mult": ("ddconfig", "ch_mult"),
    "num_res_blocks": ("ddconfig", "num_res_blocks"),
    "attn_resolutions": ("ddconfig", "attn_resolutions"),
    "resolution": ("ddconfig", "resolution"),
    "dropout": ("ddconfig", "dropout"),
}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm → swish → conv3x3 → norm → swish → dropout → conv3x3, plus a 1x1 ``nin_shortcut`` when the width
    changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections, and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # [B, C, H, W] → [B, 1, HW, C]: one head whose width is all channels (scale 1/sqrt(C), as taming).
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row/column at the bottom/right, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming's asymmetric padding; conv padding=1 would shift the sampling grid and break the weights.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 convolution (to ``out_channels`` if given)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Resolution level ``index`` of ``vq``: ``block.{j}`` residual blocks, each followed by ``attn.{j}`` when
    attention is on at this resolution; the resampling module (``downsample`` / ``upsample``) is attached by
    the caller."""

    def __init__(self, vq: VQConfig, index: int, in_channels: int, num_blocks: int) -> None:
        super().__init__()
        out_channels = _widths(vq)[index]
        block_inputs = [in_channels] + [out_channels] * (num_blocks - 1)
        self.block = nn.ModuleList(ResnetBlock(width, out_channels, vq.dropout) for width in block_inputs)
        attention = (vq.resolution >> index) in vq.attn_resolutions
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        return x


class MidBlock(nn.Module):
    """The bottleneck: residual block, attention, residual block (``block_1``, ``attn_1``, ``block_2``)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _widths(vq: VQConfig) -> list[int]:
    return [vq.base_channels * m for m in vq.channel_mult]


class Encoder(nn.Module):
    """Pixels ``[B, 3, H, W]`` → latents ``[B, z_channels, H / f, W / f]``."""

    def __init__(self, vq: VQConfig) -> None:
        super().__init__()
        widths, levels = _widths(vq), len(vq.channel_mult)
        self.conv_in = nn.Conv2d(3, vq.base_channels, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        for i in range(levels):
            level = Level(vq, i, vq.base_channels if i == 0 else widths[i - 1], vq.num_res_blocks)
            if i != levels - 1:
                level.downsample = Downsample(widths[i])
            self.down.append(level)
        self.mid = MidBlock(widths[-1], vq.dropout)
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], vq.z_channels, kernel_size=3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(pixels)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` → pixels ``[B, 3, h * f, w * f]`` (not clamped)."""

    def __init__(self, vq: VQConfig) -> None:
        super().__init__()
        widths, levels = _widths(vq), len(vq.channel_mult)
        self.conv_in = nn.Conv2d(vq.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[-1], vq.dropout)
        # up.{i} works at encoder level i's resolution; its input comes from level i + 1 (or from mid).
        self.up = nn.ModuleList()
        for i in range(levels):
            level = Level(vq, i, widths[min(i + 1, levels - 1)], vq.num_res_blocks + 1)
            if i != 0:
                level.upsample = Upsample(widths[i])
            self.up.append(level)
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------ the model


def check_vq_config(vq: VQConfig) -> None:
    """Raise ValueError when ``vq`` cannot describe a VQ-GAN (GroupNorm needs widths divisible by 32)."""
    if not vq.channel_mult or vq.num_res_blocks < 1:
        raise ValueError("vq.channel_mult needs at least one level and vq.num_res_blocks must be >= 1")
    bad = [w for w in [vq.base_channels, *_widths(vq)] if w <= 0 or w % 32]
    if bad:
        raise ValueError(f"VQ-GAN widths must be positive multiples of 32 (GroupNorm(32)), got {bad}")
    if vq.resolution % vq.downsample_factor:
        raise ValueError(f"vq.resolution {vq.resolution} is not a multiple of {vq.downsample_factor}")


class VQGAN(VisualTokenizer):
    """Encoder → ``quant_conv`` → :class:`VectorQuantizer` → ``post_quant_conv`` → decoder."""

    kind = "vqgan"

    def __init__(self, vq: VQConfig) -> None:
        super().__init__(vq)  # checks vq.kind
        check_vq_config(vq)
        self.encoder = Encoder(vq)
        self.quant_conv = nn.Conv2d(vq.z_channels, vq.embed_dim, kernel_size=1)
        self.quantize = VectorQuantizer(vq.codebook_size, vq.embed_dim, **quantizer_options(vq))
        self.post_quant_conv = nn.Conv2d(vq.embed_dim, vq.z_channels, kernel_size=1)
        self.decoder = Decoder(vq)

    # -- construction and files ---------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | os.PathLike[str],
        yaml_path: str | os.PathLike[str] | None = None,
        *,
        config: VQConfig | None = None,
        device: str | torch.device = "cpu",
        trust_pickle: bool | None = None,
    ) -> VQGAN:
        """Load trained weights: Chameleon's ``vqgan.ckpt`` (+ ``vqgan.yaml``) or a :meth:`save_pretrained`
        directory (or its ``model.safetensors``).

        The shapes come from ``yaml_path`` (a taming yaml, or our ``config.json``), else from a config file
        found beside the weights (``<stem>.yaml`` / ``<stem>.yml`` / ``config.json``), else from ``config``.
        A taming yaml only fixes the architecture: the other fields (``beta``, EMA, ...) come from ``config``
        (default: the :class:`VQConfig` defaults). Raises :class:`VQCheckpointError` on any key problem.

        Security: see :func:`load_checkpoint_state`; ``trust_pickle`` (default: ``config.trust_pickle``, else
        False) allows full unpickling of a file the restricted reader refuses.
        """
        weights_path, config_path = resolve_checkpoint_paths(Path(ckpt_path), yaml_path)
        if config_path is not None:
            vq = read_vq_config(config_path, base=config)
        elif config is not None:
            vq = copy.deepcopy(config)
        else:
            raise VQCheckpointError(
                f"no config for {weights_path}: pass yaml_path (Chameleon's vqgan.yaml) or config=VQConfig(...)"
            )
        vq.checkpoint = str(ckpt_path)
        if trust_pickle is None:
            trust_pickle = config.trust_pickle if config is not None else False
        state = load_checkpoint_state(weights_path, trust_pickle=trust_pickle)
        model = cls(vq)
        model.load_generator_state(state, source=str(weights_path))
        return model.to(device)

    def load_generator_state(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy ``state`` into this model after checking every key and shape; ``loss.*`` keys (taming's
        discriminator and LPIPS) are dropped, the quantizer's training statistics are optional both ways."""
        kept = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
        super().load_generator_state(kept, source)

    def describe(self) -> dict[str, Any]:
        return {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name in _TAMING_FIELDS
        }

    # -- tensors ----------------------------------------------------------------------------------------

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] → pre-quantization latents ``[B, embed_dim, H / f, W / f]``."""
        self.check_pixels(pixels)
        return self.quant_conv(self.encoder(pixels))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] → codes ``[B, H / f, W / f]`` (long); no losses, no statistics."""
        return self.quantize.nearest(self.encode_latents(pixels), dim=1)

    def decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        """Code vectors ``[B, embed_dim, h, w]`` → pixels ``[B, 3, h * f, w * f]`` (not clamped)."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w]`` (integers in ``[0, codebook_size)``) → pixels ``[B, 3, h * f, w * f]``."""
        self.check_codes(codes)
        weight = self.quantize.embedding.weight
        return self.decode_quantized(self.quantize.lookup(codes.to(weight.device), dim=1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Training pass: ``(reconstruction [B, 3, H, W], quantizer output with losses, indices, usage)``."""
        out = self.quantize(self.encode_latents(pixels), dim=1)
        return self.decode_quantized(out.quantized), out

    def training_forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None = None) -> TokenizerOutput:
        """:meth:`forward` as the tokenizer trainer takes it (``text_ids`` unused: no contrastive term)."""
        reconstruction, out = self(pixels)
        return TokenizerOutput(reconstruction, {"codes": out})


# ------------------------------------------------------------------------------------------------- files


def read_vq_config(path: str | os.PathLike[str], base: VQConfig | None = None) -> VQConfig:
    """A :class:`VQConfig` from our ``config.json`` or from a taming / Chameleon ``vqgan.yaml``.

    Our JSON holds every field. A taming yaml (``model.params.{n_embed, embed_dim, ddconfig}``) sets the
    architecture fields on top of ``base`` (default: the :class:`VQConfig` defaults). Values are type-checked.
    """
    path = Path(path)
    if path.suffix == ".json":
        return read_tokenizer_config(path)
    if path.suffix in (".yaml", ".yml"):
        return typed_vq_config(base or VQConfig(), taming_yaml_fields(path), path)
    raise VQCheckpointError(f"unknown VQ config file type {path.suffix!r} ({path}): expected .json or .yaml")


def taming_yaml_fields(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The :class:`VQConfig` fields that a taming ``VQModel`` yaml (Chameleon's ``vqgan.yaml``) determines."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node = raw.get("model", raw) if isinstance(raw, dict) else None
    node = node.get("params", node) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get("ddconfig"), dict):
        raise VQCheckpointError(f"{path} is not a taming VQModel yaml (no model.params.ddconfig)")
    ddconfig = node["ddconfig"]
    if ddconfig.get("double_z", False):
        raise VQCheckpointError(f"{path}: double_z=true (a KL autoencoder) is not a VQ-GAN")
    channels = (ddconfig.get("in_channels", 3), ddconfig.get("out_ch", 3))
    if channels != (3, 3):
        raise VQCheckpointError(f"{path}: only RGB VQ-GANs are supported, got in/out channels {channels}")
    fields: dict[str, Any] = {"kind": "vqgan"}
    for name, keys in _TAMING_FIELDS.items():
        value: Any = node
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None and name in ("attn_resolutions", "dropout"):
            continue  # taming's defaults: no attention levels, no dropout
        if value is None:
            raise VQCheckpointError(f"{path}: missing model.params.{'.'.join(keys)}")
        fields[name] = value
    return fields


def load_checkpoint_state(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, a plain state dict, or a Lightning ``{"state_dict"}``.

    Security: ``.ckpt`` / ``.pt`` files are read with ``torch.load(weights_only=True)``; a Lightning checkpoint
    (Chameleon's ``vqgan.ckpt``) whose metadata that refuses is read by
    :func:`unified_mllm.pickles.torch_load_restricted` (tensors kept, metadata classes inert, anything else
    refused). Only ``trust_pickle=True`` (``model.vq.trust_pickle``) unpickles a refused file in full, which
    runs whatever code the file names.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            raw = torch_load_restricted(path)
        except UnsafePickleError as exc:
            if not trust_pickle:
                raise VQCheckpointError(
                    f"{exc}. Load it only if you trust its source: model.vq.trust_pickle=true (Python: "
                    "trust_pickle=True) unpickles it in full"
                ) from exc
            warnings.warn(f"{path}: unpickling in full (model.vq.trust_pickle: trusted file)", stacklevel=2)
            raw = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]  # Lightning wraps the module's state dict with optimizer/callback state
    if not isinstance(raw, Mapping):
        raise VQCheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict")
    state = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise VQCheckpointError(f"{path} holds no tensors")
    return state
