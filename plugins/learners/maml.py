"""The ``maml`` learner: Model-Agnostic Meta-Learning.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017. The model (backbone + linear head with ``ways`` outputs) has initial parameters
theta. For a task, ``inner_steps`` gradient steps on the support loss give adapted parameters
theta'_i = theta - inner_lr * grad L_support(theta) (repeated); the meta-loss is the mean query
loss at theta'_i over ``meta_batch`` tasks, minimised over theta with Adam. Second-order by
default (the meta-gradient differentiates through the inner gradients); ``first_order=True``
gives FOMAML, whose meta-gradient is the query-loss gradient at theta'_i.

Classification and regression: the loss is cross-entropy on classification tasks and the mean
squared error on regression tasks (sinusoid: the head has ``protocol.ways`` = 1 output). The
settings that differ between the two (``meta_steps``, ``meta_batch``, ``inner_lr``,
``eval_inner_steps``, ``train_queries``) default to 0, meaning "the default for the task's
problem type" (:attr:`MAML.problem_defaults`); the learner resolves them when it is built, in
the config object it is given, so a result records the values that were used. The ``quick``
budget leaves them at 0; ``--budget paper`` takes them per protocol from ``maml.toml``.

BatchNorm, as in the published MAML code, always normalises with the statistics of the batch it
is given (no running statistics). The queries of an episode are forwarded as one batch, so a
query's prediction depends on the other queries: MAML is transductive (``transductive = True``).
(The ``mlp`` backbone of regression tasks has no BatchNorm; the flag is per learner.)

Differences from the published Omniglot setup: the backbone is whatever the run names (default
``conv4``, with max-pooling where Finn et al. used strided convolutions on Omniglot), and every
parameter, BatchNorm's scale and shift included, is adapted in the inner loop.

The building blocks it shares with other gradient-based learners live in the core, where a
third-party learner imports them too: :mod:`metabench.adaptation` (``adapt``, ``maml_meta_loss``,
``task_loss``), :mod:`metabench.batchnorm` and :mod:`metabench.stacked_tasks`.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metabench import Learner, hookimpl, setting
from metabench.adaptation import LOSSES, adapt, maml_meta_loss, task_loss  # noqa: F401  (LOSSES: re-exported)
from metabench.batchnorm import batch_statistics_only
from metabench.config import resolve_problem_defaults
from metabench.stacked_tasks import can_stack, stacked_meta_loss

from . import paper_config

CONFIGS = Path(__file__).parent  # the paper configs (*.toml) are installed beside the learners


TASK_BATCHING = ("auto", "loop", "vmap", "stacked", "grouped")


@dataclass
class MAMLConfig:
    """MAML hyper-parameters. 0 = the default for the task's problem type (see :attr:`MAML.problem_defaults`).

    meta_steps:       meta-updates (paper: 60,000 on Omniglot and mini-ImageNet, 70,000 on sinusoid)
    meta_batch:       tasks per meta-update (paper: Omniglot 5-way 32, 20-way 16; sinusoid 25)
    inner_lr:         inner-loop SGD step size (paper: Omniglot 5-way 0.4, 20-way 0.1; mini-ImageNet
                      and sinusoid 0.01)
    inner_steps:      inner steps during meta-training (paper: 1; Omniglot 20-way and mini-ImageNet 5)
    eval_inner_steps: inner steps at test time (paper: Omniglot 5-way 3, 20-way 5; mini-ImageNet 10;
                      sinusoid up to 10)
    meta_lr:          Adam learning rate of the meta-update (paper: 1e-3)
    first_order:      FOMAML: do not differentiate through the inner gradients
    train_shots:      support examples per class (regression: support points) in training tasks;
                      0 = the protocol's shots (Finn et al. meta-trained one sinusoid model with
                      K = 10 and fine-tuned it with K = 5 and 10 at test time)
    train_queries:    queries per class (regression: query points) in training tasks (the
                      published code used as many as shots, except 15 on mini-ImageNet)
    task_batching:    "loop": the meta-batch's tasks one after another; "vmap": all tasks in one
                      ``torch.func.vmap`` with per-task BatchNorm statistics (the same
                      meta-gradient; speed on CPU and GPU in benchmarks/RESULTS.md); "stacked":
                      fully connected models only (the ``mlp`` backbone), every task's copy of the
                      weights stacked and each layer one batched matrix product
                      (:mod:`metabench.stacked_tasks`; the same meta-gradient); "grouped": a
                      plain chain of convolutions (conv4), the meta-batch's tasks side by side
                      as the groups of one grouped convolution per layer (the same
                      meta-gradient); "auto" (default): "stacked" where the model allows it,
                      else on a CUDA device "grouped" where the model allows it and "vmap"
                      otherwise, else "loop"; always "loop" when per_task_backward or
                      inner_checkpoint is set (the result records which one ran)
    per_task_backward: differentiate each task's query loss as soon as its inner loop is done,
                      so one task's graph is alive at a time instead of the meta-batch's (the
                      same meta-gradient, less memory)
    inner_checkpoint: second order only: recompute each inner step in the backward pass instead of
                      keeping its graph (implies ``per_task_backward``): memory for long inner
                      loops and big backbones, at the cost of one more support forward/backward
                      per inner step
    """

    meta_steps: int = setting(0, min=0)
    meta_batch: int = setting(0, min=0)
    inner_lr: float = setting(0.0, min=0)
    inner_steps: int = setting(1, min=0)
    eval_inner_steps: int = setting(0, min=0)
    meta_lr: float = 1e-3
    first_order: bool = False
    train_shots: int = setting(0, min=0)
    train_queries: int = setting(0, min=0)
    task_batching: str = setting("auto", choices=TASK_BATCHING)
    per_task_backward: bool = False
    inner_checkpoint: bool = False


class MAML(Learner):
    """MAML (Finn et al., ICML 2017) with a linear head on any registered backbone."""

    problem_types = frozenset({"classification", "regression"})
    transductive = True
    splits_meta_batch = True  # torchrun: each process adapts its share of the meta-batch's tasks
    precisions = frozenset({"fp32", "bf16"})  # bf16 only first order (refuses_precision)
    Config = MAMLConfig
    #: The ``task_batching`` values this learner's meta-loss implements.
    task_batchings = frozenset({"loop", "vmap", "stacked", "grouped"})
    reference = "Finn, Abbeel & Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks. ICML 2017."
    paper_config = CONFIGS / "maml.toml"
    #: Values of the settings left at 0, per problem type; ``train_queries: "shots"`` means as many
    #: as the training shots. Classification: the Omniglot 5-way inner loop of the paper with fewer
    #: and smaller meta-batches, sized for the quick budget; regression: Finn et al.'s sinusoid inner
    #: loop (step 0.01, 10 steps at test, K query points) with the paper's meta-batch of 25. Run
    #: times: benchmarks/RESULTS.md (end to end) and the leaderboards' meta-train column.
    problem_defaults: dict[str, dict[str, Any]] = {
        "classification": {"meta_steps": 350, "meta_batch": 8, "inner_lr": 0.4, "eval_inner_steps": 3,
                           "train_queries": 5},
        "regression": {"meta_steps": 3000, "meta_batch": 25, "inner_lr": 0.01, "eval_inner_steps": 10,
                       "train_queries": "shots"},
    }
    # quick: every problem-dependent setting at its per-problem default (above).
    # paper: the paper's length; per-protocol settings (inner loop, meta-batch, queries, conv4
    # width) come from maml.toml; protocols without a table use Omniglot 5-way's meta-batch.
    budgets = {
        "smoke": {"meta_steps": 3, "meta_batch": 2, "train_queries": 2, "eval_inner_steps": 1},
        "quick": {},
        "paper": {"meta_steps": 60000, "meta_batch": 32, "inner_steps": 1, "meta_lr": 1e-3, "first_order": False},
    }

    @classmethod
    def refuses_precision(cls, precision, config):
        """Second-order meta-gradients (differentiating through the inner loop's gradients) stay
        float32: bf16 only with ``first_order``."""
        if precision != "fp32" and not getattr(config, "first_order", False):
            return (f"second-order meta-gradients stay float32 (first_order = false); "
                    f"--set first_order=true trains first-order in {precision}")
        return super().refuses_precision(precision, config)

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        self.loss = task_loss(protocol.problem)
        head = nn.Linear(backbone.out_features, protocol.ways)
        self.model = batch_statistics_only(nn.Sequential(backbone.module, head)).to(device)
        self.model.train()
        self.resolve_config()

    def resolve_config(self) -> None:
        """Fill the settings left at 0 from :attr:`problem_defaults` and check what the Config's
        declarations (checked by :class:`metabench.Learner`) cannot: the resolved values."""
        c, p = self.config, self.protocol
        name = self.name or type(self).__name__.lower()
        defaults = dict(self.problem_defaults[p.problem])
        if c.train_shots == 0:
            c.train_shots = p.shots
        if defaults.get("train_queries") == "shots":
            defaults["train_queries"] = c.train_shots
        resolve_problem_defaults(c, defaults)
        for field in ("meta_batch", "train_shots", "train_queries"):
            if getattr(c, field) < 1:
                raise ValueError(f"{name}: {field} must be at least 1 once 0 is resolved to the problem type's "
                                 f"default, got {getattr(c, field)!r}")
        self.check_meta_gradient_options(name)

    def check_meta_gradient_options(self, name: str) -> None:
        """Resolve ``task_batching = "auto"`` and reject combinations of ``task_batching``,
        ``per_task_backward`` and ``inner_checkpoint`` that do not exist for this learner and model."""
        c = self.config
        if not hasattr(c, "task_batching"):  # a subclass whose config has none of these options
            return
        per_task = getattr(c, "per_task_backward", False) or getattr(c, "inner_checkpoint", False)
        can = self.task_batchings
        if c.task_batching == "auto":
            if per_task:
                c.task_batching = "loop"
            elif "stacked" in can and can_stack(self.model, self.loss):
                c.task_batching = "stacked"
            elif torch.device(self.device).type == "cuda" and "grouped" in can and can_stack(self.model, self.loss,
                                                                                          convolutions=True):
                c.task_batching = "grouped"  # benchmarks/RESULTS.md, section 6: faster than vmap where it applies
            elif "vmap" in can and torch.device(self.device).type == "cuda":
                c.task_batching = "vmap"
            else:
                c.task_batching = "loop"
        if c.task_batching not in can:
            raise ValueError(f"{name}: task_batching = {c.task_batching!r} is not available for {name}; "
                             f"accepted: auto, {', '.join(sorted(can))}")
        if c.task_batching == "stacked" and not can_stack(self.model, self.loss):
            raise ValueError(f"{name}: task_batching = \"stacked\" needs a fully connected backbone (Linear, "
                             "Flatten and element-wise layers, e.g. mlp) and a cross-entropy or squared-error loss")
        if c.task_batching == "grouped" and not can_stack(self.model, self.loss, convolutions=True):
            raise ValueError(f"{name}: task_batching = \"grouped\" needs a plain chain of convolutions (Conv2d, "
                             "BatchNorm2d, pooling and element-wise layers, then Flatten and Linear layers, e.g. "
                             "conv4) and a cross-entropy or squared-error loss")
        if per_task and type(self).meta_loss is not MAML.meta_loss:
            raise ValueError(f"{name}: per_task_backward and inner_checkpoint are MAML's options; "
                             f"{name} computes its own meta-loss")
        if c.task_batching != "loop" and per_task:
            raise ValueError(f"{name}: task_batching = {c.task_batching!r} differentiates the whole meta-batch at "
                             "once; it cannot be combined with per_task_backward or inner_checkpoint")
        if getattr(c, "inner_checkpoint", False) and c.first_order:
            raise ValueError(f"{name}: inner_checkpoint is for second-order MAML (first_order keeps no inner graph)")

    def meta_params(self) -> dict:
        """The meta-parameters theta as a name -> tensor dict (the model's own tensors)."""
        return dict(self.model.named_parameters())

    def sample_tasks(self, ctx) -> list:
        """``meta_batch`` training episodes of the protocol's ways, ``train_shots`` and ``train_queries``."""
        c, p = self.config, self.protocol
        return ctx.sampler.sample_many(c.meta_batch, ways=p.ways, shots=c.train_shots, queries=c.train_queries)

    def inner_step_sizes(self):
        """The inner loop's step size: ``inner_lr`` (Meta-SGD: its learned per-element step sizes)."""
        return self.config.inner_lr

    def meta_loss(self, tasks) -> torch.Tensor:
        """The meta-loss of a meta-batch; its gradient is the meta-gradient of the optimised tensors."""
        c = self.config
        lr = self.inner_step_sizes()
        if c.task_batching in ("stacked", "grouped"):
            return stacked_meta_loss(self.model, self.meta_params(), tasks, lr, c.inner_steps, c.first_order,
                                     self.loss, convolutions=c.task_batching == "grouped")
        if c.task_batching == "vmap":
            from .maml_vmap import maml_meta_loss_vmap

            return maml_meta_loss_vmap(self.model, self.meta_params(), tasks, lr, c.inner_steps,
                                       c.first_order, self.loss)
        return maml_meta_loss(self.model, self.meta_params(), tasks, lr, c.inner_steps, c.first_order, self.loss)

    def meta_backward(self, tasks) -> float:
        """Accumulate the meta-gradient of a meta-batch into the optimised tensors' ``.grad``; return the meta-loss."""
        c = self.config
        if getattr(c, "per_task_backward", False) or getattr(c, "inner_checkpoint", False):
            from .checkpointed_inner_loop import maml_meta_backward

            return maml_meta_backward(self.model, self.meta_params(), tasks, c.inner_lr, c.inner_steps,
                                      checkpoint=c.inner_checkpoint, loss=self.loss, first_order=c.first_order)
        loss = self.meta_loss(tasks)
        loss.backward()
        return loss.item()

    def optimized_tensors(self) -> list[torch.Tensor]:
        """What the meta-optimiser updates (theta; Meta-SGD adds its step sizes)."""
        return list(self.model.parameters())

    def meta_train(self, ctx) -> None:
        c = self.config
        self.track_state(ctx)
        opt = ctx.track("optimizer", torch.optim.Adam(self.optimized_tensors(), lr=c.meta_lr))
        for _ in ctx.steps("meta-train", c.meta_steps):
            tasks = ctx.shard(self.sample_tasks(ctx))  # this process's share (all of it in one process)
            opt.zero_grad(set_to_none=True)
            loss = self.meta_backward(tasks)
            ctx.step(opt, loss)

    def track_state(self, ctx) -> None:
        """Register the learner's stateful objects with the harness (Meta-SGD adds its step sizes)."""
        ctx.track("model", self.model)

    def test_step_sizes(self):
        """The step size of test-time adaptation (Meta-SGD: its learned step sizes, detached)."""
        return self.config.inner_lr

    def adapt_for_test(self, support_x, support_y, steps: int | None = None, params: dict | None = None) -> dict:
        """theta (or ``params``, to continue an adaptation) adapted on a support set with ``steps``
        steps (default ``eval_inner_steps``); first order: no graph is kept between steps."""
        if params is None:
            params = {n: p.detach().requires_grad_(True) for n, p in self.model.named_parameters()}
        steps = self.config.eval_inner_steps if steps is None else steps
        return adapt(self.model, params, support_x, support_y, self.test_step_sizes(), steps, True, self.loss)

    def predict_after_steps(self, support_x, support_y, query_x, steps):
        """Predictions after each of ``steps`` test-time steps, from one adaptation continued step by
        step (the value after ``eval_inner_steps`` steps is :meth:`predict`'s, bit for bit)."""
        out, done, params = {}, 0, None
        for k in sorted(set(steps)):
            with torch.enable_grad():
                params = self.adapt_for_test(support_x, support_y, k - done, params)
            done = k
            with torch.no_grad():
                out[k] = functional_call(self.model, {n: t.detach() for n, t in params.items()}, (query_x,))
        return out

    def predict(self, support_x, support_y, query_x):
        """Adapt a copy of theta on the support set (``eval_inner_steps``), then predict the queries.

        support_x [S, ...], support_y [S] (regression: [S, out_dim]), query_x [Q, ...] ->
        logits [Q, ways] (regression: predictions [Q, out_dim]). The meta-parameters are left untouched.
        """
        with torch.enable_grad():
            adapted = self.adapt_for_test(support_x, support_y)
        with torch.no_grad():
            return functional_call(self.model, {n: t.detach() for n, t in adapted.items()}, (query_x,))


@hookimpl
def metabench_register_learners(register):
    register("maml", MAML)
