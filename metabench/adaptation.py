"""Gradient-based adaptation: the inner loop and meta-loss of MAML-family learners, and task losses.

Building blocks for any learner that adapts parameters by gradient steps on a support set
(``maml``, ``anil``, ``metasgd``, ``mtl`` and third-party learners): :func:`adapt` runs the inner
loop functionally (``torch.func.functional_call`` on a name -> tensor dict), :func:`maml_meta_loss`
averages the adapted query loss over a meta-batch (its gradient is the MAML, FOMAML or Meta-SGD
meta-gradient), :func:`task_loss` gives the loss of a problem type. For fully connected models,
:mod:`metabench.stacked_tasks` computes the same meta-loss for the whole meta-batch at once.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

#: The task loss per problem type: (predictions, targets) -> scalar mean loss.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "classification": F.cross_entropy,  # logits [N, ways], labels [N] int64
    "regression": F.mse_loss,           # predictions [N, out_dim], targets [N, out_dim]
}


def task_loss(problem: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of ``problem`` ("classification": cross-entropy, "regression": mean squared error)."""
    try:
        return LOSSES[problem]
    except KeyError:
        raise ValueError(f"no task loss for problem type {problem!r}; known: {', '.join(LOSSES)}") from None


def adapt(model: nn.Module, params: dict, x, y, inner_lr, steps: int, first_order: bool,
          loss: Callable = F.cross_entropy, only: Collection[str] | None = None) -> dict:
    """``steps`` gradient steps on ``loss(model(x), y)`` from ``params``; returns the adapted dict.

    x: [S, ...] support inputs, y: [S] int64 labels (or [S, out_dim] regression targets with
    ``loss=F.mse_loss``). Second order keeps the graph of every inner gradient
    (``create_graph=True``); first order treats the inner gradients as constants.

    inner_lr: one step size for every parameter, or a mapping name -> tensor of per-element step
    sizes (Meta-SGD's alpha, broadcast against the parameter).
    only: names of the parameters to adapt (default: all); the others keep their values and are
    passed through unchanged (ANIL adapts only the head).
    """
    names = list(params) if only is None else [n for n in params if n in only]
    for _ in range(steps):
        value = loss(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(value, [params[n] for n in names], create_graph=not first_order)
        params = gradient_step(params, names, grads, inner_lr)
    return params


def gradient_step(params: dict, names: list[str], grads, inner_lr) -> dict:
    """``params`` with ``p - lr * g`` for each name in ``names`` (``grads`` in the same order);
    ``inner_lr`` is one number or a mapping name -> per-element step sizes. Returns a new dict."""
    step = dict(params)
    for n, g in zip(names, grads):
        lr = inner_lr[n] if isinstance(inner_lr, Mapping) else inner_lr
        step[n] = params[n] - lr * g
    return step


def maml_meta_loss(model: nn.Module, params: dict, tasks, inner_lr, inner_steps: int,
                   first_order: bool = False, loss: Callable = F.cross_entropy,
                   only: Collection[str] | None = None) -> torch.Tensor:
    """Mean over ``tasks`` (each with support_x/support_y/query_x/query_y) of the query loss after adaptation.

    Differentiating the result with respect to ``params`` (and to ``inner_lr`` when it is a
    mapping of tensors) gives the MAML (or FOMAML, or Meta-SGD) meta-gradient. ``loss`` and
    ``only`` are passed to :func:`adapt`.
    """
    losses = []
    for t in tasks:
        adapted = adapt(model, params, t.support_x, t.support_y, inner_lr, inner_steps, first_order, loss, only)
        losses.append(loss(functional_call(model, adapted, (t.query_x,)), t.query_y))
    return torch.stack(losses).mean()
