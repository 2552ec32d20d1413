"""Task-batched MAML meta-loss: ``torch.func.vmap`` over the tasks of a meta-batch.

A helper module, not a plugin: :func:`maml_meta_loss_vmap` computes the same value (and, through
it, the same meta-gradient) as :func:`metabench_plugins.learners.maml.maml_meta_loss`, with the ``T`` tasks
stacked along a new first dimension and each task's inner loop written once for a single task
(``torch.func.grad`` + ``functional_call``) and vectorised by ``vmap``.

BatchNorm: under ``vmap``, stock ``nn.BatchNorm2d`` (ATen's fused batch norm) gives a wrong
second-order meta-gradient (relative errors 6e-4 to 1e-1 in float64 were measured). The model is
therefore run through a copy in which every BatchNorm layer is replaced by :class:`BasicBatchNorm`,
which normalises with the batch statistics of its input computed from basic ops (mean, square,
rsqrt). Under ``vmap`` that input is one task's batch, so the statistics are per task, exactly as
in the loop. It has the same parameter names (``weight``, ``bias``), so the ``params`` dict of the
original model is used unchanged. Like MAML's models (:func:`~metabench_plugins.learners.maml.batch_statistics_only`),
it never uses running statistics.

Speed and memory on a 2-core CPU are in ``benchmarks/RESULTS.md``; the loop stays the default there.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


class BasicBatchNorm(nn.Module):
    """Batch-statistics normalisation from basic ops: ``(x - mean) * rsqrt(var + eps) * weight + bias``.

    Statistics are over every dimension but 1 (the channels): [N, C] or [N, C, *spatial].
    ``var`` is the biased variance, as BatchNorm uses for normalising.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.weight = self.bias = None

    @classmethod
    def like(cls, bn: nn.modules.batchnorm._BatchNorm) -> "BasicBatchNorm":
        new = cls(bn.num_features, bn.eps, bn.affine)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias  # the same Parameter objects
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
        out = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def with_basic_batchnorm(model: nn.Module) -> nn.Module:
    """A shallow structural copy of ``model`` whose BatchNorm layers are :class:`BasicBatchNorm`.

    Parameters are shared with ``model`` (the copy is only used through ``functional_call``).
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return BasicBatchNorm.like(model)
    clone = copy.copy(model)  # own dicts below: functional_call swaps tensors in them
    clone._parameters, clone._buffers = dict(model._parameters), dict(model._buffers)
    clone._modules = {name: (with_basic_batchnorm(child) if child is not None else None)
                      for name, child in model._modules.items()}
    return clone


_FUNCTIONAL: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _functional_model(model: nn.Module) -> nn.Module:
    if model not in _FUNCTIONAL:
        _FUNCTIONAL[model] = with_basic_batchnorm(model)
    return _FUNCTIONAL[model]


@dataclass
class StackedTasks:
    """``T`` tasks of equal shapes stacked along dimension 0.

    support_x [T, S, C, H, W], support_y [T, S], query_x [T, Q, C, H, W], query_y [T, Q].
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @classmethod
    def of(cls, tasks) -> "StackedTasks":
        """Stack a sequence of episodes (anything with support_x/support_y/query_x/query_y)."""
        if isinstance(tasks, StackedTasks):
            return tasks
        tasks = list(tasks)
        if not tasks:
            raise ValueError("maml_vmap: the meta-batch is empty")
        fields = ("support_x", "support_y", "query_x", "query_y")
        for name in fields:
            shapes = {tuple(getattr(t, name).shape) for t in tasks}
            if len(shapes) > 1:
                raise ValueError(f"maml_vmap: tasks must have equal shapes to be stacked; {name} has {sorted(shapes)}")
        return cls(*(torch.stack([getattr(t, name) for t in tasks]) for name in fields))


def maml_meta_loss_vmap(model: nn.Module, params: dict, tasks: Sequence | StackedTasks, inner_lr: float,
                        inner_steps: int, first_order: bool = False, loss=F.cross_entropy) -> torch.Tensor:
    """Mean over tasks of the query loss after adaptation, all tasks in one ``vmap``.

    Same arguments and value as :func:`metabench_plugins.learners.maml.maml_meta_loss`; ``tasks`` may be a
    sequence of episodes of equal shapes or a :class:`StackedTasks`. Differentiating the result
    with respect to ``params`` gives the MAML (``first_order=False``) or FOMAML meta-gradient.
    ``loss(predictions, targets)`` is the task loss (cross-entropy; ``F.mse_loss`` for regression).
    """
    stacked = StackedTasks.of(tasks)
    fmodel = _functional_model(model)

    def support_loss(p, x, y):
        return loss(functional_call(fmodel, p, (x,)), y)

    def task_loss(p, sx, sy, qx, qy):  # one task: sx [S, C, H, W], sy [S], qx [Q, C, H, W], qy [Q]
        for _ in range(inner_steps):
            grads = grad(support_loss)(p, sx, sy)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            p = {n: p[n] - inner_lr * grads[n] for n in p}
        return loss(functional_call(fmodel, p, (qx,)), qy)

    losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(
        dict(params), stacked.support_x, stacked.support_y, stacked.query_x, stacked.query_y)  # [T]
    return losses.mean()
