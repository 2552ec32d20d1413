"""The ``metasgd`` learner: Meta-SGD.

Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv
1707.09835, 2017. Like MAML it meta-learns the initial parameters theta of the model (backbone
+ linear head), and besides them a step size for every element of every parameter: alpha, with
the shape of theta. A task is learned in one step,

    theta'_i = theta - alpha * grad L_support(theta)      (elementwise product)

and theta and alpha minimise the mean query loss at theta'_i over ``meta_batch`` tasks with
Adam (the meta-gradient differentiates through the inner gradient; alpha's gradient is
-grad L_support(theta) * grad L_query(theta'_i)). The same single step adapts at test time.
alpha is initialised uniformly in [``alpha_init``, ``alpha_init_max``] (a constant when
``alpha_init_max`` is 0), from the run's seeded global generator.

Settings, per-problem defaults (0 = the default for classification or regression), losses
(cross-entropy / mean squared error) and BatchNorm with batch statistics (transductive) are
MAML's (:mod:`metabench_plugins.learners.maml`); ``inner_steps`` and ``eval_inner_steps`` default to the
paper's single step and may be raised (each step then uses the same alpha).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metabench import hookimpl, setting

from .maml import CONFIGS, MAML, TASK_BATCHING


@dataclass
class MetaSGDConfig:
    """Meta-SGD hyper-parameters. 0 = the default for the task's problem type (``MetaSGD.problem_defaults``).

    meta_steps:       meta-updates
    meta_batch:       tasks per meta-update
    alpha_init:       initial per-element step size, or the low end of its uniform range
    alpha_init_max:   high end of the uniform range of initial step sizes; 0 = every alpha starts at
                      ``alpha_init`` (paper: random in [0.005, 0.1])
    inner_steps:      inner steps during meta-training (paper: 1)
    eval_inner_steps: inner steps at test time (paper: 1)
    meta_lr:          Adam learning rate of theta and alpha (paper: 1e-3, as MAML)
    first_order:      do not differentiate through the inner gradient (alpha is still learned)
    train_shots:      support examples per class (regression: points) in training tasks; 0 = the protocol's
    train_queries:    queries per class (regression: points) in training tasks
    task_batching:    "loop", "stacked" (fully connected backbones), "grouped" (conv4-like backbones) or "auto"; as MAML's
    """

    meta_steps: int = setting(0, min=0)
    meta_batch: int = setting(0, min=0)
    alpha_init: float = setting(0.0, min=0)
    alpha_init_max: float = setting(0.0, min=0)
    inner_steps: int = setting(1, min=0)
    eval_inner_steps: int = setting(1, min=0)
    meta_lr: float = 1e-3
    first_order: bool = False
    train_shots: int = setting(0, min=0)
    train_queries: int = setting(0, min=0)
    task_batching: str = setting("auto", choices=TASK_BATCHING)


class MetaSGD(MAML):
    """Meta-SGD (Li et al., 2017): MAML with a meta-learned step size for every parameter element."""

    Config = MetaSGDConfig
    task_batchings = frozenset({"loop", "stacked", "grouped"})  # vmap takes one step size for every parameter
    reference = ("Li, Zhou, Chen & Li. Meta-SGD: Learning to Learn Quickly for Few-Shot Learning. "
                 "arXiv:1707.09835, 2017.")
    paper_config = CONFIGS / "metasgd.toml"
    #: Values of the settings left at 0, per problem type. alpha starts where MAML's fixed step
    #: size works (0.4 on Omniglot-like classification, 0.01 on sinusoid) so that the short quick
    #: budget does not spend its steps growing alpha first.
    problem_defaults = {
        "classification": {"meta_steps": 350, "meta_batch": 8, "alpha_init": 0.4, "train_queries": 5},
        "regression": {"meta_steps": 3000, "meta_batch": 25, "alpha_init": 0.01, "train_queries": "shots"},
    }
    budgets = {
        "smoke": {"meta_steps": 3, "meta_batch": 2, "train_queries": 2},
        "quick": {},
        # The paper's length; per-protocol settings (alpha's range, meta-batch, queries, conv4
        # width) come from metasgd.toml.
        "paper": {"meta_steps": 60000, "meta_batch": 32, "inner_steps": 1, "eval_inner_steps": 1, "meta_lr": 1e-3,
                  "first_order": False},
    }

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        c = self.config
        if c.alpha_init_max and not c.alpha_init_max >= c.alpha_init:
            raise ValueError(f"metasgd: alpha_init_max ({c.alpha_init_max!r}) must be 0 or at least "
                             f"alpha_init ({c.alpha_init!r})")
        low, high = c.alpha_init, c.alpha_init_max or c.alpha_init
        self.names = [n for n, _ in self.model.named_parameters()]
        self.alpha = nn.ParameterList(
            [nn.Parameter(torch.empty_like(p).uniform_(low, high) if high > low else torch.full_like(p, low))
             for p in self.model.parameters()])

    def step_sizes(self) -> dict:
        """alpha as a name -> tensor dict, aligned with :meth:`meta_params`."""
        return dict(zip(self.names, self.alpha))

    def optimized_tensors(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) + list(self.alpha)

    def track_state(self, ctx) -> None:
        super().track_state(ctx)
        ctx.track("step_sizes", self.alpha)

    def inner_step_sizes(self) -> dict:
        return self.step_sizes()

    def test_step_sizes(self) -> dict:
        return {n: a.detach() for n, a in self.step_sizes().items()}


@hookimpl
def metabench_register_learners(register):
    register("metasgd", MetaSGD)
