"""Episodic training with Adam: the loop shared by metric learners (ProtoNet, Matching and
Relation Networks) and open to any plugin whose training is "one optimiser step per episode".
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .learner import TrainContext
from .task import Episode

#: ``episode_loss(episode) -> (loss, scores)``: a scalar loss to minimise and the query scores
#: [Q, ways] whose argmax is the predicted class (used for the progress accuracy only).
EpisodeLoss = Callable[[Episode], "tuple[torch.Tensor, torch.Tensor]"]


def train_on_episodes(ctx: TrainContext, parameters: Iterable[torch.nn.Parameter], episode_loss: EpisodeLoss, *,
                      steps: int, lr: float, ways: int, shots: int, queries: int, lr_step: int = 0,
                      lr_gamma: float = 0.5, weight_decay: float = 0.0) -> None:
    """Minimise ``episode_loss`` over ``steps`` training episodes, one Adam step each.

    Episode ``t`` is ``ctx.sampler.sample(ways=ways, shots=shots, queries=queries)``; the learning
    rate is multiplied by ``lr_gamma`` every ``lr_step`` episodes (0 = constant). The caller puts
    its modules in training mode first. Progress is reported after every step with the episode's
    loss and query accuracy. The optimiser (and scheduler) are tracked by ``ctx``; the caller
    tracks its own modules.
    """
    opt = ctx.track("optimizer", torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay))
    sched = ctx.track("scheduler", torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=lr_gamma)) \
        if lr_step else None
    for _ in ctx.steps("meta-train", steps):
        episode = ctx.sampler.sample(ways=ways, shots=shots, queries=queries)
        loss, scores = episode_loss(episode)
        optimizer_step(ctx, opt, loss, scores, episode.query_y, sched)


def optimizer_step(ctx: TrainContext, opt: torch.optim.Optimizer, loss: torch.Tensor, scores: torch.Tensor,
                   labels: torch.Tensor, scheduler=None) -> float:
    """One training step of a supervised loop: backward ``loss``, then ``ctx.step`` (finite checks,
    the gradient hook, ``opt`` and ``scheduler`` steps, progress with ``loss`` and ``acc``, the share
    of rows of ``scores`` [B, classes] whose argmax equals ``labels`` [B]). Returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        acc = (scores.argmax(1) == labels).float().mean().item()
    return ctx.step(opt, loss, scheduler=scheduler, acc=acc)
