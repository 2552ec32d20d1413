"""A meta-batch of small fully connected models as one batched computation.

Gradient-based meta-learners (MAML, Meta-SGD, ANIL) adapt one copy of the parameters per task.
For a convolutional backbone each task's forward is big enough to keep the machine busy, so a
loop over the tasks costs little; for the 40-40 MLP of sine regression (Finn et al. 2017) a
task's forward is a few microseconds of arithmetic and the loop is all Python and dispatch
overhead: 25 tasks x (support forward, inner gradient, query forward) per meta-step.

Here the ``T`` tasks of a meta-batch are stacked and every ``nn.Linear`` runs as one batched
matrix product with per-task weights: parameters that the inner loop adapts are held as
[T, *shape] tensors (task t's copy in row t), parameters it does not adapt stay [*shape] and are
broadcast. The inner gradient of all tasks comes from one ``autograd.grad`` of the sum of the
per-task support losses: task t's loss depends only on row t, so row t of the gradient is task
t's own gradient. The value returned is the mean of the per-task query losses, exactly the
quantity of the per-task loop, and its gradient is the same meta-gradient (the sums run in
another order, so float32 results agree to rounding, not bit for bit).

Only models built from ``nn.Sequential`` containers, ``nn.Linear``, ``nn.Flatten`` and
parameter-free element-wise activations are stackable (:func:`stackable`); only the mean squared
error and cross-entropy losses have a per-task form here (:func:`per_task_loss`). Anything else
keeps the per-task loop.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adaptation import gradient_step

#: Parameter-free modules applied element-wise: they act on [T, N, D] exactly as on [N, D].
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus, nn.Identity)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The non-container modules of nested ``nn.Sequential`` containers, in forward order, with their
    parameter-name prefixes ("0.1." for ``model[0][1]``)."""
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out += _leaves(child, f"{prefix}{name}.")
        return out
    return [(prefix, module)]


def stackable(model: nn.Module) -> bool:
    """Whether :func:`stacked_forward` can run ``model``: nested ``nn.Sequential`` of ``nn.Linear``,
    ``nn.Flatten(1, -1)`` and :data:`ELEMENTWISE` modules only."""
    for _, leaf in _leaves(model):
        if isinstance(leaf, nn.Flatten):
            if (leaf.start_dim, leaf.end_dim) != (1, -1):
                return False
        elif isinstance(leaf, nn.Linear):
            continue
        elif not isinstance(leaf, ELEMENTWISE) or any(True for _ in leaf.parameters()):
            return False
    return True


def stacked_forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model`` applied to each task's inputs with that task's parameters.

    x: [T, N, *features] (task t's N inputs in row t). params: name -> [T, *shape] (one copy per
    task) or [*shape] (shared by every task). Returns [T, N, out_features].
    """
    for prefix, leaf in _leaves(model):
        if isinstance(leaf, nn.Flatten):
            x = x.flatten(2)
        elif isinstance(leaf, nn.Linear):
            weight = params[prefix + "weight"]                     # [T, out, in] or [out, in]
            x = torch.matmul(x, weight.transpose(-1, -2))          # [T, N, out]
            if leaf.bias is not None:
                bias = params[prefix + "bias"]                     # [T, out] or [out]
                x = x + (bias.unsqueeze(-2) if bias.dim() == 2 else bias)
        else:
            x = leaf(x)
    return x


def _mse_per_task(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[T, N, D], [T, N, D] -> [T]: ``F.mse_loss`` of each task."""
    return (predictions - targets).square().flatten(1).mean(1)


def _cross_entropy_per_task(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[T, N, C] logits, [T, N] labels -> [T]: ``F.cross_entropy`` of each task."""
    t, n = labels.shape
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(t, n).mean(1)


_PER_TASK = {F.mse_loss: _mse_per_task, F.cross_entropy: _cross_entropy_per_task}


def per_task_loss(loss: Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The per-task form of a task loss ([T, N, ...] -> [T]), or None where there is none."""
    return _PER_TASK.get(loss)


def can_stack(model: nn.Module, loss: Callable) -> bool:
    """Whether :func:`stacked_meta_loss` can run ``model`` with ``loss``."""
    return per_task_loss(loss) is not None and stackable(model)


def stack_tasks(tasks: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """support_x, support_y, query_x, query_y of every task stacked along a new dimension 0."""
    fields = ("support_x", "support_y", "query_x", "query_y")
    for name in fields:
        shapes = {tuple(getattr(t, name).shape) for t in tasks}
        if len(shapes) != 1:
            raise ValueError(f"tasks of a stacked meta-batch need equal shapes; {name} has {sorted(shapes)}")
    return tuple(torch.stack([getattr(t, name) for t in tasks]) for name in fields)


def stacked_adapt(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, inner_lr, steps: int,
                  first_order: bool, loss: Callable, only: Collection[str] | None = None) -> dict:
    """:func:`metabench.adaptation.adapt` for ``T`` tasks at once.

    x [T, S, ...], y [T, S] or [T, S, D]; params: name -> [*shape], shared by the tasks. Returns
    the adapted parameters: name -> [T, *shape] for the adapted ones (``only``, default all), the
    others as given. ``inner_lr`` is a number or a mapping name -> per-element step sizes.
    """
    per_task = per_task_loss(loss)
    names = [n for n in params if only is None or n in only]
    tasks = x.shape[0]
    params = {n: (p.expand(tasks, *p.shape) if n in names else p) for n, p in params.items()}
    for _ in range(steps):
        value = per_task(stacked_forward(model, params, x), y).sum()
        grads = torch.autograd.grad(value, [params[n] for n in names], create_graph=not first_order)
        params = gradient_step(params, names, grads, inner_lr)  # lr broadcasts against [T, *shape]
    return params


def stacked_meta_loss(model: nn.Module, params: dict, tasks: Sequence, inner_lr, inner_steps: int,
                      first_order: bool = False, loss: Callable = F.cross_entropy,
                      only: Collection[str] | None = None) -> torch.Tensor:
    """Mean over ``tasks`` of the query loss after adaptation: the value of
    :func:`metabench.adaptation.maml_meta_loss` with the same arguments, computed for all tasks at once.

    ``model`` must be :func:`stackable` and ``loss`` have a :func:`per_task_loss`; the tasks must
    have equal shapes.
    """
    if not can_stack(model, loss):
        raise ValueError("stacked_meta_loss needs a stackable model (Linear, Flatten and element-wise "
                         "layers) and a mean squared error or cross-entropy loss")
    support_x, support_y, query_x, query_y = stack_tasks(tasks)
    adapted = stacked_adapt(model, params, support_x, support_y, inner_lr, inner_steps, first_order, loss, only)
    return per_task_loss(loss)(stacked_forward(model, adapted, query_x), query_y).mean()
