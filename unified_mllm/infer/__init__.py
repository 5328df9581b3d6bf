"""Inference: the decoding engine (KV cache, batched CFG), logits processors and the InferenceSolver.

* :mod:`unified_mllm.infer.processors` — stateless ``(input_ids, scores) -> scores`` callables (CFG combine, the
  image grid constraint, per-modality temperature / top-k / top-p), usable with transformers' ``generate``.
* :mod:`unified_mllm.infer.decoding` — the primitives decoders share: :class:`~unified_mllm.infer.decoding.DecodeBatch`
  (left-padded rows) and :class:`~unified_mllm.infer.decoding.Decoder` (input check, prefill, step over a KV cache).
* :mod:`unified_mllm.infer.engine` — :class:`~unified_mllm.infer.engine.Engine`: batched autoregressive decoding
  over ids, per-row stopping, seeded sampling, image generation with conditional and unconditional rows in one batch.
* :mod:`unified_mllm.infer.jacobi` — speculative Jacobi decoding of image grids (the engine's
  ``jacobi_window``) on the same primitives: several codes per forward, the same distribution as sequential
  sampling.
* :mod:`unified_mllm.infer.solver` — :class:`~unified_mllm.infer.solver.InferenceSolver`, the public entry point.

``from unified_mllm.infer import InferenceSolver`` works; the heavy imports (torch, transformers) happen on first
use, so importing the package alone stays cheap.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"InferenceSolver": "unified_mllm.infer.solver", "Engine": "unified_mllm.infer.engine"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
