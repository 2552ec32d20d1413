"""The ``conv4`` backbone: the four-block convolutional network of few-shot learning.

Vinyals et al., "Matching Networks for One Shot Learning" (NeurIPS 2016) introduced it; Snell
et al. (Prototypical Networks, NeurIPS 2017) and Finn et al. (MAML, ICML 2017) use the same
network. Each block is conv 3x3 (padding 1) -> BatchNorm2d -> ReLU -> max-pool 2x2, and the
last block's output is flattened into the feature vector.
"""
from __future__ import annotations

from torch import nn

from metabench import Backbone, hookimpl

BLOCKS = 4


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """[B, in_channels, H, W] -> [B, out_channels, H // 2, W // 2]."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"conv4: {name} must be a positive integer, got {value!r}")
    return value


def conv4(in_channels: int, image_size: int, width: int = 64) -> Backbone:
    """Build conv4 for square ``image_size`` images with ``in_channels`` channels.

    Shapes: input [B, in_channels, image_size, image_size]; after each of the 4 blocks the side
    halves (rounding down), e.g. 28 -> 14 -> 7 -> 3 -> 1 and 84 -> 42 -> 21 -> 10 -> 5; output
    [B, width * s * s] where s is the final side (28 px: ``width`` features, 84 px: 25 * width).

    width: channels of every block (64 in the papers); a positive integer.
    """
    in_channels = _positive_int("in_channels", in_channels)
    image_size = _positive_int("image_size", image_size)
    width = _positive_int("width", width)
    side = image_size
    for _ in range(BLOCKS):
        side //= 2
    if side < 1:
        raise ValueError(
            f"conv4: image_size {image_size} is too small; {BLOCKS} max-pools need at least {2 ** BLOCKS} px"
        )
    blocks = [conv_block(in_channels if i == 0 else width, width) for i in range(BLOCKS)]
    module = nn.Sequential(*blocks, nn.Flatten())
    return Backbone(module=module, out_features=width * side * side)


@hookimpl
def metabench_register_backbones(register):
    register("conv4", conv4)
