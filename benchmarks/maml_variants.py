"""The MAML meta-training step of metabench, its peers and the speed attempts, behind one interface.

Every variant owns a copy of one template model (conv4 + linear head, batch-statistics
BatchNorm) and an Adam optimiser, and offers

* ``meta_grads()``: the second-order meta-gradient of the mean query loss over the meta-batch
  (a list in ``named_parameters`` order), for the agreement check;
* ``step()``: one meta-training step (meta-gradient + Adam update), for timing.

Tasks are episodes (support_x [S, C, H, W], support_y [S], query_x [Q, C, H, W], query_y [Q]).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from metabench_plugins.learners import maml as mb_maml
from metabench_plugins.learners.checkpointed_inner_loop import maml_meta_backward
from metabench_plugins.learners.maml_vmap import maml_meta_loss_vmap


class Variant:
    name = "?"
    #: parameters whose meta-gradient this variant does not compute (reported, not compared)
    skipped_params: tuple[str, ...] = ()

    def __init__(self, template: nn.Module, tasks, inner_lr: float, steps: int, channels_last: bool = False):
        self.model = copy.deepcopy(template)
        self.tasks, self.inner_lr, self.steps = tasks, inner_lr, steps
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.tasks = [type(t)(t.support_x.contiguous(memory_format=torch.channels_last), t.support_y,
                                  t.query_x.contiguous(memory_format=torch.channels_last), t.query_y) for t in tasks]
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def backward(self) -> None:  # accumulate the meta-gradient into .grad
        raise NotImplementedError

    def meta_grads(self) -> list[torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        self.backward()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in self.model.parameters()]

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.backward()
        self.opt.step()


class MetabenchLoop(Variant):
    """metabench's ``maml_meta_loss`` (functional_call + autograd.grad, one backward at the end)."""

    name = "metabench loop"

    def backward(self):
        params = dict(self.model.named_parameters())
        mb_maml.maml_meta_loss(self.model, params, self.tasks, self.inner_lr, self.steps).backward()


class MetabenchChannelsLast(MetabenchLoop):
    name = "metabench loop, channels_last"

    def __init__(self, *a, **k):
        super().__init__(*a, channels_last=True, **k)


class MetabenchNoMkldnn(MetabenchLoop):
    """Attempt: convolutions through ATen's own CPU kernels (im2col + BLAS) instead of oneDNN."""

    name = "attempt: loop with oneDNN (mkldnn) convolutions off"

    def backward(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "TF32 acceleration on top of oneDNN ..." on every toggle
            with torch.backends.mkldnn.flags(enabled=False):
                super().backward()


class MetabenchPerTask(Variant):
    """``maml_meta_backward(checkpoint=False)``: each task's graph freed as soon as it is done."""

    name = "metabench per-task backward"

    def backward(self):
        maml_meta_backward(self.model, dict(self.model.named_parameters()), self.tasks, self.inner_lr,
                           self.steps, checkpoint=False)


class MetabenchCheckpointed(Variant):
    """``maml_meta_backward(checkpoint=True)``: per-task backward and recomputed inner steps."""

    name = "metabench checkpointed"

    def backward(self):
        maml_meta_backward(self.model, dict(self.model.named_parameters()), self.tasks, self.inner_lr,
                           self.steps, checkpoint=True)


class MetabenchGrouped(Variant):
    """``stacked_meta_loss(convolutions=True)`` (MAML's ``task_batching = "grouped"``): the tasks as
    the groups of one grouped convolution per layer."""

    name = "metabench grouped"

    def backward(self):
        from metabench.stacked_tasks import stacked_meta_loss

        params = dict(self.model.named_parameters())
        stacked_meta_loss(self.model, params, self.tasks, self.inner_lr, self.steps, convolutions=True).backward()


class MetabenchVmap(Variant):
    """``maml_meta_loss_vmap``: the meta-batch in one ``torch.func.vmap``."""

    name = "metabench vmap"

    def backward(self):
        params = dict(self.model.named_parameters())
        maml_meta_loss_vmap(self.model, params, self.tasks, self.inner_lr, self.steps).backward()


# ----------------------------------------------------------------------------- speed attempts
def conv4_blocks(model: nn.Module) -> int:
    """Number of conv blocks of a conv4 + head model (checks the structure these attempts assume)."""
    backbone, head = model[0], model[1]
    blocks = [m for m in backbone if isinstance(m, nn.Sequential)]
    for b in blocks:
        kinds = [type(m) for m in b]
        if kinds != [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]:
            raise TypeError(f"not a conv4 block: {kinds}")
    if not isinstance(head, nn.Linear):
        raise TypeError("expected a linear head")
    return len(blocks)


def pool2x2_by_maximum(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling, stride 2, floor mode, as two elementwise maxima of strided views."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    x = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(x[..., 0::2], x[..., 1::2])


def basic_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch-statistics BatchNorm of [N, C, H, W] from basic ops (one var_mean, one rsqrt, two fused
    multiply-adds) instead of ATen's native_batch_norm and its double-backward kernel."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
    scale = torch.rsqrt(var + eps) * weight[None, :, None, None]
    return torch.addcmul(bias[None, :, None, None], x - mean, scale)


def conv4_forward(p: list[torch.Tensor], x: torch.Tensor, blocks: int, bias: bool = True,
                  inplace_relu: bool = False, pool_first: bool = False, basic_bn: bool = False) -> torch.Tensor:
    """conv4 + head written with torch.nn.functional on a flat parameter list (named_parameters order).

    bias=False skips the conv bias (BatchNorm subtracts the per-channel mean right after, so the
    output and every other meta-gradient are unchanged; the bias's own meta-gradient is 0).
    pool_first: relu(maxpool(x)) (equal to maxpool(relu(x)): ReLU is monotonic) with the pooling
    done by :func:`pool2x2_by_maximum`; ReLU then runs on a quarter of the elements.
    """
    for b in range(blocks):
        w, cb, g, beta = p[4 * b: 4 * b + 4]
        x = F.conv2d(x, w, cb if bias else None, padding=1)
        if basic_bn:
            x = basic_batch_norm(x, g, beta)
        else:
            x = F.batch_norm(x, None, None, g, beta, training=True, momentum=0.0, eps=1e-5)
        if pool_first:
            x = F.relu(pool2x2_by_maximum(x))
        else:
            x = F.relu_(x) if inplace_relu else F.relu(x)
            x = F.max_pool2d(x, 2)
    return F.linear(x.flatten(1), p[-2], p[-1])


class Functional(Variant):
    """Attempt: less per-step Python overhead. Hand-written functional conv4 (no functional_call,
    no module re-parametrisation), a flat parameter list, ``torch._foreach_add`` for the update."""

    name = "attempt: functional conv4 + foreach update"
    bias, inplace_relu, pool_first, basic_bn = True, False, False, False

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.blocks = conv4_blocks(self.model)
        if not self.bias:
            self.skipped_params = tuple(f"0.{b}.0.bias" for b in range(self.blocks))

    def task_loss(self, params, t):
        fwd = conv4_forward
        for _ in range(self.steps):
            loss = F.cross_entropy(fwd(params, t.support_x, self.blocks, self.bias, self.inplace_relu, self.pool_first,
                                   self.basic_bn), t.support_y)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=not self.bias)
            if not self.bias:
                grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
            params = torch._foreach_add(params, grads, alpha=-self.inner_lr)
        return F.cross_entropy(fwd(params, t.query_x, self.blocks, self.bias, self.inplace_relu, self.pool_first,
                                   self.basic_bn), t.query_y)

    def backward(self):
        params = list(self.model.parameters())
        torch.stack([self.task_loss(params, t) for t in self.tasks]).mean().backward()


class FunctionalChannelsLast(Functional):
    name = "attempt: functional + channels_last"

    def __init__(self, *a, **k):
        super().__init__(*a, channels_last=True, **k)


class FunctionalFused(Functional):
    """Attempt: the cheapest conv-BN-ReLU autograd allows: no conv bias (folded away by BatchNorm),
    in-place ReLU (BatchNorm's backward needs its input, not its output)."""

    name = "attempt: functional, conv bias dropped, in-place ReLU"
    bias, inplace_relu = False, True


class FunctionalPoolFirst(Functional):
    """Attempt: max-pooling as two elementwise maxima (vectorised, where ATen's NCHW max_pool2d is
    not), before the ReLU. On exact ties the gradient is split instead of going to the first
    maximum; only the agreement check tells whether that matters."""

    name = "attempt: functional, pool by maximum before ReLU"
    pool_first = True


class FunctionalBasicBN(Functional):
    """Attempt: BatchNorm from basic ops (var_mean, rsqrt, addcmul) instead of native_batch_norm."""

    name = "attempt: functional, BatchNorm from basic ops"
    basic_bn = True


class GroupedTasks(Variant):
    """Attempt: the meta-batch as one network of T groups. Every parameter is repeated per task
    ([T, ...]); conv layers are grouped convolutions over [N, T*C, H, W]; BatchNorm over T*C
    channels computes per-task statistics by construction; the head is a batched matmul.
    Needs tasks of equal shapes."""

    name = "attempt: tasks as conv groups"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.blocks = conv4_blocks(self.model)
        T = len(self.tasks)
        # [N, T*C, H, W]: task t's images in channels t*C:(t+1)*C
        self.sx = torch.cat([t.support_x for t in self.tasks], dim=1)
        self.qx = torch.cat([t.query_x for t in self.tasks], dim=1)
        self.sy = torch.stack([t.support_y for t in self.tasks])  # [T, S]
        self.qy = torch.stack([t.query_y for t in self.tasks])
        self.T = T

    def forward(self, p, x):  # p: per-task parameters [T, ...]
        T = self.T
        for b in range(self.blocks):
            w, cb, g, beta = p[4 * b: 4 * b + 4]  # w [T, O, I, 3, 3], cb/g/beta [T, O]
            x = F.conv2d(x, w.flatten(0, 1), cb.flatten(), padding=1, groups=T)
            x = F.batch_norm(x, None, None, g.flatten(), beta.flatten(), training=True, momentum=0.0, eps=1e-5)
            x = F.max_pool2d(F.relu(x), 2)
        n = x.shape[0]
        feats = x.reshape(n, T, -1).transpose(0, 1)  # [T, N, D] (channel-major per task, as Flatten)
        return torch.baddbmm(p[-1][:, None, :], feats, p[-2].transpose(1, 2))  # [T, N, ways]

    def loss(self, p, x, y):  # sum over tasks of each task's mean cross-entropy
        logits = self.forward(p, x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]

    def backward(self):
        theta = list(self.model.parameters())
        p = [t.unsqueeze(0).expand(self.T, *t.shape) for t in theta]
        for _ in range(self.steps):
            grads = torch.autograd.grad(self.loss(p, self.sx, self.sy), p, create_graph=True)
            p = [a - self.inner_lr * g for a, g in zip(p, grads)]
        (self.loss(p, self.qx, self.qy) / self.T).backward()


# ----------------------------------------------------------------------------- peers
class Learn2Learn(Variant):
    """learn2learn's ``MAML`` wrapper as in its examples: clone, adapt, per-task backward of loss / T."""

    name = "learn2learn MAML"

    def __init__(self, *a, l2l=None, **k):
        super().__init__(*a, **k)
        self.maml = l2l.algorithms.MAML(self.model, lr=self.inner_lr, first_order=False)

    def backward(self):
        for t in self.tasks:
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(t.support_x), t.support_y))
            (F.cross_entropy(learner(t.query_x), t.query_y) / len(self.tasks)).backward()


class Higher(Variant):
    """higher's ``innerloop_ctx`` with an SGD inner optimiser, per-task backward of loss / T."""

    name = "higher innerloop_ctx"

    def __init__(self, *a, higher=None, **k):
        super().__init__(*a, **k)
        self.higher = higher
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=self.inner_lr)

    def backward(self):
        for t in self.tasks:
            with self.higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False,
                                           track_higher_grads=True) as (fmodel, diffopt):
                for _ in range(self.steps):
                    diffopt.step(F.cross_entropy(fmodel(t.support_x), t.support_y))
                (F.cross_entropy(fmodel(t.query_x), t.query_y) / len(self.tasks)).backward()


class TorchOpt(Variant):
    """TorchOpt's ``MetaSGD`` as in its MAML example: differentiable in-place steps on the module,
    module and optimiser state extracted before and recovered after each task; per-task backward."""

    name = "torchopt MetaSGD"

    def __init__(self, *a, torchopt=None, **k):
        super().__init__(*a, **k)
        self.torchopt = torchopt
        self.inner_opt = torchopt.MetaSGD(self.model, lr=self.inner_lr)

    def backward(self):
        to = self.torchopt
        net_state = to.extract_state_dict(self.model, by="reference", detach_buffers=True)
        opt_state = to.extract_state_dict(self.inner_opt, by="reference")
        for t in self.tasks:
            for _ in range(self.steps):
                self.inner_opt.step(F.cross_entropy(self.model(t.support_x), t.support_y))
            (F.cross_entropy(self.model(t.query_x), t.query_y) / len(self.tasks)).backward()
            to.recover_state_dict(self.model, net_state)
            to.recover_state_dict(self.inner_opt, opt_state)


OURS = [MetabenchLoop, MetabenchVmap, MetabenchGrouped, MetabenchPerTask, MetabenchCheckpointed]
ATTEMPTS = [MetabenchChannelsLast, MetabenchNoMkldnn, Functional, FunctionalChannelsLast, FunctionalFused, FunctionalPoolFirst,
            FunctionalBasicBN, GroupedTasks]
