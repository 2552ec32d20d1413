"""Backbones: feature extractors a learner builds on.

A backbone plugin registers a *factory* ``factory(in_channels: int, image_size: int, **options)``
returning a :class:`Backbone`: the ``nn.Module`` mapping ``[B, C, H, W]`` images to
``[B, out_features]`` features, and ``out_features``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Backbone:
    """A feature extractor ``module``: [B, C, H, W] -> [B, out_features]."""

    module: nn.Module
    out_features: int


BackboneFactory = Callable[..., Backbone]
