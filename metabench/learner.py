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
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from .backbone import Backbone
from .episodes import TrainSampler
from .task import ClassImageSource, DataSource, Protocol

BUDGETS = ("smoke", "quick", "paper")


@dataclass
class TrainContext:
    """What a learner gets for meta-training.

    sampler:  seeded training episodes (``sampler.sample(ways=, shots=, queries=)``), on ``device``
    source:   the task's data source (``source.pooled("train")`` for pre-training on pooled classes)
    device:   where to compute
    generator: a ``torch.Generator`` seeded from the run seed, for any other randomness
    progress: ``progress(step, total, **metrics)``; call it as training advances
    """

    protocol: Protocol
    sampler: TrainSampler
    source: DataSource
    device: torch.device
    generator: torch.Generator
    progress: Callable[..., None]

    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All training images (uint8 [N, C, H, W]) and their class labels (int64 [N])."""
        if not isinstance(self.source, ClassImageSource):
            raise TypeError(f"{self.protocol.name} has no pooled training classes")
        return self.source.pooled(self.sampler.split)


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
    #: Hyper-parameters: a dataclass whose every field has a default.
    Config: ClassVar[type]
    #: Budget name -> overrides of Config fields; must define smoke, quick and paper.
    budgets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: The paper, for ``metabench list``.
    reference: ClassVar[str] = ""
    #: TOML file of the paper's hyper-parameters per protocol, applied by ``--budget paper``:
    #: a table per protocol name (``["omniglot-5w1s"]``) of Config overrides, and optionally a
    #: ``backbone`` table inside it. Protocols without a table run the ``paper`` budget alone.
    paper_config: ClassVar[Any] = None

    def __init__(self, config: Any, backbone: Backbone, protocol: Protocol, device: torch.device):
        """Subclasses check their settings here and raise ``ValueError`` naming the setting, what it
        was and what is accepted: the CLI reports it as bad input (one line, exit status 2). Any
        other exception is reported as the plugin failing (exit status 1)."""
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

    @abc.abstractmethod
    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Adapt to the support set and predict the queries.

        support_x: [ways*shots, C, H, W], support_y: [ways*shots] int64, query_x: [Q, C, H, W].
        Returns logits [Q, ways] (classification) or predictions [Q, out_dim] (regression).
        Runs under ``torch.no_grad()``; use ``torch.enable_grad()`` for gradient-based adaptation.
        """
