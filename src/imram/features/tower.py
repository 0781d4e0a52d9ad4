"""A trainable image tower: the backbone's last stages and head over a cached trunk.

Fine-tuning a whole EfficientNet is a GPU job; training only its last stages is affordable on
a CPU once the frozen trunk below them has run once per picture (``imram prepare folder
--tower-stages N`` caches its output). The tower starts from the installed ImageNet weights,
so at the start its output is exactly the frozen region grid, and it keeps the pretrained
BatchNorm statistics (batches of a few dozen pictures would estimate them worse).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from imram.features.efficientnet_lite import (
    VARIANTS,
    EfficientNetLite,
    load_efficientnet_lite,
)


class ImageTower(nn.Module):
    """The last ``stages`` stages of ``backbone`` and its head: ``[B, C, h, w]`` trunk output
    → ``[B, h'*w', 1280]`` regions, row-major like the cached grid features."""

    def __init__(self, backbone: str, stages: int, pretrained: bool = True) -> None:
        super().__init__()
        spec = VARIANTS[backbone]
        network = (
            load_efficientnet_lite(backbone)
            if pretrained
            else EfficientNetLite(spec.width, spec.depth)
        )
        first = network.first_tower_block(stages)
        self.blocks = nn.ModuleList(network._blocks[first:])
        self.conv_head = network._conv_head
        self.bn = network._bn1
        self.input_channels = self.blocks[0]._depthwise_conv.in_channels
        if self.blocks[0].has_expand:
            self.input_channels = self.blocks[0]._expand_conv.in_channels
        self.eval()

    def train(self, mode: bool = True) -> ImageTower:
        """Train the weights, never the BatchNorm statistics: they stay ImageNet's."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, trunk: Tensor) -> Tensor:
        h = trunk.float() if trunk.dtype != self.bn.weight.dtype else trunk
        for block in self.blocks:
            h = block(h)
        h = F.relu6(self.bn(self.conv_head(h)))
        return h.flatten(2).transpose(1, 2)
