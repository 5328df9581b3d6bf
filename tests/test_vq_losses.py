"""VQ-GAN training losses: GAN losses by hand, the adaptive weight formula, the PatchGAN, LPIPS weights I/O."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from unified_mllm.train.tokenizer_losses import (
    LPIPS,
    NLayerDiscriminator,
    PerceptualLoss,
    PerceptualWeightsError,
    adaptive_gan_weight,
    build_perceptual_loss,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    load_lpips,
)

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.0])


def test_hinge_losses_by_hand() -> None:
    # relu(1 - real) = [0, 0.5, 2] → 5/6; relu(1 + fake) = [0, 1, 2] → 1; halved sum.
    expected = 0.5 * (2.5 / 3 + 1.0)
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(expected)
    assert discriminator_loss(REAL, FAKE, "hinge").item() == pytest.approx(expected)
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(-(-2.0 + 0.0 + 1.0) / 3)


def test_non_saturating_losses_by_hand() -> None:
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    d_expected = 0.5 * (
        sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3
    )
    assert discriminator_loss(REAL, FAKE, "non_saturating").item() == pytest.approx(d_expected, rel=1e-6)
    g_expected = sum(softplus(-f) for f in FAKE.tolist()) / 3
    assert generator_loss(FAKE, "non_saturating").item() == pytest.approx(g_expected, rel=1e-6)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(FAKE, "wasserstein")  # type: ignore[arg-type]


def test_adaptive_weight_formula_on_a_toy_model() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])
    nll = (w * a).sum()  # d/dw = a, |a| = 5
    gan = 2.0 * (w * b).sum()  # d/dw = 2b, |2b| = 6
    weight = adaptive_gan_weight(nll, gan, w)
    assert weight.item() == pytest.approx(5.0 / (6.0 + 1e-4))
    assert not weight.requires_grad
    # The graphs survive (retain_graph), and the clamp applies.
    assert adaptive_gan_weight(nll, gan, w, max_weight=0.5).item() == pytest.approx(0.5)
    nll.backward()
    assert torch.equal(w.grad, a)


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize(("size", "layers", "side"), [(64, 3, 6), (64, 2, 14), (32, 1, 14)])
def test_discriminator_output_shape(norm: str, size: int, layers: int, side: int) -> None:
    disc = NLayerDiscriminator(3, base_channels=16, num_layers=layers, norm=norm)  # type: ignore[arg-type]
    out = disc(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, side, side)
    assert "main.0.weight" in disc.state_dict()  # taming's module names


def test_discriminator_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        NLayerDiscriminator(norm="instance")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LPIPS]:
    torch.manual_seed(0)
    model = LPIPS()
    for k in range(5):  # LPIPS lin weights are non-negative: distances are then >= 0
        lin = getattr(model, f"lin{k}").model[1].weight
        lin.data = lin.data.abs()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_lpips_zero_for_identical_and_positive_otherwise(lpips_file: tuple[Path, LPIPS]) -> None:
    path, _ = lpips_file
    loss = build_perceptual_loss("lpips-vgg16", path)
    assert isinstance(loss, PerceptualLoss)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert loss(y, x).item() > 0


def test_lpips_weights_round_trip(lpips_file: tuple[Path, LPIPS], tmp_path: Path) -> None:
    path, original = lpips_file
    loaded = load_lpips(path)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded.distance(x, y), original.distance(x, y))
    # torchvision's `features.{i}` layout for the backbone and a taming-style prefix load the same.
    state = original.state_dict()
    renamed = {}
    for key, value in state.items():
        if key.startswith("net.slice"):
            index, name = key.split(".")[2:4]
            renamed[f"features.{index}.{name}"] = value
        else:
            renamed[f"loss.perceptual_loss.{key}"] = value
    other = tmp_path / "renamed.pt"
    torch.save({"state_dict": renamed}, other)
    assert torch.allclose(load_lpips(other).distance(x, y), original.distance(x, y))


def test_lpips_gradient_reaches_the_reconstruction(lpips_file: tuple[Path, LPIPS]) -> None:
    loss = load_lpips(lpips_file[0])
    target = torch.rand(1, 3, 32, 32) * 2 - 1
    recon = torch.zeros(1, 3, 32, 32, requires_grad=True)
    loss(recon, target).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())


def test_lpips_wrong_weights_file(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3), "lin0.model.1.weight": torch.zeros(1, 32, 1, 1)}, wrong)
    with pytest.raises(PerceptualWeightsError) as info:
        load_lpips(wrong)
    message = str(info.value)
    assert "missing" in message and "unexpected" in message and "wrong shape" in message
    assert "lin0.model.1.weight" in message and "encoder.weight" in message
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_lpips(tmp_path / "absent.pth")


def test_perceptual_off_without_weights() -> None:
    assert build_perceptual_loss("lpips-vgg16", None) is None
    assert build_perceptual_loss("none", "/does/not/matter") is None
    with pytest.raises(ValueError, match="unknown perceptual loss"):
        build_perceptual_loss("dists", "x.pth")


def test_lpips_channel_normalisation_ignores_feature_scale() -> None:
    # The distance compares unit-normalised features: scaling one side's features changes nothing.
    from unified_mllm.train.tokenizer_losses import _channel_normalize

    f = torch.randn(2, 8, 4, 4)
    assert torch.allclose(_channel_normalize(f), _channel_normalize(3.0 * f), atol=1e-6)
    assert torch.allclose(_channel_normalize(f).pow(2).sum(1), torch.ones(2, 4, 4), atol=1e-5)
