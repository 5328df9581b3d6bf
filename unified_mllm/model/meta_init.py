"""Build the unified model on ``meta`` while drawing from the CPU random generator exactly as a CPU build does.

A model built on ``meta`` allocates nothing, which is what lets a trainer shard it before any weight exists
(torchtitan's order: meta -> parallelize -> materialise -> load). But a CPU build also *draws*: every random
initialisation advances the global CPU generator, and training after it (dropout masks on CPU, anything else
seeded by ``train.seed``) starts from the generator state the build left. Skipping the draws would change every
later random number, so a run would no longer reproduce the one built on CPU.

:func:`build_meta_model` keeps the draws without the memory: under :func:`cpu_draws_on_meta` every random
operation that touches a meta tensor is also run on a CPU scratch tensor of the same shape, strides and dtype
(one tensor at a time, freed at once), so the CPU generator advances by exactly what the CPU build consumes.
Three things need help beyond intercepting random aten ops (``torch.Tag.nondeterministic_seeded``):

* transformers skips its weight initialisation when it sees a ``meta`` device context
  (``get_torch_context_manager_or_global_device``); the CPU build runs it, so here it must run too;
* ``torch.nn.init.trunc_normal_`` (and ``orthogonal_`` / ``sparse_``) return early on meta tensors, and
  ``trunc_normal_`` redraws until every value lies within its bounds: how many draws it takes depends on the
  values. These functions therefore run whole on the scratch tensor, with its real values;
* transformers keeps its own references to the torch init functions (``TORCH_INIT_FUNCTIONS``).

The result is checked, not assumed: tests compare the generator state after this build with the one after a
CPU build for every model variant (``tests/test_meta_init.py``). A change in transformers or torch that adds
another skip shows up there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import transformers.initialization as hf_init
import transformers.modeling_utils as hf_modeling
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from unified_mllm.config import ModelConfig
from unified_mllm.model.unified import UnifiedModel

# torch.nn.init functions that skip meta tensors or whose number of draws depends on the values they draw.
_VALUE_DEPENDENT_INITS = ("trunc_normal_", "orthogonal_", "sparse_")


def _scratch(value: Any) -> Any:
    """A CPU tensor shaped, strided and typed like a meta tensor (other values unchanged)."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
    return value


def _on_scratch(init: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``init`` that, given a meta tensor, runs on a CPU scratch copy of it instead and returns the meta tensor."""

    def run(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not tensor.is_meta:
            return init(tensor, *args, **kwargs)
        init(_scratch(tensor), *args, **kwargs)
        return tensor

    return run


class _CPUDraws(TorchDispatchMode):
    """Runs every random aten op on meta tensors (or creating meta tensors) once more on the CPU."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            if any(isinstance(x, torch.Tensor) and x.is_meta for x in tree_leaves((args, kwargs))):
                func(*tree_map(_scratch, args), **tree_map(_scratch, kwargs))
            elif kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta":
                func(*args, **{**kwargs, "device": torch.device("cpu")})  # torch.randn(..., device="meta")
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_draws_on_meta() -> Iterator[None]:
    """Within the block, initialising meta tensors draws from the CPU generator as on CPU (module docstring)."""
    scratch_inits = {name: _on_scratch(fn) for name, fn in hf_init.TORCH_INIT_FUNCTIONS.items()}
    with contextlib.ExitStack() as stack:
        # "No device context": transformers then runs its initialisation (on the meta tensors).
        no_context = mock.patch.object(
            hf_modeling, "get_torch_context_manager_or_global_device", lambda: None
        )
        stack.enter_context(no_context)
        stack.enter_context(mock.patch.dict(hf_init.TORCH_INIT_FUNCTIONS, scratch_inits))
        for name in _VALUE_DEPENDENT_INITS:
            init = getattr(torch.nn.init, name)
            stack.enter_context(mock.patch.object(torch.nn.init, name, _on_scratch(init)))
        stack.enter_context(_CPUDraws())
        yield


def build_meta_model(config: ModelConfig) -> UnifiedModel:
    """``UnifiedModel(config, device="meta")``, leaving the CPU generator where ``device="cpu"`` would."""
    with cpu_draws_on_meta():
        return UnifiedModel(config, device="meta")
