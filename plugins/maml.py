"""The ``maml`` learner: Model-Agnostic Meta-Learning.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017. The model (backbone + linear head with ``ways`` outputs) has initial parameters
theta. For a task, ``inner_steps`` gradient steps on the support loss give adapted parameters
theta'_i = theta - inner_lr * grad L_support(theta) (repeated); the meta-loss is the mean query
loss at theta'_i over ``meta_batch`` tasks, minimised over theta with Adam. Second-order by
default (the meta-gradient differentiates through the inner gradients); ``first_order=True``
gives FOMAML, whose meta-gradient is the query-loss gradient at theta'_i.

BatchNorm, as in the published MAML code, always normalises with the statistics of the batch it
is given (no running statistics). The queries of an episode are forwarded as one batch, so a
query's prediction depends on the other queries: MAML is transductive (``transductive = True``).

Differences from the published Omniglot setup: the backbone is whatever the run names (default
``conv4``, with max-pooling where Finn et al. used strided convolutions on Omniglot), and every
parameter, BatchNorm's scale and shift included, is adapted in the inner loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metabench import Learner, hookimpl


def adapt(model: nn.Module, params: dict, x, y, inner_lr: float, steps: int, first_order: bool) -> dict:
    """``steps`` SGD steps on cross_entropy(model(x), y) from ``params``; returns the adapted dict.

    x: [S, ...] support inputs, y: [S] int64. Second order keeps the graph of every inner
    gradient (``create_graph=True``); first order treats the inner gradients as constants.
    """
    names = list(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order)
        params = {n: params[n] - inner_lr * g for n, g in zip(names, grads)}
    return params


def maml_meta_loss(model: nn.Module, params: dict, tasks, inner_lr: float, inner_steps: int,
                   first_order: bool = False) -> torch.Tensor:
    """Mean over ``tasks`` (each with support_x/support_y/query_x/query_y) of the query loss after adaptation.

    Differentiating the result with respect to ``params`` gives the MAML (or FOMAML) meta-gradient.
    """
    losses = []
    for t in tasks:
        adapted = adapt(model, params, t.support_x, t.support_y, inner_lr, inner_steps, first_order)
        losses.append(F.cross_entropy(functional_call(model, adapted, (t.query_x,)), t.query_y))
    return torch.stack(losses).mean()


def batch_statistics_only(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer normalise with batch statistics, in train and eval mode alike."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


@dataclass
class MAMLConfig:
    """MAML hyper-parameters (defaults = the ``quick`` budget).

    meta_steps:       meta-updates (paper, Omniglot: 60,000)
    meta_batch:       tasks per meta-update (paper, Omniglot 5-way: 32)
    inner_lr:         inner-loop SGD step size (paper, Omniglot: 0.4)
    inner_steps:      inner steps during meta-training (paper, Omniglot: 1)
    eval_inner_steps: inner steps at test time (paper, Omniglot: 3)
    meta_lr:          Adam learning rate of the meta-update (paper: 1e-3)
    first_order:      FOMAML: do not differentiate through the inner gradients
    train_queries:    queries per class in training tasks; 0 = the protocol's (the published code
                      used as many queries as shots; ``paper`` keeps the protocol's)
    """

    meta_steps: int = 350
    meta_batch: int = 8
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    meta_lr: float = 1e-3
    first_order: bool = False
    train_queries: int = 5


class MAML(Learner):
    """MAML (Finn et al., ICML 2017) with a linear head on any registered backbone."""

    transductive = True
    Config = MAMLConfig
    reference = "Finn, Abbeel & Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks. ICML 2017."
    # quick: about a minute of meta-training + 600 test episodes of kanji-5w1s on 2 CPU cores.
    # paper: Finn et al.'s Omniglot 5-way settings (20-way used meta_batch 16, inner_lr 0.1, 5 steps).
    budgets = {
        "smoke": {"meta_steps": 3, "meta_batch": 2, "train_queries": 2, "eval_inner_steps": 1},
        "quick": {"meta_steps": 350, "meta_batch": 8, "inner_lr": 0.4, "inner_steps": 1,
                  "eval_inner_steps": 3, "train_queries": 5},
        "paper": {"meta_steps": 60000, "meta_batch": 32, "inner_lr": 0.4, "inner_steps": 1,
                  "eval_inner_steps": 3, "meta_lr": 1e-3, "first_order": False, "train_queries": 0},
    }

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        for name in ("meta_steps", "meta_batch", "inner_steps", "eval_inner_steps", "train_queries"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"maml: {name} must be a non-negative integer, got {value!r}")
        if config.meta_batch < 1:
            raise ValueError(f"maml: meta_batch must be at least 1, got {config.meta_batch!r}")
        head = nn.Linear(backbone.out_features, protocol.ways)
        self.model = batch_statistics_only(nn.Sequential(backbone.module, head)).to(device)
        self.model.train()

    def meta_params(self) -> dict:
        """The meta-parameters theta as a name -> tensor dict (the model's own tensors)."""
        return dict(self.model.named_parameters())

    def meta_train(self, ctx) -> None:
        c, p = self.config, self.protocol
        opt = torch.optim.Adam(self.model.parameters(), lr=c.meta_lr)
        for step in range(1, c.meta_steps + 1):
            tasks = [ctx.sampler.sample(ways=p.ways, shots=p.shots, queries=c.train_queries or p.queries)
                     for _ in range(c.meta_batch)]
            loss = maml_meta_loss(self.model, self.meta_params(), tasks, c.inner_lr, c.inner_steps, c.first_order)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctx.progress(step, c.meta_steps, loss=loss.item())

    def predict(self, support_x, support_y, query_x):
        """Adapt a copy of theta on the support set (``eval_inner_steps``), then score the queries.

        support_x [S, C, H, W], support_y [S], query_x [Q, C, H, W] -> logits [Q, ways].
        The meta-parameters are left untouched.
        """
        c = self.config
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_(True) for n, p in self.model.named_parameters()}
            adapted = adapt(self.model, params, support_x, support_y, c.inner_lr, c.eval_inner_steps, first_order=True)
        with torch.no_grad():
            return functional_call(self.model, {n: t.detach() for n, t in adapted.items()}, (query_x,))


@hookimpl
def metabench_register_learners(register):
    register("maml", MAML)
