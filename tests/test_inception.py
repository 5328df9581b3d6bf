"""The FID Inception-v3: exact architecture (names, shapes, parameter count), loading, forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unified_mllm.eval.inception import FEATURE_DIM, InceptionFeatureExtractor, load_fid_inception

# Every convolution of the FID Inception as (name, in, out, kh, kw), written out from the architecture
# description independently of the module code. Batch norm adds 2 * out parameters per convolution.


def _block_a(name: str, cin: int, pool: int) -> list[tuple[str, int, int, int, int]]:
    return [
        (f"{name}.branch1x1", cin, 64, 1, 1),
        (f"{name}.branch5x5_1", cin, 48, 1, 1),
        (f"{name}.branch5x5_2", 48, 64, 5, 5),
        (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
        (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
        (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
        (f"{name}.branch_pool", cin, pool, 1, 1),
    ]


def _block_c(name: str, c7: int) -> list[tuple[str, int, int, int, int]]:
    return [
        (f"{name}.branch1x1", 768, 192, 1, 1),
        (f"{name}.branch7x7_1", 768, c7, 1, 1),
        (f"{name}.branch7x7_2", c7, c7, 1, 7),
        (f"{name}.branch7x7_3", c7, 192, 7, 1),
        (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
        (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
        (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
        (f"{name}.branch_pool", 768, 192, 1, 1),
    ]


def _block_e(name: str, cin: int) -> list[tuple[str, int, int, int, int]]:
    return [
        (f"{name}.branch1x1", cin, 320, 1, 1),
        (f"{name}.branch3x3_1", cin, 384, 1, 1),
        (f"{name}.branch3x3_2a", 384, 384, 1, 3),
        (f"{name}.branch3x3_2b", 384, 384, 3, 1),
        (f"{name}.branch3x3dbl_1", cin, 448, 1, 1),
        (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
        (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
        (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
        (f"{name}.branch_pool", cin, 192, 1, 1),
    ]


CONVS = [
    ("Conv2d_1a_3x3", 3, 32, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 32, 64, 3, 3),
    ("Conv2d_3b_1x1", 64, 80, 1, 1),
    ("Conv2d_4a_3x3", 80, 192, 3, 3),
    *_block_a("Mixed_5b", 192, 32),
    *_block_a("Mixed_5c", 256, 64),
    *_block_a("Mixed_5d", 288, 64),
    ("Mixed_6a.branch3x3", 288, 384, 3, 3),
    ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
    ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
    ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    *_block_c("Mixed_6b", 128),
    *_block_c("Mixed_6c", 160),
    *_block_c("Mixed_6d", 160),
    *_block_c("Mixed_6e", 192),
    ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
    ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
    ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
    ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
    ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
    ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    *_block_e("Mixed_7b", 1280),
    *_block_e("Mixed_7c", 2048),
]

# torchvision's inception_v3 (aux head, 1000 classes) has 27,161,264 parameters; its aux head has
# 768*128 + 2*128 + 128*768*25 + 2*768 + 768*1000 + 1000 = 3,326,696 and its fc 2048*1000 + 1000 = 2,049,000.
# The body shared with the FID network is the rest; the FID network's fc has 1008 classes.
BODY_PARAMS = 27_161_264 - 3_326_696 - 2_049_000
FID_INCEPTION_PARAMS = BODY_PARAMS + 2048 * 1008 + 1008


def small_state_dict_without_counters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # The ported weights file carries no batch-norm step counters.
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def random_model() -> InceptionFeatureExtractor:
    torch.manual_seed(0)
    model = InceptionFeatureExtractor()
    # Non-trivial batch-norm statistics so that a failed load would show in the features.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.uniform_(0.8, 1.2)
            module.bias.uniform_(-0.1, 0.1)
    return model


def test_builds_on_meta_with_the_exact_parameter_count_and_names() -> None:
    with torch.device("meta"):
        model = InceptionFeatureExtractor()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, cin, cout, kh, kw in CONVS:
        assert shapes[f"{name}.conv.weight"] == (cout, cin, kh, kw), name
        for part in ("weight", "bias", "running_mean", "running_var"):
            assert shapes[f"{name}.bn.{part}"] == (cout,), name
    assert shapes["fc.weight"] == (1008, 2048)
    expected_keys = {f"{n}.conv.weight" for n, *_ in CONVS} | {"fc.weight", "fc.bias"}
    expected_keys |= {
        f"{n}.bn.{p}" for n, *_ in CONVS for p in ("weight", "bias", "running_mean", "running_var")
    }
    assert set(small_state_dict_without_counters(model)) == expected_keys
    by_table = sum(cin * cout * kh * kw + 2 * cout for _, cin, cout, kh, kw in CONVS) + 2048 * 1008 + 1008
    count = sum(p.numel() for p in model.parameters())
    assert count == by_table == FID_INCEPTION_PARAMS == 23_850_960
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.eps == 0.001


def test_fid_specific_pool_branches() -> None:
    with torch.device("meta"):
        model = InceptionFeatureExtractor()
    assert model.Mixed_7b.pool == "avg"
    assert model.Mixed_7c.pool == "max"
    from unified_mllm.eval.inception import _avg_pool_3x3

    # count_include_pad=False: a constant map stays constant at the border.
    torch.testing.assert_close(_avg_pool_3x3(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


def test_forward_gives_finite_pool3_features_and_stays_in_eval(
    random_model: InceptionFeatureExtractor,
) -> None:
    random_model.train()
    assert not random_model.training
    assert not any(m.training for m in random_model.modules())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = random_model(images)
    # uint8 input is read as value / 255; every input is resized to 299x299 and scaled to [-1, 1].
    as_uint8 = random_model.preprocess((images * 255).round().to(torch.uint8))
    reference = random_model.preprocess((images * 255).round() / 255)
    assert reference.shape == (2, 3, 299, 299)
    assert reference.min() >= -1 and reference.max() <= 1
    assert feats.shape == (2, FEATURE_DIM)
    assert torch.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # averages of ReLU outputs, not collapsed
    torch.testing.assert_close(as_uint8, reference)


def test_state_dict_round_trips_through_the_loader(
    random_model: InceptionFeatureExtractor, tmp_path: Path
) -> None:
    path = tmp_path / "pt_inception.pth"
    torch.save(small_state_dict_without_counters(random_model), path)
    loaded = load_fid_inception(path, device="cpu")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(images), random_model(images))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_wrong_file_names_the_mismatching_keys(
    random_model: InceptionFeatureExtractor, tmp_path: Path
) -> None:
    state = small_state_dict_without_counters(random_model)
    state["Mixed_5b.branch_pool.conv.weight"] = torch.zeros(64, 192, 1, 1)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    del state["fc.bias"]
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_fid_inception(path)
    message = str(error.value)
    assert "other.pth" in message
    assert "Mixed_5b.branch_pool.conv.weight" in message
    assert "AuxLogits.fc.weight" in message
    assert "fc.bias" in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="weights"):
        load_fid_inception(path)
