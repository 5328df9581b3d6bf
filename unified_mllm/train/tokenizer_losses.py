"""Training losses of the image tokenizers: discriminators, GAN losses, adaptive GAN weight, LPIPS.

What the tokenizer trainer (:mod:`unified_mllm.train.tokenizer`) combines, following taming-transformers'
``VQLPIPSWithDiscriminator`` (Esser et al. 2021), which Chameleon's tokenizer descends from:

* :class:`NLayerDiscriminator` — the pix2pix PatchGAN, with taming's module names (a taming discriminator
  state dict loads). ``norm="group"`` instead of taming's BatchNorm makes each sample's logits independent of
  the rest of its batch — preferable with small per-rank batches and under DDP, where BatchNorm statistics
  are per rank;
* :func:`discriminator_loss` / :func:`generator_loss` — hinge (taming's default) or non-saturating;
  :func:`adaptive_gan_weight` — taming's ``calculate_adaptive_weight``;
* :class:`PerceptualLoss` — ``(reconstruction, target) -> scalar``; :class:`LPIPS` implements it with VGG16
  (Zhang et al. 2018; our code), its weights only from a file the user names (:func:`load_lpips`; nothing is
  downloaded): with no file, :func:`build_perceptual_loss` returns ``None`` and there is no perceptual term;
* :class:`FeatureDiscriminator` — UniTok's discriminator: small trainable heads on the tokens of several
  layers of a *frozen* feature network (:class:`Dinov2Features`: transformers' DINOv2, UniTok's choice).
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

GanLossKind = Literal["hinge", "non_saturating"]
NormKind = Literal["batch", "group"]

# ------------------------------------------------------------------------------------------ discriminator


def _norm_layer(kind: NormKind, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown discriminator norm {kind!r}; valid: 'batch', 'group'")


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: images ``[B, C, H, W]`` → patch logits ``[B, 1, H / 2^n - 2, W / 2^n - 2]``
    (``n = num_layers``; 256 px with 3 layers gives 30 x 30 patches, 64 px with 2 layers 14 x 14)."""

    def __init__(
        self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: NormKind = "batch"
    ) -> None:
        super().__init__()
        if num_layers < 1 or base_channels < 1:
            raise ValueError(
                f"need num_layers >= 1 and base_channels >= 1, got {num_layers}, {base_channels}"
            )
        # Convolutions followed by BatchNorm need no bias (taming); GroupNorm keeps it, as taming does.
        bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden convolution keeps the resolution (-1 px)
            layers += [
                nn.Conv2d(base_channels * previous, base_channels * mult, 4, stride, padding=1, bias=bias),
                _norm_layer(norm, base_channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """taming's ``weights_init``: convolutions N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


# ---------------------------------------------------------------------------------------------- GAN losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``(mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))) / 2`` (taming's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def logistic_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``(mean(softplus(-D(x))) + mean(softplus(D(G(z))))) / 2``: binary cross-entropy on logits (taming's
    ``vanilla_d_loss``)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def _check_gan_loss(kind: str) -> None:
    if kind not in ("hinge", "non_saturating"):
        raise ValueError(f"unknown GAN loss {kind!r}; valid: 'hinge', 'non_saturating'")


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: GanLossKind = "hinge"
) -> torch.Tensor:
    """The discriminator's loss: hinge, or the logistic loss that goes with the non-saturating generator."""
    _check_gan_loss(kind)
    loss = hinge_d_loss if kind == "hinge" else logistic_d_loss
    return loss(logits_real, logits_fake)


def generator_loss(logits_fake: torch.Tensor, kind: GanLossKind = "hinge") -> torch.Tensor:
    """The generator's GAN loss: ``-mean(D(G(z)))`` for hinge (taming), ``mean(softplus(-D(G(z))))`` =
    ``-mean(log sigmoid(D(G(z))))`` for non-saturating."""
    _check_gan_loss(kind)
    return -logits_fake.mean() if kind == "hinge" else F.softplus(-logits_fake).mean()


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``clamp(|d nll / d w| / (|d gan / d w| + eps), 0, max_weight)`` at ``last_layer`` ``w``, detached.

    Both losses must still have their graphs (they are kept: ``retain_graph=True``), and ``last_layer`` must
    be a tensor both depend on (the VQ-GAN's :meth:`~unified_mllm.vision.vqgan.VQGAN.get_last_layer`).
    The caller multiplies the result by its GAN weight, and by 0 before the discriminator starts.
    """
    (nll_grads,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (gan_grads,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = nll_grads.norm() / (gan_grads.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------- perceptual loss


@runtime_checkable
class PerceptualLoss(Protocol):
    """A perceptual distance: ``(reconstruction [B, 3, H, W], target [B, 3, H, W])`` in [-1, 1] → scalar
    (mean over the batch), differentiable with respect to the reconstruction."""

    def __call__(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


# VGG16's convolution widths, "M" a 2x2 max-pool: torchvision's ``vgg16().features`` layout (indices 0..29).
_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip
# features[start:stop] of each LPIPS slice, ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer: inputs in [-1, 1] mapped to ImageNet-normalised values.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Slices(nn.Module):
    """VGG16's convolution stack cut into the five LPIPS slices; ``slice{k}.{i}`` keeps torchvision's global
    index ``i`` of ``features.{i}``, as the lpips package does."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = int(item)
        for k, (start, stop) in enumerate(_SLICE_BOUNDS, start=1):
            block = nn.Sequential()
            for index in range(start, stop):
                block.add_module(str(index), layers[index])
            self.add_module(f"slice{k}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.children():  # slice1 .. slice5, in registration order
            x = block(x)
            features.append(x)
        return features


def _channel_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS with a VGG16 backbone, frozen and in fp32: ``(reconstruction, target)`` → mean distance.

    ``sum_l mean_hw(lin_l((phi_l(x) / |phi_l(x)| - phi_l(y) / |phi_l(y)|)^2))`` over the five VGG16 feature
    maps ``phi_l``. Randomly initialised as built (no I/O); :func:`load_lpips` reads the weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Slices()
        for k, channels in enumerate(LPIPS_CHANNELS):
            # LPIPS's NetLinLayer: a 1x1 convolution to one channel, no bias, behind LPIPS's training-time
            # dropout (an identity here), so the weight is ``lin{k}.model.1.weight`` as in the published files.
            lin = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
            self.add_module(f"lin{k}", nn.Sequential(OrderedDict(model=lin)))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Always in eval mode: the loss is a fixed function (no dropout), whatever the trainer's mode is.
        return super().train(False)

    def distance(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS distance ``[B]``."""
        if reconstruction.shape != target.shape or reconstruction.ndim != 4 or reconstruction.shape[1] != 3:
            raise ValueError(
                f"expected two [B, 3, H, W] images, got {tuple(reconstruction.shape)} and {tuple(target.shape)}"
            )
        x = (reconstruction.float() - self.shift) / self.scale
        y = (target.float() - self.shift) / self.scale
        total = reconstruction.new_zeros(reconstruction.shape[0], dtype=torch.float32)
        for k, (fx, fy) in enumerate(zip(self.net(x), self.net(y))):
            diff = (_channel_normalize(fx) - _channel_normalize(fy)).pow(2)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return total

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.distance(reconstruction, target.detach()).mean()


class PerceptualWeightsError(ValueError):
    """A perceptual-loss weights file that does not hold LPIPS-VGG16 weights; the message lists the keys."""


# Prefixes of the LPIPS module inside larger checkpoints (taming: ``loss.perceptual_loss.*``).
_STRIPPED_PREFIXES = ("loss.perceptual_loss.", "perceptual_loss.", "module.")
_TORCHVISION_KEY = re.compile(r"^features\.(\d+)\.(weight|bias)$")
_IGNORED_KEYS = ("scaling_layer.shift", "scaling_layer.scale")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    # weights_only: a weights file never needs pickled objects, and unpickling them could run code.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise PerceptualWeightsError(f"{path} holds a {type(raw).__name__}, not a state dict")
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _lpips_key(key: str) -> str | None:
    """Our key for a key of the file (None: not an LPIPS key)."""
    for prefix in _STRIPPED_PREFIXES:
        key = key.removeprefix(prefix)
    if key in _IGNORED_KEYS:
        return None
    match = _TORCHVISION_KEY.match(key)
    if match:  # torchvision's vgg16 ``features.{i}``: find the slice that holds index i
        index = int(match.group(1))
        k = next((k for k, (lo, hi) in enumerate(_SLICE_BOUNDS, 1) if lo <= index < hi), None)
        return None if k is None else f"net.slice{k}.{index}.{match.group(2)}"
    return key


def load_lpips(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LPIPS:
    """Build :class:`LPIPS` and load its weights from ``path`` (``.pth`` / ``.pt`` / ``.ckpt`` read with
    ``torch.load(weights_only=True)``, or ``.safetensors``; a ``{"state_dict": ...}`` wrapper is unwrapped).

    Expected layout — the full ``state_dict()`` of the lpips package's ``LPIPS(net="vgg")`` (or of this
    class): the backbone as ``net.slice{k}.{i}.weight`` / ``.bias`` (``k`` = 1..5, ``i`` torchvision's index in
    ``vgg16().features``: slice1 0-3, slice2 4-8, slice3 9-15, slice4 16-22, slice5 23-29) and the five lin
    layers as ``lin{k}.model.1.weight`` of shape ``[1, C_k, 1, 1]`` (``k`` = 0..4, ``C`` = 64, 128, 256, 512,
    512). Also accepted: the backbone as torchvision's ``features.{i}.*`` keys, and the prefixes
    ``loss.perceptual_loss.`` / ``perceptual_loss.`` / ``module.`` (so a taming VQ-GAN training checkpoint
    works as it is). taming's ``vgg.pth`` holds only the lin layers: merge it with torchvision's VGG16 state
    dict into one file (``torch.save({**vgg16_state, **lin_state}, path)``).
    ``scaling_layer.*`` buffers are ignored (the constants are fixed). Raises :class:`FileNotFoundError` or
    :class:`PerceptualWeightsError` listing missing, unexpected and wrongly shaped keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"perceptual-loss weights not found: {path} (nothing is downloaded)")
    state = {ours: v for k, v in _read_state(path).items() if (ours := _lpips_key(k)) is not None}
    model = LPIPS()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {list(state[k].shape)} vs LPIPS {list(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                problems.append(f"{len(items)} {title} keys: {shown}")
        raise PerceptualWeightsError(
            f"{path} is not an LPIPS-VGG16 state dict (see unified_mllm.train.tokenizer_losses.load_lpips):\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device)


def build_perceptual_loss(
    kind: str, weights: str | os.PathLike[str] | None, device: str | torch.device = "cpu"
) -> PerceptualLoss | None:
    """The configured perceptual loss, or ``None`` (off) when ``kind == "none"`` or no weights file is given:
    a randomly initialised network would be no perceptual measure at all."""
    if kind == "none" or weights is None:
        return None
    if kind == "lpips-vgg16":
        return load_lpips(weights, device)
    raise ValueError(f"unknown perceptual loss {kind!r}; valid: 'lpips-vgg16', 'none'")


# ---------------------------------------------------------------------------------- feature discriminator
# UniTok's discriminator (after StyleGAN-T's): a frozen feature network and small trainable heads that give
# one logit per token of each tapped layer.

# The statistics DINOv2 was trained with, for pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Blocks of DINOv2 ViT-S/14 (0-based) whose outputs UniTok's discriminator reads.
DINOV2_LAYERS = (0, 2, 5, 8, 11)
# Xavier gain of the heads' convolutions (UniTok's ``disc_init = -0.5``): small logits at the start.
FEATURE_HEAD_GAIN = 0.5


# A frozen feature extractor for FeatureDiscriminator: images [B, 3, H, W] in [-1, 1] → one token map
# [B, N_l, C_l] per tapped layer (differentiable with respect to the images).
FeatureNetwork = Callable[[torch.Tensor], list[torch.Tensor]]


def dinov2_small_config() -> Dinov2Config:
    """DINOv2 ViT-S/14 (384 wide, 12 blocks of 6 heads, layer scale, 518 px position grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
    )


class Dinov2Features(nn.Module):
    """A frozen transformers ``Dinov2Model`` as a ``FeatureNetwork``: the outputs of blocks ``layers``
    (0-based; CLS token first, then the patches row by row), ``[B, 1 + (H' / p) * (W' / p), hidden]`` each.

    Images in [-1, 1] are mapped to ImageNet mean/std and resized (bicubic, antialiased) to the nearest
    multiple of the patch size ``p`` (256 px → 252 px for ViT-S/14). Built from a config (default ViT-S/14)
    it is randomly initialised and does no I/O; :meth:`from_pretrained` reads trained weights. The parameters
    never require gradients and the module stays in eval mode whatever ``train()`` is called with.
    """

    def __init__(
        self, backbone: Dinov2Config | Dinov2Model | None = None, layers: Sequence[int] = DINOV2_LAYERS
    ) -> None:
        super().__init__()
        import transformers

        if isinstance(backbone, transformers.Dinov2Model):
            self.model = backbone
        else:
            self.model = transformers.Dinov2Model(backbone if backbone is not None else dinov2_small_config())
        depth = self.model.config.num_hidden_layers
        if not layers or any(not 0 <= layer < depth for layer in layers):
            raise ValueError(f"layers must be block indices in [0, {depth}), got {list(layers)}")
        self.layers = tuple(layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], layers: Sequence[int] = DINOV2_LAYERS
    ) -> Dinov2Features:
        """Trained weights from a local transformers DINOv2 directory (``config.json`` + weights, e.g. a
        saved ``facebook/dinov2-small``); nothing is downloaded."""
        import transformers

        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"DINOv2 directory not found: {directory} (nothing is downloaded)")
        model, info = transformers.Dinov2Model.from_pretrained(
            str(directory), local_files_only=True, output_loading_info=True
        )
        # transformers would train against randomly filled (missing) tensors and only log it; refuse instead.
        # A published DINOv2 checkpoint holds exactly Dinov2Model's tensors (a classifier head would show here).
        problems = [
            f"{title}: {', '.join(sorted(info[key]))}"
            for title, key in (("missing keys", "missing_keys"), ("unexpected keys", "unexpected_keys"))
            if info[key]
        ]
        if problems:
            raise ValueError(
                f"DINOv2 directory {directory} does not match its config.json: " + " | ".join(problems)
            )
        return cls(model, layers)

    @property
    def channels(self) -> list[int]:
        """Width of each returned token map."""
        return [self.model.config.hidden_size] * len(self.layers)

    def train(self, mode: bool = True) -> Dinov2Features:
        # Always eval: the features are a fixed function of the images.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images.to(self.mean.dtype) + 1.0) / 2.0 - self.mean) / self.std
        patch = self.model.config.patch_size
        size = tuple(max(patch, round(side / patch) * patch) for side in x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        return [hidden[layer + 1] for layer in self.layers]  # hidden[0] is the embedding output


class FeatureHead(nn.Module):
    """Token map ``[B, N, C]`` → logits ``[B, N]``: a 1x1 conv block, a residual block with a circular
    ``kernel_size`` conv along the tokens, then a 1x1 conv to one channel (GroupNorm, LeakyReLU 0.2)."""

    def __init__(self, channels: int, kernel_size: int = 9, norm_groups: int = 32) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length circular conv), got {kernel_size}")
        groups = math.gcd(norm_groups, channels)
        self.pointwise = nn.Sequential(
            nn.Conv1d(channels, channels, 1), nn.GroupNorm(groups, channels), nn.LeakyReLU(0.2)
        )
        conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
        self.residual = nn.Sequential(conv, nn.GroupNorm(groups, channels), nn.LeakyReLU(0.2))
        self.logits = nn.Conv1d(channels, 1, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(tokens.transpose(1, 2))
        # Scaled residual sum: the variance stays that of one branch.
        x = (x + self.residual(x)) / math.sqrt(2.0)
        return self.logits(x).squeeze(1)


class FeatureDiscriminator(nn.Module):
    """UniTok's discriminator on a frozen, pluggable feature network: images ``[B, 3, H, W]`` in [-1, 1] →
    logits ``[B, sum_l N_l]``, one :class:`FeatureHead` per tapped layer, concatenated per sample. The logits
    go to :func:`discriminator_loss` / :func:`generator_loss` like the PatchGAN's.

    ``feature_net`` is any ``FeatureNetwork`` (e.g. :class:`Dinov2Features`); ``channels`` defaults to
    its ``channels`` attribute. It is deliberately *not* registered as a submodule: ``parameters()`` and
    ``state_dict()`` hold the heads only (what the optimizer trains and the checkpoint keeps; reload the
    feature network from its own file when resuming), ``.to()`` / dtype casts still move it, its parameters
    have ``requires_grad=False`` and it stays in eval mode. Gradients still flow through it to the images.
    """

    def __init__(
        self,
        feature_net: FeatureNetwork,
        channels: Sequence[int] | None = None,
        kernel_size: int = 9,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if channels is None:
            channels = getattr(feature_net, "channels", None)
            if channels is None:
                raise ValueError("pass channels: the feature network has no `channels` attribute")
        # A tuple is a plain attribute for nn.Module (not a registered child): see the class docstring.
        self._feature_net = (feature_net,)
        if isinstance(feature_net, nn.Module):
            feature_net.requires_grad_(False)
            feature_net.eval()
        self.heads = nn.ModuleList(FeatureHead(c, kernel_size, norm_groups) for c in channels)
        self.reset_parameters()

    @property
    def feature_net(self) -> FeatureNetwork:
        return self._feature_net[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Heads: Xavier-normal convolutions with gain 0.5 and zero biases; unit GroupNorms."""
        for module in self.heads.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.xavier_normal_(module.weight, gain=FEATURE_HEAD_GAIN)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> FeatureDiscriminator:
        # nn.Module routes .to() / .cuda() / .half() through _apply; the unregistered feature net must follow.
        if isinstance(self.feature_net, nn.Module):
            self.feature_net._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FeatureDiscriminator:
        super().train(mode)
        if isinstance(self.feature_net, nn.Module):
            self.feature_net.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.feature_net(images)
        if len(features) != len(self.heads):
            raise ValueError(
                f"the feature network gave {len(features)} token maps for {len(self.heads)} heads"
            )
        return torch.cat(
            [head(tokens.to(head.logits.weight.dtype)) for head, tokens in zip(self.heads, features)], 1
        )
