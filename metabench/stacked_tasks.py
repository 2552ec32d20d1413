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

Convolutional models (``convolutions=True``; MAML's ``task_batching = "grouped"``): a plain chain
of ``nn.Conv2d``, batch-statistics ``nn.BatchNorm2d``, pooling and element-wise layers, then
``nn.Flatten`` and the fully connected layers above (:func:`groupable`; conv4 is one) runs as one
network of ``T`` groups. The tasks' images go side by side along the channels, [N, T*C, H, W]
(task t in channels t*C to (t+1)*C); each convolution is one grouped convolution with ``T`` times
the layer's groups and the tasks' weights concatenated, [T*O, I/g, kh, kw], so no task sees
another's channels; BatchNorm over T*C channels normalises each task's channels with that task's
batch statistics, as the loop does; pooling and activations act per channel. ``nn.Flatten`` turns
[N, T*C, h, w] into [T, N, C*h*w], each task's features in the order a plain ``Flatten`` gives.
The meta-gradient is the loop's up to float rounding (tests/test_maml_gradient.py checks it in
float64); on a GPU this is one launch per layer for the whole meta-batch (benchmarks/RESULTS.md,
section 6: "tasks as conv groups", 2.4-3.3x the loop's tasks/s at meta-batch 4 and 7.0-17.5x at
32, ahead of vmap in all eight configurations).
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


#: Parameter-free modules acting on each channel of [N, C, H, W] alone: they act on the grouped
#: layout [N, T*C, H, W] exactly as on each task's [N, C, H, W].
PER_CHANNEL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def groupable(model: nn.Module) -> bool:
    """Whether :func:`stacked_forward` can run ``model`` on images with grouped convolutions: nested
    ``nn.Sequential`` of at least one ``nn.Conv2d`` (zero padding), ``nn.BatchNorm2d`` normalising
    with batch statistics (no running statistics: :func:`metabench.batchnorm.batch_statistics_only`),
    :data:`PER_CHANNEL` pooling and :data:`ELEMENTWISE` layers, then ``nn.Flatten(1, -1)`` and what
    :func:`stackable` allows."""
    leaves = [leaf for _, leaf in _leaves(model)]
    flat = next((i for i, leaf in enumerate(leaves) if isinstance(leaf, nn.Flatten)), None)
    if flat is None or not any(isinstance(leaf, nn.Conv2d) for leaf in leaves[:flat]):
        return False
    for leaf in leaves[:flat]:
        if isinstance(leaf, nn.Conv2d):
            if leaf.padding_mode != "zeros":
                return False
        elif isinstance(leaf, nn.BatchNorm2d):
            if leaf.running_mean is not None:
                return False
        elif not isinstance(leaf, PER_CHANNEL + ELEMENTWISE) or any(True for _ in leaf.parameters()):
            return False
    return stackable(nn.Sequential(*leaves[flat:]))


def _per_task(param: torch.Tensor, tasks: int, dims: int) -> torch.Tensor:
    """A parameter as [T, *shape] (a shared one, of ``dims`` dimensions, repeated per task), flattened
    to [T * shape[0], *shape[1:]]."""
    if param.dim() == dims:
        param = param.expand(tasks, *param.shape)
    return param.flatten(0, 1)


def _grouped(leaf: nn.Module, prefix: str, params: Mapping[str, torch.Tensor], x: torch.Tensor,
             tasks: int) -> torch.Tensor:
    """One layer of a :func:`groupable` model on the grouped layout x [N, T*C, H, W]."""
    if isinstance(leaf, nn.Conv2d):
        weight = _per_task(params[prefix + "weight"], tasks, 4)           # [T*O, I/g, kh, kw]
        bias = _per_task(params[prefix + "bias"], tasks, 1) if leaf.bias is not None else None  # [T*O]
        return F.conv2d(x, weight, bias, leaf.stride, leaf.padding, leaf.dilation, leaf.groups * tasks)
    if isinstance(leaf, nn.BatchNorm2d):
        weight = _per_task(params[prefix + "weight"], tasks, 1) if leaf.affine else None  # [T*C]
        bias = _per_task(params[prefix + "bias"], tasks, 1) if leaf.affine else None
        return F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=leaf.eps)
    return leaf(x)


def stacked_forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model`` applied to each task's inputs with that task's parameters.

    x: [T, N, *features] (task t's N inputs in row t). params: name -> [T, *shape] (one copy per
    task) or [*shape] (shared by every task). Returns [T, N, out_features]. A :func:`groupable`
    model's images (x [T, N, C, H, W]) run side by side as [N, T*C, H, W] up to its ``nn.Flatten``.
    """
    tasks, grouped = x.shape[0], False
    for prefix, leaf in _leaves(model):
        if isinstance(leaf, (nn.Conv2d, nn.BatchNorm2d) + PER_CHANNEL) and not grouped:
            x = x.transpose(0, 1).flatten(1, 2)                    # [N, T*C, H, W]
            grouped = True
        if grouped and not isinstance(leaf, nn.Flatten):
            x = _grouped(leaf, prefix, params, x, tasks)
        elif isinstance(leaf, nn.Flatten):
            if grouped:                                            # [N, T*C, h, w] -> [T, N, C*h*w]
                x, grouped = x.reshape(x.shape[0], tasks, -1).transpose(0, 1), False
            else:
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


def can_stack(model: nn.Module, loss: Callable, convolutions: bool = False) -> bool:
    """Whether :func:`stacked_meta_loss` can run ``model`` with ``loss`` (``convolutions``: also a
    :func:`groupable` model)."""
    return per_task_loss(loss) is not None and (stackable(model) or (convolutions and groupable(model)))


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
                      only: Collection[str] | None = None, convolutions: bool = False) -> torch.Tensor:
    """Mean over ``tasks`` of the query loss after adaptation: the value of
    :func:`metabench.adaptation.maml_meta_loss` with the same arguments, computed for all tasks at once.

    ``model`` must be :func:`stackable` (with ``convolutions``: or :func:`groupable`) and ``loss``
    have a :func:`per_task_loss`; the tasks must have equal shapes.
    """
    if not can_stack(model, loss, convolutions):
        raise ValueError("stacked_meta_loss needs a stackable model (Linear, Flatten and element-wise layers; "
                         "with convolutions=True also Conv2d, batch-statistics BatchNorm2d and pooling before "
                         "the Flatten) and a mean squared error or cross-entropy loss")
    support_x, support_y, query_x, query_y = stack_tasks(tasks)
    adapted = stacked_adapt(model, params, support_x, support_y, inner_lr, inner_steps, first_order, loss, only)
    return per_task_loss(loss)(stacked_forward(model, adapted, query_x), query_y).mean()
