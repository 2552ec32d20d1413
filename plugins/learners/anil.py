"""The ``anil`` learner: Almost No Inner Loop.

Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML", ICLR 2020. ANIL is MAML whose inner loop adapts only the head (the last,
linear layer): for a task, the body's features of the support set are computed once with the
meta-parameters, ``inner_steps`` gradient steps on the support loss adapt the head, and the
meta-loss is the query loss of the body's query features under the adapted head. The body is
still meta-learned: the meta-gradient reaches it through the query features and, second order,
through the support features inside the head's inner gradients. At test time the body is
frozen and the head is fine-tuned on the support set for ``eval_inner_steps`` steps.

Everything else is MAML's (:mod:`metabench_plugins.learners.maml`): the settings, their per-problem
defaults (cross-entropy for classification, mean squared error for regression), the budgets'
shape, and BatchNorm with batch statistics, which makes ANIL transductive like MAML. Raghu et
al. used Finn et al.'s hyper-parameters, so ``anil.toml`` repeats MAML's.

Because the body's features do not change during the inner loop, they are computed once per
task: an inner step costs a head forward and backward only, not the whole network's.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metabench import hookimpl
from metabench.stacked_tasks import stacked_meta_loss

from metabench.adaptation import adapt

from .maml import CONFIGS, MAML


def split_params(params: dict, prefix: str) -> dict:
    """The entries of ``params`` whose name starts with ``prefix``, with the prefix removed."""
    return {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}


def anil_meta_loss(body: nn.Module, head: nn.Module, body_params: dict, head_params: dict, tasks, inner_lr,
                   inner_steps: int, first_order: bool = False, loss: Callable = F.cross_entropy) -> torch.Tensor:
    """Mean over ``tasks`` of the query loss after adapting the head only on the support set.

    body maps inputs [N, ...] to features [N, D]; head maps features to outputs. Differentiating
    the result with respect to ``body_params`` and ``head_params`` gives ANIL's meta-gradient
    (first order: the head's inner gradients are constants).
    """
    losses = []
    for t in tasks:
        support = functional_call(body, body_params, (t.support_x,))
        adapted = adapt(head, head_params, support, t.support_y, inner_lr, inner_steps, first_order, loss)
        query = functional_call(body, body_params, (t.query_x,))
        losses.append(loss(functional_call(head, adapted, (query,)), t.query_y))
    return torch.stack(losses).mean()


class ANIL(MAML):
    """ANIL (Raghu et al., ICLR 2020): MAML adapting only the linear head in the inner loop."""

    reference = ("Raghu, Raghu, Bengio & Vinyals. Rapid Learning or Feature Reuse? Towards Understanding "
                 "the Effectiveness of MAML. ICLR 2020.")
    paper_config = CONFIGS / "anil.toml"
    # Inner steps are cheap (head only), so quick affords more meta-updates than MAML's in the
    # same time; the other per-problem defaults are MAML's.
    problem_defaults = {
        "classification": {**MAML.problem_defaults["classification"], "meta_steps": 500},
        "regression": dict(MAML.problem_defaults["regression"]),
    }
    budgets = {name: dict(values) for name, values in MAML.budgets.items()}
    task_batchings = frozenset({"loop", "stacked"})

    @property
    def body(self) -> nn.Module:
        return self.model[0]

    @property
    def head(self) -> nn.Module:
        return self.model[1]

    def meta_loss(self, tasks) -> torch.Tensor:
        c, params = self.config, self.meta_params()
        if c.task_batching == "stacked":  # the same meta-loss: only the head's copies are per task
            head = [n for n in params if n.startswith("1.")]
            return stacked_meta_loss(self.model, params, tasks, c.inner_lr, c.inner_steps, c.first_order, self.loss,
                                     only=head)
        return anil_meta_loss(self.body, self.head, split_params(params, "0."), split_params(params, "1."), tasks,
                              c.inner_lr, c.inner_steps, c.first_order, self.loss)

    def predict(self, support_x, support_y, query_x):
        """Fine-tune a copy of the head on the body's support features, then predict the queries.

        support_x [S, ...], support_y [S] (regression: [S, out_dim]), query_x [Q, ...] ->
        logits [Q, ways] (regression: predictions [Q, out_dim]). The meta-parameters are left untouched.
        """
        return self.predict_after_steps(support_x, support_y, query_x, [self.config.eval_inner_steps])[
            self.config.eval_inner_steps]

    def predict_after_steps(self, support_x, support_y, query_x, steps):
        """Predictions after each of ``steps`` head fine-tuning steps (one adaptation, continued)."""
        c = self.config
        with torch.no_grad():
            support, query = self.body(support_x), self.body(query_x)
        out, done = {}, 0
        head = {n: p.detach().requires_grad_(True) for n, p in self.head.named_parameters()}
        for k in sorted(set(steps)):
            with torch.enable_grad():
                head = adapt(self.head, head, support, support_y, c.inner_lr, k - done, True, self.loss)
            done = k
            with torch.no_grad():
                out[k] = functional_call(self.head, {n: t.detach() for n, t in head.items()}, (query,))
        return out


@hookimpl
def metabench_register_learners(register):
    register("anil", ANIL)
