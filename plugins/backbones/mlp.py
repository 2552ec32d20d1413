"""The ``mlp`` backbone: fully connected ReLU layers, the network of Finn et al.'s sinusoid regression.

Finn et al. (MAML, ICML 2017) regress sine waves with two hidden layers of 40 units and ReLU;
this backbone is those hidden layers, without the output layer (a learner adds its own head on
``out_features``). The input is flattened first, so it takes [B, C, H, W] images as well as
[B, features] vectors.
"""
from __future__ import annotations

from torch import nn

from metabench import Backbone, hookimpl


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mlp: {name} must be a positive integer, got {value!r}")
    return value


def mlp(in_channels: int, image_size: int, hidden: int = 40, layers: int = 2) -> Backbone:
    """Build the MLP for inputs of ``in_channels * image_size * image_size`` features.

    Shapes: input [B, in_channels, image_size, image_size] or [B, in_channels * image_size**2]
    (sinusoid: [B, 1]); after flattening, ``layers`` times Linear -> ReLU; output [B, hidden].

    hidden: units per hidden layer (40 in the paper); layers: hidden layers (2 in the paper).
    """
    features = _positive_int("in_channels", in_channels) * _positive_int("image_size", image_size) ** 2
    hidden = _positive_int("hidden", hidden)
    layers = _positive_int("layers", layers)
    blocks: list[nn.Module] = [nn.Flatten()]
    for i in range(layers):
        blocks += [nn.Linear(features if i == 0 else hidden, hidden), nn.ReLU()]
    return Backbone(module=nn.Sequential(*blocks), out_features=hidden)


@hookimpl
def metabench_register_backbones(register):
    register("mlp", mlp)
