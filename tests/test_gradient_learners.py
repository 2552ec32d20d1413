"""Checks of the gradient-based learners (anil, metasgd, reptile, and maml on regression).

* Meta-SGD's meta-gradient (theta and the per-element step sizes alpha) and ANIL's (body and
  head) against float64 central finite differences of the meta-loss, computed by adapting a
  plain module copy without differentiating through the adaptation.
* MAML's second-order meta-gradient with the regression loss (MSE) against finite differences.
  (First-order MAML against its definition is in test_maml_gradient.py.)
* Reptile's outer update against its definition, one meta-step computed by hand with SGD and
  with the inner Adam (beta1 = 0) whose state carries over from task to task.
* Per-problem defaults (0 = the task's problem type's value) and the plugins/learners/*.toml paper tables.
* MAML on sinusoid through ``metabench.runner.execute``: finite, deterministic MSE, and a short
  meta-training beats the untrained model; learners without regression refuse sinusoid.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import tomllib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabench import Backbone, Episode, MetabenchError, Protocol, TrainContext
from metabench.episodes import eval_draws
from metabench.plugins import PluginHost, PluginSource, discover
from metabench.runner import RunRequest, execute, prepare
from metabench_plugins.learners.anil import ANIL, anil_meta_loss, split_params
from metabench_plugins.backbones.conv4 import conv4
from metabench_plugins.learners.maml import MAML, batch_statistics_only, maml_meta_loss
from metabench_plugins.learners.metasgd import MetaSGD
from metabench_plugins.backbones.mlp import mlp
from metabench_plugins.learners.reptile import Reptile, minibatches, outer_step_size

NEW_LEARNERS = ("anil", "metasgd", "reptile")
WAYS, SHOTS, QUERIES = 3, 2, 2
TOY = Protocol(name="toy-3w2s", version=1, dataset="toy", ways=WAYS, shots=SHOTS, queries=QUERIES,
               episodes=4, image_size=16)
SINE = Protocol(name="sine-4s", version=1, dataset="sine", ways=1, shots=4, queries=6, episodes=4, image_size=1,
                problem="regression", metric="mse", higher_is_better=False)


def make_host() -> PluginHost:
    """The installed plugins plus this change's learners where they are not registered yet."""
    sources = discover()
    have = {s.name for s in sources}
    sources += [PluginSource.from_object(n, importlib.import_module(f"metabench_plugins.learners.{n}"), "tests", "0")
                for n in NEW_LEARNERS if n not in have]
    return PluginHost(sources)


HOST = make_host()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module on one thread: its tiny networks gain nothing from a second one, and on a
    busy 2-core machine OpenMP's busy-waiting made their many small operations up to ~50x slower
    (the sinusoid training test: 166 s on 2 threads at load 6, 7 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def class_tasks(n, gen, dtype=torch.float64, shots=SHOTS, queries=QUERIES):
    labels = torch.arange(WAYS)

    def images(count):
        return torch.rand(WAYS * count, 1, 16, 16, generator=gen, dtype=dtype)

    return [Episode(images(shots), labels.repeat_interleave(shots), images(queries), labels.repeat_interleave(queries))
            for _ in range(n)]


def sine_tasks(n, gen, dtype=torch.float64, shots=4, queries=6):
    tasks = []
    for _ in range(n):
        a = 0.1 + 4.9 * torch.rand((), generator=gen, dtype=dtype)
        ph = math.pi * torch.rand((), generator=gen, dtype=dtype)
        x = 10 * torch.rand(shots + queries, 1, generator=gen, dtype=dtype) - 5
        y = a * torch.sin(x - ph)
        tasks.append(Episode(x[:shots], y[:shots], x[shots:], y[shots:]))
    return tasks


def tiny_smooth_net():
    """Conv + batch-statistics BatchNorm + tanh + linear head: [B,1,16,16] -> [B,3]; body = [0], head = [1]."""
    body = nn.Sequential(nn.Conv2d(1, 2, 3, stride=4, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten())
    return batch_statistics_only(nn.Sequential(body, nn.Linear(2 * 4 * 4, WAYS))).double()


def tiny_sine_net():
    """1 -> 6 -> 6 -> 1 tanh MLP (smooth, so finite differences are accurate)."""
    body = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    return nn.Sequential(body, nn.Linear(6, 1)).double()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector, like):
    out, i = [], 0
    for t in like:
        out.append(vector[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def central_differences(f, x, eps=1e-5):
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = eps
        g[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def plain_adapted_query_loss(net, values, task, loss, lrs, steps, adapt_mask):
    """Adapt a deep copy of ``net`` holding ``values`` with p -= lr_p * grad (only where adapt_mask); query loss."""
    m = copy.deepcopy(net)
    with torch.no_grad():
        for p, v in zip(m.parameters(), values):
            p.copy_(v)
    for _ in range(steps):
        grads = torch.autograd.grad(loss(m(task.support_x), task.support_y), list(m.parameters()), allow_unused=True)
        with torch.no_grad():
            for p, g, lr, on in zip(m.parameters(), grads, lrs, adapt_mask):
                if on:
                    p -= lr * g
    with torch.no_grad():
        return loss(m(task.query_x), task.query_y).item()


# ----------------------------------------------------------------------------- meta-gradients


@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_meta_gradient_matches_finite_differences(steps):
    torch.manual_seed(0)
    net, tasks = tiny_smooth_net(), class_tasks(2, torch.Generator().manual_seed(1))
    names = [n for n, _ in net.named_parameters()]
    gen = torch.Generator().manual_seed(2)
    alpha = [(0.05 + 0.3 * torch.rand(p.shape, generator=gen, dtype=p.dtype)).requires_grad_(True)
             for p in net.parameters()]
    params = dict(net.named_parameters())
    loss = maml_meta_loss(net, params, tasks, dict(zip(names, alpha)), steps)
    grad = flat(torch.autograd.grad(loss, list(params.values()) + alpha))

    theta = flat([p.detach() for p in net.parameters()])
    shapes = [p.detach() for p in net.parameters()]

    def reference(vec):
        values, lrs = unflatten(vec[:theta.numel()], shapes), unflatten(vec[theta.numel():], shapes)
        return sum(plain_adapted_query_loss(net, values, t, F.cross_entropy, lrs, steps, [True] * len(shapes))
                   for t in tasks) / len(tasks)

    fd = central_differences(reference, torch.cat([theta, flat([a.detach() for a in alpha])]))
    assert (grad - fd).norm() / fd.norm() < 1e-6
    n = theta.numel()
    assert fd[n:].abs().max() > 1e-6, "the step sizes must get a meta-gradient"


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_matches_finite_differences_and_masked_maml(first_order):
    torch.manual_seed(0)
    net, tasks = tiny_smooth_net(), class_tasks(2, torch.Generator().manual_seed(3))
    params = dict(net.named_parameters())
    loss = anil_meta_loss(net[0], net[1], split_params(params, "0."), split_params(params, "1."), tasks, 0.4, 2,
                          first_order)
    grad = flat(torch.autograd.grad(loss, list(params.values())))
    # the same thing through MAML's loss with only the head adapted (recomputing the body each step)
    masked = maml_meta_loss(net, params, tasks, 0.4, 2, first_order, only={"1.weight", "1.bias"})
    assert torch.allclose(masked, loss, rtol=1e-12)
    assert torch.allclose(flat(torch.autograd.grad(masked, list(params.values()))), grad, rtol=1e-9, atol=1e-12)
    head_mask = [n.startswith("1.") for n in params]
    body_size = sum(p.numel() for n, p in params.items() if n.startswith("0."))
    assert grad[:body_size].abs().max() > 1e-6, "the meta-gradient must reach the body"
    if first_order:
        return
    shapes = [p.detach() for p in net.parameters()]

    def reference(vec):
        values = unflatten(vec, shapes)
        return sum(plain_adapted_query_loss(net, values, t, F.cross_entropy, [0.4] * len(shapes), 2, head_mask)
                   for t in tasks) / len(tasks)

    fd = central_differences(reference, flat(shapes))
    assert (grad - fd).norm() / fd.norm() < 1e-6


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_regression_meta_gradient_matches_finite_differences(steps):
    torch.manual_seed(0)
    net, tasks = tiny_sine_net(), sine_tasks(3, torch.Generator().manual_seed(4))
    params = dict(net.named_parameters())
    grad = flat(torch.autograd.grad(maml_meta_loss(net, params, tasks, 0.01, steps, loss=F.mse_loss),
                                    list(params.values())))
    shapes = [p.detach() for p in net.parameters()]

    def reference(vec):
        values = unflatten(vec, shapes)
        return sum(plain_adapted_query_loss(net, values, t, F.mse_loss, [0.01] * len(shapes), steps,
                                            [True] * len(shapes)) for t in tasks) / len(tasks)

    fd = central_differences(reference, flat(shapes))
    assert (grad - fd).norm() / fd.norm() < 1e-6


# ----------------------------------------------------------------------------- Reptile


def fake_ctx(tasks):
    """A TrainContext stand-in whose sampler hands out ``tasks`` in order."""
    it, calls = iter(tasks), []
    sampler = SimpleNamespace(sample=lambda ways=None, shots=None, queries=None: next(it),
                              sample_many=lambda n, ways=None, shots=None, queries=None: [next(it) for _ in range(n)])
    ctx = TrainContext(SINE, sampler, None, torch.device("cpu"), torch.Generator().manual_seed(0),
                       lambda phase, step, total, m: calls.append((step, total, m)))
    return ctx, calls


def reptile_on_sine(**settings):
    torch.manual_seed(0)
    config = Reptile.Config(**settings)
    return Reptile(config, Backbone(nn.Sequential(nn.Linear(1, 5), nn.Tanh()), 5), SINE, torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_outer_update_matches_definition(optimizer):
    lr, steps, eps = (0.05, 3, 0.7) if optimizer == "sgd" else (0.01, 3, 0.7)
    learner = reptile_on_sine(meta_steps=1, meta_batch=2, inner_optimizer=optimizer, inner_lr=lr, inner_steps=steps,
                              inner_batch=0, train_shots=10, outer_lr=eps, outer_lr_final=0.0)
    tasks = sine_tasks(2, torch.Generator().manual_seed(5), dtype=torch.float32, shots=4, queries=6)
    theta = [p.detach().clone().double() for p in learner.model.parameters()]

    # By hand: each task starts at theta; SGD, or Adam with beta1 = 0 whose second moments and
    # step count carry over from the first task to the second; theta + eps * mean(phi - theta).
    v, t, phis = [torch.zeros_like(p) for p in theta], 0, []
    for task in tasks:
        x, y = torch.cat([task.support_x, task.query_x]).double(), torch.cat([task.support_y, task.query_y]).double()
        phi = [p.clone() for p in theta]
        for _ in range(steps):
            w = [p.clone().requires_grad_(True) for p in phi]
            h = torch.tanh(x @ w[0].t() + w[1])
            grads = torch.autograd.grad(F.mse_loss(h @ w[2].t() + w[3], y), w)
            if optimizer == "sgd":
                phi = [p - lr * g for p, g in zip(phi, grads)]
            else:
                t += 1
                v = [0.999 * vi + 0.001 * g * g for vi, g in zip(v, grads)]
                phi = [p - lr * g / ((vi / (1 - 0.999 ** t)).sqrt() + 1e-8) for p, g, vi in zip(phi, grads, v)]
        phis.append(phi)
    expected = [p + eps * ((a - p) + (b - p)) / 2 for p, a, b in zip(theta, *phis)]

    ctx, calls = fake_ctx(tasks)
    learner.meta_train(ctx)
    got = [p.detach().double() for p in learner.model.parameters()]
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6), (g - e).abs().max()
    assert [c[:2] for c in calls] == [(1, 1)] and "loss" in calls[0][2]


def test_reptile_schedule_and_minibatches():
    assert outer_step_size(1, 4, 1.0, 0.0) == 1.0
    assert outer_step_size(3, 4, 1.0, 0.0) == pytest.approx(0.5)
    assert outer_step_size(2, 2, 0.8, 0.2) == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    batches = minibatches(10, 4, 5, gen)  # 20 indices: two permutations of range(10)
    assert [len(b) for b in batches] == [4] * 5
    joined = torch.cat(batches)
    assert sorted(joined[:10].tolist()) == list(range(10)) and sorted(joined[10:].tolist()) == list(range(10))
    assert all(torch.equal(b, torch.arange(6)) for b in minibatches(6, 0, 3, gen))
    assert all(torch.equal(b, torch.arange(6)) for b in minibatches(6, 8, 2, gen))


# ----------------------------------------------------------------------------- learners


def build(cls, protocol, budget="smoke", **overrides):
    torch.manual_seed(0)
    config = cls.Config(**{**cls.budgets[budget], **overrides})
    bb = conv4(1, 16, width=4) if protocol.problem == "classification" else mlp(1, 1, hidden=8)
    return cls(config, bb, protocol, torch.device("cpu"))


def test_problem_defaults_fill_only_zero_settings():
    c = build(MAML, SINE, "quick").config
    assert (c.inner_lr, c.eval_inner_steps, c.meta_batch, c.train_shots, c.train_queries) == (0.01, 10, 25, 4, 4)
    c = build(MAML, TOY, "quick").config
    assert (c.inner_lr, c.eval_inner_steps, c.meta_batch, c.train_shots, c.train_queries) == (0.4, 3, 8, SHOTS, 5)
    c = build(MAML, SINE, "quick", inner_lr=0.02, train_shots=10).config
    assert (c.inner_lr, c.train_shots, c.train_queries) == (0.02, 10, 10)  # K query points follow the training K
    c = build(MetaSGD, SINE, "quick").config
    assert (c.alpha_init, c.inner_steps, c.eval_inner_steps) == (0.01, 1, 1)
    c = build(Reptile, TOY, "quick").config
    assert c.inner_optimizer == "adam" and c.train_shots == 15
    c = build(Reptile, SINE, "quick").config
    assert (c.inner_optimizer, c.inner_lr, c.inner_batch, c.eval_inner_steps) == ("adam", 0.01, 0, 10)
    c = build(Reptile, SINE, "quick", inner_optimizer="sgd", eval_inner_steps=3).config
    assert (c.inner_optimizer, c.eval_inner_steps) == ("sgd", 3)
    with pytest.raises(ValueError, match="inner_optimizer"):
        build(Reptile, SINE, "quick", inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="meta_batch"):
        build(MAML, SINE, "quick", meta_batch=-1)


def test_metasgd_alpha_initialisation():
    learner = build(MetaSGD, TOY, alpha_init=0.005, alpha_init_max=0.1)
    values = torch.cat([a.detach().reshape(-1) for a in learner.alpha])
    assert values.min() >= 0.005 and values.max() <= 0.1 and values.std() > 0.01
    assert [a.shape for a in learner.alpha] == [p.shape for p in learner.model.parameters()]
    learner = build(MetaSGD, TOY, alpha_init=0.3)
    assert all(bool((a == 0.3).all()) for a in learner.alpha)
    with pytest.raises(ValueError, match="alpha_init_max"):
        build(MetaSGD, TOY, alpha_init=0.3, alpha_init_max=0.1)


def _state(learner):
    tensors = dict(learner.model.state_dict())
    if isinstance(learner, MetaSGD):
        tensors.update({f"alpha{i}": a for i, a in enumerate(learner.alpha)})
    return {k: v.clone() for k, v in tensors.items()}


@pytest.mark.parametrize("cls", [ANIL, MetaSGD, Reptile])
@pytest.mark.parametrize("protocol", [TOY, SINE], ids=["classification", "regression"])
def test_predict_keeps_parameters_and_is_deterministic(cls, protocol):
    learner = build(cls, protocol)
    gen = torch.Generator().manual_seed(7)
    (t,) = class_tasks(1, gen, torch.float32) if protocol is TOY else sine_tasks(1, gen, torch.float32)
    if isinstance(learner, Reptile):  # give the inner optimiser a state that predict must copy, not change
        ctx, _ = fake_ctx([t] * 10)
        learner.meta_train(ctx)
        inner = copy.deepcopy(learner.inner.state_dict())
    before = _state(learner)
    with torch.no_grad():
        first = learner.predict(t.support_x, t.support_y, t.query_x)
        second = learner.predict(t.support_x, t.support_y, t.query_x)
    expected = (WAYS * QUERIES, WAYS) if protocol is TOY else tuple(t.query_y.shape)
    assert first.shape == expected and torch.equal(first, second) and torch.isfinite(first).all()
    after = _state(learner)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if isinstance(learner, Reptile):
        assert str(learner.inner.state_dict()) == str(inner)
    learner.config.eval_inner_steps = 0  # predict adapts: without steps the outputs differ
    with torch.no_grad():
        assert not torch.allclose(learner.predict(t.support_x, t.support_y, t.query_x), first)


@pytest.mark.parametrize("cls", [ANIL, MetaSGD])
def test_meta_train_updates_body_and_reports_progress(cls):
    learner = build(cls, TOY)
    gen = torch.Generator().manual_seed(8)
    ctx, calls = fake_ctx(class_tasks(10, gen, torch.float32, shots=1, queries=2))
    body = [p.detach().clone() for p in learner.model[0].parameters()]
    learner.meta_train(ctx)
    steps = learner.config.meta_steps
    assert [c[:2] for c in calls] == [(i, steps) for i in range(1, steps + 1)]
    assert any(not torch.equal(b, p) for b, p in zip(body, learner.model[0].parameters()))
    if cls is MetaSGD:
        assert any(not bool((a == learner.config.alpha_init).all()) for a in learner.alpha)


# ----------------------------------------------------------------------------- paper configs


def paper_tables():
    for name in sorted(HOST.learners.names()):
        cls = HOST.learners.get(name).obj
        assert cls.paper_config is not None, name
        doc = tomllib.loads(open(cls.paper_config, encoding="utf-8").read())
        assert doc, f"{cls.paper_config} has no tables"
        for task in doc:
            if task != "validation":  # the paper's validation selection (metabench/validation.py), not a protocol
                yield name, task


@pytest.mark.parametrize("learner,task", list(paper_tables()))
def test_paper_config_tables_are_valid(learner, task):
    """Every table names a registered protocol the learner can run; its settings build a config."""
    assert task in HOST.tasks, f"{learner}: unknown protocol {task!r}"
    plan = prepare(RunRequest(learner=learner, task=task, budget="paper"), HOST)
    backbone_options, config = plan.backbone_options, plan.config
    section = tomllib.loads(open(HOST.learners.get(learner).obj.paper_config, encoding="utf-8").read())[task]
    values = dataclasses.asdict(config)
    for key, value in section.items():
        if key == "validation":
            assert plan.validation is not None and plan.validation.every == value["every"]
        elif key == "backbone":
            assert backbone_options == value
        elif isinstance(value, float):
            assert values[key] == pytest.approx(value), key
        elif value != 0:  # 0 = a per-problem default, resolved when the learner is built
            assert values[key] == value, key


# ----------------------------------------------------------------------------- regression runs


def sine_run(learner, **settings):
    request = RunRequest(learner=learner, task="sinusoid-5s", budget="smoke", seed=3, episodes=20,
                         learner_layers=[("test", settings)] if settings else [])
    return execute(request, HOST)


@pytest.mark.parametrize("learner", ["maml", *NEW_LEARNERS])
def test_sinusoid_smoke_run_is_finite_and_deterministic(learner):
    first = sine_run(learner)
    assert first["backbone"]["name"] == "mlp" and first["task"]["metric"] == "mse"
    assert all(math.isfinite(v) and v >= 0 for v in first["per_episode"])
    assert sine_run(learner)["per_episode"] == first["per_episode"]


def test_maml_short_sinusoid_training_beats_predicting_zero_and_the_untrained_model():
    trained = sine_run("maml", meta_steps=500, meta_batch=10, eval_inner_steps=10, train_queries=10)
    # On the same 20 episodes: predicting 0 everywhere, and the same model without meta-training
    # (through the learner directly: meta_steps=0 in a config means "the per-problem default").
    protocol, source, _ = HOST.task("sinusoid-5s")
    torch.manual_seed(3)
    raw = MAML(MAML.Config(eval_inner_steps=10), mlp(1, 1), protocol, torch.device("cpu"))
    zero, untrained = [], []
    for draw in eval_draws(protocol, source, protocol.eval_split, 20):
        ep = source.materialize(draw, protocol.eval_split)
        with torch.no_grad():
            untrained.append(F.mse_loss(raw.predict(ep.support_x, ep.support_y, ep.query_x), ep.query_y).item())
        zero.append(ep.query_y.pow(2).mean().item())
    mse, zero, untrained = trained["summary"]["mean"], sum(zero) / 20, sum(untrained) / 20
    assert math.isfinite(mse) and mse < 0.8 * zero and mse < 0.8 * untrained, (mse, zero, untrained)


@pytest.mark.parametrize("learner", [n for n in HOST.learners.names()
                                     if "regression" not in HOST.learners.get(n).obj.problem_types])
def test_learners_without_regression_refuse_sinusoid(learner):
    with pytest.raises(MetabenchError, match="cannot run regression task 'sinusoid-5s'"):
        execute(RunRequest(learner=learner, task="sinusoid-5s", budget="smoke"), HOST)


def test_protonet_is_among_the_learners_refusing_sinusoid():
    assert "regression" not in HOST.learners.get("protonet").obj.problem_types
