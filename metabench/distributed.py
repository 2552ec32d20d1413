"""One run on several processes: torch.distributed, started by torchrun.

``torchrun --nproc-per-node N -m metabench run ...`` starts N copies of the command; each finds
its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins one process group (gloo on CPU, NCCL on CUDA). Every
rank draws the same training episodes (the samplers share the run seed), so:

- the learner's parameters are broadcast from rank 0 once built (they are equal already: the same
  seed builds them; the broadcast makes that a fact rather than an assumption);
- a learner that declares ``Learner.splits_meta_batch`` gives each rank its share of every
  meta-batch (``ctx.shard(tasks)``: tasks ``rank, rank + N, ...``); the harness all-reduces the
  gradients (their mean over ranks) before the optimiser steps, through ``ctx.gradient_hook``,
  and averages the reported loss. With equal shares the mean of the ranks' mean losses is the
  mean over the whole meta-batch, so a 2-process run computes the 1-process run's steps up to
  float rounding. Not DistributedDataParallel: DDP does not synchronise gradients through
  second-order graphs (PyTorch issues 47562 and 63929);
- evaluation episodes are shared out by index (episode ``i`` on rank ``i mod N``) and gathered
  in episode order;
- rank 0 alone writes checkpoints, the learner file and the result, which records the world size
  and backend (``distributed``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import MetabenchError


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes (size 1: no process group)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def record(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}


SINGLE = World()


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MetabenchError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: expected a positive integer "
                             "(set by torchrun)") from None


def init_world(device: str) -> World:
    """Join torchrun's process group (gloo for cpu, nccl for cuda); the single-process World when
    not launched by torchrun."""
    size = launched_world_size()
    if size <= 1:
        return SINGLE
    import torch.distributed as dist

    # METABENCH_DIST_BACKEND=gloo: several processes on one GPU (NCCL wants one GPU per process)
    backend = os.environ.get("METABENCH_DIST_BACKEND") or ("nccl" if device.startswith("cuda") else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), backend, local_rank)


def shutdown(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(items, world: World, what: str = "tasks"):
    """This rank's share of ``items`` (a sequence, or a tensor's rows): every ``world.size``-th item
    from ``world.rank``. The count must divide evenly, so that every rank's mean has the same weight."""
    if not isinstance(items, torch.Tensor):
        items = list(items)
    if not world.active:
        return items
    if len(items) % world.size:
        raise MetabenchError(f"{len(items)} {what} per step cannot be split evenly across {world.size} processes; "
                             f"use a multiple of {world.size}")
    return items[world.rank::world.size]


def unshard(local: Sequence, world: World) -> list:
    """The inverse of :func:`shard`: every rank's share put back in the original order (all ranks
    get the whole list)."""
    local = list(local)
    if not world.active:
        return local
    import torch.distributed as dist

    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, local)
    whole: list[Any] = [None] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        whole[rank::world.size] = part
    return whole


def broadcast_state(state: Any, world: World) -> None:
    """Overwrite every tensor of a (nested) state dict with rank 0's, in place."""
    if not world.active:
        return
    import torch.distributed as dist

    def walk(x):
        if isinstance(x, torch.Tensor):
            dist.broadcast(x.data, src=0)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(state)


def average_gradients(world: World):
    """A ``gradient_hook`` that replaces every gradient by its mean over the ranks (one flat
    all-reduce per step)."""
    import torch.distributed as dist

    def hook(parameters: list[torch.Tensor]) -> None:
        grads = [p.grad for p in parameters]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world.size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    return hook


def average_value(value: float, world: World, device) -> float:
    """The mean of a number over the ranks."""
    if not world.active:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.size


def gather_by_index(values: dict[int, Any], world: World) -> dict[int, Any]:
    """Every rank's ``{episode index: value}`` merged (all ranks get the whole dict)."""
    if not world.active:
        return values
    import torch.distributed as dist

    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, values)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


class RunningStatsReplay:
    """BatchNorm running statistics of a meta-batch shared out across processes, made equal to a
    one-process run's.

    A BatchNorm layer in training mode moves its running mean and variance once per forward, in
    order. When each process runs its share of a step's episodes, each moves its own copy with its
    own episodes only. This records every forward's batch statistics, and :meth:`sync` gathers them
    in meta-batch order and replays the updates from the step's starting values on every process
    (PyTorch's rule: ``r = (1 - m) r + m * batch``, unbiased variance; ``m = 1 / n`` with momentum
    None). It assumes one forward per layer per item of :meth:`TrainContext.shard`'s share (one
    episode, one forward of the network), which :meth:`sync` checks.
    """

    def __init__(self, modules, world: World):
        from torch.nn.modules.batchnorm import _BatchNorm

        self.world = world
        self.layers = [m for module in modules for m in module.modules()
                       if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
        self.start: dict[int, tuple] = {}
        self.records: dict[int, list] = {id(m): [] for m in self.layers}
        self.handles = [m.register_forward_pre_hook(self._before) for m in self.layers]
        self.handles += [m.register_forward_hook(self._after) for m in self.layers]

    def _before(self, module, inputs) -> None:
        if module.training and id(module) not in self.start:
            self.start[id(module)] = (module.running_mean.clone(), module.running_var.clone(),
                                      module.num_batches_tracked.clone())

    def _after(self, module, inputs, output) -> None:
        if not module.training:
            return
        with torch.no_grad():
            x = inputs[0].detach()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            self.records[id(module)].append((flat.mean(1), flat.var(1, unbiased=True)))

    def sync(self, items: int) -> None:
        """After the forwards of this process's ``items`` items: every layer's running statistics
        as one process running all items in order would have left them."""
        for layer in self.layers:
            local = self.records[id(layer)]
            if not local:
                continue
            if len(local) != items:
                raise MetabenchError(f"a BatchNorm layer ran {len(local)} forwards for {items} items in one step; "
                                     "its running statistics cannot be shared out across processes")
            ordered = unshard([(m.cpu(), v.cpu()) for m, v in local], self.world)
            mean, var, count = self.start[id(layer)]
            with torch.no_grad():
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(count)
                for batch_mean, batch_var in ordered:
                    layer.num_batches_tracked += 1
                    m = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
                    layer.running_mean.mul_(1 - m).add_(batch_mean.to(layer.running_mean), alpha=m)
                    layer.running_var.mul_(1 - m).add_(batch_var.to(layer.running_var), alpha=m)
            local.clear()
        self.start.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
