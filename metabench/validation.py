"""Validation during training: score fixed validation episodes every N steps, keep the best state.

ProtoNet stopped training on its validation loss (Snell et al. 2017), and Chen et al. 2019 ("A
Closer Look at Few-shot Classification") select the meta-training episode count with the best
validation accuracy; a run can do the same. Every ``every`` steps of ``phase`` (and at its last
step) the learner predicts the first ``episodes`` fixed episodes of the validation split (drawn
like the test episodes, from their own seeds: their own SHA-256), the mean metric goes on the
validation curve, and the learner's state (:meth:`metabench.Learner.state_dict`) is kept when it
is the best so far. After training the best state is put back and tested.

Scoring validation episodes must not change training: the global random states and every
module's train/eval mode are put back afterwards (``predict`` may switch a network to eval mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import rng_state, set_rng_state
from .episodes import episodes_sha256, eval_draws
from .errors import MetabenchError, PluginError
from .learner import Learner
from .numerics import evaluation_numerics
from .task import Protocol

VALIDATION_SPLIT = "val"


@dataclass(frozen=True)
class ValidationSettings:
    """every: steps between validations; episodes: how many fixed validation episodes;
    phase: the training phase whose steps are counted."""

    every: int
    episodes: int = 100
    phase: str = "meta-train"

    @classmethod
    def from_table(cls, table: dict, where: str) -> "ValidationSettings | None":
        """From a ``[validation]`` table (``every = 0`` or a missing table: off)."""
        unknown = sorted(set(table) - {"every", "episodes", "phase"})
        if unknown:
            raise MetabenchError(f"{where}: unknown validation setting(s) {', '.join(unknown)}; accepted: every, "
                                 "episodes, phase")
        every, episodes, phase = table.get("every", 0), table.get("episodes", 100), table.get("phase", "meta-train")
        for key, value in (("every", every), ("episodes", episodes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MetabenchError(f"{where}: validation {key} must be a non-negative integer, got {value!r}")
        if not isinstance(phase, str) or not phase:
            raise MetabenchError(f"{where}: validation phase must be a phase name, got {phase!r}")
        if every == 0:
            return None
        if episodes < 1:
            raise MetabenchError(f"{where}: validation episodes must be at least 1")
        return cls(every, episodes, phase)

    def as_dict(self) -> dict:
        return {"every": self.every, "episodes": self.episodes, "phase": self.phase}


def _clone(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return type(state)((k, _clone(v)) for k, v in state.items())
    return state


class Validator:
    """Scores validation episodes during training and keeps the best learner state.

    ``score(protocol, output, query_y, who) -> float`` is the harness's scoring of one episode;
    ``report(phase, step, total, metrics)``, if given, gets each validation as phase "validation",
    its mean as ``acc`` (accuracy) or ``loss`` (MSE), so ``metabench plot`` draws it on the panel of
    the training metric it compares with.
    """

    def __init__(self, settings: ValidationSettings, learner: Learner, protocol: Protocol, source, device,
                 who: str, score, report=None, precision: str = "fp32"):
        try:
            source.check_split(VALIDATION_SPLIT)
        except Exception:
            raise MetabenchError(f"task {protocol.name!r} has no {VALIDATION_SPLIT!r} split to validate on; "
                                 "turn validation off (--validate-every 0)") from None
        self.settings, self.learner, self.protocol, self.source = settings, learner, protocol, source
        self.device, self.who, self.score, self.report = device, who, score, report
        self.precision = precision  # what its predictions run in (metabench.numerics.evaluation_numerics)
        self.draws = eval_draws(protocol, source, VALIDATION_SPLIT, settings.episodes)
        self.sha256 = episodes_sha256(self.draws)
        self.curve: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.best_state: dict | None = None

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.protocol.higher_is_better else value < self.best_value

    def validate(self, step: int) -> float:
        """Score the validation episodes now; keep the state if it is the best so far."""
        modes = [(m, m.training) for v in vars(self.learner).values() if isinstance(v, nn.Module) for m in v.modules()]
        saved_rng = rng_state()
        values = []
        try:
            with evaluation_numerics(self.device, self.precision):
                for i, draw in enumerate(self.draws):
                    episode = self.source.materialize(draw, VALIDATION_SPLIT).to(self.device)
                    try:
                        with torch.no_grad():
                            output = self.learner.predict(episode.support_x, episode.support_y, episode.query_x)
                    except Exception as exc:
                        raise PluginError(f"{self.who} failed in predict (validation episode {i}): "
                                          f"{type(exc).__name__}: {exc}") from exc
                    values.append(self.score(self.protocol, output, episode.query_y, self.who, len(draw.classes)))
        finally:
            set_rng_state(saved_rng)
            for module, training in modes:
                module.training = training
        value = sum(values) / len(values)
        self.curve.append((step, value))
        if self._better(value):
            self.best_step, self.best_value = step, value
            self.best_state = _clone(self.learner.state_dict())
        return value

    def after_step(self, phase: str, step: int, total: int) -> None:
        if phase == self.settings.phase and (step % self.settings.every == 0 or step == total):
            value = self.validate(step)
            if self.report is not None:  # on the training curve's own panel: accuracy as "acc", MSE as "loss"
                key = "acc" if self.protocol.metric == "accuracy" else "loss"
                self.report("validation", step, total, {key: value})

    def restore_best(self) -> None:
        """Put the best validated state back into the learner (nothing if none was validated)."""
        if self.best_state is not None:
            self.learner.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"curve": [[s, v] for s, v in self.curve], "best_step": self.best_step, "best_value": self.best_value,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.curve = [(int(s), float(v)) for s, v in state["curve"]]
        self.best_step, self.best_value, self.best_state = state["best_step"], state["best_value"], state["best_state"]

    def record(self) -> dict:
        """What the result keeps: the settings, the episodes' SHA-256, the curve and the selection."""
        return {**self.settings.as_dict(), "split": VALIDATION_SPLIT, "episodes_sha256": self.sha256,
                "curve": [{"step": s, "value": v} for s, v in self.curve],
                "best_step": self.best_step, "best_value": self.best_value,
                "tested": "best" if self.best_state is not None else "last"}
