"""UniTok (Ma et al. 2025, arXiv 2502.20321): one image tokenizer whose discrete codes serve both reconstruction
and understanding, thanks to multi-codebook quantization and a CLIP-style contrastive loss on the codes.

Data flow and shapes (``f`` = ``model.vq.downsample_factor`` = 2^(len(conv_widths) + 2); ``h, w = H / f, W / f``;
``N = h * w``; ``D`` = ``model.vq.embed_dim``; ``K`` = ``unitok.num_codebooks``)::

    pixels [B, 3, H, W] in [-1, 1]
      -> encoder: stride-2 conv stem, one MBConv stage per conv_widths entry (each halves the side), stride-2
         conv to ``width``, tokens [B, N, width], ViT blocks (GeGLU MLP, no position embedding: position comes
         from the convolutions), LayerNorm
      -> quant_proj: attention projection width -> D                                  latents [B, N, D]
      -> quantize: K sub-codebooks, chunk k (D / K channels) looked up by cosine in codebook k
                                                     codes [B, h, w, K]; code vectors [B, N, D] (unit chunks)
      -> post_quant_proj: attention projection D -> width                             tokens [B, N, width]
      -> decoder: ViT blocks, LayerNorm, grid [B, width, h, w], x2 upsampling conv to the last conv width,
         inverse MBConv stages back through conv_widths (first block of each upsamples), x2 upsampling stem
         to 3 channels                                                                pixels [B, 3, H, W]
    and, for the contrastive loss and zero-shot classification:
      post-quant tokens -> mean over N -> clip_head (LayerNorm + Linear width -> clip_dim) -> l2-normalised
      text ids [B, L] -> CLIP text transformer -> feature at the last non-padding id -> projection -> l2-normalised

The defaults of :class:`~unified_mllm.config.UniTokConfig` with :func:`unitok_large_config` are the released
UniTok-Large at 256 px (ViTamin-L widths, full-attention projections of the April-2025 checkpoint; the first
one had ``causal_projection``): 820.4M parameters, within 0.02% of the released model's 820.3M.

Two layouts of the transformer pieces (``unitok.mlp_norm``, ``unitok.layer_norm_eps``): by default the GeGLU
MLPs normalise their gated hidden and LayerNorms use eps 1e-5 (this project's original layout); the published
UniTok normalises the MLP *input* and uses eps 1e-6 in the ViT blocks, final norms and CLIP head.
:func:`unitok_large_config` and ``configs/tokenizer/unitok-large.yaml`` select the published layout, which
checkpoints converted with ``python -m unified_mllm.convert unitok`` need. The published ``img_to_idx``
returns codes ``[B, K, h * w]``; :meth:`UniTok.img_to_idx` / :func:`codes_to_published` give that order.

Choices made here where the paper says nothing (most follow the released code):

* Downsampling MBConv blocks stride their depthwise conv and take a 3x3 average-pool shortcut (plus a 1x1
  conv when the width changes). Upsampling blocks of the decoder put a nearest x2 + full 3x3 conv on the
  *expanded* channels before the depthwise conv, and a nearest x2 + 3x3 conv on the shortcut; these convs
  hold most of the decoder's 26.9M convolution parameters. Norms are channel LayerNorms (eps 1e-6), GELU exact.
* The two projections and the quantizer run outside autocast, in the parameters' dtype: in bf16 the cosine
  similarities of 8-d unit chunks round together and the lookup picks the wrong code.
* The image embedding for zero-shot goes through the *discrete* path (codes -> code vectors ->
  post_quant_proj), as UniTok evaluates it; in training the straight-through code vectors give the same values.
* The text tower is transformers' CLIP text transformer (causal attention, exact GELU as OpenCLIP builds it,
  not OpenAI's quick-GELU). It pools the last id that is not ``unitok.text_pad_id`` (captions right-padded);
  OpenCLIP pools at the end-of-text id, the same position for a caption that ends with it.
* The logit scale is clamped to [0, ln 100] where it is used (UniTok clamps the parameter after each step;
  :meth:`UniTok.clamp_logit_scale_` does that too, for trainers that want the exact behaviour).
* Initialisation: truncated normal (0.02) for transformer linears, He-normal (fan-out) for encoder convs,
  Xavier-normal with gain 0.5 for decoder convs (UniTok's ``vae_init``); codebooks keep the quantizer's own
  uniform init (with cosine lookups only the directions matter). No stochastic depth.
* In a multi-process training run the contrastive loss contrasts each rank's pairs with every rank's
  embeddings (gathered with gradients through the trainer's ``gather_rows`` hook, like OpenCLIP's
  ``gather_with_grad`` + ``local_loss``), so the negatives are the global batch, as in UniTok's run (see
  :meth:`UniTok.contrastive_loss`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from unified_mllm.config import UniTokConfig, VQConfig
from unified_mllm.vision.quantizer import MultiCodebookQuantizer
from unified_mllm.vision.visual_tokenizer import TokenizerOutput, VisualTokenizer, quantizer_options
from unified_mllm.vision.vit import AttnProjection, ViTBlock, init_transformer_weights
from unified_mllm.vision.vqgan import Upsample

# CLIP's bound on the contrastive temperature: logits are at most 100 x cosine similarity.
MAX_LOGIT_SCALE = math.log(100.0)
NORM_EPS = 1e-6
# timm's ViT LayerNorm epsilon, which the published UniTok's blocks, final norms and CLIP head use.
PUBLISHED_LAYER_NORM_EPS = 1e-6
# Gain of the decoder's convolution init (UniTok's ``vae_init``): small outputs at the start of training.
DECODER_CONV_GAIN = 0.5

Resample = Literal["down", "up"] | None


def unitok_large_config(resolution: int = 256) -> VQConfig:
    """The ``model.vq`` of the released UniTok-Large: 8 x 4096 codes of 8 channels, cosine lookup, beta 0.25,
    and the published block layout (GeGLU norm on the input, LayerNorm eps 1e-6), so that a checkpoint
    converted with ``python -m unified_mllm.convert unitok`` loads under it."""
    return VQConfig(
        kind="unitok",
        codebook_size=4096,
        embed_dim=64,
        beta=0.25,
        l2_normalize_codes=True,
        resolution=resolution,
        unitok=UniTokConfig(mlp_norm="input", layer_norm_eps=PUBLISHED_LAYER_NORM_EPS),
    )


def codes_to_published(codes: torch.Tensor) -> torch.Tensor:
    """Our codes ``[B, h, w, K]`` -> the published UniTok's ``img_to_idx`` order ``[B, K, h * w]`` (sub-codebook
    first, then the positions row-major). The boundary: everything in this project (the LM's code stacks,
    ``decode``) takes ``[B, h, w, K]``; use this only to compare with, or hand codes to, UniTok's own code."""
    if codes.ndim != 4:
        raise ValueError(f"codes must be [B, h, w, K], got shape {tuple(codes.shape)}")
    return codes.flatten(1, 2).transpose(1, 2).contiguous()


def codes_from_published(codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The published order ``[B, K, h * w]`` -> ours ``[B, h, w, K]`` (the inverse of
    :func:`codes_to_published`; the grid side is not in the published tensor, so it is passed)."""
    if codes.ndim != 3 or codes.shape[2] != height * width:
        raise ValueError(f"codes must be [B, K, {height} * {width}], got shape {tuple(codes.shape)}")
    return codes.transpose(1, 2).reshape(codes.shape[0], height, width, codes.shape[1]).contiguous()


# ---------------------------------------------------------------------------------------- conv pieces


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (each pixel normalised on its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2)


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck: ``shortcut(x) + project(dw3x3(expand(norm(x))))`` with GELUs after the
    expansion and the depthwise conv; the middle width is ``out_ch * expansion``.

    ``resample="down"`` halves the side (strided depthwise conv; average-pool shortcut), ``"up"`` doubles it
    (an :class:`~.vqgan.Upsample` on the expanded channels and on the shortcut), ``None`` keeps it.
    """

    def __init__(self, in_ch: int, out_ch: int, expansion: int, resample: Resample = None) -> None:
        super().__init__()
        mid = out_ch * expansion
        if resample == "down":
            pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
            self.shortcut: nn.Module = nn.Sequential(pool, _pointwise_or_identity(in_ch, out_ch))
        elif resample == "up":
            self.shortcut = Upsample(in_ch, out_ch)
        else:
            self.shortcut = _pointwise_or_identity(in_ch, out_ch)
        self.norm = LayerNorm2d(in_ch, eps=NORM_EPS)
        self.expand = nn.Conv2d(in_ch, mid, 1)
        self.up = Upsample(mid, mid) if resample == "up" else nn.Identity()
        stride = 2 if resample == "down" else 1
        self.depthwise = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid)
        self.project = nn.Conv2d(mid, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(F.gelu(self.expand(self.norm(x))))
        return self.shortcut(x) + self.project(F.gelu(self.depthwise(h)))


def _pointwise_or_identity(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()


def _conv_stages(
    widths: list[int], depths: list[int], in_ch: int, expansion: int, resample: Resample
) -> nn.Sequential:
    """One stage per width; the first block of each resamples and changes the width."""
    stages = []
    for width, depth in zip(widths, depths):
        blocks = [
            MBConv(in_ch if i == 0 else width, width, expansion, resample if i == 0 else None)
            for i in range(depth)
        ]
        stages.append(nn.Sequential(*blocks))
        in_ch = width
    return nn.Sequential(*stages)


class NormConv(nn.Module):
    """``conv(act(norm(x)))`` pieces of the stems: ``first`` applied before, the norm (+ GELU) between."""

    def __init__(self, first: nn.Module, channels: int, last: nn.Module, *, act: bool) -> None:
        super().__init__()
        self.first, self.norm, self.conv, self.act = first, LayerNorm2d(channels, eps=NORM_EPS), last, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.first(x))
        return self.conv(F.gelu(x) if self.act else x)


# ------------------------------------------------------------------------------------ encoder / decoder


def _vit_block(cfg: UniTokConfig) -> ViTBlock:
    return ViTBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, mlp_norm=cfg.mlp_norm, eps=cfg.layer_norm_eps)


class UniTokEncoder(nn.Module):
    """Pixels ``[B, 3, H, W]`` -> tokens ``[B, h * w, width]`` (row-major) and the grid ``(h, w)``."""

    def __init__(self, cfg: UniTokConfig) -> None:
        super().__init__()
        first = cfg.conv_widths[0]
        # Stem (stride 2), then the MBConv stages (stride 2 each), then a normed stride-2 conv into the ViT.
        self.stem = NormConv(
            nn.Conv2d(3, first, 3, stride=2, padding=1),
            first,
            nn.Conv2d(first, first, 3, padding=1),
            act=True,
        )
        self.stages = _conv_stages(cfg.conv_widths, cfg.conv_depths, first, cfg.conv_expansion, "down")
        last = cfg.conv_widths[-1]
        self.to_tokens = NormConv(
            nn.Identity(), last, nn.Conv2d(last, cfg.width, 3, stride=2, padding=1), act=False
        )
        self.blocks = nn.ModuleList(_vit_block(cfg) for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.to_tokens(self.stages(self.stem(pixels)))
        height, width = grid.shape[-2:]
        tokens = grid.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens), (height, width)


class UniTokDecoder(nn.Module):
    """Tokens ``[B, h * w, width]`` (row-major) -> pixels ``[B, 3, h * f, w * f]``: the encoder mirrored."""

    def __init__(self, cfg: UniTokConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_vit_block(cfg) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        widths, depths = cfg.conv_widths[::-1], cfg.conv_depths[::-1]
        self.up = Upsample(cfg.width, widths[0])
        self.stages = _conv_stages(widths, depths, widths[0], cfg.conv_expansion, "up")
        first = cfg.conv_widths[0]
        self.to_pixels = NormConv(Upsample(first, first), first, nn.Conv2d(first, 3, 3, padding=1), act=True)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        batch, length, channels = tokens.shape
        if length != grid[0] * grid[1]:
            raise ValueError(f"{length} tokens do not fill a {grid[0]}x{grid[1]} grid")
        x = tokens.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])
        return self.to_pixels(self.stages(self.up(x)))


class ClipHead(nn.Module):
    """Tokens ``[B, N, width]`` -> image embedding ``[B, clip_dim]`` (not normalised): mean, LayerNorm, Linear."""

    def __init__(self, width: int, clip_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, clip_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens.mean(dim=1)))


def text_tower_config(cfg: UniTokConfig) -> CLIPTextConfig:
    """The CLIP text transformer of ``cfg`` (MLP 4x wide, exact GELU as OpenCLIP's text tower)."""
    return CLIPTextConfig(
        vocab_size=cfg.text_vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.text_context,
        projection_dim=cfg.clip_dim,
        hidden_act="gelu",
        pad_token_id=cfg.text_pad_id,
        # The library's own pooling (at the first end-of-text id) is not used (see UniTok.text_embedding); its
        # special ids only have to lie inside the vocabulary, which the pad id does for any tokenizer.
        bos_token_id=None,
        eos_token_id=cfg.text_pad_id,
    )


def _check_config(vq: VQConfig) -> None:
    cfg = vq.unitok
    if not cfg.conv_widths or len(cfg.conv_widths) != len(cfg.conv_depths) or min(cfg.conv_depths) < 1:
        raise ValueError(
            f"unitok.conv_widths {cfg.conv_widths} and conv_depths {cfg.conv_depths} need the same (non-zero) "
            "length and depths >= 1"
        )
    if vq.embed_dim % cfg.num_codebooks:
        raise ValueError(f"embed_dim {vq.embed_dim} does not split into {cfg.num_codebooks} sub-codebooks")
    if cfg.width % cfg.num_heads:
        raise ValueError(f"unitok.width {cfg.width} is not divisible by {cfg.num_heads} heads")


# ---------------------------------------------------------------------------------------------- UniTok


class UniTok(VisualTokenizer):
    """UniTok: codes ``[B, h, w, num_codebooks]`` (see the module docstring for the architecture)."""

    kind = "unitok"

    def __init__(self, vq: VQConfig) -> None:
        super().__init__(vq)
        _check_config(vq)
        cfg, heads, causal = vq.unitok, vq.unitok.projection_heads, vq.unitok.causal_projection
        mlp = {"causal": causal, "mlp_norm": cfg.mlp_norm, "mlp_eps": cfg.layer_norm_eps}
        self.encoder = UniTokEncoder(cfg)
        self.quant_proj = AttnProjection(cfg.width, vq.embed_dim, heads, **mlp)
        self.quantize = MultiCodebookQuantizer(
            cfg.num_codebooks, vq.codebook_size, vq.embed_dim, **quantizer_options(vq)
        )
        self.post_quant_proj = AttnProjection(vq.embed_dim, cfg.width, heads, **mlp)
        self.decoder = UniTokDecoder(cfg)
        self.clip_head = ClipHead(cfg.width, cfg.clip_dim, cfg.layer_norm_eps)
        self.text = CLIPTextModelWithProjection(text_tower_config(cfg))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise everything but the text tower (transformers initialises that) and the codebooks."""
        for part in (self.encoder, self.quant_proj, self.post_quant_proj, self.decoder, self.clip_head):
            init_transformer_weights(part)
        for module in self.encoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for module in self.decoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain=DECODER_CONV_GAIN)
                nn.init.zeros_(module.bias)
        self.logit_scale.fill_(self.config.unitok.init_logit_scale)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **dataclasses.asdict(self.config.unitok)}

    # -- the VisualTokenizer interface ----------------------------------------------------------------

    def get_last_layer(self) -> nn.Parameter:
        """The weight of the decoder's final conv (3 output channels), for the adaptive GAN weight."""
        return self.decoder.to_pixels.conv.weight

    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> pre-quantization latents ``[B, h * w, embed_dim]`` and ``(h, w)``."""
        self.check_pixels(pixels)
        tokens, grid = self.encoder(pixels)
        with torch.autocast(tokens.device.type, enabled=False):
            latents = self.quant_proj(tokens.to(self.quant_proj.shortcut.weight.dtype))
        return latents, grid

    def post_quantize(self, code_vectors: torch.Tensor) -> torch.Tensor:
        """Code vectors ``[B, N, embed_dim]`` -> decoder / CLIP tokens ``[B, N, width]`` (outside autocast)."""
        with torch.autocast(code_vectors.device.type, enabled=False):
            return self.post_quant_proj(code_vectors.to(self.post_quant_proj.shortcut.weight.dtype))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` -> codes ``[B, H / f, W / f, num_codebooks]`` (long); no losses or statistics."""
        latents, (height, width) = self.encode_latents(pixels)
        with torch.autocast(latents.device.type, enabled=False):
            codes = self.quantize.nearest(latents)
        return codes.reshape(latents.shape[0], height, width, -1)

    def img_to_idx(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` in the published UniTok's order: codes ``[B, num_codebooks, h * w]``, as its
        ``img_to_idx`` returns them (see :func:`codes_to_published`)."""
        return codes_to_published(self.encode(pixels))

    def code_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w, K]`` -> post-quant tokens ``[B, h * w, width]`` (the discrete path)."""
        self.check_codes(codes)
        vectors = self.quantize.lookup(codes.to(self.logit_scale.device))
        return self.post_quantize(vectors.flatten(1, 2))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w, K]`` -> pixels ``[B, 3, h * f, w * f]`` (not clamped)."""
        return self.decoder(self.code_tokens(codes), (codes.shape[1], codes.shape[2]))

    def forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None = None) -> TokenizerOutput:
        """Training pass: reconstruction ``[B, 3, H, W]``, the quantizer's output (indices ``[B, h, w, K]``,
        straight-through code vectors ``[B, N, embed_dim]``) and, with ``text_ids`` ``[B, L]`` (one caption per
        image), the unweighted ``contrastive`` loss."""
        latents, grid = self.encode_latents(pixels)
        with torch.autocast(latents.device.type, enabled=False):
            out = self.quantize(latents)
        out.indices = out.indices.reshape(latents.shape[0], grid[0], grid[1], -1)
        tokens = self.post_quantize(out.quantized)
        losses: dict[str, torch.Tensor] = {}
        if text_ids is not None:
            if text_ids.shape[0] != pixels.shape[0]:
                raise ValueError(f"{text_ids.shape[0]} captions for {pixels.shape[0]} images")
            image_emb = F.normalize(self.clip_head(tokens), dim=-1)
            losses["contrastive"] = self.contrastive_loss(image_emb, self.text_embedding(text_ids))
        return TokenizerOutput(self.decoder(tokens, grid), {"codes": out}, losses)

    def training_forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None = None) -> TokenizerOutput:
        """:meth:`forward` through ``__call__`` (so wrappers' hooks run)."""
        return self(pixels, text_ids)

    # -- contrastive side -------------------------------------------------------------------------------

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, clip_dim]`` through the discrete path (pixels -> codes ->
        code vectors -> post_quant_proj -> mean -> clip_head), as UniTok's zero-shot evaluation does."""
        return F.normalize(self.clip_head(self.code_tokens(self.encode(pixels))), dim=-1)

    def text_embedding(
        self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Captions ``[B, L]`` -> l2-normalised embeddings ``[B, clip_dim]``.

        Ids beyond ``text_context`` are cut. ``attention_mask`` ``[B, L]`` (1 = text) defaults to the ids that
        differ from ``unitok.text_pad_id``; the feature is read at the last masked-in position (the caption's
        last id when right-padded; the tower is causal, so it has seen the whole caption).
        """
        if text_ids.ndim != 2 or text_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"text_ids must be integer ids [B, L], got {text_ids.dtype} {tuple(text_ids.shape)}"
            )
        context = self.config.unitok.text_context
        text_ids = text_ids[:, :context]
        if attention_mask is None:
            attention_mask = text_ids != self.config.unitok.text_pad_id
        attention_mask = attention_mask[:, :context].long()
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("every caption needs at least one id that is not padding")
        hidden = self.text.text_model(input_ids=text_ids, attention_mask=attention_mask).last_hidden_state
        positions = torch.arange(text_ids.shape[1], device=text_ids.device)
        last = (attention_mask * positions).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.normalize(self.text.text_projection(pooled), dim=-1)

    def logit_scale_value(self) -> torch.Tensor:
        """``exp(clamp(logit_scale, 0, ln 100))``: the factor on cosine similarities (at most 100)."""
        return self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself to [0, ln 100] (UniTok does this after every optimizer step)."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def contrastive_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Symmetric softmax InfoNCE over the ``B`` matched pairs of l2-normalised ``[B, clip_dim]`` embeddings:
        ``(CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2`` with ``s`` = :meth:`logit_scale_value`.

        In training with :attr:`gather_rows` set (a multi-process trainer sets it; every rank passes the same
        ``B``) the columns are every rank's embeddings and the rows this rank's pairs: the mean of the ranks'
        losses is then the loss of the global batch, and DDP's gradient average is its gradient.
        """
        if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
            raise ValueError(
                f"need two [B, D] embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        image_emb, text_emb = image_emb.float(), text_emb.float()
        all_images, all_texts, offset = image_emb, text_emb, 0
        if self.training and self.gather_rows is not None:
            (all_images, offset), (all_texts, _) = self.gather_rows(image_emb), self.gather_rows(text_emb)
        scale = self.logit_scale_value()
        targets = torch.arange(offset, offset + image_emb.shape[0], device=image_emb.device)
        image_to_text = F.cross_entropy(scale * image_emb @ all_texts.t(), targets)
        text_to_image = F.cross_entropy(scale * text_emb @ all_images.t(), targets)
        return 0.5 * (image_to_text + text_to_image)
