"""The ``amtl`` learner: MTL with adversarial cross-updates (a metabench-defined variant, not a published method).

It combines Meta-Transfer Learning (Sun, Liu, Chua & Schiele, CVPR 2019; see ``mtl``) with the
adversarial cross-updates of ADML (Yin, Tang, Wei, Zhang, Jiang & Qi, "Adversarial
Meta-Learning", 2018). Everything is MTL's (pre-training, frozen extractor with scaling and
shifting, meta-learned linear base learner, hard-task meta-batches) except each task's loss:

* adversarial copies of the support and the query images are made by attacking the model at the
  meta-parameters (frozen extractor + SS + the base learner's initialisation theta) on the task's
  own labels: FGSM, x + epsilon * sign(grad_x loss), or PGD, ``pgd_steps`` signed-gradient steps
  of ``pgd_step_size`` (0 = 2.5 * epsilon / pgd_steps) from the clean images (no random start),
  projected onto the L-inf ball of radius epsilon; images are clipped to [0, 1] (``clamp``). The
  perturbations are constants: the meta-gradient does not flow through the attack;
* the base learner is adapted twice, from theta on the clean support set and from theta on the
  adversarial one;
* the clean-adapted learner is scored on the adversarial queries and the adversarially-adapted
  learner on the clean queries; the task's loss is the sum of the two.

The failure class of a task (for hard-task meta-batches) is read off the clean-adapted learner on
the clean queries, and test episodes are scored clean, with MTL's ``predict``. ``--budget
paper`` runs MTL's published schedule (its ``mtl.toml``) with this variant's attack
settings, which are metabench's choice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metabench import hookimpl, setting

from .mtl import MTL, MTLConfig, TaskOutcome

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _finish(x_adv: torch.Tensor, clamp: bool) -> torch.Tensor:
    return x_adv.clamp(0.0, 1.0) if clamp else x_adv


def fgsm(loss_fn: LossFn, x: torch.Tensor, epsilon: float, clamp: bool = True) -> torch.Tensor:
    """Fast gradient sign method: x + epsilon * sign(d loss_fn(x) / dx), clipped to [0, 1] if ``clamp``.

    loss_fn maps a batch like ``x`` to a scalar. Returns a detached tensor shaped like ``x``.
    """
    with torch.enable_grad():
        x0 = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x0), x0)
    return _finish(x.detach() + epsilon * grad.sign(), clamp).detach()


def pgd(loss_fn: LossFn, x: torch.Tensor, epsilon: float, steps: int, step_size: float,
        clamp: bool = True) -> torch.Tensor:
    """Projected gradient ascent on the loss in the L-inf ball of radius ``epsilon`` around ``x``.

    ``steps`` steps x <- proj(x + step_size * sign(grad)), starting at ``x`` (no random start, so
    the attack is deterministic). Returns a detached tensor shaped like ``x``.
    """
    x = x.detach()
    adv = x.clone()
    for _ in range(steps):
        with torch.enable_grad():
            a = adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(a), a)
        adv = adv.detach() + step_size * grad.sign()
        adv = _finish(torch.min(torch.max(adv, x - epsilon), x + epsilon), clamp)
    return adv.detach()


@dataclass
class AMTLConfig(MTLConfig):
    """MTL's hyper-parameters plus the attack (metabench's defaults, not published ones).

    attack:        "fgsm" or "pgd"
    epsilon:       L-inf radius of the perturbation (images are in [0, 1])
    pgd_steps:     PGD steps
    pgd_step_size: PGD step size; 0 = 2.5 * epsilon / pgd_steps
    clamp:         clip adversarial images to [0, 1]
    """

    attack: str = setting("fgsm", choices=("fgsm", "pgd"))
    epsilon: float = setting(0.03, min=0)
    pgd_steps: int = setting(3, min=1)
    pgd_step_size: float = setting(0.0, min=0)
    clamp: bool = True


class AMTL(MTL):
    """MTL with ADML-style adversarial cross-updates (metabench-defined variant, not a published method)."""

    name = "amtl"
    Config = AMTLConfig
    reference = ("metabench-defined variant, not a published method: Meta-Transfer Learning (Sun et al., CVPR 2019) "
                 "with the adversarial cross-updates of ADML (Yin et al., Adversarial Meta-Learning, 2018).")
    # quick: fewer meta-steps than mtl's, since each task costs four feature passes and two attacks
    # (kanji-5w1s, 600 test episodes: 196 s of CPU time on one thread, 95.7% accuracy).
    budgets = {
        "smoke": dict(MTL.budgets["smoke"]),
        "quick": {**MTL.budgets["quick"], "meta_steps": 100},
        "paper": dict(MTL.budgets["paper"]),
    }

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial copy of ``x`` [N, C, H, W] against the model at the meta-parameters, labels ``y`` [N]."""
        c = self.config
        theta = {k: v.detach() for k, v in self.head_params().items()}

        def loss_fn(z: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.head_logits(theta, self.features(z)), y)

        if c.attack == "fgsm":
            return fgsm(loss_fn, x, c.epsilon, c.clamp)
        step = c.pgd_step_size or 2.5 * c.epsilon / c.pgd_steps
        return pgd(loss_fn, x, c.epsilon, c.pgd_steps, step, c.clamp)

    def task_outcome(self, ep) -> TaskOutcome:
        """Loss = clean-adapted on adversarial queries + adversarially-adapted on clean queries."""
        c = self.config
        s, q = ep.support_x.shape[0], ep.query_x.shape[0]
        support_adv = self.perturb(ep.support_x, ep.support_y)
        query_adv = self.perturb(ep.query_x, ep.query_y)
        feats = self.features(torch.cat([ep.support_x, support_adv, ep.query_x, query_adv]))
        fs, fs_adv, fq, fq_adv = torch.split(feats, [s, s, q, q])
        clean = self.adapt_head(fs, ep.support_y, c.inner_steps, c.first_order)
        robust = self.adapt_head(fs_adv, ep.support_y, c.inner_steps, c.first_order)
        loss = (F.cross_entropy(self.head_logits(clean, fq_adv), ep.query_y)
                + F.cross_entropy(self.head_logits(robust, fq), ep.query_y))
        with torch.no_grad():
            logits = self.head_logits(clean, fq)
        return TaskOutcome(loss, logits, ep.query_y, fq)


@hookimpl
def metabench_register_learners(register):
    register("amtl", AMTL)
