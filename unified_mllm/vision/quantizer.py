"""Vector quantization: nearest-code lookup, losses, EMA codebooks, dead-code restarts, usage statistics.

Plain functions plus :class:`VectorQuantizer`, which UniTok's :class:`MultiCodebookQuantizer` (one per channel
chunk) and DualToken's :class:`ResidualQuantizer` (one codebook for successive residuals) build on.

Chameleon's (taming-transformers') quantizer is the default: the nearest code by L2 distance, the
straight-through estimator, and ``codebook loss + beta * commitment loss`` (van den Oord et al. 2017). taming's
``legacy`` loss puts ``beta`` on the codebook term instead; the two have the same *value* (both terms are the
same mean squared error) and differ only in how the gradient is split between the encoder and the codebook.
Optional, for training new tokenizers: l2-normalised codes looked up by cosine similarity (ViT-VQGAN), EMA
codebook updates (VQ-VAE-2), and dead-code restarts (Jukebox / SoundStream style).

Distribution (design convention 1): nothing here imports torch's collective-communication package. The trainer may set
:attr:`VectorQuantizer.all_reduce` (a callable summing a tensor over ranks and returning it) so that usage
counts and EMA statistics are global, and it calls :meth:`VectorQuantizer.restart_dead_codes` with a
``broadcast`` callable so that every rank ends up with rank 0's codebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Rows of the (rows x codebook_size) distance matrix computed at once: 8192 codes x 4096 rows x 4 bytes is
# 128 MiB, which bounds memory for big batches of 512 px images (16 images = 16384 latent vectors).
LOOKUP_CHUNK_ROWS = 4096

TensorHook = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass
class QuantizerOutput:
    """What :meth:`VectorQuantizer.forward` returns.

    ``quantized`` has the input's shape and carries the straight-through gradient; ``indices`` has the input's
    shape without the code dimension. ``loss`` is what the trainer adds to its objective; the two terms are
    also given separately for logging (``codebook_loss`` is zero with EMA codebooks). ``counts`` (float,
    ``[codebook_size]``), ``perplexity`` and ``usage`` (fraction of codes used) describe this batch — summed
    over ranks in training when :attr:`VectorQuantizer.all_reduce` is set. ``latents`` are the detached input
    vectors ``[N, dim]`` (l2-normalised for cosine codebooks), the pool for :meth:`restart_dead_codes`.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    counts: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    latents: torch.Tensor


def nearest_code_indices(
    vectors: torch.Tensor,
    codebook: torch.Tensor,
    *,
    cosine: bool = False,
    chunk_rows: int = LOOKUP_CHUNK_ROWS,
) -> torch.Tensor:
    """Index of the nearest code for each row of ``vectors`` ``[N, dim]`` → ``[N]`` (long).

    L2 distance as Chameleon computes it (``|z|^2 + |e|^2 - 2 z.e``), or with ``cosine`` the largest cosine
    similarity (both sides l2-normalised here). Distances are computed in float32 even for bf16 models:
    in bf16 the distances between close codes round together and the argmin picks the wrong code.
    """
    if vectors.ndim != 2 or codebook.ndim != 2 or vectors.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"expected vectors [N, dim] and codebook [K, dim], got {tuple(vectors.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    vectors, codebook = vectors.float(), codebook.float()
    if cosine:
        vectors, codebook = F.normalize(vectors, dim=1), F.normalize(codebook, dim=1)
    code_sq = codebook.pow(2).sum(dim=1)
    out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    for start in range(0, vectors.shape[0], chunk_rows):
        rows = vectors[start : start + chunk_rows]
        if cosine:
            out[start : start + chunk_rows] = (rows @ codebook.t()).argmax(dim=1)
        else:
            distances = rows.pow(2).sum(dim=1, keepdim=True) + code_sq - 2.0 * (rows @ codebook.t())
            out[start : start + chunk_rows] = distances.argmin(dim=1)
    return out


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in ``indices`` (any shape) → float ``[codebook_size]``."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size).float()


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of the code distribution given by ``counts``: 1 if one code is used, K if all K are
    used equally; the effective number of codes in use."""
    probs = counts.float() / counts.sum().clamp_min(1.0)
    # 0 * log 0 = 0: codes that never occur contribute nothing.
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    return entropy.exp()


def straight_through(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``codes`` in the forward pass, identity gradient to ``vectors`` in the backward pass."""
    return vectors + (codes - vectors).detach()


def _vectors_last(z: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """``z`` with its dimension ``dim`` (which must hold ``width`` channels) moved last."""
    if z.shape[dim] != width:
        raise ValueError(f"expected {width} channels at dim {dim}, got shape {tuple(z.shape)}")
    return z.movedim(dim, -1)


class VectorQuantizer(nn.Module):
    """A codebook of ``codebook_size`` vectors of width ``dim``; the parameter is ``embedding.weight`` (taming's
    and Chameleon's name, so ``quantize.embedding.weight`` loads from ``vqgan.ckpt`` unchanged).

    ``ema_decay`` switches to EMA codebook updates (the codebook then gets no gradient and no codebook loss);
    ``dead_code_steps > 0`` tracks, per code, the training forward passes since it was last used, which
    :meth:`restart_dead_codes` reads. Those statistics are persistent buffers (exact resume) registered only
    when the feature is on; :attr:`STATISTIC_BUFFERS` names them so loaders can treat them as optional.
    """

    STATISTIC_BUFFERS: tuple[str, ...] = ("ema_cluster_size", "ema_embed_sum", "steps_since_used")

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        beta: float = 0.25,
        l2_normalize: bool = False,
        ema_decay: float | None = None,
        ema_epsilon: float = 1e-5,
        dead_code_steps: int = 0,
    ) -> None:
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"need codebook_size >= 2 and dim >= 1, got {codebook_size} and {dim}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
        if dead_code_steps < 0:
            raise ValueError(f"dead_code_steps must be >= 0, got {dead_code_steps}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.l2_normalize, self.ema_decay, self.ema_epsilon = l2_normalize, ema_decay, ema_epsilon
        self.dead_code_steps = dead_code_steps
        # Set by the trainer in a distributed run: sums a tensor over ranks (in place or returned).
        self.all_reduce: TensorHook | None = None
        self.embedding = nn.Embedding(codebook_size, dim)
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", torch.zeros(codebook_size, dim))
        if dead_code_steps > 0:
            self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """taming's init: codes uniform in ``±1/codebook_size``; statistics restarted from the codebook."""
        self.embedding.weight.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
        self.reset_statistics()

    @torch.no_grad()
    def reset_statistics(self) -> None:
        """Restart the EMA / usage statistics from the current codebook (after loading a checkpoint without
        them). The EMA sums start as if every code had been assigned once, to itself: starting the cluster
        sizes at zero would blow unused codes up by ``1 / epsilon`` on the first update."""
        if self.ema_decay is not None:
            self.ema_cluster_size.fill_(1.0)
            self.ema_embed_sum.copy_(self.embedding.weight)
        if self.dead_code_steps > 0:
            self.steps_since_used.zero_()

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors as the lookup sees them ``[codebook_size, dim]`` (normalised for cosine codes)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.l2_normalize else weight

    def lookup(self, indices: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Code vectors for ``indices`` (any shape): the vector dimension is inserted at ``dim``."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"code indices must be integers, got {indices.dtype}")
        vectors = F.embedding(indices.long(), self.codebook)
        return vectors.movedim(-1, dim)

    def nearest(self, z: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Code indices for ``z`` (vectors along ``dim``) without losses or statistics: inference only."""
        moved = _vectors_last(z, dim, self.dim)
        indices = nearest_code_indices(
            moved.reshape(-1, self.dim).detach(), self.embedding.weight.detach(), cosine=self.l2_normalize
        )
        return indices.reshape(moved.shape[:-1])

    def forward(self, z: torch.Tensor, dim: int = -1) -> QuantizerOutput:
        """Quantize ``z``, whose dimension ``dim`` holds the code vectors (``dim=1`` for ``[B, C, H, W]``)."""
        moved = _vectors_last(z, dim, self.dim)
        flat = moved.reshape(-1, self.dim)
        if self.l2_normalize:
            flat = F.normalize(flat, dim=1)
        codebook = self.codebook
        indices = nearest_code_indices(flat.detach(), codebook.detach(), cosine=self.l2_normalize)
        codes = F.embedding(indices, codebook).to(flat.dtype)
        codebook_loss = F.mse_loss(codes, flat.detach())  # moves the codes towards the encoder outputs
        commitment_loss = F.mse_loss(flat, codes.detach())  # keeps the encoder close to its codes
        if self.ema_decay is not None:
            codebook_loss = torch.zeros_like(commitment_loss)  # EMA moves the codes, no gradient does
        loss = codebook_loss + self.beta * commitment_loss
        quantized = straight_through(flat, codes).reshape(moved.shape).movedim(-1, dim)
        counts = code_counts(indices, self.codebook_size)
        if self.training:
            counts = self.update_statistics(flat.detach(), indices, counts)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.reshape(moved.shape[:-1]),
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            counts=counts,
            perplexity=perplexity_from_counts(counts),
            usage=(counts > 0).float().mean(),
            latents=flat.detach(),
        )

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks with :attr:`all_reduce` (itself in a single process)."""
        if self.all_reduce is None:
            return tensor
        result = self.all_reduce(tensor)
        return tensor if result is None else result

    @torch.no_grad()
    def update_statistics(
        self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, *, counts_reduced: bool = False
    ) -> torch.Tensor:
        """Training-time bookkeeping after a lookup of ``flat`` ``[N, dim]`` → ``indices`` ``[N]`` (``counts``
        their histogram, already summed over ranks when ``counts_reduced``): dead-code clocks and the EMA step;
        returns the globally summed counts."""
        if not counts_reduced:
            counts = self.reduce(counts)
        if self.dead_code_steps > 0:
            self.steps_since_used.add_(1)
            self.steps_since_used.masked_fill_(counts > 0, 0)
        if self.ema_decay is not None:
            embed_sum = torch.zeros(self.codebook_size, self.dim, device=flat.device)
            embed_sum.index_add_(0, indices, flat.float())
            self.ema_update(counts, self.reduce(embed_sum))
        return counts

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, embed_sum: torch.Tensor) -> None:
        """One EMA step from a batch's per-code ``counts`` ``[K]`` and sums of assigned vectors ``[K, dim]``.

        ``N <- d N + (1-d) counts``, ``m <- d m + (1-d) embed_sum``, then each code becomes ``m / N'`` with
        Laplace-smoothed sizes ``N' = (N + eps) / (sum(N) + K eps) * sum(N)`` so no code divides by zero.
        """
        if self.ema_decay is None:
            raise RuntimeError("ema_update needs a quantizer built with ema_decay")
        decay, eps = self.ema_decay, self.ema_epsilon
        self.ema_cluster_size.mul_(decay).add_(counts.float(), alpha=1.0 - decay)
        self.ema_embed_sum.mul_(decay).add_(embed_sum.float(), alpha=1.0 - decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + eps) / (total + self.codebook_size * eps) * total
        codes = self.ema_embed_sum / smoothed.unsqueeze(1)
        if self.l2_normalize:
            codes = F.normalize(codes, dim=1)
        self.embedding.weight.copy_(codes)

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors that must agree on every rank: the codebook and the statistics buffers."""
        tensors = [self.embedding.weight.data]
        return tensors + [getattr(self, name) for name in self.STATISTIC_BUFFERS if hasattr(self, name)]

    def dead_codes(self) -> torch.Tensor:
        """Indices of codes unused for at least ``dead_code_steps`` training forward passes (``[n]``, long)."""
        if self.dead_code_steps <= 0:
            return torch.zeros(0, dtype=torch.long, device=self.embedding.weight.device)
        return (self.steps_since_used >= self.dead_code_steps).nonzero().squeeze(1)

    @torch.no_grad()
    def restart_dead_codes(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        broadcast: TensorHook | None = None,
    ) -> torch.Tensor:
        """Re-initialise the dead codes from random rows of ``latents`` ``[N, dim]`` (the batch's encoder
        outputs, e.g. :attr:`QuantizerOutput.latents`); returns the restarted indices.

        Each dead code gets a distinct row when there are enough rows (otherwise rows repeat), drawn with
        ``generator``. In a distributed run pass ``broadcast`` (e.g. a rank-0 broadcast from ``unified_mllm.train.distributed``)
        on *every* rank: after the local restart each of :meth:`state_tensors` is broadcast in place, so
        all ranks hold rank 0's codebook whatever their own batch was. The returned indices are this rank's.
        """
        dead = self.dead_codes()
        if dead.numel() > 0:
            pool = latents.detach().reshape(-1, self.dim).float()
            if pool.shape[0] == 0:
                raise ValueError("restart_dead_codes needs at least one latent vector")
            device = generator.device if generator is not None else pool.device
            if pool.shape[0] >= dead.numel():
                rows = torch.randperm(pool.shape[0], generator=generator, device=device)[: dead.numel()]
            else:
                rows = torch.randint(pool.shape[0], (dead.numel(),), generator=generator, device=device)
            fresh = pool[rows.to(pool.device)].to(self.embedding.weight.device)
            if self.l2_normalize:
                fresh = F.normalize(fresh, dim=1)
            self.embedding.weight[dead] = fresh.to(self.embedding.weight.dtype)
            self.steps_since_used[dead] = 0
            if self.ema_decay is not None:
                self.ema_cluster_size[dead] = 1.0
                self.ema_embed_sum[dead] = fresh
        if broadcast is not None:
            for tensor in self.state_tensors():
                broadcast(tensor)
        return dead

    def extra_repr(self) -> str:
        lookup = "cosine" if self.l2_normalize else "l2"
        ema = f", ema_decay={self.ema_decay}" if self.ema_decay is not None else ""
        dead = f", dead_code_steps={self.dead_code_steps}" if self.dead_code_steps else ""
        return f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, lookup={lookup}{ema}{dead}"


# ------------------------------------------------------------------------------- multi-code quantizers


class _QuantizerGroup(nn.Module):
    """What the multi-code quantizers share: the trainer's ``all_reduce`` hook and ``dead_code_steps`` reach
    every :class:`VectorQuantizer` inside."""

    def _vector_quantizers(self) -> list[VectorQuantizer]:
        return [module for module in self.modules() if isinstance(module, VectorQuantizer)]

    @property
    def all_reduce(self) -> TensorHook | None:
        return self._vector_quantizers()[0].all_reduce

    @all_reduce.setter
    def all_reduce(self, hook: TensorHook | None) -> None:
        for quantizer in self._vector_quantizers():
            quantizer.all_reduce = hook

    @property
    def dead_code_steps(self) -> int:
        return self._vector_quantizers()[0].dead_code_steps

    def _latent_pools(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """For each of :meth:`_vector_quantizers`, the rows of ``latents`` its dead codes restart from."""
        raise NotImplementedError

    @torch.no_grad()
    def restart_dead_codes(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        broadcast: TensorHook | None = None,
    ) -> torch.Tensor:
        """Restart each codebook's dead codes from its pool of ``latents`` (:attr:`QuantizerOutput.latents`);
        returns the restarted indices of all codebooks concatenated."""
        pools = zip(self._vector_quantizers(), self._latent_pools(latents))
        return torch.cat([q.restart_dead_codes(pool, generator, broadcast) for q, pool in pools])


class MultiCodebookQuantizer(_QuantizerGroup):
    """UniTok's multi-codebook quantization: the ``dim`` channels of each vector are split into
    ``num_codebooks`` contiguous chunks, and chunk ``k`` is quantized by its own :class:`VectorQuantizer`
    (``codebook_size`` codes of ``dim / num_codebooks`` channels). One position thus takes one of
    ``codebook_size ** num_codebooks`` values while each small codebook stays fully used.

    ``forward`` returns indices with a trailing codebook dimension (``[..., num_codebooks]``), losses averaged
    over the codebooks (UniTok: ``mean_k(codebook_k + beta * commitment_k)``) and ``counts``
    ``[num_codebooks, codebook_size]``; ``latents`` are the (normalised) chunks, ``[N, dim]`` concatenated.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, **quantizer_kwargs: object) -> None:
        super().__init__()
        if num_codebooks < 1 or dim % num_codebooks:
            raise ValueError(f"dim {dim} does not split into {num_codebooks} equal chunks")
        self.num_codebooks, self.codebook_size, self.dim = num_codebooks, codebook_size, dim
        self.chunk_dim = dim // num_codebooks
        self.codebooks = nn.ModuleList(
            VectorQuantizer(codebook_size, self.chunk_dim, **quantizer_kwargs)  # type: ignore[arg-type]
            for _ in range(num_codebooks)
        )

    def forward(self, z: torch.Tensor, dim: int = -1) -> QuantizerOutput:
        chunks = _vectors_last(z, dim, self.dim).split(self.chunk_dim, -1)
        outputs = [codebook(chunk) for codebook, chunk in zip(self.codebooks, chunks)]

        def mean(name: str) -> torch.Tensor:
            return torch.stack([getattr(out, name) for out in outputs]).mean()

        return QuantizerOutput(
            quantized=torch.cat([out.quantized for out in outputs], dim=-1).movedim(-1, dim),
            indices=torch.stack([out.indices for out in outputs], dim=-1),
            loss=mean("loss"),
            codebook_loss=mean("codebook_loss"),
            commitment_loss=mean("commitment_loss"),
            counts=torch.stack([out.counts for out in outputs]),
            perplexity=mean("perplexity"),
            usage=mean("usage"),
            latents=torch.cat([out.latents for out in outputs], dim=1),
        )

    def nearest(self, z: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Indices ``[..., num_codebooks]`` for ``z`` without losses or statistics."""
        chunks = _vectors_last(z, dim, self.dim).split(self.chunk_dim, -1)
        return torch.stack([cb.nearest(chunk) for cb, chunk in zip(self.codebooks, chunks)], dim=-1)

    def lookup(self, indices: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The concatenated code vectors for ``indices`` ``[..., num_codebooks]``; channels inserted at ``dim``."""
        if indices.shape[-1] != self.num_codebooks:
            raise ValueError(f"expected {self.num_codebooks} codes per position, got {tuple(indices.shape)}")
        parts = [cb.lookup(indices[..., k]) for k, cb in enumerate(self.codebooks)]
        return torch.cat(parts, dim=-1).movedim(-1, dim)

    def _latent_pools(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """Each sub-codebook restarts from its own chunk of the channels of ``latents`` ``[N, dim]``."""
        return list(latents.reshape(-1, self.dim).split(self.chunk_dim, dim=1))


class ResidualQuantizer(_QuantizerGroup):
    """Residual quantization (RQ-VAE, Lee et al. 2022) with one codebook shared by all ``depth`` steps, as
    DualToken uses it: step ``d`` quantizes what the first ``d - 1`` codes left over, and the position's
    vector is the sum of its ``depth`` codes (finer and finer corrections).

    Losses follow RQ-VAE: the commitment term is the mean over depths of ``mse(z, sg(sum of the first d
    codes))``; the codebook term (gradient codebooks only) is the mean over depths of ``mse(code_d,
    sg(residual_d))``. EMA codebooks are updated once per forward from the residuals of all depths together
    (DualToken's ``rq_ema``), so the update does not depend on the order of the depths. ``indices`` have a
    trailing depth dimension; ``counts`` are ``[depth, codebook_size]``; ``latents`` are all residuals.
    """

    def __init__(self, depth: int, codebook_size: int, dim: int, **quantizer_kwargs: object) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth, self.codebook_size, self.dim = depth, codebook_size, dim
        self.codebook = VectorQuantizer(codebook_size, dim, **quantizer_kwargs)  # type: ignore[arg-type]

    def _residual_codes(self, flat: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per depth: the residual that was quantized ``[N, dim]`` and its code indices ``[N]``."""
        residual, residuals, indices = flat.detach(), [], []
        weights = self.codebook.codebook.detach()
        for _ in range(self.depth):
            index = nearest_code_indices(residual, weights, cosine=self.codebook.l2_normalize)
            residuals.append(residual)
            indices.append(index)
            residual = residual - F.embedding(index, weights).to(residual.dtype)
        return residuals, indices

    def forward(self, z: torch.Tensor, dim: int = -1) -> QuantizerOutput:
        moved = _vectors_last(z, dim, self.dim)
        flat = moved.reshape(-1, self.dim)
        residuals, indices = self._residual_codes(flat)
        codebook = self.codebook.codebook
        codes = [F.embedding(index, codebook).to(flat.dtype) for index in indices]
        partial_sums = torch.stack(codes).cumsum(dim=0)  # [depth, N, dim]
        commitment = torch.stack([F.mse_loss(flat, partial.detach()) for partial in partial_sums]).mean()
        if self.codebook.ema_decay is None:
            codebook_loss = torch.stack([F.mse_loss(c, r) for c, r in zip(codes, residuals)]).mean()
        else:
            codebook_loss = torch.zeros_like(commitment)
        per_depth = torch.stack([code_counts(index, self.codebook_size) for index in indices])
        if self.training:
            per_depth = self.codebook.reduce(per_depth)  # global per-depth counts: logging and the EMA step
            self.codebook.update_statistics(
                torch.cat(residuals).float(), torch.cat(indices), per_depth.sum(dim=0), counts_reduced=True
            )
        quantized = straight_through(flat, partial_sums[-1]).reshape(moved.shape).movedim(-1, dim)
        return QuantizerOutput(
            quantized=quantized,
            indices=torch.stack(indices, dim=-1).reshape(*moved.shape[:-1], self.depth),
            loss=codebook_loss + self.codebook.beta * commitment,
            codebook_loss=codebook_loss,
            commitment_loss=commitment,
            counts=per_depth,
            perplexity=torch.stack([perplexity_from_counts(c) for c in per_depth]).mean(),
            usage=(per_depth.sum(dim=0) > 0).float().mean(),
            latents=torch.cat(residuals),
        )

    def nearest(self, z: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Indices ``[..., depth]`` for ``z`` without losses or statistics."""
        moved = z.movedim(dim, -1)
        _, indices = self._residual_codes(moved.reshape(-1, self.dim))
        return torch.stack(indices, dim=-1).reshape(*moved.shape[:-1], self.depth)

    def partial_sums(self, indices: torch.Tensor) -> torch.Tensor:
        """``[..., depth, dim]``: entry ``d`` is the sum of the first ``d + 1`` code vectors of each position
        (what a depth transformer feeds back after predicting code ``d``)."""
        if indices.shape[-1] != self.depth:
            raise ValueError(f"expected {self.depth} codes per position, got {tuple(indices.shape)}")
        return self.codebook.lookup(indices).cumsum(dim=-2)

    def lookup(self, indices: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The quantized vectors (sum over depth) for ``indices`` ``[..., depth]``; channels at ``dim``."""
        return self.partial_sums(indices)[..., -1, :].movedim(-1, dim)

    def _latent_pools(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """The shared codebook restarts from the residuals of all depths (``latents``)."""
        return [latents]
