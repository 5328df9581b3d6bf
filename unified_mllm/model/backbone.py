"""The autoregressive LM backbone, built from transformers (design convention 9).

:func:`lm_hf_config` maps our :class:`~unified_mllm.config.LMConfig` onto transformers' ``ChameleonConfig``
(``arch=chameleon``: Llama-2 blocks plus per-head q/k layer norms) or ``LlamaConfig`` (``arch=llama``).
:func:`build_lm_backbone` returns the *bare* decoder (``ChameleonModel`` / ``LlamaModel``): token embedding,
blocks and final norm; it is called with ``inputs_embeds`` because the unified model scatters the projected
SigLIP features into the embedded sequence before the LM runs. :func:`build_lm_head` makes the output
projection, kept outside the backbone so that the trainer owns logits and loss (convention 6).

Two things transformers does not do the way this project needs:

* ``ChameleonModel`` builds a VQ-VAE encoder (``vqmodel``) inside itself. Our VQ tokenizer lives outside the
  trained model (``vision/``; codes are pre-computed or produced by the data pipeline), so the backbone is
  built with a stub VQ config and the stub is deleted. The backbone therefore takes ``inputs_embeds`` or
  ``input_ids`` but never ``pixel_values``.
* Neither Chameleon nor Llama has *residual* dropout (dropout on each attention / MLP output before it is
  added to the residual stream), which UniToken and Lumina-mGPT train with. :func:`add_residual_dropout`
  adds it with forward hooks, so parameter names stay exactly those of the published checkpoints.

Building does no I/O. On ``device="meta"`` nothing is allocated: construction runs under
``torch.device("meta")``. To materialise a meta-built backbone, call ``backbone.to_empty(device=...)`` and
then ``backbone.init_weights()`` (which also recomputes the RoPE ``inv_freq`` buffers that ``to_empty``
leaves uninitialised) or load a state dict — loading alone does not restore those non-persistent buffers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle
from transformers import (
    ChameleonConfig,
    ChameleonModel,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.chameleon.modeling_chameleon import ChameleonSwinDecoderLayer

from unified_mllm.config import ConfigError, LMConfig

# ChameleonModel always instantiates `vqmodel` from `config.vq_config`; the full Chameleon VQ-VAE encoder has
# ~30M parameters. This stub (one level, no residual blocks, no attention, 1-channel latent) keeps that
# throw-away module at a few thousand parameters; the encoder's GroupNorm needs channels divisible by 32.
_STUB_VQ_CONFIG: dict[str, Any] = {
    "embed_dim": 1,
    "num_embeddings": 2,
    "latent_channels": 1,
    "base_channels": 32,
    "channel_multiplier": [1],
    "num_res_blocks": 0,
    "attn_resolutions": [],
    "attn_type": "none",
    "resolution": 32,
}


def lm_hf_config(lm: LMConfig) -> PretrainedConfig:
    """The transformers config of the LM backbone described by ``lm``.

    ``residual_dropout`` has no transformers counterpart: it is stored as an extra attribute (so it travels
    in ``config.json``) and applied by :func:`add_residual_dropout`. Token ids (pad / bos / eos) are left
    unset: ids are looked up by name through the token layout, and padding is handled by attention masks.
    """
    common: dict[str, Any] = {
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads,
        "max_position_embeddings": lm.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(lm.rope_theta)},
        "rms_norm_eps": lm.rms_norm_eps,
        "attention_dropout": lm.attention_dropout,
        "initializer_range": lm.initializer_range,
        "tie_word_embeddings": lm.tie_word_embeddings,
        "attn_implementation": lm.attn_implementation,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    config: PretrainedConfig
    if lm.arch == "chameleon":
        config = ChameleonConfig(
            **common,
            swin_norm=lm.swin_norm,
            vq_config=dict(_STUB_VQ_CONFIG),
            # An empty map: the BPE <-> VQ-code mapping belongs to the token layout, not to the backbone.
            vocabulary_map={},
        )
    elif lm.arch == "llama":
        config = LlamaConfig(**common)
    else:  # load_config rejects other values; this guards hand-built LMConfig objects
        raise ConfigError(f"`model.lm.arch`: unknown architecture {lm.arch!r} (use 'chameleon' or 'llama')")
    config.residual_dropout = lm.residual_dropout
    return config


class _SublayerOutputDropout:
    """Forward hook: dropout on a sub-layer's output (a tensor, or the first element of a tuple).

    A class rather than a closure so that modules carrying the hook stay deep-copyable and picklable.
    It reads ``module.training`` at call time, so ``model.eval()`` switches it off like ``nn.Dropout``.
    """

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or self.p == 0.0:
            return None  # None keeps the output unchanged
        if isinstance(output, tuple):  # attention returns (attn_output, attn_weights)
            return (F.dropout(output[0], self.p, training=True), *output[1:])
        return F.dropout(output, self.p, training=True)


def add_residual_dropout(backbone: nn.Module, p: float) -> list[RemovableHandle]:
    """Apply dropout with probability ``p`` to every block's attention and MLP branch before the residual add;
    returns the hook handles (empty when ``p == 0``).

    For Chameleon's Swin-norm blocks, whose branch output is normalised before the add, the hooks sit on the
    two norms, so the dropout is always the last thing before the residual sum (as in Lumina-mGPT). Hooks rather
    than new modules keep the state-dict keys identical to the published checkpoints; they are traced by
    ``torch.compile`` and replayed with the same RNG state under activation checkpointing.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"residual dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return []
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise TypeError(f"{type(backbone).__name__} has no `.layers`; expected a transformers decoder")
    hook = _SublayerOutputDropout(p)
    handles = []
    for layer in layers:
        if isinstance(layer, ChameleonSwinDecoderLayer):
            branch_outputs = (layer.input_layernorm, layer.post_attention_layernorm)
        else:
            branch_outputs = (layer.self_attn, layer.mlp)
        handles.extend(module.register_forward_hook(hook) for module in branch_outputs)
    return handles


def cache_argument(model: nn.Module) -> str:
    """The name under which transformers' ``model.forward`` takes the KV cache and its output returns it:
    ``cache`` in recent transformers 5 releases, ``past_key_values`` before (the old name still works there but
    warns on every call and is announced to go in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def build_lm_backbone(lm: LMConfig, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The bare decoder for ``lm``: ``ChameleonModel`` (without its ``vqmodel``) or ``LlamaModel``, randomly
    initialised directly on ``device``, with residual dropout attached. Its ``last_hidden_state`` is already
    passed through the final norm."""
    config = lm_hf_config(lm)
    model_cls = ChameleonModel if lm.arch == "chameleon" else LlamaModel
    # Building under the device context puts every parameter and buffer straight onto `device`: no CPU
    # copy of a 7B model first, and nothing at all for "meta".
    with torch.device(device):
        backbone = model_cls(config)
    if isinstance(backbone, ChameleonModel):
        # The VQ tokenizer is not part of the trained model (see module docstring).
        del backbone.vqmodel
    add_residual_dropout(backbone, lm.residual_dropout)
    return backbone


def build_lm_head(
    lm: LMConfig, device: str | torch.device = "cpu", *, embedding: nn.Embedding | None = None
) -> nn.Linear:
    """The output projection ``hidden -> vocab`` (no bias), initialised like transformers' heads; with
    ``lm.tie_word_embeddings`` and an ``embedding`` given (the backbone's ``embed_tokens``) it shares its weight."""
    with torch.device(device):
        head = nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
    if lm.tie_word_embeddings and embedding is not None:
        if tuple(embedding.weight.shape) != (lm.vocab_size, lm.hidden_size):
            raise ValueError(
                f"cannot tie: embedding is {tuple(embedding.weight.shape)}, "
                f"head needs {(lm.vocab_size, lm.hidden_size)}"
            )
        head.weight = embedding.weight
    else:
        nn.init.normal_(head.weight, mean=0.0, std=lm.initializer_range)
    return head
