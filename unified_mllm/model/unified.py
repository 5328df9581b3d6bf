"""The unified model: one LM that reads text ids, VQ code ids and projected SigLIP features, and predicts ids.

:class:`UnifiedModel` holds four parts, under module paths the trainer relies on (it freezes and groups
parameters by these prefixes):

* ``lm`` — the bare transformers decoder (``ChameleonModel`` without its VQ encoder, or ``LlamaModel``);
* ``lm_head`` — the output projection over the **full** vocabulary (text, image codes, specials), unmasked:
  transformers' ``ChameleonForConditionalGeneration`` sets image-code logits to the dtype minimum, which would
  make image generation impossible, so we never go through it;
* ``vision.tower`` / ``vision.projector`` — SigLIP and the MLP that maps its patch features to the LM width;
* ``code_embedder`` / ``code_heads`` — only for tokenizers with a stack of D codes per position (UniTok,
  DualToken; :mod:`unified_mllm.model.code_stack`): the stack's embedding is the LM input at a code position
  (its id is only a marker there), and depth heads predict the next position's stack; the LM head still
  predicts every other token;
* ``code_grid_embedding`` (and ``vision.slot_embedding``) — only with ``model.grid_positions``: learned 2-D
  positions of code cells and feature slots (:mod:`unified_mllm.model.grid_positions`).

**Feature scatter.** A sequence reserves one slot per continuous feature (layout: ``feature_mask``); the ids
at those slots are ordinary ids of a placeholder token whose embedding is overwritten. :meth:`UnifiedModel.embed`
writes the projected features of ``pixel_values`` ``[N_views, 3, S, S]`` into the slots in row-major order of
the ``[B, T]`` mask (batch row, then position): the images in the order they appear in the batch, each image's
views base view first then its AnyRes tiles (:func:`unified_mllm.vision.anyres.split_image_features`), each
view's patch grid row-major; with ``feature_index`` (UniToken's AnyRes layout) the slots take the listed
features instead. The vision encoder is built even when ``model.vision.enabled`` is false (stage 0
simply sends no feature slots), so every stage's export has the same keys.

**Packing.** Several samples may share one row, with ``position_ids`` restarting at 0 at each sample start and
``attention_mask=None``. transformers (5.x, ``masking_utils.find_packed_sequence_indices``) then detects the
restarts and builds a block-diagonal causal mask for the sdpa and eager kernels, so no token attends across a
sample boundary. That detection only runs without a KV cache, which is why ``use_cache`` defaults to False.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unified_mllm.config import ModelConfig
from unified_mllm.model.backbone import build_lm_backbone, build_lm_head, cache_argument
from unified_mllm.model.code_stack import build_code_stack
from unified_mllm.model.export import (
    ShardRegion,
    check_lm_checkpoint_config,
    expand_qk_norm,
    held_whole,
    lm_checkpoint_key,
    load_safetensors_into,
    read_export_config,
    safetensors_files,
    unique_state_dict,
    write_export,
)
from unified_mllm.model.grid_positions import CodeGridEmbedding
from unified_mllm.vision.siglip import VisionEncoder

# Module paths of the parts, as the trainer's freezing rules name them.
LM_PREFIXES = ("lm.", "lm_head.")


@dataclass
class UnifiedOutput:
    """What :meth:`UnifiedModel.forward` returns."""

    logits: torch.Tensor
    """``[B, T, V]`` next-token logits over the full vocabulary (in the head's / autocast dtype)."""
    past_key_values: Any | None = None
    """The transformers KV cache when ``use_cache`` (or a cache was passed in), else None."""
    hidden_states: torch.Tensor | None = None
    """``[B, T, H]`` the LM's last hidden states, when ``return_hidden`` (the engine's depth-head input)."""
    code_losses: torch.Tensor | None = None
    """``[N]`` depth-head cross-entropy of each ``code_targets`` position, row-major (the mean over its codes;
    fp32); the trainer weights and sums them."""


class UnifiedModel(nn.Module):
    """LM backbone + LM head + SigLIP encoder with projector (see the module docstring), with parameters
    created on ``device`` (``"meta"`` allocates nothing: published sizes, sharded init)."""

    def __init__(self, config: ModelConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.config = config
        self.lm = build_lm_backbone(config.lm, device)
        # What transformers calls the KV cache in `lm`'s forward (the engine calls `lm` directly too).
        self.cache_argument = cache_argument(self.lm)
        self.lm_head = build_lm_head(config.lm, device, embedding=self.lm.get_input_embeddings())
        self.vision = VisionEncoder(
            config.vision,
            config.lm.hidden_size,
            config.projector,
            device,
            slot_positions=config.grid_positions > 0,
        )
        # model.grid_positions: learned row / column embeddings of code cells (model/grid_positions.py).
        self.code_grid_embedding = (
            CodeGridEmbedding(config.grid_positions, config.lm.hidden_size, device)
            if config.grid_positions > 0
            else None
        )
        # Tokenizers with a stack of codes per position (UniTok, DualToken): the stack's embedding replaces the
        # id's at code positions, and depth heads predict stacks from the LM's hidden states.
        head = config.depth_head
        stack = build_code_stack(
            config.vq,
            config.lm.hidden_size,
            width=head.width or None,
            num_layers=head.num_layers,
            num_heads=head.num_heads or None,
            device=device,
        )
        self.code_embedder, self.code_heads = stack if stack is not None else (None, None)

    @property
    def features_per_view(self) -> int:
        """Feature slots one SigLIP view fills (``P``)."""
        return self.vision.features_per_view

    # ------------------------------------------------------------------------------------------ forward

    def embed_code_stacks(
        self, embeds: torch.Tensor, code_stacks: torch.Tensor | None, code_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``embeds`` with the combined embeddings of ``code_stacks`` ``[N, D]`` written at the True positions
        of ``code_mask`` ``[B, T]`` (row-major), for tokenizers with D codes a position."""
        if code_stacks is None and code_mask is None:
            if self.training and self.code_embedder is not None:
                # A micro-batch without images still touches the embedder (see code_stack_loss).
                dummy = torch.zeros(1, self.code_embedder.depth, dtype=torch.long, device=embeds.device)
                return embeds + 0.0 * self.code_embedder(dummy).sum().to(embeds.dtype)
            return embeds
        if self.code_embedder is None:
            raise ValueError(
                f"code_stacks given, but model.vq.kind={self.config.vq.kind!r} has one code a position"
            )
        if code_stacks is None or code_mask is None or code_mask.shape != embeds.shape[:2]:
            raise ValueError("code_stacks [N, D] and code_mask [B, T] (shaped like input_ids) go together")
        stacked = self.code_embedder(code_stacks).to(embeds.dtype)
        return embeds.masked_scatter(code_mask.unsqueeze(-1), stacked)

    def code_stack_loss(
        self,
        hidden: torch.Tensor,
        code_stacks: torch.Tensor,
        code_mask: torch.Tensor,
        code_targets: torch.Tensor,
    ) -> torch.Tensor:
        """Depth-head cross-entropy ``[N]`` (fp32) of the ``N`` positions of ``code_targets`` ``[B, T]`` (a subset
        of ``code_mask``) in row-major order: the hidden state at ``t - 1`` predicts the stack at ``t``; each
        entry is the mean over the stack's codes. Boolean selection: one host sync."""
        if self.code_heads is None:
            raise ValueError(
                "code_targets need a tokenizer with code stacks (model.vq.kind unitok / dualtoken)"
            )
        flat_targets = code_targets.reshape(-1)
        stacks = code_stacks[code_targets[code_mask]]  # the stacks of the supervised code positions
        previous = torch.nonzero(flat_targets).squeeze(1) - 1  # code spans never start a row
        inputs = hidden.reshape(-1, hidden.shape[-1])[previous]
        if stacks.shape[0] == 0:
            # No supervised stack in this micro-batch (understanding data): run the heads on one dummy row and
            # keep none of it, so every rank's backward still touches the same parameters (FSDP / DDP reduce
            # them all; the empty slice passes zero gradients).
            inputs, stacks = (
                hidden.new_zeros(1, hidden.shape[-1]),
                code_stacks.new_zeros(1, code_stacks.shape[1]),
            )
            return self.code_heads.loss(inputs, stacks).float()[:0]
        return self.code_heads.loss(inputs, stacks).float()

    def embed_code_cells(self, embeds: torch.Tensor, code_cells: torch.Tensor | None) -> torch.Tensor:
        """``embeds`` plus the row / column embeddings of ``code_cells`` (``model.grid_positions``)."""
        if self.code_grid_embedding is None:
            if code_cells is not None:
                raise ValueError("code_cells given, but the model has no grid positions (grid_positions=0)")
            return embeds
        if code_cells is None:
            raise ValueError(
                "the model adds learned grid positions to image codes (model.grid_positions="
                f"{self.config.grid_positions}): pass code_cells (model.grid_positions.CodeCells over the ids)"
            )
        if code_cells.shape != (*embeds.shape[:2], 2):
            raise ValueError(
                f"code_cells must be [B, T, 2] for input_ids {tuple(embeds.shape[:2])}, got "
                f"{tuple(code_cells.shape)}"
            )
        return embeds + self.code_grid_embedding(code_cells).to(embeds.dtype)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        feature_mask: torch.Tensor | None = None,
        code_stacks: torch.Tensor | None = None,
        code_mask: torch.Tensor | None = None,
        code_cells: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings ``[B, T, H]``: token embeddings, with the projected features of ``pixel_values``
        written at the True positions of ``feature_mask`` (module docstring), plus the code stacks' and
        ``code_cells``' embeddings (:meth:`embed_code_stacks`, :meth:`embed_code_cells`).

        ``feature_index`` ``[N_slots, 2]`` (view, patch): the feature each slot takes, in slot order, when the
        slots take a selection of the views' features (UniToken's AnyRes layout keeps the unpadded part of its
        merged tile grid; the row ends between its rows are ``<row-end>`` ids, embedded like any id). None: every
        feature, in order.

        The write is out of place (``masked_scatter``), so gradients reach both the token embeddings and the
        vision encoder. Counting the slots against the features is one host sync per batch that has pixels.
        """
        embeds = self.embed_code_stacks(self.lm.get_input_embeddings()(input_ids), code_stacks, code_mask)
        embeds = self.embed_code_cells(embeds, code_cells)
        if pixel_values is None:
            # Reading the count is a host sync, but only the rare "mask without pixels" case pays it.
            if feature_mask is not None and bool(feature_mask.any()):
                raise ValueError(
                    f"feature_mask marks {int(feature_mask.sum())} feature slots but no pixel_values were given"
                )
            return embeds
        if feature_mask is None:
            raise ValueError(
                f"pixel_values ({pixel_values.shape[0]} views) given without a feature_mask saying where "
                "their features go"
            )
        if feature_mask.dtype != torch.bool or feature_mask.shape != input_ids.shape:
            raise ValueError(
                f"feature_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                f"got {feature_mask.dtype} {tuple(feature_mask.shape)}"
            )
        features = self.vision(pixel_values)  # [N_views, P, H]
        num_views, per_view = features.shape[0], features.shape[1]
        # masked_scatter would silently use a prefix of the features or fail obscurely; check the count.
        slots = int(feature_mask.sum())
        if feature_index is not None:
            if feature_index.ndim != 2 or feature_index.shape[1] != 2 or feature_index.shape[0] != slots:
                raise ValueError(
                    f"feature_index must be [N_slots, 2] with one row per feature slot ({slots}), got "
                    f"{tuple(feature_index.shape)}"
                )
            index = feature_index.to(features.device)
            features = features[index[:, 0], index[:, 1]]  # [N_slots, H]
        elif slots != num_views * per_view:
            raise ValueError(
                f"batch has {slots} feature slots but pixel_values give {num_views * per_view} features "
                f"({num_views} views x {per_view})"
            )
        flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # autocast may return bf16
        return embeds.masked_scatter(feature_mask.unsqueeze(-1), flat)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        feature_mask: torch.Tensor | None = None,
        code_stacks: torch.Tensor | None = None,
        code_mask: torch.Tensor | None = None,
        code_targets: torch.Tensor | None = None,
        code_cells: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
        past_key_values: Any | None = None,
        use_cache: bool = False,
        cache_position: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> UnifiedOutput:
        """Logits ``[B, T, V]`` for ``input_ids`` ``[B, T]``.

        ``attention_mask`` ``[B, T_past + T]`` (1 = real token) handles padding; for packed rows pass
        ``position_ids`` ``[B, T]`` restarting at 0 per sample and no mask (module docstring). ``pixel_values``
        / ``feature_mask`` (/ ``feature_index``) feed the continuous features (:meth:`embed`).
        ``past_key_values`` / ``use_cache`` are transformers' KV cache. ``cache_position`` ``[T]`` (the absolute positions of the new tokens) is
        accepted for callers written against older transformers: it only supplies ``position_ids`` when those
        are not given, since transformers 5 derives cache positions from the cache itself.

        Code stacks (UniTok / DualToken): ``code_stacks`` ``[N, D]`` are embedded at the ``code_mask`` positions
        (:meth:`embed_code_stacks`); with ``code_targets`` the depth heads' loss is computed here, inside the
        forward that FSDP wraps (:meth:`code_stack_loss`). ``code_cells``: the code cells of ``input_ids`` when
        ``model.grid_positions`` is on (:meth:`embed_code_cells`). ``return_hidden`` adds the last hidden states.
        """
        if position_ids is None and cache_position is not None:
            position_ids = cache_position.unsqueeze(0).expand(input_ids.shape[0], -1)
        out = self.lm(
            inputs_embeds=self.embed(
                input_ids, pixel_values, feature_mask, code_stacks, code_mask, code_cells, feature_index
            ),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self.cache_argument: past_key_values},
        )
        hidden = out.last_hidden_state
        code_loss = None
        if code_targets is not None and code_stacks is not None and code_mask is not None:
            code_loss = self.code_stack_loss(hidden, code_stacks, code_mask, code_targets)
        return UnifiedOutput(
            logits=self.lm_head(hidden),
            past_key_values=getattr(out, self.cache_argument),
            hidden_states=hidden if return_hidden else None,
            code_losses=code_loss,
        )

    # -------------------------------------------------------------------------------------- weights I/O

    def tie_weights(self) -> None:
        """Re-share the head with the embedding when the config ties them (``to_empty`` unties them)."""
        if self.config.lm.tie_word_embeddings:
            self.lm_head.weight = self.lm.get_input_embeddings().weight

    def init_non_persistent_buffers(self) -> None:
        """Recompute the buffers a state dict does not carry: RoPE ``inv_freq`` (in fp32, whatever the
        parameters' dtype) and SigLIP's ``position_ids``. Needed after building on ``meta`` and ``to_empty``.

        Raises RuntimeError when the model holds a non-persistent buffer this method does not know (a
        transformers change), rather than leaving it uninitialised.
        """
        rotary = self.lm.rotary_emb
        with torch.device(rotary.inv_freq.device):
            self.lm.rotary_emb = type(rotary)(config=self.lm.config)
        embeddings = self.vision.tower.embeddings
        with torch.no_grad():
            positions = torch.arange(embeddings.num_positions, device=embeddings.position_ids.device)
            embeddings.position_ids.copy_(positions.expand(1, -1))
        known = {
            "lm.rotary_emb.inv_freq",
            "lm.rotary_emb.original_inv_freq",
            "vision.tower.embeddings.position_ids",
        }
        unknown = {
            f"{prefix}.{name}".lstrip(".")
            for prefix, module in self.named_modules()
            for name in module._non_persistent_buffers_set
        } - known
        if unknown:
            raise RuntimeError(f"non-persistent buffers with no known initialisation: {sorted(unknown)}")

    def load_pretrained(
        self,
        *,
        lm: str | os.PathLike[str] | None = None,
        siglip: str | os.PathLike[str] | None = None,
        shard: ShardRegion = held_whole,
    ) -> None:
        """Read published weights: ``lm``, a transformers Chameleon / Llama causal-LM directory of safetensors
        (e.g. Lumina-mGPT-7B; mapped and checked as :mod:`unified_mllm.model.export` describes); ``siglip``, a
        SigLIP ``from_pretrained`` directory for ``vision.tower``. ``shard``: where a sharded model's parameters
        keep this rank's part (the LM is then read slice by slice)."""
        if lm is None and siglip is None:
            raise ValueError("load_pretrained: nothing to load (pass lm=... and/or siglip=...)")
        if lm is not None:
            check_lm_checkpoint_config(lm, self.config.lm)
            targets = {k: v for k, v in unique_state_dict(self).items() if k.startswith(LM_PREFIXES)}
            reshape, transform = expand_qk_norm(self.config.lm)
            load_safetensors_into(
                targets,
                safetensors_files(lm),
                f"LM checkpoint {lm}",
                rename=lm_checkpoint_key,
                reshape=reshape,
                transform=transform,
                shard=shard,
            )
        if siglip is not None:
            self.vision.load_pretrained_tower(Path(siglip))

    def save_pretrained(self, directory: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Path:
        """Write the Hugging Face-format export (``config.json`` + ``model.safetensors``) atomically; other
        files already in ``directory`` are kept. ``dtype`` casts the stored weights (default: as they are)."""
        return write_export(directory, self.config, unique_state_dict(self), dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> UnifiedModel:
        """Rebuild a model from :meth:`save_pretrained`'s export, in eval mode (as transformers does).

        ``dtype`` defaults to the stored one. The model is built on ``meta`` and materialised once on
        ``device``, then filled tensor by tensor, so no random initialisation runs and no second copy is made.
        """
        config, stored_dtype = read_export_config(directory)
        files = safetensors_files(directory)
        model = cls(config, device="meta")
        model.to_empty(device=device)
        model.to(dtype or stored_dtype)
        model.tie_weights()
        model.init_non_persistent_buffers()
        load_safetensors_into(unique_state_dict(model), files, f"export {directory}")
        return model.eval()
