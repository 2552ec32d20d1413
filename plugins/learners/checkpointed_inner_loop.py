"""Second-order MAML with less memory: inner steps recomputed in the backward pass.

A helper module, not a plugin. Plain second-order MAML (:func:`metabench_plugins.learners.maml.adapt` with
``create_graph=True``) keeps, for every task of the meta-batch, the graph of every inner step
(the support forward, its backward, the parameter update) and of the query forward until the
meta-loss is differentiated. Two independent savings, both giving the same meta-gradient:

* :func:`adapt_checkpointed`: each inner step is one :class:`torch.autograd.Function` that keeps
  only its input parameters. Its forward computes the step without a graph; its backward
  recomputes the step with ``create_graph=True`` and returns the vector-Jacobian product
  ``v - inner_lr * H v`` (H: the support loss's Hessian at the step's input). One extra support
  forward + backward per step buys a graph of one step instead of ``steps``.
* :func:`maml_meta_backward`: differentiates each task's share of the meta-loss as soon as the
  task is done (accumulating into ``.grad``), so one task's graph is alive at a time instead of
  ``meta_batch`` of them.

Third-order derivatives through a checkpointed step are not supported (``once_differentiable``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call


def _support_grads(model, names, params, x, y, create_graph: bool, loss_fn=F.cross_entropy):
    loss = loss_fn(functional_call(model, dict(zip(names, params)), (x,)), y)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


class _RecomputedStep(torch.autograd.Function):
    """One SGD step ``p - lr * grad L_support(p)`` whose graph is rebuilt during backward."""

    @staticmethod
    def forward(ctx, model, names, x, y, inner_lr, loss_fn, *params):
        ctx.model, ctx.names, ctx.x, ctx.y, ctx.inner_lr, ctx.loss_fn = model, names, x, y, inner_lr, loss_fn
        ctx.save_for_backward(*params)
        with torch.enable_grad():
            inputs = [p.detach().requires_grad_(True) for p in params]
            grads = _support_grads(model, names, inputs, x, y, False, loss_fn)
        return tuple(p - inner_lr * g for p, g in zip(params, grads))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_out):
        params = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [p.detach().requires_grad_(True) for p in params]
            grads = _support_grads(ctx.model, ctx.names, inputs, ctx.x, ctx.y, True, ctx.loss_fn)
            new = [p - ctx.inner_lr * g for p, g in zip(inputs, grads)]
            vjp = torch.autograd.grad(new, inputs, grad_out)
        return (None, None, None, None, None, None, *vjp)


def adapt_checkpointed(model: nn.Module, params: dict, x, y, inner_lr: float, steps: int,
                       loss: Callable = F.cross_entropy) -> dict:
    """Second-order ``adapt``: the same adapted parameters and meta-gradient, one step's graph at a time.

    x: [S, ...] support inputs, y: [S] int64 labels (or regression targets with ``loss=F.mse_loss``).
    Returns the adapted name -> tensor dict.
    """
    names = tuple(params)
    values = tuple(params[n] for n in names)
    for _ in range(steps):
        values = _RecomputedStep.apply(model, names, x, y, inner_lr, loss, *values)
    return dict(zip(names, values))


def maml_meta_backward(model: nn.Module, params: dict, tasks: Sequence, inner_lr: float, inner_steps: int,
                       checkpoint: bool = True, loss: Callable = F.cross_entropy, first_order: bool = False) -> float:
    """Second-order MAML meta-gradient, accumulated into ``params[n].grad``; returns the meta-loss.

    The same meta-gradient as ``maml_meta_loss(model, params, tasks, ...).backward()`` (the mean
    over tasks of the query loss after adaptation), differentiated task by task. ``checkpoint``
    also recomputes the inner steps (:func:`adapt_checkpointed`) instead of keeping their graphs.
    ``first_order`` (FOMAML; not with ``checkpoint``) and ``loss`` are as in ``maml_meta_loss``.
    Call ``optimizer.zero_grad()`` before it, as before ``backward()``.
    """
    if checkpoint and first_order:
        raise ValueError("the checkpointed inner loop is for second-order MAML; first order keeps no inner graph")
    from metabench.adaptation import adapt

    tasks = list(tasks)
    leaves = [params[n] for n in params]
    total = 0.0
    for t in tasks:
        if checkpoint:
            adapted = adapt_checkpointed(model, params, t.support_x, t.support_y, inner_lr, inner_steps, loss)
        else:
            adapted = adapt(model, params, t.support_x, t.support_y, inner_lr, inner_steps, first_order, loss)
        share = loss(functional_call(model, adapted, (t.query_x,)), t.query_y) / len(tasks)
        grads = torch.autograd.grad(share, leaves, allow_unused=True)
        for leaf, g in zip(leaves, grads):
            if g is None:
                continue
            if leaf.grad is None:
                leaf.grad = g.detach().clone()
            else:
                leaf.grad += g
        total += share.item()
    return total
