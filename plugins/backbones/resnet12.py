"""The ``resnet12`` backbone: the ResNet-12 of MetaOptNet and MTL.

Lee et al., "Meta-Learning with Differentiable Convex Optimization" (MetaOptNet, CVPR 2019) and
Sun et al., "Meta-Transfer Learning for Few-Shot Learning" (MTL, CVPR 2019) use this network,
and much later few-shot work follows them. It has 4 residual blocks of widths 64-160-320-640.
Each block is 3 x (conv 3x3 without bias -> BatchNorm2d -> LeakyReLU(0.1)), the last
LeakyReLU coming after the shortcut (conv 1x1 -> BatchNorm2d) is added, then a 2x2 max-pool.

Differences from the published networks:

* The features are globally average-pooled to 640 numbers by default (``pool=True``). MetaOptNet's
  miniImageNet network does not pool: it flattens the last 5 x 5 x 640 map at 84 px (16000
  features). ``pool=False`` gives that.
* MetaOptNet regularises the last two blocks with DropBlock (and the first two with dropout).
  Here there is no DropBlock: ``dropout`` (default 0) is plain dropout after every block's
  max-pool.

The weights are initialised as in MetaOptNet: He-normal (fan-out, leaky ReLU) convolutions and
BatchNorm scale 1, shift 0. At width_scale 1 the network has 12.42M parameters (12.41M in
convolutions, 9.5k in BatchNorm) whatever the image size; pooling adds none.
"""
from __future__ import annotations

import torch
from torch import nn

from metabench import Backbone, hookimpl

WIDTHS = (64, 160, 320, 640)
SLOPE = 0.1  # LeakyReLU negative slope


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels)]


class ResidualBlock(nn.Module):
    """[B, in_channels, H, W] -> [B, out_channels, H // 2, W // 2]."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(in_channels, out_channels, 3), nn.LeakyReLU(SLOPE),
            *_conv_bn(out_channels, out_channels, 3), nn.LeakyReLU(SLOPE),
            *_conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1))
        self.act = nn.LeakyReLU(SLOPE)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.pool(self.act(self.body(x) + self.shortcut(x))))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"resnet12: {name} must be a positive integer, got {value!r}")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"resnet12: {name} must be a number, got {value!r}")
    return float(value)


def resnet12(in_channels: int, image_size: int, pool: bool = True, dropout: float = 0.0,
             width_scale: float = 1.0) -> Backbone:
    """ResNet-12 of MetaOptNet / MTL (widths 64-160-320-640), global average pooling -> 640 features.

    Shapes: each of the 4 blocks halves the side (rounding down): 28 -> 14 -> 7 -> 3 -> 1,
    84 -> 42 -> 21 -> 10 -> 5. Output [B, 640] with ``pool`` (the default), or the flattened
    last map [B, 640 * s * s] without it (84 px: 16000, as in MetaOptNet).

    pool: global average pooling of the last map (True) or flattening it (False).
    dropout: probability of plain dropout after each block, in [0, 1) (MetaOptNet uses DropBlock).
    width_scale: multiplies every block's width (rounded, at least 1); 1.0 is the published network.
    """
    in_channels = _positive_int("in_channels", in_channels)
    image_size = _positive_int("image_size", image_size)
    if not isinstance(pool, bool):
        raise ValueError(f"resnet12: pool must be true or false, got {pool!r}")
    dropout = _number("dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"resnet12: dropout must be in [0, 1), got {dropout!r}")
    width_scale = _number("width_scale", width_scale)
    if not width_scale > 0:
        raise ValueError(f"resnet12: width_scale must be positive, got {width_scale!r}")
    side = image_size >> len(WIDTHS)
    if side < 1:
        raise ValueError(f"resnet12: image_size {image_size} is too small; its {len(WIDTHS)} max-pools "
                         f"need at least {2 ** len(WIDTHS)} px")
    widths = [max(1, round(w * width_scale)) for w in WIDTHS]
    blocks = [ResidualBlock(c_in, c_out, dropout) for c_in, c_out in zip([in_channels, *widths], widths)]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pool else [nn.Flatten()]
    module = nn.Sequential(*blocks, *head)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return Backbone(module=module, out_features=widths[-1] * (1 if pool else side * side))


@hookimpl
def metabench_register_backbones(register):
    register("resnet12", resnet12)
