"""Restricted unpickling: read the pickles we must read without letting a crafted file run code.

A pickle names the callables that rebuild its objects; unpickling calls them, so a file can name ``os.system``.
Two files this project reads are pickles that ``torch.load(weights_only=True)`` cannot always take:

* **Lightning checkpoints** such as Chameleon's ``vqgan.ckpt``: tensors plus training metadata (hyper-parameters
  as ``argparse.Namespace`` or OmegaConf objects, callback states, Lightning classes). :func:`torch_load_restricted`
  admits what a tensor file needs (torch's tensor and storage rebuilders, sizes, dtypes, numpy scalars and
  arrays, ordered dicts) and replaces every class of the metadata modules (:data:`METADATA_MODULES`) by an inert
  :class:`Opaque` placeholder, since only the tensors are kept; any other global is refused by name.
* **DCP metadata** (``dcp/.metadata`` of a checkpoint, which torch's reader unpickles in full):
  :func:`check_dcp_metadata` reads it first with only torch.distributed.checkpoint's metadata classes allowed, so
  a crafted run directory is refused before torch touches it.

Refusals are :class:`UnsafePickleError` naming the file and the global; callers say how to opt in.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Modules whose classes only carry training metadata in checkpoints: rebuilt as inert placeholders.
METADATA_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "argparse", "typing")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global that the restricted reader does not admit."""


class Opaque:
    """Stands in for a metadata class: accepts any constructor arguments and state, does nothing with them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _is_torch_value(module: str, name: str, kinds: tuple[type, ...]) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), kinds)


_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("_codecs", "encode"),  # protocol-2 pickles write bytes through it
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}
_DTYPES = (torch.dtype, torch.layout, torch.memory_format)


def tensor_file_global(module: str, name: str) -> Any:
    """What a tensor checkpoint may name (see the module docstring); raises KeyError for anything else."""
    if (module, name) in _TENSOR_GLOBALS or _is_torch_value(module, name, _DTYPES):
        return None  # resolve normally
    if module.split(".")[0] in METADATA_MODULES:
        return Opaque
    if module.startswith("numpy") and name.endswith("DType"):  # numpy >= 1.25 pickles dtypes by class
        return None
    raise KeyError


def dcp_metadata_global(module: str, name: str) -> Any:
    """What DCP's ``.metadata`` may name: its own metadata classes, sizes, dtypes, paths; else KeyError."""
    if (module, name) in _DCP_GLOBALS or _is_torch_value(module, name, _DTYPES):
        return None
    if module == "torch.distributed.checkpoint.metadata" and isinstance(
        getattr(importlib.import_module(module), name, None), type
    ):
        return None
    raise KeyError


Rule = Callable[[str, str], Any]


def restricted_unpickler(rule: Rule, source: str) -> type[pickle.Unpickler]:
    """An Unpickler class resolving globals through ``rule`` (None: import normally; a class: use it; KeyError:
    refuse with :class:`UnsafePickleError` naming ``source`` and the global)."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                replacement = rule(module, name)
            except KeyError:
                raise UnsafePickleError(
                    f"{source} names {module}.{name}, which a data file never needs (a crafted file could run "
                    "code this way); refused"
                ) from None
            return super().find_class(module, name) if replacement is None else replacement

    return Restricted


def torch_load_restricted(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of a tensor checkpoint through :func:`tensor_file_global` (metadata classes -> Opaque)."""
    module = types.ModuleType("restricted_pickle")
    module.Unpickler = restricted_unpickler(tensor_file_global, str(path))  # type: ignore[attr-defined]
    module.load = pickle.load  # type: ignore[attr-defined]
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=module)


def check_dcp_metadata(path: str | os.PathLike[str]) -> Any:
    """DCP's ``.metadata`` read with only its own classes allowed (the ``Metadata`` object); raises
    :class:`UnsafePickleError`."""
    data = Path(path).read_bytes()
    return restricted_unpickler(dcp_metadata_global, str(path))(io.BytesIO(data)).load()
