"""Weight quantization for inference, with torchao: the LM's linear layers hold int8 or int4 weights.

    model = UnifiedModel.from_pretrained(export)
    report = quantize_model(model, "int8")          # or InferenceSolver.from_pretrained(export, quantize="int8")

**Modes** (:data:`QUANT_MODES`):

* ``"int8"`` — int8 weight-only, one scale per output row (torchao ``Int8WeightOnlyConfig``). Runs on every
  device torchao supports (CPU and CUDA); activations stay in the model's dtype.
* ``"int4"`` — packed int4 weights (two per byte) in groups of :data:`INT4_GROUP_SIZE` input columns, each
  group with a scale and zero point: torchao's ``Int4WeightOnlyConfig`` in the tinygemm layout
  (``tile_packed_to_4d``), which needs CUDA and bfloat16 weights. Elsewhere it raises
  :class:`QuantizationUnsupported` naming the device and what is missing: torchao 0.18 has no packed int4
  weight-only kernel for x86 CPUs (its CPU int4 paths need the optional TorchAO C++ kernel library or Arm's
  KleidiAI, and quantize activations too).
* ``"int4-unpacked"`` — the same int4 values (groups of :data:`INT4_UNPACKED_GROUP_SIZE`, symmetric) stored one
  per byte (torchao ``IntxWeightOnlyConfig``, ``unpacked_to_int8``) and dequantized at each matmul: int4's
  accuracy with int8's memory, on any device. It exists to measure what int4 rounding does to a model's
  outputs where no packed int4 kernel runs (this repository's CPU benchmark), not to save memory.

**What is quantized.** Only the ``nn.Linear`` layers inside the LM backbone (``model.lm``: attention
q/k/v/o and the MLP's gate/up/down projections): at 7B they are ~92% of the weights and every decoding step
reads all of them, so they are where memory and bandwidth go. Kept in the model's dtype, on purpose:

* the LM head (``lm_head``): its logits pick every token directly, and classifier-free guidance multiplies the
  difference of two rows of them by the guidance scale, so its rounding error reaches the samples undamped;
  it is one matrix (~4% of a 7B model);
* the input embeddings: a table lookup, not a matmul (torchao's weight-only configs target linear layers) and
  the feature slots' rows are overwritten by projected SigLIP features anyway;
* the vision tower, projector and VQ tokenizer: they run once per image, not once per token, and the
  continuous features they produce are the LM's view of the image;
* code-stack embedders and depth heads (UniTok, DualToken): small and, like the LM head, they pick codes.

A linear layer whose input width is not a multiple of the mode's group size stays unquantized (int4 groups
must tile the row); :class:`QuantizeReport` lists it with the reason.

**Devices.** ``quantize_model(model, mode, device=...)`` moves each linear layer to ``device`` just before
quantizing it and the rest of the model after, so a model loaded on the CPU in full precision reaches an
accelerator already quantized: the accelerator never holds the full-precision LM (what lets a 7B model fit a
smaller card). The quantized weights are torchao tensor subclasses; the model is for inference (no training,
no ``save_pretrained``: quantize after loading an export instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

QUANT_MODES = ("int8", "int4", "int4-unpacked")
INT4_GROUP_SIZE = 128
"""Input columns per scale in ``int4`` (tinygemm's usual group; 32, 64, 128 and 256 are what it supports)."""
INT4_UNPACKED_GROUP_SIZE = 32
"""Input columns per scale in ``int4-unpacked`` (the common CPU int4 group)."""
QUANTIZED_PART = "lm"
"""The submodule of :class:`~unified_mllm.model.unified.UnifiedModel` whose linear layers are quantized."""


class QuantizationUnsupported(ValueError):
    """The requested mode has no kernel for this device, dtype or torchao build (the message says which).

    A ValueError: the command-line drivers print it as one line, like any other bad argument."""


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    """Qualified names of the linear layers now holding quantized weights."""
    kept: dict[str, str] = field(default_factory=dict)
    """Linear layers of the quantized part left in full precision, with the reason."""
    bytes_before: int = 0
    """Bytes of the quantized layers' weights before (their dtype), see :func:`tensor_bytes`."""
    bytes_after: int = 0
    """Bytes of the same weights after: quantized values plus scales and zero points."""


def check_mode(mode: str) -> None:
    """Raise ValueError for an unknown mode and ImportError when torchao is missing, before any model loads."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {', '.join(QUANT_MODES)}")
    _torchao()


def _torchao() -> Any:
    """``torchao.quantization``, imported on first use (it is an optional dependency: the ``adapt`` extra)."""
    try:
        import torchao.quantization as quantization
    except ImportError as error:
        raise ImportError(
            "weight quantization needs torchao: pip install 'unified-mllm[adapt]' (or pip install torchao)"
        ) from error
    return quantization


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's data takes: for a torchao quantized weight, the sum over its inner tensors (packed
    values, scales, zero points); for a plain tensor, ``numel * element_size``."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module`` (each counted once), quantized ones at their real size."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def _device_type(device: str | torch.device | None, model: nn.Module) -> str:
    if device is not None:
        return torch.device(device).type
    return next(model.parameters()).device.type


def _config(mode: str, device_type: str, dtype: torch.dtype) -> tuple[Any, int | None]:
    """The torchao config of ``mode`` for weights of ``dtype`` on ``device_type``, and its group size."""
    quantization = _torchao()
    if mode == "int8":
        # set_inductor_config=False: nothing here compiles, and torchao would otherwise change inductor's
        # process-wide settings as a side effect.
        return quantization.Int8WeightOnlyConfig(set_inductor_config=False), None
    if mode == "int4-unpacked":
        from torchao.quantization.granularity import PerGroup

        config = quantization.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(INT4_UNPACKED_GROUP_SIZE)
        )
        return config, INT4_UNPACKED_GROUP_SIZE
    if device_type != "cuda":
        raise QuantizationUnsupported(
            f"int4 on device {device_type!r}: torchao {_torchao_version()} packs int4 weights only for CUDA "
            "(the tinygemm kernel); its CPU int4 kernels need the optional TorchAO C++ kernel library or Arm "
            "KleidiAI, and this build has neither. Use quantize='int8' here, 'int4-unpacked' to measure int4's "
            "accuracy (int8 memory), or int4 on a CUDA device with dtype=torch.bfloat16"
        )
    if dtype != torch.bfloat16:
        raise QuantizationUnsupported(
            f"int4 on CUDA runs torchao's tinygemm kernel, which takes bfloat16 weights and activations; the "
            f"model is {dtype}: load it with dtype=torch.bfloat16"
        )
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    config = quantization.Int4WeightOnlyConfig(
        group_size=INT4_GROUP_SIZE,
        int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
        set_inductor_config=False,
    )
    return config, INT4_GROUP_SIZE


def _torchao_version() -> str:
    import torchao

    return str(getattr(torchao, "__version__", "?"))


def quantize_model(
    model: nn.Module, mode: str, *, device: str | torch.device | None = None
) -> QuantizeReport:
    """Quantize the linear layers of ``model.lm`` in place (see the module docstring) and return the report.

    ``model`` is a :class:`~unified_mllm.model.unified.UnifiedModel` (or any module with an ``lm`` submodule).
    ``device``: where the model ends up (default: where it is); each layer moves there before it is
    quantized. Raises ValueError for an unknown mode or a model without ``lm``, ImportError without torchao,
    :class:`QuantizationUnsupported` where the mode has no kernel (int4 off CUDA, or not in bfloat16).
    """
    check_mode(mode)
    part = getattr(model, QUANTIZED_PART, None)
    if not isinstance(part, nn.Module):
        raise ValueError(
            f"quantize_model needs a model with an `{QUANTIZED_PART}` submodule (the LM backbone)"
        )
    dtype = next(part.parameters()).dtype
    config, group = _config(mode, _device_type(device, model), dtype)
    report = QuantizeReport(mode)
    targets = []
    for name, module in part.named_modules():
        if not isinstance(module, nn.Linear) or is_traceable_wrapper_subclass(module.weight):
            continue
        qualified = f"{QUANTIZED_PART}.{name}"
        if group is not None and module.in_features % group:
            report.kept[qualified] = (
                f"input width {module.in_features} is not a multiple of the group {group}"
            )
            continue
        targets.append(module)
        report.quantized.append(qualified)
        report.bytes_before += tensor_bytes(module.weight)
    chosen = {id(module) for module in targets}
    quantization = _torchao()
    with torch.no_grad():
        quantization.quantize_(part, config, filter_fn=lambda module, _: id(module) in chosen, device=device)
    if device is not None:
        model.to(device)
    report.bytes_after = sum(tensor_bytes(module.weight) for module in targets)
    return report
