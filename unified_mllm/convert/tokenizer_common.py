"""What the UniTok and DualToken converters share: rename tables written once and used both ways, the fused
GeGLU projection, and writing a visual-tokenizer directory that ``model.vq.checkpoint`` loads.

A :class:`Pair` is a published name and ours with the same placeholders (``<i>``: a number; ``<p>``:
``weight`` / ``bias``; others named in :data:`PLACEHOLDERS`): :func:`pair_rules` turns a table into
:class:`~unified_mllm.convert.common.Rule` s from published to ours, or (``reverse=True``) back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from unified_mllm.config import VQConfig
from unified_mllm.convert.common import ConversionError, Rule, check_converted, transform
from unified_mllm.vision.tokenizer_registry import build_visual_tokenizer

PLACEHOLDERS: dict[str, str] = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias",
    "tower": r"encoder|decoder",
    "proj": r"quant_proj|post_quant_proj",
    "qkv": r"q|k|v",
    "rest": r".+",  # the rest of a name under a renamed prefix
    # AttnProjection parts whose names are the same on both sides (fc1 after the GeGLU fusion).
    "same": r"norm1|norm2|norm3|attn\.proj|mlp\.norm|mlp\.fc1",
}
_TOKEN = re.compile(r"<(\w+)>")


@dataclass(frozen=True)
class Pair:
    """A published name template and ours (the same placeholders on both sides)."""

    published: str
    ours: str


def _pattern(template: str) -> str:
    """``a.<i>.b`` -> ``a\\.(?P<i>\\d+)\\.b``."""
    out, last = [], 0
    for match in _TOKEN.finditer(template):
        out.append(re.escape(template[last : match.start()]))
        out.append(f"(?P<{match.group(1)}>{PLACEHOLDERS[match.group(1)]})")
        last = match.end()
    out.append(re.escape(template[last:]))
    return "".join(out)


def _target(template: str) -> str:
    """``a.<i>.b`` -> ``a.\\g<i>.b`` (for ``Match.expand``)."""
    return _TOKEN.sub(lambda m: f"\\g<{m.group(1)}>", template)


def pair_rules(pairs: Sequence[Pair], *, reverse: bool = False) -> list[Rule]:
    """Rename rules from the published names to ours, or from ours to the published ones."""
    return [
        Rule(_pattern(p.ours), _target(p.published))
        if reverse
        else Rule(_pattern(p.published), _target(p.ours))
        for p in pairs
    ]


def fuse_geglu(state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Published GeGLU ``X.mlp.w0`` (gate) + ``X.mlp.w1`` (value) -> our ``X.mlp.fc1 = cat([w1, w0])``."""

    def fuse(match: re.Match[str], value: torch.Tensor) -> dict[str, torch.Tensor]:
        gate_key = f"{match.group(1)}.mlp.w0.{match.group(2)}"
        if gate_key not in state:
            raise ConversionError(f"{origin}: {match.group(0)} has no gate half {gate_key}")
        return {f"{match.group(1)}.mlp.fc1.{match.group(2)}": torch.cat([value, state[gate_key]])}

    fused = transform(state, r"(.+)\.mlp\.w1\.(weight|bias)", fuse)
    orphans = [
        k
        for k in fused
        if re.fullmatch(r"(.+)\.mlp\.w0\.(weight|bias)", k) and k.replace(".w0.", ".fc1.") not in fused
    ]
    if orphans:
        raise ConversionError(f"{origin}: GeGLU gate halves without a value half: {orphans[:5]}")
    return {k: v for k, v in fused.items() if not re.fullmatch(r"(.+)\.mlp\.w0\.(weight|bias)", k)}


def split_geglu(state: dict[str, torch.Tensor], owners: str) -> dict[str, torch.Tensor]:
    """Ours -> published: ``X.mlp.fc1`` -> ``X.mlp.w1`` (value, first half) and ``X.mlp.w0`` (gate), for the
    GeGLU MLPs whose ``X`` fully matches the regex ``owners`` (other ``mlp.fc1`` s are plain MLPs)."""

    def split(match: re.Match[str], fused: torch.Tensor) -> dict[str, torch.Tensor]:
        value, gate = fused.chunk(2, dim=0)
        prefix, name = match.group(1), match.group(2)
        return {f"{prefix}.mlp.w0.{name}": gate.clone(), f"{prefix}.mlp.w1.{name}": value.clone()}

    return transform(state, rf"({owners})\.mlp\.fc1\.(weight|bias)", split)


def drop_zero_buffer(rule_pattern: str, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Raise :class:`ConversionError` unless every tensor whose key matches ``rule_pattern`` is all zeros
    (a constant the conversion drops because our module recomputes it)."""
    compiled = re.compile(rule_pattern)
    nonzero = [
        k for k, v in state.items() if compiled.fullmatch(k) and not v.is_meta and bool(v.count_nonzero())
    ]
    if nonzero:
        raise ConversionError(f"{origin}: expected constant zeros, found non-zero values in {nonzero[:5]}")


def write_tokenizer(vq: VQConfig, state: Mapping[str, torch.Tensor], dst: Path, origin: str) -> Path:
    """Check ``state`` against the tokenizer ``vq`` describes (every key, every shape), then write the
    directory ``model.vq.checkpoint`` / ``load_visual_tokenizer`` reads (``model.safetensors`` + ``config.json``).
    The model is built on ``meta`` and takes the converted tensors as they are (no second copy in memory)."""
    model = build_visual_tokenizer(vq, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_to_save().items()}
    check_converted(state, expected, origin)
    model.load_state_dict(dict(state), strict=False, assign=True)
    return model.save_pretrained(dst)
