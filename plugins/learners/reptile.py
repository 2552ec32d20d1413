"""The ``reptile`` learner: Reptile, a first-order meta-learner.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv 1803.02999, 2018.
The model is a backbone + linear head with initial parameters theta. For each of ``meta_batch``
tasks, ``inner_steps`` steps of an inner optimiser (Adam with beta1 = 0, as in the paper, or
plain SGD) on minibatches of ``inner_batch`` examples of the task's data give phi_i; the outer
update moves theta towards them,

    theta <- theta + eps * mean_i (phi_i - theta),

with eps annealed linearly from ``outer_lr`` to ``outer_lr_final`` over the ``meta_steps``
outer iterations. No second derivatives and no support/query split: a training task is
``train_shots`` examples per class (support and query points together; regression:
``train_shots`` points). At test time a copy of theta is fine-tuned on the support set for
``eval_inner_steps`` steps of minibatches of ``eval_inner_batch`` examples, and predicts the queries.

Inner Adam: as in the published code, one inner optimiser state (Adam's second-moment averages
and step count) carries over from task to task during meta-training while the parameters are
reset to theta; each test episode starts from a copy of the state meta-training ended with.
Minibatches cycle through random permutations of the task's data (a batch may wrap into the
next permutation); training permutations come from the run's generator, test ones from a
generator seeded with ``eval_seed`` on every call, so ``predict`` is deterministic.

The loss is cross-entropy for classification and the mean squared error for regression.
BatchNorm uses batch statistics, as in MAML; the queries are forwarded as one batch, so a
query's prediction depends on the others (transductive, like the paper's headline results).
Settings that differ between the problem types default to 0, meaning "the default for the
task's problem type" (:attr:`Reptile.problem_defaults`), resolved when the learner is built.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metabench import Learner, hookimpl, setting

from metabench.adaptation import task_loss
from metabench.batchnorm import batch_statistics_only
from metabench.config import resolve_problem_defaults

from . import paper_config

OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.0, 0.999)  # the paper's inner Adam: beta1 = 0


def minibatches(n: int, batch: int, count: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """``count`` index batches of size ``batch`` (0 or >= n: all n) over random permutations of range(n).

    Batches are consecutive slices of concatenated permutations, so every example is used once
    before any is used twice; with ``batch`` >= n every batch is the whole set, in order.
    """
    if batch <= 0 or batch >= n:
        return [torch.arange(n)] * count
    needed = batch * count
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-needed // n))])
    return [order[i * batch:(i + 1) * batch] for i in range(count)]


def inner_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
    return torch.optim.SGD(params, lr=lr)


def reptile_step(theta: list[torch.Tensor], phis: list[list[torch.Tensor]], eps: float) -> list[torch.Tensor]:
    """theta + eps * mean_i (phi_i - theta), tensor by tensor."""
    return [t + eps * torch.stack([phi[j] - t for phi in phis]).mean(0) for j, t in enumerate(theta)]


def outer_step_size(step: int, steps: int, start: float, final: float) -> float:
    """eps at (1-based) outer iteration ``step`` of ``steps``: linear from ``start`` towards ``final``."""
    done = (step - 1) / steps
    return done * final + (1.0 - done) * start


@dataclass
class ReptileConfig:
    """Reptile hyper-parameters. 0 = the default for the task's problem type (``Reptile.problem_defaults``).

    meta_steps:       outer iterations (paper: 100,000 to 200,000)
    meta_batch:       tasks per outer iteration (paper: 2 to 10)
    outer_lr:         outer step size eps at the start (paper: 1, or 0.7 / 0.235 in some settings)
    outer_lr_final:   eps at the end, reached linearly (paper: 0)
    inner_lr:         learning rate of the inner optimiser (paper, Adam: 2.2e-4 to 1.5e-3)
    inner_optimizer:  "adam" (beta1 = 0, the paper's) or "sgd"
    inner_steps:      inner steps per task during meta-training
    inner_batch:      examples per inner step; 0 = the whole task
    train_shots:      examples per class of a training task (support and query together; >= 2)
    eval_inner_steps: fine-tuning steps on the support set at test time
    eval_inner_batch: support examples per fine-tuning step; 0 = the whole support set
    eval_seed:        seed of the test-time minibatch order (predict is deterministic)
    """

    meta_steps: int = setting(0, min=0)
    meta_batch: int = setting(0, min=0)
    outer_lr: float = setting(1.0, min=0)
    outer_lr_final: float = setting(0.0, min=0)
    inner_lr: float = setting(0.0, min=0)
    inner_optimizer: str = setting("", choices=("",) + OPTIMIZERS)
    inner_steps: int = setting(0, min=0)
    inner_batch: int = setting(0, min=0)
    train_shots: int = setting(0, min=0)
    eval_inner_steps: int = setting(0, min=0)
    eval_inner_batch: int = setting(0, min=0)
    eval_seed: int = setting(0, min=0)


class Reptile(Learner):
    """Reptile (Nichol et al., 2018) with a linear head on any registered backbone."""

    problem_types = frozenset({"classification", "regression"})
    transductive = True
    Config = ReptileConfig
    reference = "Nichol, Achiam & Schulman. On First-Order Meta-Learning Algorithms. arXiv:1803.02999, 2018."
    paper_config = paper_config("reptile.toml")
    #: Values of the settings left at 0 (or "") per problem type. Classification: close to the
    #: paper's transductive Omniglot setting (Adam 1e-3, 15 shots per class, batches of 25, 3
    #: inner and 5 test steps) with a smaller meta-batch, for about the cost of MAML's quick run
    #: on kanji-5w1s. Regression (no setting in the paper fits the sinusoid protocols): Adam 0.01
    #: on the whole task, 10 steps in training and at test, tasks of 10 points; plain SGD at 0.02
    #: diverged on some 5-point test episodes.
    problem_defaults: dict[str, dict[str, Any]] = {
        "classification": {"meta_steps": 200, "meta_batch": 5, "inner_lr": 1e-3, "inner_optimizer": "adam",
                           "inner_steps": 3, "inner_batch": 25, "train_shots": 15, "eval_inner_steps": 5,
                           "eval_inner_batch": 25},
        "regression": {"meta_steps": 3000, "meta_batch": 10, "inner_lr": 0.01, "inner_optimizer": "adam",
                       "inner_steps": 10, "inner_batch": 0, "train_shots": 10, "eval_inner_steps": 10,
                       "eval_inner_batch": 0},
    }
    budgets = {
        "smoke": {"meta_steps": 3, "meta_batch": 2, "inner_steps": 2, "train_shots": 3, "eval_inner_steps": 2},
        "quick": {},
        # The paper's length and outer schedule; the inner loop per protocol comes from reptile.toml.
        "paper": {"meta_steps": 100000, "meta_batch": 5, "outer_lr": 1.0, "outer_lr_final": 0.0},
    }

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        c = self.config
        resolve_problem_defaults(c, self.problem_defaults[protocol.problem])  # 0 and "": the problem type's
        if c.meta_batch < 1:
            raise ValueError(f"reptile: meta_batch must be at least 1, got {c.meta_batch!r}")
        if c.train_shots < 2:  # a task is split into at least one support and one query example
            raise ValueError(f"reptile: train_shots must be at least 2, got {c.train_shots!r}")
        self.loss = task_loss(protocol.problem)
        head = nn.Linear(backbone.out_features, protocol.ways)
        self.model = batch_statistics_only(nn.Sequential(backbone.module, head)).to(device)
        self.model.train()
        self.inner = inner_optimizer(c.inner_optimizer, self.model.parameters(), c.inner_lr)

    def sample_task(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """A training task: ``train_shots`` examples per class (x [N, ...], y [N] or [N, out_dim])."""
        c, p = self.config, self.protocol
        shots = max(1, min(p.shots, c.train_shots - 1))  # the sampler wants >= 1 support and query each
        ep = ctx.sampler.sample(ways=p.ways, shots=shots, queries=c.train_shots - shots)
        return torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])

    def fit(self, model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int, batch: int,
            generator: torch.Generator | None) -> float:
        """``steps`` optimiser steps on minibatches of (x, y); returns the mean loss of the steps."""
        return self.fit_batches(model, opt, x, y, minibatches(x.shape[0], batch, steps, generator))

    def fit_batches(self, model: nn.Module, opt: torch.optim.Optimizer, x, y, batches: list[torch.Tensor]) -> float:
        """One optimiser step on each minibatch (index tensor) of (x, y); returns their mean loss."""
        total, steps = 0.0, len(batches)
        for idx in batches:
            idx = idx.to(x.device)
            loss = self.loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        return total / max(steps, 1)

    def meta_train(self, ctx) -> None:
        c = self.config
        ctx.track("model", self.model)
        ctx.track("inner_optimizer", self.inner)
        params = list(self.model.parameters())
        for step in ctx.steps("meta-train", c.meta_steps):
            theta = [p.detach().clone() for p in params]
            phis, losses = [], []
            for _ in range(c.meta_batch):
                x, y = self.sample_task(ctx)
                losses.append(self.fit(self.model, self.inner, x, y, c.inner_steps, c.inner_batch, ctx.generator))
                phis.append([p.detach().clone() for p in params])
                with torch.no_grad():
                    for p, t in zip(params, theta):
                        p.copy_(t)
            eps = outer_step_size(step, c.meta_steps, c.outer_lr, c.outer_lr_final)
            with torch.no_grad():
                for p, new in zip(params, reptile_step(theta, phis, eps)):
                    p.copy_(new)
            ctx.step(None, sum(losses) / len(losses))  # theta was updated above: nothing to step

    def predict(self, support_x, support_y, query_x):
        """Fine-tune a copy of theta on the support set, then predict the queries.

        support_x [S, ...], support_y [S] (regression: [S, out_dim]), query_x [Q, ...] ->
        logits [Q, ways] (regression: predictions [Q, out_dim]). theta and the inner optimiser's
        state are left untouched.
        """
        c = self.config
        return self.predict_after_steps(support_x, support_y, query_x, [c.eval_inner_steps])[c.eval_inner_steps]

    def predict_after_steps(self, support_x, support_y, query_x, steps):
        """Predictions after each of ``steps`` fine-tuning steps of one copy of theta. The minibatch
        order is drawn once for the longest count, so the first k batches are those of a k-step run."""
        c = self.config
        model = copy.deepcopy(self.model)
        opt = inner_optimizer(c.inner_optimizer, model.parameters(), c.inner_lr)
        opt.load_state_dict(copy.deepcopy(self.inner.state_dict()))
        generator = torch.Generator().manual_seed(c.eval_seed)
        batches = minibatches(support_x.shape[0], c.eval_inner_batch, max(steps), generator)
        out, done = {}, 0
        for k in sorted(set(steps)):
            with torch.enable_grad():
                self.fit_batches(model, opt, support_x, support_y, batches[done:k])
            done = k
            with torch.no_grad():
                out[k] = model(query_x)
        return out


@hookimpl
def metabench_register_learners(register):
    register("reptile", Reptile)
