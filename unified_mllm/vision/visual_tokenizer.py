"""What every image tokenizer of the project shares: VQ-GAN (:mod:`.vqgan`), UniTok (:mod:`.unitok`) and
DualToken (:mod:`.dualtoken`) are :class:`VisualTokenizer` subclasses, chosen by ``model.vq.kind``.

A tokenizer maps pixels ``[B, 3, H, W]`` in [-1, 1] to integer codes on a grid of ``latent_size`` x
``latent_size`` positions and back. VQ-GAN has one code per position (codes ``[B, h, w]``); the others have a
*stack* of ``code_depth`` codes per position (codes ``[B, h, w, D]``): UniTok one per sub-codebook, DualToken
the pixel residual depths followed by the semantic ones. :meth:`VisualTokenizer.code_vocab_sizes` says how
many values each slot of the stack takes.

Files: :meth:`VisualTokenizer.save_pretrained` writes ``model.safetensors`` + ``config.json``
(``{"format": "unified_mllm.vqgan", "format_version": 1, "vq": {VQConfig fields}}`` — the name predates the
other kinds and stays for compatibility); ``load_visual_tokenizer`` (:mod:`.tokenizer_registry`) reads the
kind from that file and builds the right class. Every load checks each key and shape and lists all mismatches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from unified_mllm.config import VQConfig
from unified_mllm.io import atomic_path, write_json
from unified_mllm.vision.image import ImageSource, tensor_to_image
from unified_mllm.vision.image import preprocess as preprocess_images
from unified_mllm.vision.quantizer import QuantizerOutput, VectorQuantizer

FORMAT_NAME = "unified_mllm.vqgan"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_LISTED_KEYS = 20


class VQCheckpointError(ValueError):
    """Tokenizer weights or config that do not fit: names every missing, unexpected or wrongly shaped key."""


@dataclass
class TokenizerOutput:
    """One training forward (:meth:`VisualTokenizer.training_forward`): ``reconstruction`` ``[B, 3, H, W]``;
    ``quant`` maps each quantizer's name (as in :meth:`VisualTokenizer.quantizers`) to its output (loss,
    indices, usage, latents for restarts); ``losses`` holds the kind's extra *unweighted* terms by name
    (UniTok's ``contrastive``, DualToken's ``semantic``), which the trainer weights with
    ``vq_train.<name>_weight``."""

    reconstruction: torch.Tensor
    quant: dict[str, QuantizerOutput]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def quantizer_loss(self) -> torch.Tensor:
        """Sum of the quantizers' losses (codebook + beta * commitment each)."""
        return torch.stack([out.loss for out in self.quant.values()]).sum()


RowGather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""``rows [B, D]`` -> (every rank's rows concatenated, gradients flowing back; where this rank's rows start)."""


class VisualTokenizer(nn.Module):
    """Base class: files, checks and image conversion on top of the subclass's tensor methods.

    Subclasses set :attr:`kind`, build their modules in ``__init__(vq)`` (no I/O) and implement
    :meth:`encode`, :meth:`decode` and :meth:`training_forward`; :meth:`quantizers` and :meth:`get_last_layer`
    default to a ``quantize`` module and a VQ-GAN ``decoder``. They may extend :meth:`code_vocab_sizes` and the
    checks.
    """

    kind: ClassVar[str] = ""
    # True for kinds that take exactly ``resolution`` px (DualToken: SigLIP's position embeddings fix the grid).
    fixed_resolution: ClassVar[bool] = False
    config: VQConfig

    def __init__(self, vq: VQConfig) -> None:
        super().__init__()
        if vq.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs vq.kind={self.kind!r}, got {vq.kind!r}")
        self.config = copy.deepcopy(vq)
        # Set by a multi-process trainer (train.distributed.all_gather_with_grad) for losses whose negatives
        # are the global batch (UniTok's contrastive loss); model code itself knows nothing of ranks.
        self.gather_rows: RowGather | None = None

    # -- what subclasses provide ----------------------------------------------------------------------

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels → codes ``[B, h, w]`` (depth 1) or ``[B, h, w, D]``; no losses, no statistics."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as :meth:`encode` returns them → pixels ``[B, 3, H, W]`` (not clamped)."""
        raise NotImplementedError

    def training_forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None = None) -> TokenizerOutput:
        """Reconstruction, quantizer outputs and extra loss terms (``text_ids``: captions, for contrastive
        tokenizers; ``[B, L]`` padded ids)."""
        raise NotImplementedError

    def quantizers(self) -> dict[str, nn.Module]:
        """The quantizer modules by name (the trainer sets their ``all_reduce`` and restarts dead codes)."""
        return {"codes": self.quantize}

    def get_last_layer(self) -> nn.Parameter:
        """The decoder's last weight, for the adaptive GAN-loss weight (taming's calculate_adaptive_weight)."""
        return self.decoder.conv_out.weight

    # -- shape -----------------------------------------------------------------------------------------

    @property
    def latent_size(self) -> int:
        """Code positions per side for a ``resolution`` x ``resolution`` image."""
        return self.config.resolution // self.config.downsample_factor

    @property
    def code_depth(self) -> int:
        """Codes per position (1: codes are ``[B, h, w]``; D > 1: ``[B, h, w, D]``)."""
        return self.config.code_depth

    def code_vocab_sizes(self) -> list[int]:
        """How many values each of the ``code_depth`` codes of a position takes."""
        return [self.config.codebook_size] * self.code_depth

    # -- construction and files -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, vq: VQConfig, device: str | torch.device | None = None) -> VisualTokenizer:
        """A randomly initialised tokenizer built directly on ``device`` (``"meta"``: no memory); no I/O."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(vq)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | os.PathLike[str],
        *,
        config: VQConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> VisualTokenizer:
        """Load a :meth:`save_pretrained` directory (or its ``model.safetensors``; the shapes come from the
        ``config.json`` beside it, else from ``config``)."""
        weights, config_path = resolve_checkpoint_paths(Path(ckpt_path))
        vq = read_tokenizer_config(config_path) if config_path is not None else copy.deepcopy(config)
        if vq is None:
            raise VQCheckpointError(f"no config.json beside {weights}: pass config=VQConfig(...)")
        vq.checkpoint = str(ckpt_path)
        model = cls(vq)
        model.load_generator_state(load_file(str(weights), device="cpu"), source=str(weights))
        return model.to(device)

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_pretrained` writes (subclasses drop frozen copies they rebuild)."""
        return dict(self.state_dict())

    def optional_state_keys(self) -> set[str]:
        """Keys a checkpoint may lack (restarted when absent): the quantizers' training statistics."""
        return {
            f"{name}.{buffer}" if name else buffer
            for name, module in self.named_modules()
            if isinstance(module, VectorQuantizer)
            for buffer in VectorQuantizer.STATISTIC_BUFFERS
        }

    def load_generator_state(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy ``state`` in after checking every key and shape (:class:`VQCheckpointError` lists them all)."""
        expected = self.state_to_save()
        optional = self.optional_state_keys()
        missing = [k for k in expected if k not in state and k not in optional]
        unexpected = [k for k in state if k not in expected and k not in optional]
        mismatched = [
            (k, tuple(state[k].shape), tuple(expected[k].shape))
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ]
        if missing or unexpected or mismatched:
            raise VQCheckpointError(
                mismatch_message(source, self.describe(), missing, unexpected, mismatched)
            )
        self.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
        if any(k in expected and k not in state for k in optional):
            for module in self.modules():
                if isinstance(module, VectorQuantizer):
                    module.reset_statistics()

    def describe(self) -> dict[str, Any]:
        """The config fields that fix the parameter shapes (shown in checkpoint errors)."""
        return {
            "kind": self.kind,
            "codebook_size": self.config.codebook_size,
            "embed_dim": self.config.embed_dim,
        }

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        tensors = self.state_to_save()
        if any(v.is_meta for v in tensors.values()):
            raise ValueError(
                f"cannot save a {type(self).__name__} built on the meta device: materialise it first"
            )
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        vq = stored_settings(self.config)
        document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vq": vq}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), {"format": FORMAT_NAME})
        write_json(directory / CONFIG_FILE, document)
        return directory

    # -- images -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def images_to_codes(
        self, images: Sequence[ImageSource], batch_size: int = 16, preprocess: str | None = None
    ) -> list[np.ndarray]:
        """Tokenize images (paths, bytes or PIL images of any mode and size) → one int64 array each, ``[h, w]``
        or ``[h, w, D]``: converted to RGB (transparency on white), resized and centre-cropped to
        ``resolution`` (``preprocess``, default ``config.preprocess``: see ``model.vq.preprocess``), scaled to
        [-1, 1], encoded ``batch_size`` at a time in eval mode."""
        if isinstance(images, torch.Tensor) or any(isinstance(i, torch.Tensor) for i in images):
            raise ValueError("images_to_codes takes images (paths, bytes, PIL); encode() takes pixel tensors")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        param = next(p for p in self.parameters() if p.is_floating_point())
        codes: list[np.ndarray] = []
        with self.eval_mode():
            for start in range(0, len(images), batch_size):
                pixels = preprocess_images(
                    list(images[start : start + batch_size]),
                    self.config.resolution,
                    preprocess or self.config.preprocess,
                )
                batch = self.encode(pixels.to(device=param.device, dtype=param.dtype)).cpu().numpy()
                codes.extend(np.ascontiguousarray(c, dtype=np.int64) for c in batch)
        return codes

    @torch.no_grad()
    def codes_to_images(
        self, codes: Sequence[np.ndarray | torch.Tensor], batch_size: int = 16
    ) -> list[Image.Image]:
        """Decode code grids (``[h, w]`` or ``[h, w, D]``) into RGB images, in input order; grids of one shape
        are decoded together, ``batch_size`` at a time, in eval mode."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        grids = [c if isinstance(c, torch.Tensor) else torch.as_tensor(np.asarray(c)) for c in codes]
        rank = 2 if self.code_depth == 1 else 3
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, grid in enumerate(grids):
            if grid.ndim != rank:
                want = "[h, w]" if rank == 2 else f"[h, w, {self.code_depth}]"
                raise ValueError(f"codes[{i}] must be a {want} grid, got shape {tuple(grid.shape)}")
            by_shape.setdefault(tuple(grid.shape), []).append(i)
        images: list[Image.Image | None] = [None] * len(grids)
        with self.eval_mode():
            for positions in by_shape.values():
                for start in range(0, len(positions), batch_size):
                    chunk = positions[start : start + batch_size]
                    pixels = self.decode(torch.stack([grids[i] for i in chunk]))
                    for i, image in zip(chunk, pixels):
                        images[i] = tensor_to_image(image)
        return [image for image in images if image is not None]

    # -- checks -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode inside the block, the caller's mode restored after (tokenizing must not depend on it)."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """A clear error unless ``pixels`` is a float ``[B, 3, H, W]`` with sides this tokenizer can encode
        (exactly ``resolution`` with :attr:`fixed_resolution`)."""
        side = self.config.resolution
        want = f"[B, 3, {side}, {side}]" if self.fixed_resolution else "[B, 3, H, W]"
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise ValueError(f"pixels must be a float tensor {want} in [-1, 1], got {describe_value(pixels)}")
        wrong_side = self.fixed_resolution and tuple(pixels.shape[2:]) != (side, side)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or wrong_side:
            hint = " (add a batch dimension: pixels[None])" if pixels.ndim == 3 else ""
            raise ValueError(f"pixels must have shape {want}, got {tuple(pixels.shape)}{hint}")
        if self.fixed_resolution:
            return
        factor = self.config.downsample_factor
        height, width = pixels.shape[-2:]
        if height == 0 or width == 0 or height % factor or width % factor:
            raise ValueError(
                f"pixel height and width must be positive multiples of the downsampling factor {factor}, "
                f"got {height}x{width}"
            )

    def check_codes(self, codes: torch.Tensor) -> None:
        """A clear error unless ``codes`` is an integer ``[B, h, w]`` / ``[B, h, w, D]`` tensor in range."""
        depth = self.code_depth
        want = "[B, h, w]" if depth == 1 else f"[B, h, w, {depth}]"
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codes must be an integer tensor {want}, got {describe_value(codes)}")
        if codes.ndim != (3 if depth == 1 else 4) or (depth > 1 and codes.shape[-1] != depth):
            raise ValueError(f"codes must have shape {want}, got {tuple(codes.shape)}")
        if not codes.numel():
            return
        stacked = codes.reshape(-1, depth)
        for slot, size in enumerate(self.code_vocab_sizes()):
            low, high = int(stacked[:, slot].min()), int(stacked[:, slot].max())
            if low < 0 or high >= size:
                where = f" (code {slot} of each position)" if depth > 1 else ""
                raise ValueError(f"codes must lie in [0, {size}){where}, got [{low}, {high}]")


def quantizer_options(vq: VQConfig) -> dict[str, Any]:
    """The :class:`~.quantizer.VectorQuantizer` keyword arguments ``model.vq`` sets for every tokenizer kind."""
    return {
        "beta": vq.beta,
        "l2_normalize": vq.l2_normalize_codes,
        "ema_decay": vq.ema_decay,
        "dead_code_steps": vq.dead_code_steps,
    }


# ------------------------------------------------------------------------------------------------ files


def resolve_checkpoint_paths(
    path: Path, config_path: str | os.PathLike[str] | None = None
) -> tuple[Path, Path | None]:
    """(weights file, config file or None) for a checkpoint path as the user gave it: an explicit
    ``config_path`` wins over a config found beside the weights."""
    if path.is_dir():
        weights, candidates = path / WEIGHTS_FILE, [path / CONFIG_FILE]
    else:
        weights = path
        candidates = [path.with_suffix(".yaml"), path.with_suffix(".yml"), path.parent / CONFIG_FILE]
    if not weights.is_file():
        raise FileNotFoundError(f"tokenizer weights not found: {weights}")
    if config_path is None:
        return weights, next((c for c in candidates if c.is_file()), None)
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"VQ-GAN config not found: {config_path}")
    return weights, Path(config_path)


def stored_settings(vq: VQConfig) -> dict[str, Any]:
    """The settings a tokenizer's ``config.json`` stores: every field but the checkpoint path and
    ``preprocess`` (the LM recipe's, ``model.vq.preprocess``, not a property of the weights). A DualToken
    backbone's ``anyres.layout`` is left out at its default, so files written before the key are unchanged."""
    settings = {k: v for k, v in dataclasses.asdict(vq).items() if k not in ("checkpoint", "preprocess")}
    anyres = settings["dualtoken"]["backbone"]["anyres"]
    if anyres["layout"] == "tiles":
        del anyres["layout"]
    return settings


def read_tokenizer_config(path: str | os.PathLike[str]) -> VQConfig:
    """The :class:`VQConfig` stored in our ``config.json`` (every field, type-checked)."""
    path = Path(path)
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise VQCheckpointError(f"{path} is not a {FORMAT_NAME} config (missing 'format': '{FORMAT_NAME}')")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise VQCheckpointError(f"{path} has format_version {document['format_version']} > {FORMAT_VERSION}")
    return typed_vq_config(VQConfig(), document.get("vq", {}), path)


def typed_vq_config(base: VQConfig, fields: Mapping[str, Any], source: Path) -> VQConfig:
    """``base`` with ``fields`` merged in; unknown keys and wrong types raise :class:`VQCheckpointError`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), dict(fields))
        vq = OmegaConf.to_object(merged)
    except Exception as exc:  # omegaconf raises several unrelated exception types
        raise VQCheckpointError(f"{source}: invalid VQ config: {exc}") from exc
    assert isinstance(vq, VQConfig)
    return vq


def describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def mismatch_message(
    source: str,
    shapes: Mapping[str, Any],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    """One error text listing (up to 20 of) each kind of key problem."""
    lines = [f"checkpoint {source} does not fit the tokenizer config {dict(shapes)}:"]
    shape_lines = [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in mismatched]
    sections = {"shape mismatches": shape_lines, "missing keys": missing, "unexpected keys": unexpected}
    for title, items in sections.items():
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items[:_MAX_LISTED_KEYS])
            if len(items) > _MAX_LISTED_KEYS:
                lines.append(f"    ... and {len(items) - _MAX_LISTED_KEYS} more")
    return "\n".join(lines)
