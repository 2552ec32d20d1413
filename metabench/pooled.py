"""Mini-batches over the pooled training images, for pre-training on all training classes at once.

Baseline / Baseline++ (Chen et al. 2019) and MTL (Sun et al. 2019) pre-train a backbone as an
ordinary classifier over every training class before (or instead of) meta-training. Both walk
through random permutations of the pooled images; :class:`PooledBatches` is that walk, with its
position as state so that a checkpoint can resume it mid-epoch.
"""
from __future__ import annotations

import torch


class PooledBatches:
    """Consecutive slices of random permutations of ``n`` pooled images.

    images: uint8 [N, C, H, W] (any device; batches are moved to ``device``), labels: int64 [N].
    ``drop_last``: start a new permutation when fewer than ``batch`` images are left (every batch
    is full); otherwise the last batch of a permutation may be shorter. The first permutation is
    drawn from ``generator`` when the object is made, each later one when it is needed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, generator: torch.Generator,
                 device: torch.device | str, drop_last: bool):
        self.images, self.labels, self.generator, self.device = images, labels, generator, device
        self.n = images.shape[0]
        self.batch, self.drop_last = batch, drop_last
        self.order, self.pos = torch.randperm(self.n, generator=generator), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next mini-batch: float32 images in [0, 1] [B, C, H, W] and labels [B], on ``device``."""
        exhausted = self.pos + self.batch > self.n if self.drop_last else self.pos >= self.n
        if exhausted:
            self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.images[idx].to(self.device).float().div_(255.0), self.labels[idx].to(self.device)

    def state_dict(self) -> dict:
        return {"order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.pos = state["order"].clone(), int(state["pos"])
