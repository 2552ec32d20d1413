"""Checks of the built-in learners against independent references.

* MAML's second-order meta-gradient (autograd through the inner loop) against central finite
  differences of the meta-loss, in float64; the reference adapts a plain module copy and never
  differentiates through the adaptation.
* First-order MAML against its definition: the query-loss gradient at the adapted parameters.
* ProtoNet's logits against -||q - mean_c||^2 written out by hand.
* ``predict``: leaves the meta-parameters untouched and is deterministic.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabench import Backbone, Episode, Protocol, TrainContext
from metabench_plugins.backbones.conv4 import conv4
from metabench_plugins.learners.maml import MAML, batch_statistics_only, maml_meta_loss
from metabench_plugins.learners.protonet import ProtoNet, prototype_logits

WAYS, SHOTS, QUERIES = 3, 2, 2
PROTOCOL = Protocol(name="toy-3w2s", version=1, dataset="toy", ways=WAYS, shots=SHOTS, queries=QUERIES,
                    episodes=4, image_size=16)


def make_tasks(n, gen, dtype=torch.float64, side=16, shots=SHOTS, queries=QUERIES):
    labels = torch.arange(WAYS)
    return [Episode(torch.rand(WAYS * shots, 1, side, side, generator=gen, dtype=dtype), labels.repeat_interleave(shots),
                    torch.rand(WAYS * queries, 1, side, side, generator=gen, dtype=dtype), labels.repeat_interleave(queries))
            for _ in range(n)]


def tiny_smooth_net():
    """A tiny conv net with batch-statistics BatchNorm and smooth activations: [B,1,16,16] -> [B,3]."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=4, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                        nn.Flatten(), nn.Linear(2 * 4 * 4, WAYS))
    return batch_statistics_only(net).double()


def tiny_conv4_net():
    """conv4 (width 2, ReLU + max-pool) and a linear head, as MAML builds it: [B,1,16,16] -> [B,3]."""
    bb = conv4(1, 16, width=2)
    return batch_statistics_only(nn.Sequential(bb.module, nn.Linear(bb.out_features, WAYS))).double()


def reference_meta_loss(net, flat, tasks, inner_lr, steps):
    """Meta-loss at the flat parameter vector ``flat``, adapting a plain copy of ``net`` (values only)."""
    total = 0.0
    for t in tasks:
        m = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(flat.clone(), m.parameters())  # (it aliases the vector)
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(m(t.support_x), t.support_y), list(m.parameters()))
            with torch.no_grad():
                for p, g in zip(m.parameters(), grads):
                    p -= inner_lr * g
        with torch.no_grad():
            total += F.cross_entropy(m(t.query_x), t.query_y).item()
    return total / len(tasks)


def autograd_meta_grad(net, tasks, inner_lr, steps, first_order):
    params = dict(net.named_parameters())
    loss = maml_meta_loss(net, params, tasks, inner_lr, steps, first_order)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    torch.manual_seed(0)
    net, tasks = tiny_smooth_net(), make_tasks(2, torch.Generator().manual_seed(1))
    grad = autograd_meta_grad(net, tasks, 0.4, steps, first_order=False)
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    eps, fd = 1e-5, torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = eps
        fd[i] = (reference_meta_loss(net, theta + e, tasks, 0.4, steps)
                 - reference_meta_loss(net, theta - e, tasks, 0.4, steps)) / (2 * eps)
    rel = (grad - fd).norm() / fd.norm()
    assert rel < 1e-6, f"relative error {rel:.3g}"


def test_second_order_meta_gradient_on_conv4_directional():
    """The real backbone (ReLU, max-pool, BatchNorm): directional derivatives along random directions."""
    torch.manual_seed(0)
    net, tasks = tiny_conv4_net(), make_tasks(2, torch.Generator().manual_seed(2))
    grad = autograd_meta_grad(net, tasks, 0.4, 2, first_order=False)
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
        v /= v.norm()
        eps = 1e-6
        fd = (reference_meta_loss(net, theta + eps * v, tasks, 0.4, 2)
              - reference_meta_loss(net, theta - eps * v, tasks, 0.4, 2)) / (2 * eps)
        exact = float(grad @ v)
        assert abs(exact - fd) <= 1e-6 * max(grad.norm().item(), 1e-12), (exact, fd)


@pytest.mark.parametrize("steps", [1, 2])
def test_first_order_meta_gradient_is_query_gradient_at_adapted_parameters(steps):
    torch.manual_seed(0)
    net, tasks = tiny_smooth_net(), make_tasks(3, torch.Generator().manual_seed(4))
    fo = autograd_meta_grad(net, tasks, 0.4, steps, first_order=True)
    # Definition: adapt a detached copy, then average the query-loss gradients at the adapted parameters.
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    expected = torch.zeros_like(theta)
    for t in tasks:
        m = copy.deepcopy(net)
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(m(t.support_x), t.support_y), list(m.parameters()))
            with torch.no_grad():
                for p, g in zip(m.parameters(), grads):
                    p -= 0.4 * g
        grads = torch.autograd.grad(F.cross_entropy(m(t.query_x), t.query_y), list(m.parameters()))
        expected += torch.cat([g.reshape(-1) for g in grads]) / len(tasks)
    assert torch.allclose(fo, expected, rtol=1e-10, atol=1e-12)
    so = autograd_meta_grad(net, tasks, 0.4, steps, first_order=False)
    assert (so - fo).norm() / so.norm() > 1e-3, "second-order and first-order gradients should differ"


def test_protonet_logits_closed_form():
    gen = torch.Generator().manual_seed(5)
    support, query = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    logits = prototype_logits(support, labels, query, 3)
    assert logits.shape == (5, 3)
    for q in range(5):
        for c in range(3):
            members = [support[i] for i in range(6) if labels[i] == c]
            mean = sum(members) / len(members)
            assert torch.isclose(logits[q, c], -((query[q] - mean) ** 2).sum(), rtol=1e-12)


def test_protonet_predict_on_identity_embedding_is_closed_form():
    learner = ProtoNet(ProtoNet.Config(), Backbone(nn.Flatten(), 16 * 16), PROTOCOL, torch.device("cpu"))
    (t,) = make_tasks(1, torch.Generator().manual_seed(6), dtype=torch.float32)
    with torch.no_grad():
        logits = learner.predict(t.support_x, t.support_y, t.query_x)
    s, q = t.support_x.flatten(1), t.query_x.flatten(1)
    means = torch.stack([s[t.support_y == c].mean(0) for c in range(WAYS)])
    assert torch.allclose(logits, -torch.cdist(q.double(), means.double()).pow(2).float(), rtol=1e-4, atol=1e-3)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("cls", [ProtoNet, MAML])
def test_predict_keeps_parameters_and_is_deterministic(cls):
    torch.manual_seed(0)
    config = cls.Config(**cls.budgets["smoke"])
    learner = cls(config, conv4(1, 16, width=4), PROTOCOL, torch.device("cpu"))
    module = learner.model if cls is MAML else learner.net
    before = _state(module)
    (t,) = make_tasks(1, torch.Generator().manual_seed(7), dtype=torch.float32)
    with torch.no_grad():
        first = learner.predict(t.support_x, t.support_y, t.query_x)
        second = learner.predict(t.support_x, t.support_y, t.query_x)
    assert first.shape == (WAYS * QUERIES, WAYS)
    assert torch.equal(first, second)
    after = _state(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if cls is ProtoNet:  # inductive: a query's logits do not depend on the other queries
        with torch.no_grad():
            part = learner.predict(t.support_x, t.support_y, t.query_x[:2])
        assert torch.allclose(part, first[:2], rtol=1e-5, atol=1e-5)
    else:  # predict adapts even under no_grad: zero inner steps give other logits
        learner.config.eval_inner_steps = 0
        with torch.no_grad():
            unadapted = learner.predict(t.support_x, t.support_y, t.query_x)
        assert not torch.allclose(unadapted, first)


@pytest.mark.parametrize("cls", [ProtoNet, MAML])
def test_meta_train_smoke_updates_parameters_and_reports_progress(cls):
    torch.manual_seed(0)
    learner = cls(cls.Config(**cls.budgets["smoke"]), conv4(1, 16, width=4), PROTOCOL, torch.device("cpu"))
    gen, calls = torch.Generator().manual_seed(8), []
    module = learner.model if cls is MAML else learner.net
    before = [p.detach().clone() for p in module.parameters()]

    def sample(ways=None, shots=None, queries=None):
        labels = torch.arange(ways or WAYS)
        n_s, n_q = (ways or WAYS) * (shots or SHOTS), (ways or WAYS) * (queries or QUERIES)
        return Episode(torch.rand(n_s, 1, 16, 16, generator=gen), labels.repeat_interleave(shots or SHOTS),
                       torch.rand(n_q, 1, 16, 16, generator=gen), labels.repeat_interleave(queries or QUERIES))

    def sample_many(n, ways=None, shots=None, queries=None):
        return [sample(ways, shots, queries) for _ in range(n)]

    ctx = TrainContext(PROTOCOL, SimpleNamespace(sample=sample, sample_many=sample_many), None, torch.device("cpu"),
                       gen, lambda phase, step, total, m: calls.append((step, total, m)))
    learner.meta_train(ctx)
    steps = learner.config.meta_steps
    assert [c[:2] for c in calls] == [(i, steps) for i in range(1, steps + 1)]
    assert all("loss" in c[2] for c in calls)
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_conv4_output_sizes_and_validation():
    for size, feats in ((28, 64), (84, 25 * 64), (16, 64)):
        bb = conv4(1 if size == 28 else 3, size)
        x = torch.zeros(2, 1 if size == 28 else 3, size, size)
        assert bb.out_features == feats and bb.module.eval()(x).shape == (2, feats)
    assert conv4(1, 28, width=8).out_features == 8
    for bad in (0, -1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="width"):
            conv4(1, 28, width=bad)
    with pytest.raises(ValueError, match="too small"):
        conv4(1, 8)
