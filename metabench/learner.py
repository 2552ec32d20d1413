"""The learner interface every algorithm plugin implements.

A learner (1) meta-trains on training episodes (it may also pre-train on the pooled training
classes), then (2) for each test episode adapts to the support set and predicts the query set.
The harness draws the episodes, keeps the query labels, and scores the predictions, so every
learner is evaluated on the same episodes with the same metric.

Hyper-parameters live in a dataclass ``Config`` with defaults. ``budgets`` maps each budget
(``smoke``, ``quick``, ``paper``) to overrides of that config; a TOML file and ``--set
key=value`` override on top.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from . import faults
from .backbone import Backbone
from .distributed import SINGLE, World, average_value, shard, unshard
from .episodes import TrainSampler
from .settings import check_settings
from .task import ClassImageSource, DataSource, Protocol



class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient during training; the message names the phase and step."""


#: What the harness does between a learner's ``backward()`` and its optimiser's ``step()``:
#: ``gradient_hook(parameters)`` with the parameters that have gradients (a no-op in one process).
GradientHook = Callable[[list[torch.Tensor]], None]


def _no_gradient_hook(parameters: list[torch.Tensor]) -> None:
    pass


class StepHooks:
    """What the harness does at the training-step boundaries of :class:`TrainContext` (checkpoints,
    resume, validation, interrupts: :class:`metabench.resume.TrainingState`). This base does nothing:
    a learner driven by a bare ``TrainContext`` (tests, notebooks) just trains."""

    def on_track(self, name: str, obj: Any) -> None:
        """``obj`` was tracked as ``name`` (a resumed run loads its saved state into it here)."""

    def on_phase_start(self, phase: str) -> None:
        """The loop of ``phase`` is about to run its first remaining step."""

    def on_step_done(self, phase: str, step: int, total: int) -> None:
        """Step ``step`` of ``phase`` finished: the learner's loop body for it has run."""

    def on_phase_end(self, phase: str, total: int) -> None:
        """Every step of ``phase`` has run."""


@dataclass
class TrainContext:
    """What a learner gets for meta-training, and the harness's hold on its training steps.

    sampler:   seeded training episodes (``sampler.sample(ways=, shots=, queries=)``), on ``device``
    source:    the task's data source (``source.pooled("train")`` for pre-training on pooled classes)
    device:    where to compute
    generator: a ``torch.Generator`` seeded from the run seed, for any other randomness
    report:    ``report(phase, step, total, metrics)``: where progress goes (the harness's)

    The training-step contract (what lets the harness checkpoint, resume, stop at a NaN and
    synchronise gradients across processes)::

        opt = ctx.track("optimizer", torch.optim.Adam(params, lr=...))   # every stateful object
        for step in ctx.steps("meta-train", total):                       # the steps still to run
            opt.zero_grad()
            loss = ...; loss.backward()
            ctx.step(opt, loss, acc=...)                                  # check, sync, step, report

    ``ctx.track`` is where a resumed run puts the saved state back into the object, and the first
    remaining step of the phase a checkpoint was taken in is where the random states (torch,
    Python, NumPy, ``ctx.generator``) and the sampler's position are put back. So: track every
    stateful object before the loop that uses it, do not change it between ``track`` and the loop,
    keep everything the loop body changes in tracked objects (plain attributes:
    :class:`metabench.AttributeState`), and give each loop its own phase name.

    A learner that keeps its own loop and calls ``ctx.progress(step, total, **metrics)`` still
    runs; its result records ``resumable: false``.
    """

    protocol: Protocol
    sampler: TrainSampler
    source: DataSource
    device: torch.device
    generator: torch.Generator
    report: Callable[[str, int, int, dict], None]
    gradient_hook: GradientHook = _no_gradient_hook
    tracked: dict[str, Any] = field(default_factory=dict)
    #: Steps already done per phase (a resumed run starts after them).
    done: dict[str, int] = field(default_factory=dict)
    phase: str | None = None
    total: int = 0
    current: int = 0
    harness_steps: bool = False  # the learner used :meth:`steps`
    hooks: StepHooks = field(default_factory=StepHooks)
    #: this process's place in a torchrun run (metabench.distributed); one process by default
    world: World = SINGLE

    def shard(self, items: Sequence, what: str = "tasks") -> list:
        """This process's share of a meta-batch (all of it in a one-process run): every N-th item of
        ``items`` from this rank, N the number of processes. Every rank draws the same meta-batch;
        the harness averages the gradients over ranks before the optimiser steps. The count must be
        a multiple of N (else the run is refused with one line)."""
        return shard(items, self.world, what)

    def unshard(self, local: Sequence) -> list:
        """Every rank's per-item results of :meth:`shard`'s share, in the meta-batch's order (a
        learner whose next step depends on all tasks' outcomes, e.g. MTL's hard tasks)."""
        return unshard(local, self.world)

    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All training images (uint8 [N, C, H, W]) and their class labels (int64 [N])."""
        if not isinstance(self.source, ClassImageSource):
            raise TypeError(f"{self.protocol.name} has no pooled training classes")
        return self.source.pooled(self.sampler.split)

    def track(self, name: str, obj: Any) -> Any:
        """Register a stateful object (module, optimiser, scheduler, tensor) under ``name``; returns it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"ctx.track: name must be a non-empty string, got {name!r}")
        if name in self.tracked and self.tracked[name] is not obj:
            raise ValueError(f"ctx.track: {name!r} is already tracked")
        self.tracked[name] = obj
        self.hooks.on_track(name, obj)
        return obj

    def steps(self, phase: str, total: int) -> Iterator[int]:
        """The 1-based steps of ``phase`` still to run, out of ``total``."""
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise ValueError(f"ctx.steps: total must be a non-negative integer, got {total!r}")
        self.harness_steps = True
        self.phase, self.total = phase, total
        self.hooks.on_phase_start(phase)
        for step in range(self.done.get(phase, 0) + 1, total + 1):
            self.current = step
            yield step
            self.done[phase] = step
            self.hooks.on_step_done(phase, step, total)
        self.done.setdefault(phase, total)
        self.hooks.on_phase_end(phase, total)

    def step(self, optimizer: torch.optim.Optimizer | None, loss: torch.Tensor | float, *, scheduler=None,
             parameters: list[torch.Tensor] | None = None, **metrics: float) -> float:
        """Finish a training step whose gradients are in ``.grad``: check that the loss and the
        gradients are finite, call the gradient hook, step ``optimizer`` (and ``scheduler``), and
        report progress with ``loss`` and ``metrics``. ``optimizer=None``: the learner updates its
        parameters itself (Reptile); ``parameters`` then names the ones to check. Returns the loss
        as a float."""
        value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
        value = faults.loss_value(f"{self.phase}:{self.current}", value)
        if parameters is None:
            parameters = [] if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
        grads = [p for p in parameters if p.grad is not None]
        if self.world.active:  # every rank sees the same loss and gradients
            value = average_value(value, self.world, self.device)
        self.gradient_hook(grads)  # before the checks: a NaN on one rank reaches all, and all stop
        where = f"{self.phase or 'training'} step {self.current}"
        if not math.isfinite(value):
            raise TrainingDiverged(f"the training loss is {value} at {where}")
        if grads and not bool(torch.stack([torch.isfinite(p.grad).all() for p in grads]).all()):
            raise TrainingDiverged(f"a gradient is not finite at {where}")
        faults.kill_point(f"{self.phase}:{self.current}")
        if optimizer is not None:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.report(self.phase or "meta-train", self.current, self.total, {"loss": value, **metrics})
        return value

    def progress(self, step: int, total: int, **metrics: float) -> None:
        """Report progress from a learner's own loop (not resumable: see the class docstring)."""
        self.report(self.phase or "meta-train", step, total, metrics)


class Learner(abc.ABC):
    """Base class of every few-shot learner.

    Subclasses set the class attributes and implement :meth:`meta_train` and :meth:`predict`.
    """

    #: Problem types it can run: a subset of {"classification", "regression"}.
    problem_types: ClassVar[frozenset[str]] = frozenset({"classification"})
    #: True if predictions for one query depend on the other queries of the episode.
    transductive: ClassVar[bool] = False
    #: Registered backbone used when the run names none.
    default_backbone: ClassVar[str] = "conv4"
    #: Hyper-parameters: a dataclass whose every field has a default. Declare what a field accepts
    #: with :func:`metabench.setting` (bounds, choices); its annotation gives its type.
    Config: ClassVar[type]
    #: How messages about its settings name the learner; "" = the class name in lower case.
    name: ClassVar[str] = ""
    #: Budget name -> overrides of Config fields; must define smoke, quick and paper.
    budgets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: The paper, for ``metabench list``.
    reference: ClassVar[str] = ""
    #: TOML file of the paper's hyper-parameters per protocol, applied by ``--budget paper``:
    #: a table per protocol name (``["omniglot-5w1s"]``) of Config overrides, and optionally a
    #: ``backbone`` table inside it. Protocols without a table run the ``paper`` budget alone.
    paper_config: ClassVar[Any] = None
    #: True if a trained learner can be tested on episodes with another number of ways than it
    #: was trained on (metric learners, fine-tuned heads); ``metabench eval`` refuses it otherwise.
    any_ways: ClassVar[bool] = False
    #: True if its training steps take ``ctx.shard(meta_batch)`` and leave the optimiser step to
    #: ``ctx.step`` (so gradients can be averaged over processes): ``torchrun`` may run it on
    #: several processes. Others are refused there with one line.
    splits_meta_batch: ClassVar[bool] = False
    #: True if it takes episodes whose way count and shots per class vary (Meta-Dataset's sampler:
    #: ``predict`` reads the way count from ``support_y``); tasks drawing such episodes refuse others.
    variable_episodes: ClassVar[bool] = False
    #: The training precisions it allows (``--precision``; metabench/numerics.py): "fp32" always;
    #: "bf16" if its training forward and backward may run under ``torch.autocast(dtype=bfloat16)``
    #: (parameters, optimiser state and gradients stay float32). Others are refused with one line.
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    #: True if its evaluation runs in the run's precision too; by default it runs in float32.
    evaluates_in_precision: ClassVar[bool] = False

    @classmethod
    def refuses_precision(cls, precision: str, config: Any) -> str | None:
        """Why it cannot train in ``precision`` with ``config`` (the harness refuses the run with
        this reason and the precisions it does accept), or None if it can. Default: it can in
        :attr:`precisions`. A learner whose settings decide (second-order MAML stays float32)
        overrides this."""
        if precision == "fp32" or precision in cls.precisions:
            return None
        return f"it does not declare {precision} in its precisions"

    def __init__(self, config: Any, backbone: Backbone, protocol: Protocol, device: torch.device):
        """Checks a dataclass ``config`` against its fields' declarations (:func:`metabench.check_settings`:
        types, and the bounds and choices of :func:`metabench.setting`). Subclasses check here what
        the declarations cannot say (rules between settings, values resolved from the protocol or
        the backbone) and raise ``ValueError`` naming the setting, what it was and what is accepted:
        the CLI reports it as bad input (one line, exit status 2). Any other exception is reported
        as the plugin failing (exit status 1)."""
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            check_settings(self.name or type(self).__name__.lower(), config)
        self.config = config
        self.backbone = backbone
        self.protocol = protocol
        self.device = device

    @abc.abstractmethod
    def meta_train(self, ctx: TrainContext) -> None:
        """Meta-train (and optionally pre-train) for the budget set in ``self.config``."""

    def predict_after_steps(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                            steps: Sequence[int]) -> dict[int, torch.Tensor] | None:
        """Predictions after each of ``steps`` test-time adaptation steps, for learners that adapt
        by gradient steps (MAML, Reptile, ...): ``{k: predictions after k steps}``, each shaped as
        :meth:`predict`'s output. The harness records the metric after each (regression tasks:
        ``per_step`` in the result, the curve of Finn et al. 2017, Figure 3). None (the default):
        the learner has no step count to vary.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """The trained state :meth:`predict` needs, by attribute name: every ``nn.Module`` (its
        ``state_dict()``) and tensor attribute of the learner, a module held under two names once.
        What a saved learner file keeps, and what validation keeps of the best state. A learner
        whose test-time state lives elsewhere overrides this and :meth:`load_state_dict`; whatever
        ``predict`` needs must exist once ``__init__`` has run, so that a fresh learner can take it."""
        state, seen = {}, set()
        for name, value in vars(self).items():
            if isinstance(value, (nn.Module, torch.Tensor)) and id(value) not in seen:
                seen.add(id(value))
                state[name] = value.state_dict() if isinstance(value, nn.Module) else value.detach()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a :meth:`state_dict`; ``ValueError`` naming what does not fit."""
        own = self.state_dict()
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"the saved state does not fit this learner (missing: {', '.join(missing) or '-'}; "
                             f"unexpected: {', '.join(extra) or '-'})")
        for name, value in state.items():
            target = getattr(self, name)
            if isinstance(target, nn.Module):
                target.load_state_dict(value)
            else:
                if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                    raise ValueError(f"the saved {name!r} does not fit this learner's shape {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(value)

    def predict_batch(self, episodes: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Optional: :meth:`predict` of several test episodes in one call, e.g. all their images in one
        backbone forward (on a GPU one episode per forward is launch-bound).

        episodes: ``(support_x, support_y, query_x)`` of each episode, as :meth:`predict` takes them.
        Returns one output per episode, in order, each what :meth:`predict` returns for that episode
        (the same function: equal up to float rounding, so that its predictions are the same).

        The harness groups ``--eval-batch`` consecutive test episodes (default 1 on a CPU, 16 on CUDA)
        and calls this only for a learner that overrides it; other learners get one episode per
        :meth:`predict` call. Runs under ``torch.no_grad()``, like :meth:`predict`.
        """
        return [self.predict(*episode) for episode in episodes]

    @abc.abstractmethod
    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Adapt to the support set and predict the queries.

        support_x: [ways*shots, C, H, W], support_y: [ways*shots] int64, query_x: [Q, C, H, W].
        Returns logits [Q, ways] (classification) or predictions [Q, out_dim] (regression).
        Runs under ``torch.no_grad()``; use ``torch.enable_grad()`` for gradient-based adaptation.
        """
