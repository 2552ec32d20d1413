"""Checks of the metric and fine-tuning learners: Matching Networks, Relation Networks, Baseline(++).

* MatchingNet: attention rows sum to one; the output is the log of the attention-weighted sum of
  support one-hot labels, written out by hand; full-context embeddings keep the shapes and the
  queries independent.
* RelationNet: the relation scores lie in [0, 1] with shape [Q, ways] at 28 px and 84 px; the
  feature maps have the documented sizes; class features are sums over shots.
* Baseline / Baseline++: the fine-tuned head fits a separable support set; Baseline++'s logits
  ignore the embeddings' norm.
* Every one: ``predict`` leaves the backbone's weights and statistics alone and is deterministic,
  and a smoke run on the tiny task is reproducible.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metabench import Backbone, Protocol
from metabench.runner import RunRequest, execute
from metabench_plugins.learners import baseline, matchingnet, relationnet
from metabench_plugins.backbones import conv4 as conv4_plugin
from metabench_plugins.learners.baseline import Baseline, BaselinePlusPlus, Head, fit_head
from metabench_plugins.backbones.conv4 import conv4
from metabench_plugins.learners.matchingnet import MatchingNet, cosine_attention, matching_log_probs
from metabench_plugins.learners.relationnet import RelationNet, feature_map_network, relation_pairs

from conftest import host_with, tiny_plugin

CPU = torch.device("cpu")


def protocol(ways=3, shots=2, queries=3, size=16):
    return Protocol(name=f"toy-{ways}w{shots}s", version=1, dataset="toy", ways=ways, shots=shots, queries=queries,
                    episodes=4, image_size=size)


def episode(p: Protocol, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p.ways)
    sx = torch.rand(p.ways * p.shots, p.channels, p.image_size, p.image_size, generator=g)
    qx = torch.rand(p.ways * p.queries, p.channels, p.image_size, p.image_size, generator=g)
    return sx, labels.repeat_interleave(p.shots), qx


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


def pixels(p: Protocol, factor=1.0) -> Backbone:
    """The flattened pixels (times ``factor``) as the embedding: no parameters, fully predictable."""
    return Backbone(nn.Sequential(nn.Flatten(), Scale(factor)), p.channels * p.image_size ** 2)


def small_conv4(p: Protocol, width=8) -> Backbone:
    torch.manual_seed(0)
    return conv4(p.channels, p.image_size, width=width)


def state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


# -- Matching Networks ---------------------------------------------------------------------------
def test_matching_attention_rows_sum_to_one_and_output_is_weighted_label_sum_by_hand():
    p = protocol(ways=3, shots=2, queries=2)
    sx, sy, qx = episode(p)
    learner = MatchingNet(MatchingNet.Config(scale=1.0), pixels(p), p, CPU)
    with torch.no_grad():
        logits = learner.predict(sx, sy, qx)
    assert logits.shape == (qx.shape[0], p.ways)

    s, q = sx.flatten(1).double(), qx.flatten(1).double()
    attention = cosine_attention(s, q)
    assert torch.allclose(attention.sum(1), torch.ones(q.shape[0], dtype=torch.float64))
    for i in range(q.shape[0]):
        cos = [float(q[i] @ s[j]) / (math.sqrt(float(q[i] @ q[i])) * math.sqrt(float(s[j] @ s[j])))
               for j in range(s.shape[0])]
        weights = [math.exp(v) for v in cos]
        a = [w / sum(weights) for w in weights]
        assert attention[i].tolist() == pytest.approx(a, abs=1e-12)
        probs = [sum(a[j] for j in range(s.shape[0]) if int(sy[j]) == c) for c in range(p.ways)]
        assert logits[i].exp().tolist() == pytest.approx(probs, abs=1e-5)
        assert sum(probs) == pytest.approx(1.0)


def test_matching_scale_sharpens_the_softmax_and_missing_classes_get_zero_probability():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[2.0, 1.0]])
    flat, sharp = cosine_attention(s, q, 1.0), cosine_attention(s, q, 10.0)
    assert sharp[0, 0] > flat[0, 0] > 0.5
    log_probs = matching_log_probs(s, torch.tensor([0, 0]), q, ways=2)
    assert log_probs[0, 0].exp().item() == pytest.approx(1.0) and torch.isfinite(log_probs).all()
    assert log_probs[0, 1] < -80  # probability 0, clamped to a finite log


@pytest.mark.parametrize("fce", [False, True])
def test_matching_shapes_with_and_without_full_context_embeddings(fce):
    p = protocol(ways=3, shots=2, queries=3)
    sx, sy, qx = episode(p)
    learner = MatchingNet(MatchingNet.Config(fce=fce, fce_steps=3), small_conv4(p), p, CPU)
    assert (learner.fce is not None) == fce
    with torch.no_grad():
        logits = learner.predict(sx, sy, qx)
        assert logits.shape == (qx.shape[0], p.ways)
        assert torch.allclose(logits.exp().sum(1), torch.ones(qx.shape[0]), atol=1e-5)
        # inductive: a query's output does not depend on the other queries
        assert torch.allclose(learner.predict(sx, sy, qx[:2]), logits[:2], atol=1e-5)
    if fce:
        g0 = torch.randn(5, learner.fce.dim)
        assert learner.fce.embed_support(g0).shape == g0.shape
        assert learner.fce.embed_query(torch.randn(4, learner.fce.dim), g0).shape == (4, learner.fce.dim)


# -- Relation Networks ---------------------------------------------------------------------------
@pytest.mark.parametrize("size, side", [(28, 7), (84, 21)])
def test_relation_scores_in_unit_interval_with_query_by_way_shape(size, side):
    p = protocol(ways=5, shots=2, queries=2, size=size)
    bb = small_conv4(p)
    learner = RelationNet(RelationNet.Config(), bb, p, CPU)
    assert not learner.flat and learner.map_shape == (8, side, side)  # only the first two blocks pool
    backbone_params = {id(t) for t in bb.module.parameters()}
    assert {id(t) for t in learner.embed.parameters()} == backbone_params  # the backbone's own layers
    sx, sy, qx = episode(p)
    with torch.no_grad():
        scores = learner.predict(sx, sy, qx)
    assert scores.shape == (qx.shape[0], p.ways)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert bb.module(sx).shape == (sx.shape[0], bb.out_features)  # the backbone itself still flattens


def test_relation_pairs_sum_shots_and_put_the_class_first():
    support = torch.randn(6, 2, 3, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    queries = torch.randn(4, 2, 3, 3)
    pairs = relation_pairs(support, labels, queries, ways=3)
    assert pairs.shape == (12, 4, 3, 3)
    for qi in range(4):
        for c in range(3):
            expected = torch.cat([support[labels == c].sum(0), queries[qi]])
            assert torch.allclose(pairs[qi * 3 + c], expected)


def test_relation_network_falls_back_to_feature_vectors_for_non_convolutional_backbones():
    p = protocol()
    learner = RelationNet(RelationNet.Config(), Backbone(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), 10), p, CPU)
    assert learner.flat and learner.map_shape == (10, 1, 1)
    sx, sy, qx = episode(p)
    with torch.no_grad():
        scores = learner.predict(sx, sy, qx)
    assert scores.shape == (qx.shape[0], p.ways) and bool(((scores >= 0) & (scores <= 1)).all())


def test_feature_map_network_keeps_pools_when_asked():
    bb = conv4(1, 28, width=4)
    x = torch.rand(2, 1, 28, 28)
    assert feature_map_network(bb.module, 0)(x).shape == (2, 4, 1, 1)
    assert feature_map_network(bb.module, 1)(x).shape == (2, 4, 3, 3)
    assert feature_map_network(bb.module, 2)(x).shape == (2, 4, 7, 7)
    assert feature_map_network(nn.Linear(3, 3), 2) is None


# -- Baseline / Baseline++ -----------------------------------------------------------------------
def separable_episode(ways=5, shots=2, dim=16):
    """Support points around orthogonal directions, one per class, as [ways * shots, 1, 4, 4] images."""
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(dim)[:ways] * 3.0
    y = torch.arange(ways).repeat_interleave(shots)
    x = centres[y] + 0.3 * torch.randn(ways * shots, dim, generator=g)
    return x.view(-1, 1, 4, 4), y


@pytest.mark.parametrize("cls", [Baseline, BaselinePlusPlus])
def test_finetuned_head_fits_its_own_support_set(cls):
    sx, sy = separable_episode()
    p = protocol(ways=5, shots=2, queries=2, size=4)
    learner = cls(cls.Config(), pixels(p), p, CPU)
    with torch.no_grad():
        logits = learner.predict(sx, sy, sx)
    assert logits.shape == (sx.shape[0], 5)
    assert (logits.argmax(1) == sy).all()


def test_fit_head_full_batch_and_minibatches_both_fit():
    sx, sy = separable_episode(ways=4, shots=3)
    for batch in (0, 4):
        for cosine in (False, True):
            head = fit_head(sx.flatten(1), sy, 4, cosine, 10.0, 100, 0.01, 0.9, batch, 0.0, seed=0)
            with torch.no_grad():
                assert (head(sx.flatten(1)).argmax(1) == sy).all(), (batch, cosine)


def test_baseline_plus_plus_logits_ignore_the_embedding_norm():
    sx, sy = separable_episode()
    p = protocol(ways=5, shots=2, queries=2, size=4)
    qx = torch.randn(7, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    out = {}
    for cls in (Baseline, BaselinePlusPlus):
        for factor in (1.0, 7.5):
            learner = cls(cls.Config(), pixels(p, factor), p, CPU)
            with torch.no_grad():
                out[cls, factor] = learner.predict(sx, sy, qx)
    assert torch.allclose(out[BaselinePlusPlus, 1.0], out[BaselinePlusPlus, 7.5], atol=1e-5)
    assert not torch.allclose(out[Baseline, 1.0], out[Baseline, 7.5], atol=1e-3)  # a linear head does not
    head = Head(16, 5, cosine=True, scale=4.0, generator=torch.Generator().manual_seed(0))
    f = torch.randn(3, 16)
    assert torch.allclose(head(f), head(0.01 * f), atol=1e-6)
    assert bool((head(f).abs() <= 4.0 + 1e-6).all())


# -- all four: predict leaves the backbone alone and is deterministic ----------------------------
def build(name: str, p: Protocol):
    bb = small_conv4(p)
    if name == "matchingnet":
        return MatchingNet(MatchingNet.Config(), bb, p, CPU), bb
    if name == "matchingnet-fce":
        return MatchingNet(MatchingNet.Config(fce=True), bb, p, CPU), bb
    if name == "relationnet":
        return RelationNet(RelationNet.Config(), bb, p, CPU), bb
    cls = Baseline if name == "baseline" else BaselinePlusPlus
    return cls(cls.Config(finetune_steps=20), bb, p, CPU), bb


@pytest.mark.parametrize("name", ["matchingnet", "matchingnet-fce", "relationnet", "baseline", "baseline++"])
def test_predict_keeps_backbone_weights_and_is_deterministic(name):
    p = protocol()
    learner, bb = build(name, p)
    before = state(bb.module)
    sx, sy, qx = episode(p)
    with torch.no_grad():
        first = learner.predict(sx, sy, qx)
        second = learner.predict(sx, sy, qx)
    after = state(bb.module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(first, second)
    assert all(not t.requires_grad or t.grad is None for t in bb.module.parameters())


@pytest.mark.parametrize("module, name", [(matchingnet, "matchingnet"), (relationnet, "relationnet"),
                                          (baseline, "baseline"), (baseline, "baseline++")])
def test_smoke_run_on_the_tiny_task_is_reproducible(module, name):
    host = host_with(("learners", module), ("tiny", tiny_plugin()), ("conv4", conv4_plugin), builtins=False)
    assert host.errors == []
    request = RunRequest(learner=name, task="tiny-3w2s", budget="smoke", seed=3, episodes=4)
    first, second = execute(request, host), execute(request, host)
    assert first["per_episode"] == second["per_episode"]
    assert all(0.0 <= v <= 1.0 for v in first["per_episode"])
