"""PSNR, SSIM, codebook usage, Fréchet distance and the streaming FID statistics, against independent math."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from unified_mllm.eval.image_metrics import (
    FeatureStats,
    FIDAccumulator,
    codebook_usage,
    compute_fid,
    feature_statistics,
    frechet_distance,
    load_stats,
    save_stats,
)
from unified_mllm.metrics import psnr, ssim

# ------------------------------------------------------------------------------------------------------ PSNR


def test_psnr_of_a_constant_offset_has_the_closed_form() -> None:
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.1
    b[1] -= 0.5
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.25)], dtype=torch.float64)
    torch.testing.assert_close(psnr(a, b), expected)
    torch.testing.assert_close(psnr(a, b, data_range=1.0), expected - 10 * math.log10(4))


def test_psnr_uint8_defaults_to_255_and_identical_images_are_inf() -> None:
    a = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 110  # one pixel off by 10 -> mse = 100 / 48
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(255**2 * 48 / 100))
    assert psnr(a, a).item() == math.inf
    assert psnr(a[0], b[0]).shape == (1,)


def test_psnr_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


# ------------------------------------------------------------------------------------------------------ SSIM


def reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. as scikit-image computes it: full-image Gaussian filtering (reflect), crop 5 px, average.

    Written independently of the library: scipy's gaussian_filter (sigma 1.5, truncate 3.5 -> 11 taps),
    channel loop, crop instead of 'valid' convolution.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for xc, yc in zip(x, y):

        def blur(img: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(img, sigma=1.5, truncate=3.5, mode="reflect")

        ux, uy = blur(xc), blur(yc)
        vx = blur(xc * xc) - ux * ux
        vy = blur(yc * yc) - uy * uy
        vxy = blur(xc * yc) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 23, 31), (1, 11, 11)])
def test_ssim_matches_an_independent_implementation(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, *shape))
    y = np.clip(x + rng.normal(0, 0.3, size=x.shape), -1, 1)
    got = ssim(torch.from_numpy(x).float(), torch.from_numpy(y).float()).numpy()
    for i in range(2):
        want = reference_ssim(x[i].astype(np.float32).astype(np.float64), y[i].astype(np.float32), 2.0)
        assert abs(got[i] - want) < 1e-5


def test_ssim_uint8_matches_reference_with_range_255() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(1, 3, 20, 20), dtype=np.uint8)
    y = rng.integers(0, 256, size=(1, 3, 20, 20), dtype=np.uint8)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert abs(got - reference_ssim(x[0].astype(np.float64), y[0].astype(np.float64), 255.0)) < 1e-5


def test_ssim_is_one_on_identical_images_and_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 24, generator=g) * 2 - 1
    y = torch.rand(3, 3, 24, 24, generator=g) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert (ssim(x, y) < 0.5).all()


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))


# ---------------------------------------------------------------------------------------------- codebook usage


def test_codebook_usage_on_a_known_assignment() -> None:
    codes = torch.tensor([[0, 0], [1, 2]])
    usage = codebook_usage(codes, codebook_size=8)
    assert usage["used"] == 3
    assert usage["usage_fraction"] == 3 / 8
    # p = (1/2, 1/4, 1/4): entropy 1.5 ln 2, perplexity 2 ** 1.5.
    assert usage["perplexity"] == pytest.approx(2**1.5, rel=1e-12)
    assert usage["counts"].tolist() == [2, 1, 1, 0, 0, 0, 0, 0]


def test_codebook_usage_uniform_and_single_code() -> None:
    assert codebook_usage(torch.arange(16).repeat(3), 16)["perplexity"] == pytest.approx(16.0)
    single = codebook_usage(torch.full((10,), 5), 16)
    assert single["perplexity"] == pytest.approx(1.0)
    assert single["used"] == 1


def test_codebook_usage_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_usage(torch.tensor([0, 4]), 4)
    with pytest.raises(TypeError):
        codebook_usage(torch.tensor([0.0]), 4)


# --------------------------------------------------------------------------------------------- Fréchet distance


def random_spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(dim, rank or 2 * dim))
    return a @ a.T / a.shape[1]


def eigen_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Symmetric route: tr sqrtm(s1 s2) = tr sqrtm(s1^1/2 s2 s1^1/2), all by symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_frechet_distance_matches_the_eigen_route_on_random_spd_matrices() -> None:
    rng = np.random.default_rng(0)
    for dim in (1, 5, 32):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(eigen_frechet(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_of_identical_distributions_is_zero() -> None:
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=16), random_spd(rng, 16)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9


def test_frechet_distance_diagonal_closed_form() -> None:
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_with_singular_covariances_uses_the_offset() -> None:
    rng = np.random.default_rng(2)
    # Rank-3 covariances in 12 dimensions: sigma1 @ sigma2 is singular.
    mu = np.zeros(12)
    s1, s2 = random_spd(rng, 12, rank=3), random_spd(rng, 12, rank=3)
    got = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(eigen_frechet(mu, s1, mu, s2), abs=0.05)


def test_frechet_distance_rejects_a_large_imaginary_component() -> None:
    eye = np.eye(3)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), -eye)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------- streaming statistics


def test_accumulator_equals_numpy_mean_and_unbiased_cov() -> None:
    rng = np.random.default_rng(3)
    # Offset mean and uneven batches, to exercise the sum-based covariance. Values are float32-exact so that
    # feeding some batches as float32 and others as float64 changes nothing.
    feats = rng.normal(loc=5.0, scale=0.5, size=(103, 24)).astype(np.float32).astype(np.float64)
    acc = FIDAccumulator(dim=24)
    for i, chunk in enumerate(np.split(feats, [1, 40, 41, 90])):
        batch = torch.from_numpy(chunk)
        acc.update(batch.float() if i % 2 else batch)
    mu, sigma, n = acc.stats()
    assert n == 103
    np.testing.assert_allclose(mu, np.mean(feats, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False, bias=False), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(sigma, feature_statistics(feats).sigma, rtol=1e-9, atol=1e-11)


def test_merged_accumulators_equal_one_over_the_union() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 8, generator=g), torch.randn(17, 8, generator=g) + 1
    first, second, union = FIDAccumulator(8), FIDAccumulator(8), FIDAccumulator(8)
    first.update(x)
    second.update(y)
    union.update(torch.cat([x, y]))
    merged = first.merge(second).stats()
    for got, want in zip(merged[:2], union.stats()[:2]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert merged.n == 47


def test_state_tensors_add_like_an_all_reduce() -> None:
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, 4, generator=g) for n in (5, 9, 3)]
    ranks = [FIDAccumulator(4) for _ in parts]
    for acc, part in zip(ranks, parts):
        acc.update(part)
    total = [sum(ts) for ts in zip(*(acc.state_tensors() for acc in ranks))]
    for tensor, summed in zip(ranks[0].state_tensors(), total):
        tensor.copy_(summed)  # what dist.all_reduce(tensor) does in place
    ref = feature_statistics(torch.cat(parts))
    got = ranks[0].stats()
    np.testing.assert_allclose(got.sigma, ref.sigma, rtol=1e-10, atol=1e-12)
    assert got.n == 17


def test_accumulator_rejects_wrong_dims_and_too_few_samples() -> None:
    acc = FIDAccumulator(4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        acc.update(torch.zeros(2, 5))
    acc.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        acc.stats()


def test_stats_round_trip_and_compute_fid(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    real, fake = FIDAccumulator(6), FIDAccumulator(6)
    real.update(torch.randn(50, 6, generator=g))
    fake.update(torch.randn(50, 6, generator=g) * 1.5 + 0.2)
    path = tmp_path / "real.npz"
    save_stats(path, real.stats())
    loaded = load_stats(path)
    assert loaded.n == 50
    np.testing.assert_array_equal(loaded.sigma, real.stats().sigma)
    expected = frechet_distance(*real.stats()[:2], *fake.stats()[:2])
    assert compute_fid(path, fake) == pytest.approx(expected, rel=1e-12)
    assert compute_fid(real.stats(), fake.stats()[:2]) == pytest.approx(expected, rel=1e-12)
    assert compute_fid(real, real) == pytest.approx(0.0, abs=1e-9)


def test_load_stats_accepts_pytorch_fid_files_and_names_missing_paths(tmp_path: Path) -> None:
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    loaded = load_stats(path)
    assert isinstance(loaded, FeatureStats)
    assert loaded.n is None
    np.testing.assert_array_equal(loaded.sigma, np.eye(3))
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_stats(missing)
