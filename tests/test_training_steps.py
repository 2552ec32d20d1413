"""The training-step contract: ctx.track, ctx.steps(phase, total), ctx.step(optimizer, loss, **metrics)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metabench import TrainContext
from metabench.learner import TrainingDiverged
from metabench.runner import PluginFailed, RunRequest, execute

from conftest import host_with, tiny_plugin


def make_ctx(calls: list, hook=None) -> TrainContext:
    kwargs = {"gradient_hook": hook} if hook else {}
    return TrainContext(None, None, None, torch.device("cpu"), torch.Generator().manual_seed(0),
                        lambda phase, step, total, metrics: calls.append((phase, step, total, metrics)), **kwargs)


def one_step(ctx: TrainContext, model: nn.Module, opt, loss_scale: float = 1.0, **metrics) -> float:
    opt.zero_grad()
    loss = model(torch.ones(2, 3)).sum() * loss_scale
    loss.backward()
    return ctx.step(opt, loss, **metrics)


def test_steps_run_each_phase_and_report_it():
    calls = []
    ctx = make_ctx(calls)
    model = ctx.track("model", nn.Linear(3, 1))
    opt = ctx.track("optimizer", torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    for _ in ctx.steps("pre-train", 2):
        one_step(ctx, model, opt, acc=0.5)
    for _ in ctx.steps("meta-train", 3):
        one_step(ctx, model, opt)
    assert [(c[0], c[1], c[2]) for c in calls] == [("pre-train", 1, 2), ("pre-train", 2, 2), ("meta-train", 1, 3),
                                                    ("meta-train", 2, 3), ("meta-train", 3, 3)]
    assert calls[0][3]["acc"] == 0.5 and isinstance(calls[0][3]["loss"], float)
    assert not torch.equal(before, model.weight)  # the optimiser stepped
    assert ctx.done == {"pre-train": 2, "meta-train": 3} and set(ctx.tracked) == {"model", "optimizer"}


def test_steps_resume_after_the_steps_already_done():
    ctx = make_ctx([])
    ctx.done["meta-train"] = 7
    assert list(ctx.steps("meta-train", 10)) == [8, 9, 10]


def test_the_gradient_hook_sees_the_gradients_before_the_optimiser_steps():
    seen = []
    model = nn.Linear(3, 1)
    ctx = make_ctx([], hook=lambda params: seen.append([(p.grad.clone(), p.detach().clone()) for p in params]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in ctx.steps("meta-train", 1):
        one_step(ctx, model, opt)
    (grads,) = seen
    assert len(grads) == 2 and all(g.abs().sum() > 0 for g, _ in grads)
    assert not torch.equal(grads[0][1], model.weight.detach())  # the hook ran before opt.step()


@pytest.mark.parametrize("scale,message", [(math.nan, "training loss is nan at meta-train step 2"),
                                           (math.inf, "training loss is -?inf at meta-train step 2")])
def test_a_non_finite_loss_stops_training_naming_the_phase_and_step(scale, message):
    ctx = make_ctx([])
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingDiverged, match=message):
        for step in ctx.steps("meta-train", 3):
            one_step(ctx, model, opt, loss_scale=1.0 if step == 1 else scale)
    assert ctx.done == {"meta-train": 1}


def test_a_non_finite_gradient_stops_training_before_the_optimiser_steps():
    ctx = make_ctx([])
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with pytest.raises(TrainingDiverged, match="gradient is not finite at pre-train step 1"):
        for _ in ctx.steps("pre-train", 1):
            opt.zero_grad()
            loss = model(torch.ones(2, 3)).sum()
            loss.backward()
            model.weight.grad[0, 0] = math.inf
            ctx.step(opt, loss)
    assert torch.equal(before, model.weight)


def test_tracking_two_objects_under_one_name_is_refused():
    ctx = make_ctx([])
    ctx.track("model", nn.Linear(1, 1))
    with pytest.raises(ValueError, match="already tracked"):
        ctx.track("model", nn.Linear(1, 1))


def test_results_say_whether_the_harness_owned_the_steps():
    """The conftest tiny learner keeps its own loop (ctx.progress): not resumable; maml uses the contract."""
    host = host_with(("tiny", tiny_plugin()))
    own = execute(RunRequest(learner="toy", task="tiny-3w2s", budget="smoke"), host)
    assert own["learner"]["resumable"] is False
    maml = execute(RunRequest(learner="maml", task="sinusoid-5s", budget="smoke", episodes=2), host)
    assert maml["learner"]["resumable"] is True


def test_a_diverging_learner_is_reported_as_failing_with_phase_and_step():
    from metabench import Learner, hookimpl

    class Diverging(Learner):
        from dataclasses import dataclass

        @dataclass
        class Config:
            steps: int = 3

        budgets = {"smoke": {}, "quick": {}, "paper": {}}

        def __init__(self, config, backbone, protocol, device):
            super().__init__(config, backbone, protocol, device)
            self.w = nn.Parameter(torch.ones(1))

        def meta_train(self, ctx):
            opt = ctx.track("optimizer", torch.optim.SGD([self.w], lr=0.1))
            for step in ctx.steps("meta-train", self.config.steps):
                opt.zero_grad()
                loss = self.w.sum() * (math.nan if step == 2 else 1.0)
                loss.backward()
                ctx.step(opt, loss)

        def predict(self, support_x, support_y, query_x):
            return torch.zeros(query_x.shape[0], int(support_y.max()) + 1)

    class Plugin:
        @hookimpl
        def metabench_register_learners(self, register):
            register("diverging", Diverging)

    host = host_with(("diverging", Plugin()), ("tiny", tiny_plugin()))
    with pytest.raises(PluginFailed, match="diverging.*diverged: the training loss is nan at meta-train step 2; no score is written"):
        execute(RunRequest(learner="diverging", task="tiny-3w2s", budget="smoke"), host)
