"""What every converter shares: reading published checkpoints, and renaming every key by explicit rules.

A rename table is a list of :class:`Rule` s tried in order; the first whose pattern matches a key (``re.fullmatch``)
maps it — to a new name (``\\1``-style groups allowed), or to nothing when the rule *drops* it on purpose
(a published tensor with no counterpart here, named in the rule's ``why``). A key no rule matches is an error that
lists it, so a new published variant can never lose a tensor silently; :func:`check_converted` then compares the
result with the keys and shapes our module expects.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unified_mllm.model.export import CheckpointMismatchError, check_keys_and_shapes, safetensors_files

_MAX_LISTED = 20


class ConversionError(ValueError):
    """A source that cannot be converted: wrong kind, files or keys missing, keys no rule knows."""


def listed(items: Sequence[str]) -> str:
    """``a; b; c`` for at most 20 items, then how many more."""
    more = f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


def require_files(src: Path, names: Iterable[str], kind: str) -> None:
    """Raise :class:`ConversionError` naming every file of ``names`` that ``src`` lacks."""
    if not src.is_dir():
        raise ConversionError(f"{kind}: {src} is not a directory")
    missing = [name for name in names if not (src / name).exists()]
    if missing:
        raise ConversionError(f"{kind}: {src} lacks {listed(missing)} — is it a {kind} checkpoint?")


def read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors directory, as stored (memory-mapped, not copied)."""
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, path in safetensors_files(src).items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for key in keys:
                tensors[key] = handle.get_tensor(key)
    return tensors


def read_torch_checkpoint(path: Path, inside: Sequence[str], kind: str) -> dict[str, torch.Tensor]:
    """The tensors at ``checkpoint[inside[0]][inside[1]]...`` of a ``torch.save`` file, read weights-only
    (a published file never needs pickled code, and unpickling it could run some)."""
    if not path.is_file():
        raise ConversionError(f"{kind}: checkpoint file not found: {path}")
    try:
        node: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file gets one message naming it
        raise ConversionError(
            f"{kind}: cannot read {path} as a weights-only torch checkpoint: {exc}"
        ) from exc
    for i, key in enumerate(inside):
        if not isinstance(node, Mapping) or key not in node:
            where = "".join(f"[{k!r}]" for k in inside[:i]) or "the top level"
            found = listed(sorted(map(str, node))) if isinstance(node, Mapping) else type(node).__name__
            raise ConversionError(f"{kind}: {path} has no {key!r} at {where} (found: {found})")
        node = node[key]
    if not isinstance(node, Mapping):
        raise ConversionError(f"{kind}: {path}{''.join(f'[{k!r}]' for k in inside)} is not a state dict")
    return {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class Rule:
    """``pattern`` (a full-match regex over published names) -> ``to`` (our name; ``None`` drops the key)."""

    pattern: str
    to: str | None
    why: str = ""
    """For a drop: why the tensor has no counterpart (shown by ``--verbose`` conversions and in tests)."""


def rename(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], origin: str) -> dict[str, torch.Tensor]:
    """``state`` under our names; every key is matched by a rule or the conversion stops listing the strays."""
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    out: dict[str, torch.Tensor] = {}
    strays: list[str] = []
    for key, tensor in state.items():
        for pattern, rule in compiled:
            match = pattern.fullmatch(key)
            if match:
                if rule.to is not None:
                    name = match.expand(rule.to)
                    if name in out:
                        raise ConversionError(
                            f"{origin}: two published keys map to {name} (the second is {key})"
                        )
                    out[name] = tensor
                break
        else:
            strays.append(key)
    if strays:
        raise ConversionError(
            f"{origin}: {len(strays)} key(s) no conversion rule knows: {listed(sorted(strays))}"
        )
    return out


def check_converted(
    converted: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], origin: str
) -> None:
    """Raise :class:`ConversionError` unless ``converted`` has exactly the expected keys and shapes."""
    try:
        check_keys_and_shapes(expected, {k: tuple(v.shape) for k, v in converted.items()}, origin)
    except CheckpointMismatchError as exc:
        raise ConversionError(str(exc)) from exc


def transform(
    state: dict[str, torch.Tensor],
    pattern: str,
    fn: Callable[[re.Match[str], torch.Tensor], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Replace each key matching ``pattern`` by what ``fn(match, tensor)`` returns (tensor surgery: splitting a
    fused projection, transposing, dropping a padding row); other keys pass through in order."""
    compiled = re.compile(pattern)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = compiled.fullmatch(key)
        out.update(fn(match, tensor) if match else {key: tensor})
    return out


def count_indices(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over the keys of ``state`` (layers, stages)."""
    compiled = re.compile(pattern)
    return len({m.group(1) for k in state if (m := compiled.fullmatch(k))})


def shape_of(state: Mapping[str, torch.Tensor], key: str, origin: str, kind: str) -> tuple[int, ...]:
    """The shape of ``state[key]``; a missing key means the source is not a ``kind`` checkpoint."""
    if key not in state:
        raise ConversionError(f"{origin}: no {key} — is this a {kind} checkpoint?")
    return tuple(state[key].shape)
