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
                      lr_gamma: float = 0.5, weight_decay: float = 0.0, episodes_per_step: int = 1) -> None:
    """Minimise ``episode_loss`` over ``steps`` training steps, one Adam step each.

    Step ``t`` takes the next ``episodes_per_step`` episodes of
    ``ctx.sampler.sample(ways=ways, shots=shots, queries=queries)`` and minimises their mean loss
    (one episode: its loss, as the papers train); under torchrun each process computes its share
    of them (``ctx.shard``) and the harness averages the gradients. The learning rate is
    multiplied by ``lr_gamma`` every ``lr_step`` steps (0 = constant). The caller puts
    its modules in training mode first. Progress is reported after every step with the episode's
    loss and query accuracy. The optimiser (and scheduler) are tracked by ``ctx``; the caller
    tracks its own modules.
    """
    opt = ctx.track("optimizer", torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay))
    sched = ctx.track("scheduler", torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=lr_gamma)) \
        if lr_step else None
    world = ctx.world
    replay = None
    if world.active:  # BatchNorm running statistics as one process would have them
        from .distributed import RunningStatsReplay

        replay = RunningStatsReplay([m for m in ctx.tracked.values() if isinstance(m, torch.nn.Module)], world)
    try:
        _episode_steps(ctx, opt, sched, episode_loss, steps, ways, shots, queries, episodes_per_step, replay)
    finally:
        if replay is not None:
            replay.close()


def _episode_steps(ctx, opt, sched, episode_loss, steps, ways, shots, queries, episodes_per_step, replay) -> None:
    for _ in ctx.steps("meta-train", steps):
        episodes = ctx.shard([ctx.sampler.sample(ways=ways, shots=shots, queries=queries)
                              for _ in range(episodes_per_step)], "episodes")
        if len(episodes) == 1:
            loss, scores = episode_loss(episodes[0])
            labels = episodes[0].query_y
        else:
            losses, all_scores = zip(*(episode_loss(e) for e in episodes))
            loss, scores = torch.stack(losses).mean(), torch.cat([s.argmax(1) for s in all_scores])
            labels = torch.cat([e.query_y for e in episodes])
        optimizer_step(ctx, opt, loss, scores, labels, sched)
        if replay is not None:  # after backward: autograd keeps the running statistics' versions
            replay.sync(len(episodes))


def optimizer_step(ctx: TrainContext, opt: torch.optim.Optimizer, loss: torch.Tensor, scores: torch.Tensor,
                   labels: torch.Tensor, scheduler=None) -> float:
    """One training step of a supervised loop: backward ``loss``, then ``ctx.step`` (finite checks,
    the gradient hook, ``opt`` and ``scheduler`` steps, progress with ``loss`` and ``acc``, the share
    of rows of ``scores`` [B, classes] whose argmax equals ``labels`` [B]; ``scores`` may also be the
    predicted classes [B]). Returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        predicted = scores if scores.dim() == 1 else scores.argmax(1)
        acc = (predicted == labels).float().mean().item()
    return ctx.step(opt, loss, scheduler=scheduler, acc=acc)
