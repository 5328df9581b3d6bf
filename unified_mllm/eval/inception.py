"""The Inception-v3 network that FID is defined with, in plain torch, for its 2048-d pool3 features.

FID numbers are only comparable when they come from one specific network: the TensorFlow Inception graph of
2015-12-05 used by the original FID code (TTUR). Its port to PyTorch is the weights file
``pt_inception-2015-12-05-6726825d.pth`` that pytorch-fid and torch-fidelity load. torchvision's Inception-v3
is a *different* network (other weights, and its pooling differs), and torchvision cannot be installed on our
CPU boxes anyway, so the architecture is written here from its description, with parameter names equal to the
keys of that file so that it loads with a plain ``load_state_dict``.

Differences from the classification Inception-v3 (what makes this "the FID variant"):

* the average pool of the ``branch_pool`` of the A, C and first E blocks ignores the zero padding
  (``count_include_pad=False``), as TensorFlow's average pool does;
* the last E block (``Mixed_7c``) uses a *max* pool in its pool branch (a quirk of the TF graph);
* the classifier has 1008 outputs (unused here: FID reads the 2048-d global average pool, "pool3").

Input convention (that of pytorch-fid): RGB in ``[0, 1]`` (or ``uint8`` in ``[0, 255]``), resized to 299x299
with ``F.interpolate(mode="bilinear", align_corners=False)`` and no antialiasing, then scaled to ``[-1, 1]``.
torch-fidelity instead reimplements TensorFlow's bilinear resize; the two give FIDs that differ slightly for
inputs that are not already 299x299, so report which tool a number is comparable with.

Building does no I/O; weights come in through :func:`load_fid_inception` from a path the user gives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's 1001 ImageNet classes, padded to 1008 in the ported file
BN_EPS = 0.001  # the TF graph's batch-norm epsilon; PyTorch's default (1e-5) would change every feature

_MAX_LISTED_KEYS = 20


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm, ReLU: the unit every Inception layer is made of."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TF's "SAME" average pool divides by the number of real pixels under the window, not 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (Mixed_7b with an average pool, Mixed_7c with a max pool)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_3x3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)


class InceptionFeatureExtractor(nn.Module):
    """FID Inception-v3: ``forward(images [B, 3, H, W] in [0, 1] or uint8) -> pool3 features [B, 2048]``.

    The module's own parameter names are the keys of ``pt_inception-2015-12-05-6726825d.pth``. It is always in
    eval mode (batch norm uses its running statistics: FID features must not depend on the batch), and its
    parameters do not require grad. A freshly built instance has random weights; use
    :func:`load_fid_inception` for the real ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # Kept only so that the weights file loads strictly; FID never reads the logits.
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        # He-normal keeps activations O(1) through ~50 ReLU layers, so a random instance (tests, smoke runs)
        # gives features that are neither vanishing nor exploding. Real use always loads the file.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Stays in eval mode whatever ``mode`` is: batch statistics would make FID depend on batching."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` RGB in ``[0, 1]`` (float) or ``[0, 255]`` (uint8) -> ``[B, 3, 299, 299]`` in ``[-1, 1]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
        param = self.Conv2d_1a_3x3.conv.weight
        if images.dtype == torch.uint8:
            x = images.to(device=param.device, dtype=param.dtype) / 255.0
        elif images.is_floating_point():
            x = images.to(device=param.device, dtype=param.dtype)
        else:
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            # pytorch-fid's resize: bilinear, align_corners=False, no antialiasing (see module docstring).
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward_normalized(self, x: Tensor) -> Tensor:
        """Network body: ``[B, 3, 299, 299]`` in ``[-1, 1]`` -> pool3 ``[B, 2048]``."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b):
            x = block(x)
        for block in (self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b):
            x = block(x)
        x = self.Mixed_7c(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, output_size=1), start_dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` (or uint8) -> ``[B, 2048]`` pool3 features (float32)."""
        return self.forward_normalized(self.preprocess(images))


def _is_bn_counter(key: str) -> bool:
    # Batch-norm step counters are bookkeeping, absent from the ported file and irrelevant to the features.
    return key.endswith("num_batches_tracked")


def _state_dict_mismatches(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> list[str]:
    """Lines describing missing keys, unexpected keys and shape mismatches (empty when the file fits)."""
    want = {k: tuple(v.shape) for k, v in expected.items() if not _is_bn_counter(k)}
    have = {k: tuple(v.shape) for k, v in found.items() if not _is_bn_counter(k)}
    problems = {
        "missing keys": sorted(set(want) - set(have)),
        "unexpected keys": sorted(set(have) - set(want)),
        "shape mismatches": sorted(
            f"{k}: file {have[k]} != network {want[k]}" for k in set(want) & set(have) if want[k] != have[k]
        ),
    }
    lines: list[str] = []
    for title, items in problems.items():
        if items:
            shown = ", ".join(items[:_MAX_LISTED_KEYS])
            more = f", ... ({len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else ""
            lines.append(f"{len(items)} {title}: {shown}{more}")
    return lines


def load_fid_inception(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> InceptionFeatureExtractor:
    """Build the FID Inception and load ``pt_inception-2015-12-05-6726825d.pth`` (or a compatible state dict).

    Raises ``FileNotFoundError`` naming ``path`` when it does not exist, and ``ValueError`` listing the
    missing / unexpected / wrongly shaped keys when the file holds another network.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}. Point to the standard file {FID_WEIGHTS_NAME} "
            "(the one pytorch-fid / torch-fidelity use); nothing is downloaded at run time."
        )
    # weights_only: the file is a plain tensor dict, and unpickling arbitrary objects would run code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (found {type(state).__name__})")
    model = InceptionFeatureExtractor()
    expected = model.state_dict()
    problems = _state_dict_mismatches(expected, state)
    if problems:
        raise ValueError(
            f"{path!r} is not the FID Inception-v3 ({FID_WEIGHTS_NAME}):\n  " + "\n  ".join(problems)
        )
    # The ported file has no batch-norm counters; keep ours so the strict load checks everything else.
    counters = {key: value for key, value in expected.items() if _is_bn_counter(key)}
    model.load_state_dict({**counters, **state}, strict=True)
    return model.to(device)
