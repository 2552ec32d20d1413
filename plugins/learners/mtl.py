"""The ``mtl`` learner: Meta-Transfer Learning.

Sun, Liu, Chua & Schiele, "Meta-Transfer Learning for Few-Shot Learning", CVPR 2019.

1. **Pre-training.** The backbone and a classifier over all training classes are trained on
   minibatches of the pooled training images (``ctx.pooled_train()``), with SGD (momentum,
   weight decay) or Adam, the learning rate multiplied by ``pretrain_lr_gamma`` every
   ``pretrain_lr_step`` steps down to ``pretrain_min_lr``. The classifier is then discarded.
2. **Meta-transfer.** The backbone's weights are frozen. Every ``nn.Conv2d`` of the backbone,
   whatever the backbone, is wrapped with per-output-channel *scaling and shifting* (SS)
   parameters: conv(W, b) becomes conv(W * s, b + t) with s [out_channels] initialised to 1 and
   t [out_channels] to 0 (a conv without bias gets bias t), so at initialisation the network is
   unchanged. A linear *base learner* (``ways`` outputs) on the features has a meta-learned
   initialisation theta. For a task, ``inner_steps`` gradient steps of size ``inner_lr`` on the
   support loss adapt the base learner alone (the features, hence SS, stay fixed inside the inner
   loop); the meta-loss is the query loss of the adapted base learner, averaged over the
   meta-batch, and Adam minimises it over SS (``meta_lr_ss``) and theta (``meta_lr_head``), both
   multiplied by ``meta_lr_gamma`` every ``meta_lr_step`` steps down to ``meta_min_lr``. The
   meta-gradient differentiates through the inner loop (``first_order=True`` treats the inner
   gradients as constants).
3. **Hard-task (HT) meta-batch.** After each meta-step the *failure class* of every task of the
   meta-batch (the class with the lowest query accuracy after adaptation; ties go to the class
   with the highest query loss) is recorded, the most recent ``hard_pool`` distinct ones (0 =
   ``ways``) kept. The next meta-batch adds ``hard_task_count`` tasks re-sampled from those
   classes: ``ways`` classes drawn from the recorded ones (all of them, topped up with other
   training classes, while fewer than ``ways`` are recorded) and *new* support/query images of
   each. The paper describes this scheme (Sec. 4); the authors' public code leaves it out. Here
   it is on by default (``hard_tasks=True``).

Test time: the base learner is adapted from theta on the support features for
``eval_inner_steps`` steps and scores the queries. The frozen extractor's BatchNorm layers stay
in eval mode (running statistics from pre-training) during meta-training and testing, so each
query is classified on its own: MTL is inductive (``transductive = False``).

Differences from the paper: the backbone is whatever the run names (default ``conv4``; the
paper used a ResNet-12 of widths 64-128-256-512, the registered ``resnet12`` is 64-160-320-640);
SS wraps every convolution, the residual shortcuts' 1x1 convolutions included (the authors'
code leaves those plain); no data augmentation and no dropout in pre-training; no model
selection on the validation split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metabench import AttributeState, ClassImageSource, EpisodeDraw, Learner, hookimpl, setting
from metabench.episodic import optimizer_step

from metabench.adaptation import adapt
from metabench.inference import embed_episodes
from metabench.pooled import PooledBatches

from . import paper_config

PAPER_CONFIG = paper_config("mtl.toml")


# --------------------------------------------------------------------------- scaling and shifting


class SSConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` with per-output-channel scaling ``ss_scale`` and shifting ``ss_shift``.

    [B, C_in, H, W] -> [B, C_out, H', W']: conv(x; W * s[:, None, None, None], b + t), where b is
    the wrapped conv's bias (0 when it has none). s starts at 1 and t at 0 (the identity).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        weight = conv.weight
        self.ss_scale = nn.Parameter(torch.ones(conv.out_channels, device=weight.device, dtype=weight.dtype))
        self.ss_shift = nn.Parameter(torch.zeros(conv.out_channels, device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight * self.ss_scale.view(-1, 1, 1, 1)
        bias = self.ss_shift if self.conv.bias is None else self.conv.bias + self.ss_shift
        return self.conv._conv_forward(x, weight, bias)


def install_scaling_shifting(module: nn.Module) -> list[SSConv2d]:
    """Wrap every ``nn.Conv2d`` inside ``module`` (in place) with :class:`SSConv2d`; return the wrappers.

    Convolutions already wrapped are left alone, so calling it twice adds nothing.
    """
    if isinstance(module, nn.Conv2d):
        raise TypeError("install_scaling_shifting wraps the convolutions inside a module, not a bare Conv2d")
    wrapped = []
    for parent in list(module.modules()):
        if isinstance(parent, SSConv2d):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                ss = SSConv2d(child)
                setattr(parent, name, ss)
                wrapped.append(ss)
    return wrapped


def ss_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The scaling and shifting parameters of every :class:`SSConv2d` in ``module``."""
    return [p for m in module.modules() if isinstance(m, SSConv2d) for p in (m.ss_scale, m.ss_shift)]


def frozen_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``module`` that is not a scaling or shifting parameter."""
    ss = {id(p) for p in ss_parameters(module)}
    return [p for p in module.parameters() if id(p) not in ss]


# --------------------------------------------------------------------------- helpers


def step_decay(base: float, step: int, every: int, gamma: float, floor: float) -> float:
    """``base * gamma ** (step // every)``, not below ``min(floor, base)``; ``base`` when ``every`` is 0."""
    if every <= 0:
        return base
    return max(base * gamma ** (step // every), min(floor, base))


def failure_class(logits: torch.Tensor, labels: torch.Tensor, ways: int) -> int:
    """The class (in [0, ways)) with the lowest query accuracy.

    Ties go to the highest mean query loss, then to the lowest index. logits [Q, ways], labels [Q].
    """
    with torch.no_grad():
        correct = (logits.argmax(1) == labels).to(logits.dtype)
        losses = F.cross_entropy(logits, labels, reduction="none")
        keys = []
        for c in range(ways):
            mask = labels == c
            n = int(mask.sum())
            acc = float(correct[mask].mean()) if n else math.inf
            loss = float(losses[mask].mean()) if n else -math.inf
            keys.append((acc, -loss, c))
    return min(keys)[2]


@dataclass
class TaskOutcome:
    """One task's contribution to a meta-step.

    loss: the task's (differentiable) meta-loss term; logits [Q, ways]: the adapted base learner
    on the clean queries (detached; they pick the failure class); query_y [Q];
    query_features [Q, D]: the clean queries' features (with their graph, for regularisers).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    query_y: torch.Tensor
    query_features: torch.Tensor


# --------------------------------------------------------------------------- the learner


@dataclass
class MTLConfig:
    """MTL hyper-parameters (defaults = the ``quick`` budget on kanji-5w1s).

    pretrain_steps:        minibatches of pre-training on the pooled training classes (0 = none)
    pretrain_batch:        pre-training minibatch size (authors' code: 64)
    pretrain_optimizer:    "sgd" (with momentum) or "adam" (authors' code: Adam)
    pretrain_lr:           pre-training learning rate (authors' code: 1e-3)
    pretrain_momentum:     SGD momentum
    pretrain_weight_decay: weight decay of pre-training
    pretrain_lr_step:      multiply the pre-training rate by ``pretrain_lr_gamma`` every this many
                           steps; 0 = never (authors' code: 0.5 every 5000)
    pretrain_lr_gamma:     that factor
    pretrain_min_lr:       the rate does not decay below this (authors' code: 1e-4)
    meta_steps:            meta-updates (authors' code: 15,000-20,000)
    meta_batch:            freshly drawn tasks per meta-update (authors' code: 2)
    train_queries:         queries per class of training tasks; 0 = the protocol's (authors' code: 15)
    inner_steps:           base-learner gradient steps in meta-training (authors' code: 20)
    eval_inner_steps:      base-learner gradient steps at test time (authors' code: 100)
    inner_lr:              base-learner step size (authors' code: 0.01)
    first_order:           treat the inner gradients as constants in the meta-gradient
    meta_lr_ss:            Adam learning rate of the SS parameters
    meta_lr_head:          Adam learning rate of the base learner's initialisation
    meta_lr_step:          multiply both meta learning rates by ``meta_lr_gamma`` every this many
                           meta-steps; 0 = never (authors' code: 0.5 every 1000)
    meta_lr_gamma:         that factor
    meta_min_lr:           the meta learning rates do not decay below this (authors' code: 1e-4)
    hard_tasks:            add hard tasks re-sampled from the recorded failure classes
    hard_task_count:       hard tasks added to each meta-batch (once failure classes are recorded)
    hard_pool:             distinct failure classes remembered (most recent first); 0 = ``ways``
    """

    pretrain_steps: int = setting(600, min=0)
    pretrain_batch: int = setting(128, min=1)
    pretrain_optimizer: str = setting("adam", choices=("sgd", "adam"))
    pretrain_lr: float = setting(2e-3, min=0, min_exclusive=True)
    pretrain_momentum: float = setting(0.9, min=0)
    pretrain_weight_decay: float = setting(0.0, min=0)
    pretrain_lr_step: int = setting(400, min=0)
    pretrain_lr_gamma: float = setting(0.5, min=0)
    pretrain_min_lr: float = setting(1e-4, min=0)
    meta_steps: int = setting(150, min=0)
    meta_batch: int = setting(2, min=1)
    train_queries: int = setting(0, min=0)
    inner_steps: int = setting(20, min=0)
    eval_inner_steps: int = setting(50, min=0)
    inner_lr: float = setting(0.1, min=0, min_exclusive=True)
    first_order: bool = False
    meta_lr_ss: float = setting(1e-3, min=0, min_exclusive=True)
    meta_lr_head: float = setting(1e-3, min=0, min_exclusive=True)
    meta_lr_step: int = setting(100, min=0)
    meta_lr_gamma: float = setting(0.5, min=0)
    meta_min_lr: float = setting(1e-4, min=0)
    hard_tasks: bool = True
    hard_task_count: int = setting(1, min=0)
    hard_pool: int = setting(0, min=0)


class MTL(Learner):
    """Meta-Transfer Learning (Sun et al., CVPR 2019): pre-training, SS meta-transfer, hard-task meta-batches."""

    name = "mtl"
    transductive = False
    splits_meta_batch = True  # torchrun: each process adapts its share of every meta-batch; pre-training: its rows
    Config = MTLConfig
    reference = "Sun, Liu, Chua & Schiele. Meta-Transfer Learning for Few-Shot Learning. CVPR 2019."
    paper_config = PAPER_CONFIG
    # quick: pre-training (600 steps) + meta-training (150 steps) + 600 test episodes of kanji-5w1s,
    # sized for the quick budget (run times: benchmarks/RESULTS.md, section 5).
    # paper: the authors' mini-ImageNet schedule (mtl.toml has it per protocol).
    budgets = {
        "smoke": {"pretrain_steps": 3, "pretrain_batch": 16, "pretrain_lr_step": 0, "meta_steps": 3,
                  "meta_batch": 2, "train_queries": 2, "inner_steps": 2, "eval_inner_steps": 2, "meta_lr_step": 0},
        "quick": {"pretrain_steps": 600, "pretrain_batch": 128, "pretrain_optimizer": "adam", "pretrain_lr": 2e-3,
                  "pretrain_lr_step": 400, "meta_steps": 150, "meta_batch": 2, "inner_steps": 20,
                  "eval_inner_steps": 50, "inner_lr": 0.1, "meta_lr_step": 100},
        "paper": {"pretrain_steps": 10000, "pretrain_batch": 64, "pretrain_optimizer": "adam", "pretrain_lr": 1e-3,
                  "pretrain_weight_decay": 0.0, "pretrain_lr_step": 5000, "pretrain_lr_gamma": 0.5,
                  "pretrain_min_lr": 1e-4, "meta_steps": 15000, "meta_batch": 2, "train_queries": 15,
                  "inner_steps": 20, "eval_inner_steps": 100, "inner_lr": 0.01, "first_order": False,
                  "meta_lr_ss": 1e-3, "meta_lr_head": 1e-3, "meta_lr_step": 1000, "meta_lr_gamma": 0.5,
                  "meta_min_lr": 1e-4, "hard_tasks": True, "hard_task_count": 1, "hard_pool": 0},
    }

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        self.extractor = backbone.module.to(device)
        self.ss_layers = install_scaling_shifting(self.extractor)
        if not self.ss_layers:
            raise ValueError(f"{self.name}: the backbone has no nn.Conv2d layers to scale and shift")
        self.head = nn.Linear(backbone.out_features, protocol.ways).to(device)  # the base learner's init theta
        self.failure_pool: list[int] = []  # recorded failure classes (training-split indices), most recent first
        self.last_failures: list[int] = []  # the failure classes recorded after the latest meta-step
        self.last_draws: list[tuple[EpisodeDraw, bool]] = []  # the latest meta-batch: (draw, is_hard)
        self._opt = self._sched = None
        self._meta_step = 0

    # ---------------------------------------------------------------- model pieces

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, D]: the extractor with its SS parameters, BatchNorm in eval mode."""
        self.extractor.eval()
        return self.extractor(x)

    def head_params(self) -> dict:
        """The base learner's initialisation theta as a name -> tensor dict (the module's own tensors)."""
        return dict(self.head.named_parameters())

    def head_logits(self, params: dict, feats: torch.Tensor) -> torch.Tensor:
        """[N, D] features -> [N, ways] logits of the base learner with parameters ``params``."""
        return functional_call(self.head, params, (feats,))

    def adapt_head(self, support_feats: torch.Tensor, support_y: torch.Tensor, steps: int, first_order: bool) -> dict:
        """The base learner adapted from theta by ``steps`` gradient steps on the support loss (nothing else moves).

        First order: the inner gradients are constants, so the support features enter detached.
        """
        if first_order:
            support_feats = support_feats.detach()
        return adapt(self.head, self.head_params(), support_feats, support_y, self.config.inner_lr, steps, first_order)

    # ---------------------------------------------------------------- meta-training pieces

    def task_outcome(self, ep) -> TaskOutcome:
        """Adapt the base learner on the support set; the loss is the adapted base learner's query loss."""
        n = ep.support_x.shape[0]
        feats = self.features(torch.cat([ep.support_x, ep.query_x]))
        adapted = self.adapt_head(feats[:n], ep.support_y, self.config.inner_steps, self.config.first_order)
        logits = self.head_logits(adapted, feats[n:])
        return TaskOutcome(F.cross_entropy(logits, ep.query_y), logits.detach(), ep.query_y, feats[n:])

    def meta_loss(self, outcomes: list[TaskOutcome]) -> torch.Tensor:
        """The meta-batch's loss: the mean of the tasks' losses."""
        return torch.stack([o.loss for o in outcomes]).mean()

    # ---------------------------------------------------------------- the three stages

    def pretrain(self, ctx) -> None:
        """Train the backbone (SS at identity) and a classifier over all training classes."""
        c = self.config
        if c.pretrain_steps == 0:
            return
        images, labels = ctx.pooled_train()
        classes = int(labels.max()) + 1
        classifier = nn.Linear(self.backbone.out_features, classes).to(self.device)
        params = frozen_parameters(self.extractor) + list(classifier.parameters())
        if c.pretrain_optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=c.pretrain_lr, momentum=c.pretrain_momentum,
                                  weight_decay=c.pretrain_weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=c.pretrain_lr, weight_decay=c.pretrain_weight_decay)
        ctx.track("pretrain_classifier", classifier)
        ctx.track("pretrain_optimizer", opt)
        batches = ctx.track("pretrain_batches", PooledBatches(images, labels, min(c.pretrain_batch, images.shape[0]),
                                                              ctx.generator, self.device, drop_last=True))
        ss = ss_parameters(self.extractor)
        for p in ss:  # SS stays at the identity during pre-training
            p.requires_grad_(False)
        self.extractor.train()
        for step in ctx.steps("pre-train", c.pretrain_steps):
            for group in opt.param_groups:
                group["lr"] = step_decay(c.pretrain_lr, step - 1, c.pretrain_lr_step, c.pretrain_lr_gamma,
                                         c.pretrain_min_lr)
            x, y = batches.next()
            x, y = ctx.shard(x, "images"), ctx.shard(y, "images")  # this process's rows of the mini-batch
            logits = classifier(self.extractor(x))
            optimizer_step(ctx, opt, F.cross_entropy(logits, y), logits, y)
        for p in ss:
            p.requires_grad_(True)
        self.extractor.eval()

    def start_meta_training(self) -> None:
        """Freeze the extractor's weights and set up Adam over SS and theta."""
        c = self.config
        for p in frozen_parameters(self.extractor):
            p.requires_grad_(False)
        self.extractor.eval()
        groups = [{"params": ss_parameters(self.extractor), "lr": c.meta_lr_ss},
                  {"params": list(self.head.parameters()), "lr": c.meta_lr_head}]
        self._opt = torch.optim.Adam(groups)
        bases = (c.meta_lr_ss, c.meta_lr_head)
        self._sched = torch.optim.lr_scheduler.LambdaLR(self._opt, [
            (lambda s, b=b: step_decay(b, s, c.meta_lr_step, c.meta_lr_gamma, c.meta_min_lr) / b) for b in bases])
        self._meta_step = 0

    def hard_draw(self, ctx, ways: int, shots: int, queries: int) -> EpisodeDraw:
        """A task over the recorded failure classes, with new images drawn from ``ctx.generator``."""
        source, split, g = ctx.source, ctx.sampler.split, ctx.generator
        if not isinstance(source, ClassImageSource):
            raise TypeError(f"{self.name}: hard tasks need an image-class data source")
        sizes, offsets = source.class_sizes(split), source.offsets(split)
        pool = self.failure_pool
        if len(pool) >= ways:
            classes = [pool[i] for i in torch.randperm(len(pool), generator=g)[:ways].tolist()]
        else:  # all recorded classes, topped up with other classes that have enough images
            recorded = set(pool)
            others = [k for k, size in enumerate(sizes) if k not in recorded and size >= shots + queries]
            fill = torch.randperm(len(others), generator=g)[:ways - len(pool)].tolist()
            classes = list(pool) + [others[i] for i in fill]
        classes = [classes[i] for i in torch.randperm(ways, generator=g).tolist()]  # random label order
        support, query = [], []
        for k in classes:
            picks = [offsets[k] + j for j in torch.randperm(sizes[k], generator=g)[:shots + queries].tolist()]
            support.extend(picks[:shots])
            query.extend(picks[shots:])
        return EpisodeDraw(tuple(classes), tuple(support), tuple(query))

    def next_draws(self, ctx) -> list[tuple[EpisodeDraw, bool]]:
        """The next meta-batch: ``meta_batch`` fresh draws, plus hard ones once failure classes are recorded."""
        c, p = self.config, self.protocol
        queries = c.train_queries or p.queries
        draws = [(ctx.sampler.draw(ways=p.ways, shots=p.shots, queries=queries), False) for _ in range(c.meta_batch)]
        if c.hard_tasks and self.failure_pool:
            draws += [(self.hard_draw(ctx, p.ways, p.shots, queries), True) for _ in range(c.hard_task_count)]
        return draws

    def record_failures(self, draws: list[tuple[EpisodeDraw, bool]], outcomes: list[TaskOutcome], ctx=None) -> None:
        """Remember each task's failure class (as a training-split class index). ``draws``/``outcomes``:
        this process's share of the meta-batch; ``ctx.unshard`` puts every process's in order."""
        ways = self.protocol.ways
        local = [draw.classes[failure_class(o.logits, o.query_y, ways)] for (draw, _), o in zip(draws, outcomes)]
        self.last_failures = ctx.unshard(local) if ctx is not None else local
        cap = self.config.hard_pool or ways
        self.failure_pool = list(dict.fromkeys(self.last_failures + self.failure_pool))[:cap]

    def meta_step(self, ctx) -> tuple[float, float]:
        """One meta-update; returns (meta-loss, mean query accuracy of the adapted base learners)."""
        if self._opt is None:
            self.start_meta_training()
        draws = self.next_draws(ctx)
        mine = ctx.shard(draws)  # this process's share of the meta-batch (all of it in one process)
        split = ctx.sampler.split
        episodes = [ctx.source.materialize(d, split).to(self.device) for d, _ in mine]
        outcomes = [self.task_outcome(ep) for ep in episodes]
        loss = self.meta_loss(outcomes)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        acc = sum((o.logits.argmax(1) == o.query_y).float().mean().item() for o in outcomes) / len(outcomes)
        value = ctx.step(self._opt, loss, scheduler=self._sched, acc=acc)
        self._meta_step += 1
        self.last_draws = draws
        self.record_failures(mine, outcomes, ctx)
        return value, acc

    def meta_train(self, ctx) -> None:
        c = self.config
        ctx.track("extractor", self.extractor)
        ctx.track("head", self.head)
        self.pretrain(ctx)
        self.start_meta_training()
        ctx.track("meta_optimizer", self._opt)
        ctx.track("meta_scheduler", self._sched)
        # the hard-task memory: which classes the latest meta-batches failed on
        ctx.track("failure_classes", AttributeState(self, "failure_pool", "last_failures", "_meta_step"))
        for _ in ctx.steps("meta-train", c.meta_steps):
            self.meta_step(ctx)

    def predict(self, support_x, support_y, query_x):
        """Adapt a copy of theta on the support features (``eval_inner_steps``), then score the queries.

        support_x [S, C, H, W], support_y [S], query_x [Q, C, H, W] -> logits [Q, ways].
        No parameter is changed.
        """
        n = support_x.shape[0]
        with torch.no_grad():
            feats = self.features(torch.cat([support_x, query_x]))
        return self.adapt_and_score(feats[:n], support_y, feats[n:])

    def predict_batch(self, episodes):
        """:meth:`predict` of several episodes: every support and query image of all of them in one
        forward of the extractor (eval-mode BatchNorm: each image's features as alone), then each
        episode's base learner adapted from theta on its own support features, as :meth:`predict` does.

        episodes: [(support_x [S_i, C, H, W], support_y [S_i], query_x [Q_i, C, H, W]), ...]
        -> [logits [Q_i, ways], ...] in episode order. No parameter is changed.
        """
        with torch.no_grad():
            embedded = embed_episodes(self.features, episodes)  # [(support [S_i, D], query [Q_i, D]), ...]
        return [self.adapt_and_score(support_feats, support_y, query_feats)
                for (support_feats, query_feats), (_, support_y, _) in zip(embedded, episodes)]

    def adapt_and_score(self, support_feats, support_y, query_feats):
        """Test time: a copy of theta adapted for ``eval_inner_steps`` first-order steps on the support
        features [S, D] (grad enabled, even under ``no_grad``) -> its logits for the query features [Q, ways]."""
        with torch.enable_grad():
            params = {k: v.detach().requires_grad_(True) for k, v in self.head.named_parameters()}
            adapted = adapt(self.head, params, support_feats, support_y, self.config.inner_lr,
                            self.config.eval_inner_steps, first_order=True)
        with torch.no_grad():
            return self.head_logits({k: v.detach() for k, v in adapted.items()}, query_feats)


@hookimpl
def metabench_register_learners(register):
    register("mtl", MTL)
