"""DualToken (Song et al. 2025, arXiv 2503.14324): one SigLIP backbone that yields two stacks of codes per
patch, pixel codes from a shallow layer (what the image looks like) and semantic codes from a deep layer
(what it means).

Data flow for pixels ``[B, 3, S, S]`` in [-1, 1] (SigLIP's own normalisation, mean = std = 0.5), with
``h = w = S // patch`` grid positions, ``N = h * w`` tokens and code width ``E = vq.embed_dim``:

* **Backbone.** A transformers ``SiglipVisionModel`` (with its attention-pooling head), run one encoder layer
  at a time so that layers can be tapped and one can be replaced; layers are numbered from 1.
* **Pixel branch.** ``pre_pixel(pixel_layer) + shortcut_weight * pre_shortcut(shortcut_layer)`` (attention
  projections ``hidden -> E``), residual-quantized (``pixel_depth`` codes per position, one shared codebook);
  decoded by ``post_pixel`` (causal ``E -> hidden``), a bilinear resize to ``decoder_latent_side``,
  ``post_quant_block`` and the VQ-GAN CNN decoder of :mod:`.vqgan`.
* **Semantic branch.** ``pre_semantic(semantic_layer)``, residual-quantized (``semantic_depth`` codes) and
  mapped back by ``post_semantic``, *replaces* the hidden state: the remaining layers, the post-layernorm and
  the MAP head run on the quantized semantics, so the pooled output (zero-shot classification against a
  SigLIP text tower) comes from the discrete path.
* **Codes** are ``[B, h, w, pixel_depth + semantic_depth]``, the pixel depths first; only the pixel part is
  decoded to pixels.
* **Semantic loss**: distillation (:func:`semantic_distillation_loss`) to ``teacher``, a frozen copy of the
  backbone as it started (the pretrained SigLIP).

Published defaults (:func:`published_dualtoken_config` and the :class:`DualTokenConfig` defaults): about 639M
trainable parameters (the teacher and the EMA codebooks are not trained).

Choices where the paper and its code are silent or where we differ on purpose:

* The distillation terms use ``1 - cos`` where the published code uses ``-cos``: the same gradients, but the
  loss is 0 (not ``-(5 + 1)``) when the student matches the teacher, which reads better in logs.
* By default the post-quant resnet block has one GroupNorm and a SiLU between its two convolutions, without
  which they would collapse into one linear map; ``dualtoken.post_quant_norm2`` adds the published block's
  second GroupNorm before that SiLU. ``dualtoken.mlp_norm`` / ``mlp_norm_eps`` choose the GeGLU layout of the
  projections (see :class:`~.vit.GeGLU`); :func:`published_dualtoken_config` and
  ``configs/tokenizer/dualtoken-so400m.yaml`` select the published layout, which converted checkpoints
  (``python -m unified_mllm.convert dualtoken``) need.
* Both quantizers update their EMA codebook once per forward from all depths (the published semantic
  quantizer does; its pixel quantizer updates inside the depth loop). Dead codes are restarted by the
  trainer from ``QuantizerOutput.latents`` after ``vq.dead_code_steps`` unused steps.
* The teacher is not saved (:meth:`DualToken.state_to_save`): it is a copy of weights the user already has.
  Loading a checkpoint without teacher weights makes the teacher a copy of the loaded backbone; training
  from the published SigLIP goes through :meth:`DualToken.load_backbone` (backbone and teacher).
* A tiny configuration (:func:`tiny_dualtoken_config`, tests and CPU runs) starts from a random backbone, so
  its "teacher" is just the random initial backbone: the distillation then only keeps the semantic path
  close to where it started; a real semantic target needs ``dualtoken.pretrained``, a SigLIP of the
  backbone's shape (e.g. one that :mod:`.contrastive` trains on the synthetic world with that shape).

Building does no I/O (design convention 5); weights come in through :meth:`DualToken.load_backbone` or the
base class's ``from_checkpoint``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionModel

from unified_mllm.config import DualTokenConfig, VisionConfig, VQConfig
from unified_mllm.vision.quantizer import QuantizerOutput, ResidualQuantizer
from unified_mllm.vision.siglip import build_siglip_tower, load_siglip_pretrained
from unified_mllm.vision.visual_tokenizer import TokenizerOutput, VisualTokenizer, quantizer_options
from unified_mllm.vision.vit import AttnProjection, init_transformer_weights
from unified_mllm.vision.vqgan import Decoder

TEACHER_PREFIX = "teacher."
# GroupNorm(32) in the post-quant block and the VQ-GAN decoder: widths must divide into 32 groups.
_NORM_GROUPS = 32


def published_dualtoken_config() -> VQConfig:
    """The published DualToken tokenizer: SigLIP-so400m/14 at 384 px, two depth-8 residual quantizers over
    16384 x 32 EMA codebooks, and the ``ch 128, mult [1, 1, 4, 4, 8]`` pixel decoder with 1024 input channels
    (the :class:`DualTokenConfig` defaults hold the backbone shape and layer taps), with the published module
    layout (:func:`published_layout`) so that a converted checkpoint loads under it."""
    return VQConfig(
        kind="dualtoken",
        resolution=384,
        codebook_size=16384,
        embed_dim=32,
        z_channels=1024,
        base_channels=128,
        channel_mult=[1, 1, 4, 4, 8],
        num_res_blocks=2,
        attn_resolutions=[24],
        ema_decay=0.99,
        dualtoken=published_layout(DualTokenConfig()),
    )


def published_layout(dt: DualTokenConfig) -> DualTokenConfig:
    """``dt`` with the published module layout: GeGLU norms on the projections' inputs (eps 1e-6) and the
    post-quant block's second GroupNorm."""
    return dataclasses.replace(dt, mlp_norm="input", mlp_norm_eps=1e-6, post_quant_norm2=True)


def tiny_dualtoken_config() -> VQConfig:
    """A DualToken that trains on 2 CPU cores: a 4-layer, 32-wide SigLIP on 32 px images with 6 px patches
    (5 x 5 positions, 2 pixel rows and columns unseen, as at 384 / 14), pixel codes from layer 1 (shortcut
    from layer 1), semantic codes from layer 3, depths 3 and 2 over 32 codes of 8 dims, and the 5 x 5 grid
    resized to 4 x 4 for a 3-upsampling decoder."""
    backbone = VisionConfig(
        image_size=32, patch_size=6, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=2
    )
    dualtoken = DualTokenConfig(
        backbone=backbone,
        pixel_layer=1,
        shortcut_layer=1,
        semantic_layer=3,
        pixel_depth=3,
        semantic_depth=2,
        projection_heads=2,
        decoder_latent_side=4,
    )
    return VQConfig(
        kind="dualtoken",
        resolution=32,
        codebook_size=32,
        embed_dim=8,
        z_channels=32,
        base_channels=32,
        channel_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        ema_decay=0.9,
        dualtoken=dualtoken,
    )


def check_dualtoken_config(vq: VQConfig) -> None:
    """Raise ValueError naming the field when ``vq`` cannot describe a DualToken."""
    dt, backbone = vq.dualtoken, vq.dualtoken.backbone
    if vq.kind != "dualtoken":
        raise ValueError(f"DualToken needs vq.kind='dualtoken', got {vq.kind!r}")
    if vq.resolution != backbone.image_size:
        raise ValueError(
            f"vq.resolution ({vq.resolution}) must equal vq.dualtoken.backbone.image_size "
            f"({backbone.image_size}): SigLIP's position embeddings fix the input size"
        )
    if not 1 <= dt.shortcut_layer <= dt.pixel_layer < dt.semantic_layer <= backbone.num_layers:
        raise ValueError(
            "need 1 <= shortcut_layer <= pixel_layer < semantic_layer <= backbone.num_layers, got "
            f"{dt.shortcut_layer}, {dt.pixel_layer}, {dt.semantic_layer}, {backbone.num_layers}"
        )
    if min(dt.pixel_depth, dt.semantic_depth) < 1:
        raise ValueError(f"quantizer depths must be >= 1, got {dt.pixel_depth} and {dt.semantic_depth}")
    # Both projections split the backbone width into heads (averaged going down, concatenated going up).
    if backbone.hidden_size % dt.projection_heads:
        raise ValueError(
            f"vq.dualtoken.backbone.hidden_size={backbone.hidden_size} is not divisible by "
            f"projection_heads={dt.projection_heads}"
        )
    widths = [backbone.hidden_size, vq.base_channels * min(vq.channel_mult), vq.base_channels]
    if any(w <= 0 or w % _NORM_GROUPS for w in widths):
        raise ValueError(
            f"backbone.hidden_size and the decoder widths must be positive multiples of {_NORM_GROUPS} "
            f"(GroupNorm), got hidden {backbone.hidden_size}, base_channels {vq.base_channels}, "
            f"channel_mult {vq.channel_mult}"
        )
    side = dt.decoder_latent_side << (len(vq.channel_mult) - 1)
    if dt.decoder_latent_side < 1 or side != vq.resolution:
        raise ValueError(
            f"the pixel decoder turns a {dt.decoder_latent_side} x {dt.decoder_latent_side} latent into "
            f"{side} px ({len(vq.channel_mult) - 1} upsamplings), but vq.resolution is {vq.resolution}: "
            f"set vq.dualtoken.decoder_latent_side to resolution / 2^(len(channel_mult) - 1)"
        )


def distillation_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``MSE + (1 - mean cosine)`` between features ``[..., C]`` (cosine along ``C``): 0 when they agree."""
    student, teacher = student.float(), teacher.float()
    cosine = F.cosine_similarity(student, teacher, dim=-1).mean()
    return F.mse_loss(student, teacher) + (1.0 - cosine)


def semantic_distillation_loss(
    tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    pooled: torch.Tensor,
    teacher_pooled: torch.Tensor,
    *,
    hidden_weight: float,
    pooled_weight: float,
) -> torch.Tensor:
    """DualToken's semantic term: ``hidden_weight * d(tokens, teacher_tokens) + pooled_weight * d(pooled,
    teacher_pooled)`` with ``d`` = :func:`distillation_distance`; tokens ``[B, N, C]``, pooled ``[B, C]``."""
    token_term = distillation_distance(tokens, teacher_tokens.detach())
    pooled_term = distillation_distance(pooled, teacher_pooled.detach())
    return hidden_weight * token_term + pooled_weight * pooled_term


class PostQuantResnetBlock(nn.Module):
    """``[B, in, h, w] -> [B, out, h, w]``: ``conv3x3(silu(conv1x1(silu(norm(x))))) + conv1x1(x)``; widens
    the backbone-width grid to the decoder's ``z_channels`` (1152 -> 1024: 11.80M parameters).

    ``norm2=True`` (``dualtoken.post_quant_norm2``) puts a second GroupNorm on the ``out`` channels before
    the middle SiLU, ``conv3x3(silu(norm2(conv1x1(...))))``, as the published block does."""

    def __init__(self, in_channels: int, out_channels: int, *, norm2: bool = False) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_NORM_GROUPS, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.norm2 = nn.GroupNorm(_NORM_GROUPS, out_channels, eps=1e-6) if norm2 else None
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm(x)))
        if self.norm2 is not None:
            h = self.norm2(h)
        return self.conv2(F.silu(h)) + self.shortcut(x)


@dataclasses.dataclass
class SemanticPass:
    """One backbone pass through the quantized semantic path: the pixel latent ``[B, h, w, E]``, the hidden
    state that replaced ``semantic_layer``'s output ``[B, N, hidden]``, the pooled output ``[B, hidden]`` and
    the semantic quantizer's output (None when the codes were looked up without statistics)."""

    pixel_latent: torch.Tensor
    tokens: torch.Tensor
    pooled: torch.Tensor
    semantic_quant: QuantizerOutput | None


# ----------------------------------------------------------------------------------------------- the model


class DualToken(VisualTokenizer):
    """SigLIP backbone + pixel and semantic residual quantizers + VQ-GAN pixel decoder (module docstring)."""

    kind = "dualtoken"
    fixed_resolution = True

    def __init__(self, vq: VQConfig) -> None:
        check_dualtoken_config(vq)
        super().__init__(vq)
        dt = vq.dualtoken
        hidden, dim, heads = dt.backbone.hidden_size, vq.embed_dim, dt.projection_heads
        mlp: dict[str, Any] = {"mlp_norm": dt.mlp_norm, "mlp_eps": dt.mlp_norm_eps}
        # from_config builds under a device context; build_siglip_tower opens its own, so pass that device on.
        self.backbone: SiglipVisionModel = build_siglip_tower(
            dt.backbone, torch.get_default_device(), use_head=True
        )
        self.teacher: SiglipVisionModel = copy.deepcopy(self.backbone)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.pre_pixel = AttnProjection(hidden, dim, heads, **mlp)
        # Published: 0.6 x a projection of layer 4; with weight 0 the branch would get no gradient (DDP error).
        self.pre_shortcut = AttnProjection(hidden, dim, heads, **mlp) if dt.shortcut_weight != 0 else None
        self.pre_semantic = AttnProjection(hidden, dim, heads, **mlp)
        quantizer_kwargs = quantizer_options(vq)
        self.pixel_quantizer = ResidualQuantizer(dt.pixel_depth, vq.codebook_size, dim, **quantizer_kwargs)
        self.semantic_quantizer = ResidualQuantizer(
            dt.semantic_depth, vq.codebook_size, dim, **quantizer_kwargs
        )
        self.post_semantic = AttnProjection(dim, hidden, heads, causal=True, **mlp)
        self.post_pixel = AttnProjection(dim, hidden, heads, causal=True, **mlp)
        self.post_quant_block = PostQuantResnetBlock(hidden, vq.z_channels, norm2=dt.post_quant_norm2)
        # decoder_latent_side in, vq.resolution out (check_dualtoken_config makes the two agree).
        self.decoder = Decoder(vq)
        for module in (
            self.pre_pixel,
            self.pre_shortcut,
            self.pre_semantic,
            self.post_semantic,
            self.post_pixel,
        ):
            if module is not None:
                init_transformer_weights(module)

    @property
    def dualtoken(self) -> DualTokenConfig:
        return self.config.dualtoken

    # -- the teacher --------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DualToken:
        """As ``nn.Module.train``, but the teacher always stays in eval mode (a fixed target)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make the teacher an exact copy of the current backbone (after loading the starting weights)."""
        self.teacher.load_state_dict(self.backbone.state_dict())

    def load_backbone(self, path: str | os.PathLike[str]) -> None:
        """Read SigLIP weights (a transformers ``SiglipModel`` or ``SiglipVisionModel`` directory, shapes
        checked against ``dualtoken.backbone``) into the backbone, then copy them into the teacher."""
        dtype = self.backbone.embeddings.patch_embedding.weight.dtype
        loaded = load_siglip_pretrained(path, self.dualtoken.backbone, use_head=True, dtype=dtype)
        self.backbone.load_state_dict(loaded.state_dict())
        self.reset_teacher()

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """Everything but the teacher (a frozen copy of weights the user already has)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TEACHER_PREFIX)}

    def optional_state_keys(self) -> set[str]:
        """The quantizers' statistics and the teacher: a full ``state_dict`` loads too."""
        teacher = {TEACHER_PREFIX + k for k in self.teacher.state_dict()}
        return super().optional_state_keys() | teacher

    def load_generator_state(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """The base class's checked load; the teacher comes from ``state`` when it holds one, else it becomes
        a copy of the loaded backbone."""
        super().load_generator_state(state, source)
        teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
        if teacher:
            self.teacher.load_state_dict(teacher)
        else:
            self.reset_teacher()

    # -- the backbone, layer by layer ---------------------------------------------------------------------

    def _trunk(self, tower: SiglipVisionModel, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run ``tower`` from the patch embeddings through ``semantic_layer``; returns the outputs of the
        tapped layers (1-based: shortcut, pixel and semantic layers), each ``[B, N, hidden]``."""
        dt = self.dualtoken
        wanted = {dt.shortcut_layer, dt.pixel_layer, dt.semantic_layer}
        hidden = tower.embeddings(pixels)
        taps: dict[int, torch.Tensor] = {}
        for number, layer in enumerate(tower.encoder.layers[: dt.semantic_layer], start=1):
            hidden = layer(hidden, None)  # no attention mask: every patch sees every patch
            if number in wanted:
                taps[number] = hidden
        return taps

    def _head(self, tower: SiglipVisionModel, hidden: torch.Tensor) -> torch.Tensor:
        """The layers after ``semantic_layer``, the post-layernorm and the MAP head: ``[B, N, C] -> [B, C]``."""
        for layer in tower.encoder.layers[self.dualtoken.semantic_layer :]:
            hidden = layer(hidden, None)
        return tower.head(tower.post_layernorm(hidden))

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C] -> [B, h, w, C]`` (SigLIP's tokens are the patch grid in row-major order)."""
        side = self.latent_size
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])

    def _pixel_latent(self, taps: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The pixel branch before quantization, ``[B, h, w, E]``."""
        dt = self.dualtoken
        latent = self.pre_pixel(taps[dt.pixel_layer])
        if self.pre_shortcut is not None:
            latent = latent + dt.shortcut_weight * self.pre_shortcut(taps[dt.shortcut_layer])
        return self._grid(latent)

    def latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixel and semantic latents before quantization, each ``[B, h, w, E]``."""
        self.check_pixels(pixels)
        taps = self._trunk(self.backbone, pixels)
        semantic = self._grid(self.pre_semantic(taps[self.dualtoken.semantic_layer]))
        return self._pixel_latent(taps), semantic

    def _semantic_path(
        self, hidden: torch.Tensor, *, train: bool
    ) -> tuple[torch.Tensor, QuantizerOutput | None]:
        """``semantic_layer``'s output ``[B, N, hidden]`` → projected, quantized and projected back to what
        replaces it (same shape). ``train``: through the quantizer's forward (losses, statistics,
        straight-through gradient); else the nearest codes are looked up."""
        latent = self._grid(self.pre_semantic(hidden))
        if train:
            out: QuantizerOutput | None = self.semantic_quantizer(latent)
            quantized = out.quantized
        else:
            out = None
            quantized = self.semantic_quantizer.lookup(self.semantic_quantizer.nearest(latent))
        return self.post_semantic(quantized.flatten(1, 2)), out

    def _semantic_pass(self, pixels: torch.Tensor, *, train: bool) -> SemanticPass:
        """The full backbone pass with the semantic layer's output replaced by its quantized version."""
        taps = self._trunk(self.backbone, pixels)
        tokens, quant = self._semantic_path(taps[self.dualtoken.semantic_layer], train=train)
        pooled = self._head(self.backbone, tokens)
        return SemanticPass(self._pixel_latent(taps), tokens, pooled, quant)

    @torch.no_grad()
    def teacher_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's ``semantic_layer`` output ``[B, N, hidden]`` and pooled output ``[B, hidden]``."""
        taps = self._trunk(self.teacher, pixels)
        hidden = taps[self.dualtoken.semantic_layer]
        return hidden, self._head(self.teacher, hidden)

    # -- the tokenizer interface ---------------------------------------------------------------------------

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, S, S]`` → codes ``[B, h, w, pixel_depth + semantic_depth]`` (pixel depths first)."""
        pixel_latent, semantic_latent = self.latents(pixels)
        pixel_codes = self.pixel_quantizer.nearest(pixel_latent)
        semantic_codes = self.semantic_quantizer.nearest(semantic_latent)
        return torch.cat([pixel_codes, semantic_codes], dim=-1)

    def decode_latent(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized pixel latent ``[B, h, w, E]`` → pixels ``[B, 3, S, S]`` (not clamped)."""
        batch, height, width, _ = quantized.shape
        hidden = self.post_pixel(quantized.flatten(1, 2))  # causal over the row-major grid, as published
        grid = hidden.transpose(1, 2).reshape(batch, -1, height, width)
        side = self.dualtoken.decoder_latent_side
        if (height, width) != (side, side):
            grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
        return self.decoder(self.post_quant_block(grid))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w, pixel_depth + semantic_depth]`` → pixels ``[B, 3, S, S]``; the semantic codes
        are ignored (they describe meaning, not appearance)."""
        self.check_codes(codes)
        side = self.latent_size
        if tuple(codes.shape[1:3]) != (side, side):
            raise ValueError(f"codes must cover the {side} x {side} grid, got {tuple(codes.shape)}")
        pixel_codes = codes[..., : self.dualtoken.pixel_depth]
        return self.decode_latent(self.pixel_quantizer.lookup(pixel_codes))

    def training_forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None = None) -> TokenizerOutput:
        """Reconstruction from the quantized pixel branch, both quantizers' outputs and the unweighted
        ``semantic`` distillation term (``text_ids`` is unused: DualToken has no contrastive loss)."""
        self.check_pixels(pixels)
        state = self._semantic_pass(pixels, train=True)
        assert state.semantic_quant is not None
        pixel_quant = self.pixel_quantizer(state.pixel_latent)
        teacher_tokens, teacher_pooled = self.teacher_features(pixels)
        semantic = semantic_distillation_loss(
            state.tokens,
            teacher_tokens,
            state.pooled,
            teacher_pooled,
            hidden_weight=self.dualtoken.semantic_hidden_weight,
            pooled_weight=self.dualtoken.semantic_pooled_weight,
        )
        return TokenizerOutput(
            reconstruction=self.decode_latent(pixel_quant.quantized),
            quant={"pixel": pixel_quant, "semantic": state.semantic_quant},
            losses={"semantic": semantic},
        )

    def semantic_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """The l2-normalised pooled output ``[B, hidden]`` through the *quantized* semantic path (what
        zero-shot classification compares with SigLIP text embeddings)."""
        self.check_pixels(pixels)
        return F.normalize(self._semantic_pass(pixels, train=False).pooled, dim=-1)

    def quantizers(self) -> dict[str, nn.Module]:
        return {"pixel": self.pixel_quantizer, "semantic": self.semantic_quantizer}

    def describe(self) -> dict[str, Any]:
        dt = self.dualtoken
        return {
            **super().describe(),
            "hidden_size": dt.backbone.hidden_size,
            "num_layers": dt.backbone.num_layers,
            "pixel_depth": dt.pixel_depth,
            "semantic_depth": dt.semantic_depth,
        }
