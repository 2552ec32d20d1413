"""The ``tamtl`` learner: MTL with a task-agnostic regulariser (a metabench-defined variant, not a published method).

It combines Meta-Transfer Learning (Sun, Liu, Chua & Schiele, CVPR 2019; see ``mtl``) with a
regulariser of TAML (Jamal & Qi, "Task Agnostic Meta-Learning for Few-Shot Learning", CVPR 2019),
which keeps the meta-learned initial model from favouring some tasks over others. Everything is
MTL's except the meta-loss, which gets one of two terms (weight ``reg_weight`` = lambda):

* ``regularizer = "entropy"``: the entropy H of the *initial* base learner's predictions (theta,
  before adaptation) on the task's queries, mean over queries of -sum_c p_c log p_c, is
  maximised: each task's loss gets the term -lambda * H;
* ``regularizer = "inequality"``: an inequality measure of the meta-batch's per-task losses is
  minimised: the meta-loss (mean of the tasks' query losses after adaptation) gets + lambda * I.
  ``inequality`` picks I: ``"theil"`` (Theil index, (1/n) sum_i (l_i/mu) ln(l_i/mu)),
  ``"generalized_entropy"`` (GE(alpha) = (1/(n alpha (alpha-1))) sum_i ((l_i/mu)^alpha - 1), with
  alpha = ``ge_alpha``; alpha 1 is Theil, alpha 0 the mean log deviation) or ``"gini"`` (the Gini
  coefficient, sum_ij |l_i - l_j| / (2 n^2 mu)). ``inequality_of`` says whose losses: the
  initial base learner's (theta, on the queries: ``"initial"``, as TAML measures the initial
  model) or the adapted ones' (``"adapted"``). Every measure is 0 when all losses are equal, so a
  meta-batch of one task gets no term.

The weight and the choices are metabench's defaults, not published ones. ``--budget paper``
runs MTL's published schedule (its ``mtl.toml``) with this variant's regulariser.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metabench import hookimpl, setting

from .mtl import MTL, MTLConfig, TaskOutcome


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy (nats) of softmax(logits): [N, K] -> scalar."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def theil_index(values: torch.Tensor) -> torch.Tensor:
    """Theil index of positive values [n]: (1/n) sum_i (v_i/mu) ln(v_i/mu); 0 when all are equal."""
    r = values / values.mean()
    return torch.xlogy(r, r).mean()


def generalized_entropy(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalized entropy index GE(alpha) of positive values [n] (alpha 1: Theil; alpha 0: mean log deviation)."""
    r = values / values.mean()
    if alpha == 1:
        return torch.xlogy(r, r).mean()
    if alpha == 0:
        return -torch.log(r).mean()
    return (r.pow(alpha) - 1).mean() / (alpha * (alpha - 1))


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of non-negative values [n]: sum_ij |v_i - v_j| / (2 n^2 mu)."""
    n = values.shape[0]
    return (values[:, None] - values[None, :]).abs().sum() / (2 * n * n * values.mean())


@dataclass
class TAMTLOutcome(TaskOutcome):
    """A task outcome that also keeps the initial base learner's query loss and prediction entropy."""

    initial_loss: torch.Tensor | None = None
    adapted_loss: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@dataclass
class TAMTLConfig(MTLConfig):
    """MTL's hyper-parameters plus the regulariser (metabench's defaults, not published ones).

    regularizer:  "entropy" (maximise the initial predictions' entropy) or "inequality"
    reg_weight:   lambda, the weight of the regulariser
    inequality:   "theil", "generalized_entropy" or "gini"
    ge_alpha:     alpha of the generalized entropy index
    inequality_of: "initial" (theta's query losses) or "adapted" (the adapted learners' query losses)
    """

    regularizer: str = setting("entropy", choices=("entropy", "inequality"))
    reg_weight: float = setting(0.1, min=0)
    inequality: str = setting("theil", choices=("theil", "generalized_entropy", "gini"))
    ge_alpha: float = 2.0
    inequality_of: str = setting("initial", choices=("initial", "adapted"))


class TAMTL(MTL):
    """MTL with TAML's entropy or inequality regulariser (metabench-defined variant, not a published method)."""

    name = "tamtl"
    Config = TAMTLConfig
    splits_meta_batch = False  # its meta-loss compares the tasks of a meta-batch: not a mean of shares
    reference = ("metabench-defined variant, not a published method: Meta-Transfer Learning (Sun et al., CVPR 2019) "
                 "with the task-agnostic regularisers of TAML (Jamal & Qi, CVPR 2019).")
    budgets = {
        "smoke": dict(MTL.budgets["smoke"]),
        "quick": dict(MTL.budgets["quick"]),
        "paper": dict(MTL.budgets["paper"]),
    }

    def inequality(self, losses: torch.Tensor) -> torch.Tensor:
        """The configured inequality measure of per-task losses [n]."""
        c = self.config
        if c.inequality == "theil":
            return theil_index(losses)
        if c.inequality == "gini":
            return gini(losses)
        return generalized_entropy(losses, c.ge_alpha)

    def task_outcome(self, ep) -> TAMTLOutcome:
        """MTL's outcome, plus theta's query loss and prediction entropy; the entropy term joins the loss."""
        out = super().task_outcome(ep)
        initial_logits = self.head_logits(self.head_params(), out.query_features)
        entropy = prediction_entropy(initial_logits)
        loss = out.loss
        if self.config.regularizer == "entropy":
            loss = loss - self.config.reg_weight * entropy
        return TAMTLOutcome(loss, out.logits, out.query_y, out.query_features,
                            initial_loss=F.cross_entropy(initial_logits, out.query_y), adapted_loss=out.loss,
                            entropy=entropy)

    def meta_loss(self, outcomes: list[TAMTLOutcome]) -> torch.Tensor:
        """MTL's mean loss, plus lambda times the inequality of the tasks' losses (``inequality`` regulariser)."""
        loss = super().meta_loss(outcomes)
        c = self.config
        if c.regularizer == "inequality":
            per_task = [o.initial_loss if c.inequality_of == "initial" else o.adapted_loss for o in outcomes]
            loss = loss + c.reg_weight * self.inequality(torch.stack(per_task))
        return loss


@hookimpl
def metabench_register_learners(register):
    register("tamtl", TAMTL)
