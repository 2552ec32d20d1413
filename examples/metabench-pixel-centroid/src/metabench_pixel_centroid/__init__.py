"""A complete third-party metabench plugin: a learner that needs no training.

Each query is given to the class whose support images have the nearest mean, in raw pixels.
It is a floor every real learner should beat.
"""
from dataclasses import dataclass

import torch

from metabench import Learner, hookimpl


class PixelCentroid(Learner):
    """Nearest class centroid on flattened pixels (optionally standardised per episode)."""

    problem_types = frozenset({"classification"})
    transductive = False
    default_backbone = "conv4"  # built but unused: this learner works on pixels
    reference = "nearest centroid on pixels (a baseline, no paper)"

    @dataclass
    class Config:
        standardize: bool = False  # subtract the support mean and divide by its std

    budgets = {"smoke": {}, "quick": {}, "paper": {}}

    def meta_train(self, ctx):
        ctx.progress(1, 1)  # nothing to learn

    def predict(self, support_x, support_y, query_x):
        """support_x [S, C, H, W], support_y [S], query_x [Q, C, H, W] -> logits [Q, ways]."""
        s, q = support_x.flatten(1), query_x.flatten(1)
        if self.config.standardize:
            mean, std = s.mean(0), s.std(0) + 1e-6
            s, q = (s - mean) / std, (q - mean) / std
        ways = int(support_y.max()) + 1
        centroids = torch.stack([s[support_y == c].mean(0) for c in range(ways)])  # [ways, D]
        return -torch.cdist(q, centroids) ** 2


@hookimpl
def metabench_register_learners(register):
    register("pixel_centroid", PixelCentroid)
