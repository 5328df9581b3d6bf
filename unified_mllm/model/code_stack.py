"""Reading and writing a *stack* of image codes per LM position (UniTok and DualToken).

The VQ-GAN gives one code per image position, and the LM's own embedding table and ``lm_head`` handle it like
any other id. UniTok and DualToken give ``D`` codes per spatial position; flattening them would make image
spans ``D`` times longer, so their MLLMs keep **one LM position per spatial location**:

* on the way in, :class:`CodeStackEmbedder` turns the ``D`` codes of a position into one LM input vector;
* on the way out, :class:`CodeStackHeads` reads the LM hidden state of the position *before* it (the usual
  next-token shift, done by the caller) and predicts the ``D`` codes one after another with a small causal
  "depth" transformer per group of slots.

**Contract.** Codes are ``[N, D]`` (long; the embedder also takes ``[..., D]``), one row per spatial position.
The ``D`` slots are split into consecutive :class:`CodeGroup` runs, in the order of the tokenizers'
``encode()`` output (the last axis of its ``[B, h, w, D]`` codes):

* UniTok: one group ``"codes"`` of ``num_codebooks`` slots, sub-codebook 0 first;
* DualToken: ``"pixel"`` (``pixel_depth`` residual depths, coarsest first) then ``"semantic"``
  (``semantic_depth`` depths);
* VQ-GAN: one group of one slot, but :func:`build_code_stack` returns ``None`` for it (nothing to add).

**What follows the papers.** UniTok's MLLM (Liquid code) feeds the LM one vector per position built from the
8 sub-codes, and predicts the sub-codes with 3 Llama layers over the sequence ``[h, e(c_0), ..., e(c_6)]``,
teacher-forced in training and re-run without a cache at sampling. DualToken's MLLM (paper only) concatenates
the pixel and semantic embeddings of a position along channels, maps them with a 2-layer MLP into the LM, and
sends the LM hidden state through two separate 2-layer GELU projectors into two separate depth transformers,
each with one classifier per depth.

**What we chose.**

* One structure serves both: a group's input embedding is the *sum* of per-slot embeddings (as expressive
  as concatenating per-slot vectors and applying one linear map), the groups are concatenated along channels
  (DualToken), then ``Linear -> GELU -> Linear`` to the LM width. UniTok's MLLM instead concatenates its
  frozen 8-d sub-code vectors and runs its causal attention projection, which also mixes earlier image
  positions; we leave that mixing to the LM. Embeddings are learned from scratch; nothing here copies the
  tokenizer's codebook vectors (an integrator may initialise from them).
* Every group gets a DualToken-style head (:class:`DepthHead`): a 2-layer GELU projector from the LM width,
  learned depth-position embeddings, pre-norm causal blocks (:class:`~unified_mllm.vision.vit.ViTBlock`:
  LayerNorm + GeGLU, not Llama's RMSNorm + SwiGLU), a final LayerNorm and one classifier per depth (UniTok
  shares one classifier over its sub-codebooks; separate ones cost ``D x width x vocab`` more parameters and
  let each slot's code distribution have its own output space).
* **Depth input.** Position 0 holds the projected hidden state; position ``d >= 1`` holds the embedding of
  code ``d - 1`` alone (UniTok / LlamaGen style), each slot with its own table, plus the depth-position
  embedding. RQ-Transformer and DualToken feed the *sum* of the embeddings of codes ``0..d-1`` instead; with
  causal attention every position already sees all earlier codes, and with separate tables per slot a
  running sum would not be a partial reconstruction of anything, so we keep the simpler input.
* Groups are independent given the hidden state (DualToken's two heads): the semantic head never sees the
  pixel codes. :meth:`CodeStackHeads.sample` still walks the groups in order, so ``slot_index`` is global.
* :meth:`CodeStackHeads.loss` is the *mean* cross-entropy over all ``D`` slots (DualToken sums log-probs
  over depths); the mean keeps the per-position scale of one ordinary next-token loss whatever ``D`` is, so
  image and text positions can be averaged together. No z-loss here: the trainer owns extra terms.
* The hidden state is the LM's last hidden state after its final norm (what ``lm_head`` reads). It is cast
  to the head's parameter dtype, so an fp32 head can sit behind a bf16 LM.
* :meth:`DepthHead.next_logits` re-runs the whole ``depth``-long sequence, so sampling reproduces the
  teacher-forced logits bit for bit (its docstring says why).
* The MLP projectors keep PyTorch's default initialisation (scale-preserving, as the SigLIP projector does).

**Sizes.** Per-slot tables and classifiers cost ``D x vocab x width`` each. With the defaults, UniTok behind
a 4096-wide LM (8 x 4096 codes) has a 167.8M-parameter embedder and a 788.8M-parameter head (its released
``AR_head``, 3 Llama layers with one shared classifier, is about 740M by our count). DualToken behind a
2048-wide LM (2 x 8 depths of 16384 codes) comes to 549.5M + 1275.6M, far above the 258M head of the paper,
which shares one codebook across depths; sharing tables within a group is the lever if that matters.

Building does no I/O; pass ``device="meta"`` to :func:`build_code_stack` to count parameters of the
published sizes without allocating them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unified_mllm.config import VQConfig
from unified_mllm.vision.projector import MLPProjector
from unified_mllm.vision.vit import ViTBlock, init_transformer_weights

# Standard deviation of freshly initialised embeddings (Llama's initializer_range).
EMBED_STD = 0.02
# Channels per attention head that the default head count aims for.
HEAD_DIM_TARGET = 64

# ``choose(logits [N, vocab] float32, slot_index) -> codes [N]``: guidance, filtering, temperature, sampling.
ChooseFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class CodeGroup:
    """A run of consecutive slots of the code stack that share one depth head and one vocabulary."""

    name: str
    depth: int
    vocab_size: int


def code_groups(vq: VQConfig) -> list[CodeGroup]:
    """The slot groups of ``vq``'s tokenizer, in the order of its ``encode()`` output's last axis."""
    if vq.kind == "unitok":
        return [CodeGroup("codes", vq.unitok.num_codebooks, vq.codebook_size)]
    if vq.kind == "dualtoken":
        return [
            CodeGroup("pixel", vq.dualtoken.pixel_depth, vq.codebook_size),
            CodeGroup("semantic", vq.dualtoken.semantic_depth, vq.codebook_size),
        ]
    if vq.kind == "vqgan":
        return [CodeGroup("codes", 1, vq.codebook_size)]
    raise ValueError(f"unknown visual tokenizer kind {vq.kind!r}")


def _checked_groups(groups: Sequence[CodeGroup]) -> tuple[list[CodeGroup], int]:
    """``groups`` as a list and their total depth (codes per position), after checking them."""
    if not groups:
        raise ValueError("a code stack needs at least one group")
    names = [group.name for group in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    for group in groups:
        if group.depth < 1 or group.vocab_size < 1:
            raise ValueError(f"group {group.name!r}: depth and vocab_size must be >= 1, got {group}")
    return list(groups), sum(group.depth for group in groups)


def _check_codes(codes: torch.Tensor, depth: int, what: str) -> None:
    """Shape and dtype only: a range check would need a host sync on every step."""
    if codes.dim() < 1 or codes.shape[-1] != depth:
        raise ValueError(f"{what}: expected codes [..., {depth}], got {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"{what}: codes must be integers, got {codes.dtype}")


def _normal_embedding(num: int, dim: int) -> nn.Embedding:
    embedding = nn.Embedding(num, dim)
    nn.init.normal_(embedding.weight, std=EMBED_STD)
    return embedding


class CodeStackEmbedder(nn.Module):
    """Codes ``[..., D]`` -> LM input vectors ``[..., hidden_size]``, one per spatial position: per group the
    sum of per-slot embeddings, the groups concatenated, then ``Linear -> GELU -> Linear``."""

    def __init__(self, groups: Sequence[CodeGroup], hidden_size: int, embed_dim: int) -> None:
        super().__init__()
        self.groups, self.depth = _checked_groups(groups)
        self.embeddings = nn.ModuleList(
            _normal_embedding(group.vocab_size, embed_dim)
            for group in self.groups
            for _ in range(group.depth)
        )
        self.projector = MLPProjector(len(self.groups) * embed_dim, hidden_size, depth=2, activation="gelu")

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        _check_codes(codes, self.depth, "CodeStackEmbedder")
        parts, slot = [], 0
        for group in self.groups:
            summed = self.embeddings[slot](codes[..., slot])
            for offset in range(1, group.depth):
                summed = summed + self.embeddings[slot + offset](codes[..., slot + offset])
            parts.append(summed)
            slot += group.depth
        return self.projector(torch.cat(parts, dim=-1))


class DepthHead(nn.Module):
    """One group's depth transformer: LM hidden ``[N, hidden_size]`` -> logits over its ``depth`` slots.

    The sequence is ``[proj(h), e_0(c_0), ..., e_{depth-2}(c_{depth-2})]`` plus depth-position embeddings,
    run through ``num_layers`` causal pre-norm blocks and a LayerNorm; position ``d`` is classified by the
    ``d``-th classifier, so slot ``d``'s logits depend on ``h`` and codes ``< d`` only.
    """

    def __init__(
        self, group: CodeGroup, hidden_size: int, width: int, num_layers: int, num_heads: int
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"depth head width {width} is not divisible by {num_heads} heads")
        self.group = group
        self.depth = group.depth
        self.input_proj = MLPProjector(hidden_size, width, depth=2, activation="gelu")
        self.position = nn.Parameter(torch.empty(group.depth, width))
        # The last code is never an input: nothing comes after it within the group.
        self.code_embeddings = nn.ModuleList(
            nn.Embedding(group.vocab_size, width) for _ in range(group.depth - 1)
        )
        self.blocks = nn.ModuleList(ViTBlock(width, num_heads, causal=True) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleList(nn.Linear(width, group.vocab_size) for _ in range(group.depth))
        init_transformer_weights(self.blocks)
        init_transformer_weights(self.classifiers)
        nn.init.normal_(self.position, std=EMBED_STD)
        for embedding in self.code_embeddings:
            nn.init.normal_(embedding.weight, std=EMBED_STD)

    def _states(self, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Hidden ``[N, hidden_size]`` and codes ``[N, L - 1]`` -> normed states ``[N, L, width]``."""
        if hidden.dim() != 2 or prefix.dim() != 2 or prefix.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"{self.group.name}: expected hidden [N, H] and codes [N, d], got "
                f"{tuple(hidden.shape)} and {tuple(prefix.shape)}"
            )
        first = self.input_proj(hidden.to(self.position.dtype))
        inputs = [first] + [self.code_embeddings[i](prefix[:, i]) for i in range(prefix.shape[1])]
        x = torch.stack(inputs, dim=1) + self.position[: len(inputs)]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[N, depth, vocab]`` for hidden ``[N, hidden_size]`` and codes
        ``[N, depth]`` (the last column is not read: it is only predicted)."""
        _check_codes(codes, self.depth, self.group.name)
        states = self._states(hidden, codes[:, : self.depth - 1])
        return torch.stack([head(states[:, d]) for d, head in enumerate(self.classifiers)], dim=1)

    def next_logits(self, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, vocab]`` of slot ``d = prefix.shape[1]`` given codes ``prefix`` ``[N, d]`` of slots
        ``< d``, bit-identical to ``forward(hidden, codes)[:, d]`` for any ``codes`` that start with
        ``prefix``.

        No cache: the whole ``depth``-long sequence is re-run with the missing codes padded by code 0. Running
        only the ``d + 1`` known positions would be up to twice cheaper, but other sequence lengths pick other
        matmul / attention kernels and move the logits by rounding; with the training shapes the causal mask
        makes the padding contribute exact zeros, so sampling sees exactly the model that was trained.
        """
        step = prefix.shape[-1]
        if prefix.dim() != 2 or not 0 <= step < self.depth:
            raise ValueError(
                f"{self.group.name}: prefix must be [N, d] with d < {self.depth}, got {tuple(prefix.shape)}"
            )
        padded = F.pad(prefix, (0, self.depth - 1 - step))
        return self.classifiers[step](self._states(hidden, padded)[:, step])


class CodeStackHeads(nn.Module):
    """One :class:`DepthHead` per group (``heads[name]``, in group order): LM hidden states -> code stacks.

    ``hidden`` is ``[N, hidden_size]``: for the code stack at position ``t`` the caller passes the LM hidden
    state at ``t - 1``, exactly as for ordinary next-token prediction.
    """

    def __init__(
        self, groups: Sequence[CodeGroup], hidden_size: int, width: int, num_layers: int, num_heads: int
    ) -> None:
        super().__init__()
        self.groups, self.depth = _checked_groups(groups)
        self.heads = nn.ModuleDict(
            (group.name, DepthHead(group, hidden_size, width, num_layers, num_heads)) for group in self.groups
        )

    def _split(self, codes: torch.Tensor) -> list[torch.Tensor]:
        _check_codes(codes, self.depth, "CodeStackHeads")
        return list(codes.split([group.depth for group in self.groups], dim=-1))

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced logits, one ``[N, group.depth, group.vocab_size]`` tensor per group."""
        return [head(hidden, part) for head, part in zip(self.heads.values(), self._split(codes))]

    def loss(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Per-position loss ``[N]``: the mean over all ``D`` slots of the cross-entropy of the float32 logits
        against ``codes`` ``[N, D]``. Masking and averaging over positions are the caller's."""
        losses = []
        for logits, target in zip(self.forward(hidden, codes), self._split(codes)):
            flat = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
            losses.append(flat.view(target.shape))
        return torch.cat(losses, dim=1).mean(dim=1)

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, choose: ChooseFn) -> torch.Tensor:
        """Codes ``[N, D]`` (long) drawn slot by slot: for each group in order, for each depth ``d``,
        ``choose(logits [N, vocab] float32, slot_index)`` picks slot ``d``'s codes given those already picked.

        ``choose`` applies guidance, top-k / top-p, temperature and sampling (the engine supplies it; greedy
        is ``lambda logits, slot: logits.argmax(-1)``). For classifier-free guidance pass the conditional and
        the unconditional rows together in ``hidden`` (e.g. ``[cond; uncond]``), mix the two halves inside
        ``choose`` and return the *same* choice for both halves, so both rows condition on the same prefix.
        """
        rows = hidden.shape[0]
        columns: list[torch.Tensor] = []
        slot = 0
        for head in self.heads.values():
            prefix = torch.empty((rows, 0), dtype=torch.long, device=hidden.device)
            for _ in range(head.depth):
                chosen = choose(head.next_logits(hidden, prefix).float(), slot)
                if chosen.shape != (rows,):
                    raise ValueError(
                        f"choose returned {tuple(chosen.shape)} for slot {slot}, expected ({rows},)"
                    )
                prefix = torch.cat([prefix, chosen.to(torch.long)[:, None]], dim=1)
                slot += 1
            columns.append(prefix)
        return torch.cat(columns, dim=1)


def _default_heads(width: int) -> int:
    """The largest head count ``<= width // 64`` that divides ``width`` (at least 1)."""
    heads = max(1, width // HEAD_DIM_TARGET)
    while width % heads:
        heads -= 1
    return heads


def build_code_stack(
    vq: VQConfig,
    hidden_size: int,
    *,
    width: int | None = None,
    num_layers: int = 3,
    num_heads: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CodeStackEmbedder, CodeStackHeads] | None:
    """The input embedder and the depth heads for ``vq``'s code stack, built on ``device``, or ``None`` for a
    tokenizer with one code per position. Defaults: ``width = hidden_size`` (UniTok's head runs at the LM
    width), 3 layers (both papers), heads of about 64 channels, embedder ``embed_dim = hidden_size``."""
    groups = code_groups(vq)
    if sum(group.depth for group in groups) == 1:
        return None
    width = hidden_size if width is None else width
    num_heads = _default_heads(width) if num_heads is None else num_heads
    with torch.device(device):
        embedder = CodeStackEmbedder(groups, hidden_size, embed_dim=hidden_size)
        heads = CodeStackHeads(groups, hidden_size, width, num_layers, num_heads)
    return embedder, heads
