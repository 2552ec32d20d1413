"""The ``wrn28_10`` backbone: Wide ResNet 28-10, as few-shot learning uses it.

Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016) define WRN-d-k; few-shot work such
as LEO (Rusu et al., ICLR 2019) and S2M2 (Mangla et al., WACV 2020) takes WRN-28-10 as its
feature extractor. Depth 28 gives (28 - 4) / 6 = 4 blocks per group:

* a 3x3 convolution to 16 channels;
* 3 groups of 4 pre-activation basic blocks, widths 16k, 32k, 64k = 160, 320, 640 with k = 10,
  the first block of groups 2 and 3 striding by 2. A block is BatchNorm -> ReLU -> conv 3x3 ->
  BatchNorm -> ReLU -> [dropout] -> conv 3x3, added to its input; where the width or the stride
  changes, the shortcut is a 1x1 convolution of the pre-activated input;
* BatchNorm -> ReLU, then global average pooling to 640 features.

Convolutions have no bias and are initialised He-normal (fan-out) as in the authors' code;
BatchNorm scale 1, shift 0. The network has 36.48M parameters whatever the image size (the
36.5M usually quoted is the CIFAR network, whose 10-way classifier adds 6.4k). It keeps full
resolution in its first group, so it is expensive at 84 px: 84 -> 84 -> 42 -> 21 before pooling.
"""
from __future__ import annotations

import torch
from torch import nn

from metabench import Backbone, hookimpl

DEPTH = 28
WIDEN = 10
STEM = 16
GROUPS = (16 * WIDEN, 32 * WIDEN, 64 * WIDEN)
STRIDES = (1, 2, 2)
BLOCKS_PER_GROUP = (DEPTH - 4) // 6


class PreActBlock(nn.Module):
    """Pre-activation basic block: [B, in, H, W] -> [B, out, ceil(H / stride), ceil(W / stride)]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.projection = None
        if in_channels != out_channels or stride != 1:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.pre(x)
        shortcut = x if self.projection is None else self.projection(activated)
        return shortcut + self.body(activated)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"wrn28_10: {name} must be a positive integer, got {value!r}")
    return value


def wrn28_10(in_channels: int, image_size: int, dropout: float = 0.0) -> Backbone:
    """Wide ResNet 28-10 (pre-activation, widths 160-320-640), global average pooling -> 640 features.

    Shapes: the side is kept by the first group and halved (rounding up) by the others,
    28 -> 28 -> 14 -> 7 and 84 -> 84 -> 42 -> 21; output [B, 640] at any image size.

    dropout: probability of dropout between the two convolutions of every block, in [0, 1)
    (Zagoruyko & Komodakis use 0.3 on CIFAR; 0 is no dropout).
    """
    in_channels = _positive_int("in_channels", in_channels)
    _positive_int("image_size", image_size)  # any size works: the strided convolutions pad
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"wrn28_10: dropout must be a number in [0, 1), got {dropout!r}")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, STEM, 3, padding=1, bias=False)]
    width = STEM
    for out_channels, stride in zip(GROUPS, STRIDES):
        for i in range(BLOCKS_PER_GROUP):
            layers.append(PreActBlock(width, out_channels, stride if i == 0 else 1, float(dropout)))
            width = out_channels
    layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    module = nn.Sequential(*layers)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return Backbone(module=module, out_features=width)


@hookimpl
def metabench_register_backbones(register):
    register("wrn28_10", wrn28_10)
