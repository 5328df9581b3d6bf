"""Image-quality metrics for tokenizer reconstruction and generation: codebook usage and FID (PSNR and SSIM
are in :mod:`unified_mllm.metrics`, below every package folder, since the tokenizer trainer uses them too).

Conventions (chosen to match the tools published numbers come from):

* **FID** uses the 2048-d pool3 features of :mod:`unified_mllm.eval.inception`; covariances are unbiased
  (``np.cov`` default, divide by ``n - 1``), as pytorch-fid and the original TTUR code do. Reference statistics
  are ``.npz`` files with ``mu``, ``sigma`` and ``n`` (pytorch-fid's files, which lack ``n``, also load).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

# --------------------------------------------------------------------------------------------- codebook usage


def codebook_usage(codes: Tensor, codebook_size: int) -> dict[str, Any]:
    """How much of a codebook a set of code indices uses.

    ``codes``: integer tensor of any shape (all entries index one codebook of ``codebook_size`` entries; for
    UniTok's multi-codebook codes call this once per sub-codebook). Returns ``used`` (int: entries seen at
    least once), ``usage_fraction`` (``used / codebook_size``), ``perplexity`` (``exp`` of the entropy, in
    nats, of the empirical code distribution: ``codebook_size`` when perfectly uniform, 1 when one code
    takes all) and ``counts`` (``[codebook_size]`` int64 tensor on the codes' device).
    """
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codebook_size <= 0:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    flat = codes.reshape(-1).long()
    if flat.numel() == 0:
        raise ValueError("codebook_usage needs at least one code")
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), found range [{low}, {high}]")
    counts = torch.bincount(flat, minlength=codebook_size)
    probs = counts[counts > 0].double() / flat.numel()
    entropy = float(-(probs * probs.log()).sum())
    used = int((counts > 0).sum())
    return {
        "usage_fraction": used / codebook_size,
        "perplexity": math.exp(entropy),
        "used": used,
        "counts": counts,
    }


# ----------------------------------------------------------------------------------------- Fréchet distance


class FeatureStats(NamedTuple):
    """Gaussian statistics of a feature set: ``mu [D]``, ``sigma [D, D]`` (float64), ``n`` (None if unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None


def feature_statistics(features: np.ndarray | Tensor) -> FeatureStats:
    """``[N, D]`` features -> mean and unbiased covariance (``np.cov(features, rowvar=False)``), in float64."""
    if isinstance(features, Tensor):
        features = features.detach().double().cpu().numpy()
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {feats.shape}")
    return FeatureStats(feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False)), feats.shape[0])


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return mu, sigma


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    """``sqrtm(sigma1 @ sigma2)``, retried with ``eps * I`` added to both when the product is near-singular."""
    product = sigma1 @ sigma2
    covmean = linalg.sqrtm(product)
    scale = max(float(np.linalg.norm(product)), np.finfo(np.float64).tiny)
    residual = np.inf
    if np.isfinite(covmean).all():
        residual = float(np.linalg.norm(covmean @ covmean - product)) / scale
    if residual > 1e-6:
        # A singular product (e.g. fewer samples than dimensions) has no reliable square root; a small
        # ridge makes it well posed at the cost of an O(eps) bias in the distance.
        offset = eps * np.eye(sigma1.shape[0])
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("matrix square root of sigma1 @ sigma2 is not finite, even with the eps offset")
    return covmean


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))``.

    Raises ``ValueError`` when the square root has a large imaginary part (the covariances are then not
    valid covariance matrices, or far too few samples were used); a small imaginary residue from round-off
    is dropped.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}")
    covmean = _sqrtm_product(sigma1, sigma2, eps)
    if np.iscomplexobj(covmean):
        # The eigenvalues of sigma1 @ sigma2 are real and >= 0 in exact arithmetic; round-off leaves a tiny
        # imaginary part, anything larger means the inputs are wrong. Only the trace is used, so (as in
        # pytorch-fid) the diagonal is checked, with its 1e-3 tolerance scaled for large covariances.
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        tolerance = 1e-3 * max(1.0, float(np.max(np.abs(np.diagonal(covmean).real))))
        if largest > tolerance:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {largest:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ------------------------------------------------------------------------------------- streaming statistics


class FIDAccumulator:
    """Streaming mean and covariance of ``[N, dim]`` features in one pass, mergeable across processes.

    The state is three float64 tensors: ``count`` (0-d), ``feature_sum [dim]`` and ``outer_sum [dim, dim]``
    (sum of ``x x^T``). Sums, unlike running means, are exactly what an all-reduce adds, so a distributed
    evaluation does ``for t in acc.state_tensors(): dist.all_reduce(t)`` (in place) before :meth:`stats`; on
    one machine use :meth:`merge`. float64 sums keep the covariance ``(S - n mu mu^T) / (n - 1)`` accurate to
    ~1e-12 relative for Inception features (mean and spread of the same order) over millions of samples.
    Create with ``device="cuda"`` when the all-reduce backend needs GPU tensors.
    """

    def __init__(self, dim: int = 2048, device: str | torch.device = "cpu") -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.feature_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        """Number of feature vectors seen (the count is stored as float64 so it can be all-reduced)."""
        return round(float(self.count))

    def state_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(count, feature_sum, outer_sum)``: the tensors themselves, for an in-place all-reduce (SUM)."""
        return self.count, self.feature_sum, self.outer_sum

    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        """Add a batch of features ``[N, dim]`` (any float dtype and device)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got shape {tuple(features.shape)}")
        x = features.detach().to(device=self.feature_sum.device, dtype=torch.float64)
        self.count += x.shape[0]
        self.feature_sum += x.sum(dim=0)
        self.outer_sum += x.T @ x

    def merge(self, other: FIDAccumulator) -> FIDAccumulator:
        """Add another accumulator's samples into this one (in place); returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dims {self.dim} and {other.dim}")
        for mine, theirs in zip(self.state_tensors(), other.state_tensors(), strict=True):
            mine += theirs.to(mine.device)  # in place
        return self

    def stats(self) -> FeatureStats:
        """``(mu [dim], sigma [dim, dim], n)`` as float64 numpy; sigma is unbiased (``np.cov``'s default)."""
        n = self.n
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {n}")
        total = self.feature_sum.cpu().numpy()
        outer = self.outer_sum.cpu().numpy()
        mu = total / n
        sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
        # The outer-product sum is symmetric in exact arithmetic; symmetrise away round-off.
        sigma = (sigma + sigma.T) / 2
        return FeatureStats(mu, sigma, n)


def save_stats(path: str | os.PathLike[str], stats: FeatureStats) -> None:
    """Write reference statistics to an ``.npz`` with ``mu``, ``sigma`` and ``n`` (-1 when unknown)."""
    n = -1 if stats.n is None else int(stats.n)
    np.savez(os.fspath(path), mu=np.asarray(stats.mu), sigma=np.asarray(stats.sigma), n=np.int64(n))


def load_stats(path: str | os.PathLike[str]) -> FeatureStats:
    """Read an ``.npz`` written by :func:`save_stats` or by pytorch-fid (``mu`` and ``sigma`` only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file not found: {path!r}")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path!r} lacks 'mu' / 'sigma' (has {sorted(data.files)})")
        n = int(data["n"]) if "n" in data else -1
        mu, sigma = _check_stats(data["mu"], data["sigma"], path)
    return FeatureStats(mu, sigma, None if n < 0 else n)


StatsLike: TypeAlias = (
    "FeatureStats | tuple[np.ndarray, np.ndarray] | FIDAccumulator | str | os.PathLike[str]"
)


def _as_stats(stats: StatsLike) -> FeatureStats:
    if isinstance(stats, FIDAccumulator):
        return stats.stats()
    if isinstance(stats, (str, os.PathLike)):
        return load_stats(stats)
    if isinstance(stats, FeatureStats):
        return stats
    mu, sigma, *_ = stats
    return FeatureStats(np.asarray(mu), np.asarray(sigma), None)


def compute_fid(real_stats: StatsLike, fake_stats: StatsLike) -> float:
    """FID between two feature distributions, each given as :class:`FeatureStats`, a ``(mu, sigma[, n])``
    tuple, an :class:`FIDAccumulator` or the path of an ``.npz`` statistics file."""
    real = _as_stats(real_stats)
    fake = _as_stats(fake_stats)
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
