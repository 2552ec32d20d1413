"""Scoring a learner on fixed episodes: the loop ``metabench run`` and ``metabench eval`` share.

The harness materializes each episode, keeps its query labels, calls ``predict`` (or, for a learner
that implements it, ``predict_batch`` on ``--eval-batch`` consecutive episodes), and scores each
output (accuracy, or mean squared error for regression). It can start after the episodes an
interrupted evaluation already scored, and it hands every scored episode to a callback (which
keeps the progress on disk and stops the loop on Ctrl-C).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import faults
from .errors import PluginError
from .learner import Learner
from .results import PER_STEP_COUNTS
from .task import Episode, EpisodeDraw, Protocol


def score(protocol: Protocol, output: torch.Tensor, query_y: torch.Tensor, who: str, ways: int | None = None) -> float:
    """Accuracy (classification) or mean squared error (regression) of one episode's predictions.
    ``ways``: the episode's way count where it varies (default the protocol's)."""
    q = query_y.shape[0]
    if protocol.problem == "classification":
        expected = (q, ways or protocol.ways)
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise PluginError(f"{who}: predict returned {got}; expected logits of shape {expected}")
        return (output.argmax(dim=1) == query_y).float().mean().item()
    if not isinstance(output, torch.Tensor) or output.shape != query_y.shape:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise PluginError(f"{who}: predict returned {got}; expected predictions of shape {tuple(query_y.shape)}")
    return torch.mean((output.double() - query_y.double()) ** 2).item()


def metric_after_steps(learner: Learner, protocol: Protocol, episode: Episode, who: str, index: int,
                       ways: int | None = None) -> dict | None:
    """The metric of one episode after each of :data:`~metabench.results.PER_STEP_COUNTS` test-time
    steps (``{k: value}``, a non-finite value as None), for a learner that adapts by steps; None
    when the learner has no step count to vary."""
    try:
        with torch.no_grad():
            outputs = learner.predict_after_steps(episode.support_x, episode.support_y, episode.query_x,
                                                  PER_STEP_COUNTS)
    except Exception as exc:
        raise PluginError(f"{who} failed in predict_after_steps (episode {index}): {type(exc).__name__}: {exc}") from exc
    if outputs is None:
        return None
    if not isinstance(outputs, dict) or set(outputs) != set(PER_STEP_COUNTS):
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise PluginError(f"{who}: predict_after_steps returned {got}; expected a dict with keys "
                          f"{list(PER_STEP_COUNTS)}")
    values = {k: score(protocol, outputs[k], episode.query_y, who, ways) for k in PER_STEP_COUNTS}
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


class Scores:
    """The per-episode metric so far, and (regression) the metric after 1, 5 and 10 test steps
    until the learner says it has no step count (``per_step`` None from then on)."""

    def __init__(self, problem: str, per_episode: list[float] | None = None, per_step: dict | None = None,
                 started: bool = False):
        self.per_episode = list(per_episode or [])
        if started:  # continuing: keep what was recorded, None included
            self.per_step = None if per_step is None else {int(k): list(v) for k, v in per_step.items()}
        else:
            self.per_step = {k: [] for k in PER_STEP_COUNTS} if problem == "regression" else None

    def record(self) -> dict:
        return {"per_episode": list(self.per_episode),
                "per_step": None if self.per_step is None else {str(k): list(v) for k, v in self.per_step.items()}}


def predicts_batches(learner: Learner) -> bool:
    """Whether the learner takes several test episodes per call (it overrides ``predict_batch``)."""
    return type(learner).predict_batch is not Learner.predict_batch


def score_episodes(learner: Learner, protocol: Protocol, source, split: str, draws: Sequence[EpisodeDraw],
                   indices: Sequence[int], who: str, device: torch.device,
                   transform: Callable[[Episode], Episode] | None, with_steps: bool) -> list[tuple[float, dict | None]]:
    """Test episodes ``indices`` (their ``draws``): materialize them, predict (one episode: ``predict``;
    several: one ``predict_batch`` call), score each. Per episode ``(value, after)``: its metric, and
    with ``with_steps`` its metric after 1, 5 and 10 test-time steps (None: the learner has no step count)."""
    episodes = []
    for draw in draws:
        episode = source.materialize(draw, split).to(device)
        episodes.append(transform(episode) if transform is not None else episode)
    if len(episodes) == 1:
        (episode,), (index,) = episodes, indices
        try:
            with torch.no_grad():
                outputs = [learner.predict(episode.support_x, episode.support_y, episode.query_x)]
        except Exception as exc:
            raise PluginError(f"{who} failed in predict (episode {index}): {type(exc).__name__}: {exc}") from exc
    else:
        where = f"episodes {indices[0]} to {indices[-1]}"
        try:
            with torch.no_grad():
                outputs = learner.predict_batch([(e.support_x, e.support_y, e.query_x) for e in episodes])
        except Exception as exc:
            raise PluginError(f"{who} failed in predict_batch ({where}): {type(exc).__name__}: {exc}") from exc
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(episodes):
            got = f"{len(outputs)} outputs" if isinstance(outputs, (list, tuple)) else type(outputs).__name__
            raise PluginError(f"{who}: predict_batch returned {got} for {len(episodes)} episodes ({where}); "
                              "expected a list of one output per episode")
    scored = []
    for episode, draw, index, output in zip(episodes, draws, indices, outputs):
        ways = len(draw.classes)
        value = score(protocol, output, episode.query_y, who, ways)
        after = metric_after_steps(learner, protocol, episode, who, index, ways) if with_steps else None
        scored.append((value, after))
    return scored


def _groups(indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` in consecutive groups of ``size`` (the last one may be shorter)."""
    indices = list(indices)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _record(scores: Scores, value: float, after: dict | None) -> None:
    scores.per_episode.append(value)
    if scores.per_step is not None:
        if after is None:
            scores.per_step = None
        else:
            for k, v in after.items():
                scores.per_step[k].append(v)


def evaluate(learner: Learner, protocol: Protocol, source, split: str, draws: Sequence[EpisodeDraw], who: str,
             progress, device: torch.device, scores: Scores,
             transform: Callable[[Episode], Episode] | None = None,
             after_episode: Callable[[int, Scores], None] | None = None, world=None, batch: int = 1,
             precision: str = "fp32") -> Scores:
    """Score ``draws[len(scores.per_episode):]`` (the episodes not scored yet) into ``scores``.

    transform: applied to each episode before ``predict`` (``metabench eval`` resizes images).
    after_episode(i, scores): called once episode ``i`` is recorded.
    world: a torchrun run (metabench.distributed.World) shares the episodes out by index (episode
    ``i`` on rank ``i mod N``) and gathers them in episode order (``after_episode`` is then not called).
    batch: consecutive episodes (of this process's share) given to the learner in one
    ``predict_batch`` call, where it implements one (:func:`predicts_batches`); each episode is still
    recorded, and reported to ``after_episode``, one by one.
    precision: what the predictions run in (metabench.numerics.evaluation_numerics: float32 by
    default; on CUDA deterministic cuDNN and no TF32).
    """
    from .numerics import evaluation_numerics

    size = batch if predicts_batches(learner) else 1
    with_steps = scores.per_step is not None
    start = len(scores.per_episode)
    with evaluation_numerics(device, precision):
        if world is not None and world.active:
            from .distributed import gather_by_index

            mine = [i for i in range(start, len(draws)) if i % world.size == world.rank]
            progress.start("evaluate", len(mine))
            local, n = {}, 0
            for group in _groups(mine, size):
                for i, scored in zip(group, score_episodes(learner, protocol, source, split, [draws[i] for i in group],
                                                           group, who, device, transform, with_steps)):
                    local[i] = scored
                    n += 1
                    progress.update("evaluate", n)
            merged = gather_by_index(local, world)
            for i in range(start, len(draws)):
                _record(scores, *merged[i])
            return scores
        progress.start("evaluate", len(draws))
        for group in _groups(range(start, len(draws)), size):
            scored = score_episodes(learner, protocol, source, split, [draws[i] for i in group], group, who, device,
                                    transform, with_steps)
            for i, (value, after) in zip(group, scored):
                faults.kill_point(f"evaluate:{i}")
                _record(scores, value, after)
                progress.update("evaluate", i + 1, mean=sum(scores.per_episode) / len(scores.per_episode))
                if after_episode is not None:
                    after_episode(i, scores)
    return scores
