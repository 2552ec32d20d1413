"""Meta-Transfer Learning (``mtl``) and its variants ``amtl`` and ``tamtl``.

* Scaling and shifting: identity at initialisation (conv4 and resnet12), the scaled conv by hand.
* Meta-training freezes the extractor (weights and BatchNorm statistics) and moves SS and theta;
  the inner loop moves the base learner alone.
* Hard-task meta-batches: the recorded failure classes are the tasks' lowest-accuracy classes,
  and the next meta-batch holds a task re-sampled from them, with new images of those classes.
* amtl: FGSM's perturbation has L-inf norm epsilon and raises the loss; PGD stays in the ball.
* tamtl: the entropy term against a hand computation; inequality measures by hand.
* ``predict`` is deterministic and changes no parameter; smoke runs through the runner.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TinySource, host_with, tiny_plugin
from metabench_plugins.learners import amtl as amtl_module
from metabench_plugins.backbones import conv4 as conv4_module
from metabench_plugins.learners import mtl as mtl_module
from metabench_plugins.learners import tamtl as tamtl_module
from metabench_plugins.learners.amtl import AMTL, fgsm, pgd
from metabench_plugins.backbones.conv4 import conv4
from metabench_plugins.learners.mtl import (
    MTL,
    SSConv2d,
    failure_class,
    frozen_parameters,
    install_scaling_shifting,
    ss_parameters,
)
from metabench_plugins.backbones.resnet12 import resnet12
from metabench_plugins.learners.tamtl import (
    TAMTL,
    generalized_entropy,
    gini,
    prediction_entropy,
    theil_index,
)
from torch import nn

from metabench import Protocol, TrainContext
from metabench.episodes import TrainSampler
from metabench.runner import RunRequest, execute

SMALL = {"pretrain_steps": 2, "pretrain_batch": 16, "pretrain_lr_step": 0, "meta_steps": 3, "meta_batch": 2,
         "train_queries": 2, "inner_steps": 3, "eval_inner_steps": 3, "meta_lr_step": 0, "meta_lr_ss": 0.01,
         "meta_lr_head": 0.01}


def make(cls=MTL, backbone=None, protocol: Protocol = TINY, **overrides):
    torch.manual_seed(0)
    config = cls.Config(**{**SMALL, **overrides})
    return cls(config, backbone or conv4(1, protocol.image_size, width=8), protocol, torch.device("cpu"))


def make_ctx(protocol: Protocol = TINY, seed: int = 0) -> TrainContext:
    source = TinySource()
    return TrainContext(protocol, TrainSampler(protocol, source, seed), source, torch.device("cpu"),
                        torch.Generator().manual_seed(seed), lambda *args, **kwargs: None)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def small_resnet12():
    return resnet12(1, 16, width_scale=0.1)


# --------------------------------------------------------------------------- scaling and shifting


@pytest.mark.parametrize("build", [lambda: conv4(1, 16, width=8), small_resnet12], ids=["conv4", "resnet12"])
def test_scaling_shifting_at_initialisation_leaves_the_extractor_unchanged(build):
    torch.manual_seed(1)
    backbone = build()
    module = backbone.module.eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    x = torch.rand(4, 1, 16, 16)
    before = module(x)
    wrapped = install_scaling_shifting(module)
    assert len(wrapped) == convs > 0
    assert all(bool((w.ss_scale == 1).all()) and bool((w.ss_shift == 0).all()) for w in wrapped)
    assert all(w.ss_scale.shape == (w.conv.out_channels,) for w in wrapped)
    assert torch.equal(module(x), before)
    assert install_scaling_shifting(module) == []  # wrapping twice adds nothing


@pytest.mark.parametrize("bias", [True, False])
def test_scaled_and_shifted_conv_by_hand(bias):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
    ss = SSConv2d(conv)
    with torch.no_grad():
        ss.ss_scale.uniform_(0.5, 1.5)
        ss.ss_shift.normal_()
    x = torch.randn(2, 3, 7, 7)
    weight = conv.weight * ss.ss_scale[:, None, None, None]
    expected_bias = ss.ss_shift + (conv.bias if bias else 0)
    torch.testing.assert_close(ss(x), F.conv2d(x, weight, expected_bias, padding=1))


# --------------------------------------------------------------------------- what moves


def test_meta_training_freezes_the_extractor_and_moves_ss_and_theta():
    learner, ctx = make(), make_ctx()
    learner.pretrain(ctx)
    extractor_before = {k: v for k, v in snapshot(learner.extractor).items() if "ss_" not in k}
    ss_before = [p.detach().clone() for p in ss_parameters(learner.extractor)]
    head_before = snapshot(learner.head)
    learner.start_meta_training()
    assert all(not p.requires_grad for p in frozen_parameters(learner.extractor))
    for _ in range(3):
        learner.meta_step(ctx)
    after = snapshot(learner.extractor)
    for k, v in extractor_before.items():  # conv and BatchNorm weights and running statistics
        assert torch.equal(after[k], v), k
    moved = [not torch.equal(p, q) for p, q in zip(ss_parameters(learner.extractor), ss_before)]
    assert all(moved), "every scaling and shifting parameter is meta-learned"
    assert any(not torch.equal(v, head_before[k]) for k, v in snapshot(learner.head).items())


def test_meta_step_on_resnet12_reaches_every_convolution():
    learner, ctx = make(backbone=small_resnet12(), pretrain_steps=0), make_ctx()
    learner.meta_step(ctx)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ss_parameters(learner.extractor))
    assert all(p.grad is None for p in frozen_parameters(learner.extractor))


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_loop_adapts_the_base_learner_alone(first_order):
    learner, ctx = make(first_order=first_order), make_ctx()
    learner.start_meta_training()
    ep = ctx.sampler.sample(ways=3, shots=2, queries=2)
    everything = snapshot(learner.extractor) | {f"head.{k}": v for k, v in snapshot(learner.head).items()}
    feats = learner.features(ep.support_x)
    adapted = learner.adapt_head(feats, ep.support_y, 3, first_order)
    assert set(adapted) == {"weight", "bias"}
    assert not torch.equal(adapted["weight"], learner.head.weight)
    after = snapshot(learner.extractor) | {f"head.{k}": v for k, v in snapshot(learner.head).items()}
    assert all(torch.equal(after[k], v) for k, v in everything.items())
    # the adapted learner is theta minus inner steps: it fits the support set better than theta
    before_loss = F.cross_entropy(learner.head(feats), ep.support_y)
    after_loss = F.cross_entropy(learner.head_logits(adapted, feats), ep.support_y)
    assert after_loss < before_loss


# --------------------------------------------------------------------------- hard tasks


def reference_failure(logits: torch.Tensor, labels: torch.Tensor, ways: int) -> int:
    """Lowest per-class accuracy; ties: highest mean query loss (written independently)."""
    best = None
    for c in range(ways):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        acc = sum(int(logits[i].argmax() == c) for i in rows) / len(rows)
        loss = sum(-torch.log_softmax(logits[i], 0)[c].item() for i in rows) / len(rows)
        if best is None or acc < best[0] or (acc == best[0] and loss > best[1]):
            best = (acc, loss, c)
    return best[2]


def test_failure_class_rule():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.tensor([[2.0, 0, 0], [2, 0, 0], [0, 2, 0], [1, 0, 0], [0, 0, 2], [0, 3, 0]])
    # class 1 and 2 both at 50%; class 2's wrong query is more confidently wrong -> higher loss
    assert failure_class(logits, labels, 3) == reference_failure(logits, labels, 3) == 2
    logits[5] = torch.tensor([0.0, 0, 2])  # now class 1 alone is the worst
    assert failure_class(logits, labels, 3) == reference_failure(logits, labels, 3) == 1


def test_hard_task_meta_batch_holds_the_recorded_failure_classes():
    learner, ctx = make(hard_tasks=True, hard_task_count=1), make_ctx()
    learner.start_meta_training()
    seen = []
    original = learner.task_outcome

    def spy(ep):
        out = original(ep)
        seen.append((out.logits.clone(), out.query_y.clone()))
        return out

    learner.task_outcome = spy
    learner.meta_step(ctx)
    first = learner.last_draws
    assert [hard for _, hard in first] == [False, False]  # nothing recorded yet: fresh tasks only
    expected = [draw.classes[reference_failure(lg, y, TINY.ways)] for (draw, _), (lg, y) in zip(first, seen)]
    assert learner.last_failures == expected
    recorded = set(expected)

    seen.clear()
    learner.meta_step(ctx)
    second = learner.last_draws
    assert [hard for _, hard in second] == [False, False, True]
    hard_draw = second[-1][0]
    assert recorded <= set(hard_draw.classes)  # fewer than `ways` recorded: all of them, topped up
    assert len(set(hard_draw.classes)) == TINY.ways
    # new images of those classes: each row belongs to its class, none repeats within the task
    offsets, sizes = ctx.source.offsets("train"), ctx.source.class_sizes("train")
    shots, queries = TINY.shots, SMALL["train_queries"]
    for i, k in enumerate(hard_draw.classes):
        rows = hard_draw.support[i * shots:(i + 1) * shots] + hard_draw.query[i * queries:(i + 1) * queries]
        assert all(offsets[k] <= r < offsets[k] + sizes[k] for r in rows)
    assert len(set(hard_draw.support + hard_draw.query)) == len(hard_draw.support + hard_draw.query)
    # the failures of all three tasks (the hard one included) are recorded after the second step
    expected = [draw.classes[reference_failure(lg, y, TINY.ways)] for (draw, _), (lg, y) in zip(second, seen)]
    assert learner.last_failures == expected
    assert learner.failure_pool[:len(set(expected))] == list(dict.fromkeys(expected))


def test_hard_tasks_drawn_from_the_pool_once_it_is_full():
    learner, ctx = make(hard_tasks=True, hard_task_count=2), make_ctx()
    learner.failure_pool = [7, 2, 9, 4]  # more than `ways` recorded classes
    draws = learner.next_draws(ctx)
    hard = [d for d, is_hard in draws if is_hard]
    assert len(hard) == 2
    assert all(set(d.classes) <= {7, 2, 9, 4} and len(set(d.classes)) == TINY.ways for d in hard)


def test_no_hard_tasks_when_switched_off():
    learner, ctx = make(hard_tasks=False), make_ctx()
    for _ in range(2):
        learner.meta_step(ctx)
        assert [hard for _, hard in learner.last_draws] == [False, False]


# --------------------------------------------------------------------------- amtl


def test_fgsm_perturbation_has_linf_norm_epsilon_and_raises_the_loss():
    learner = make(AMTL, epsilon=0.05)
    learner.start_meta_training()
    g = torch.Generator().manual_seed(3)
    x = 0.2 + 0.6 * torch.rand(9, 1, 16, 16, generator=g)  # away from the [0, 1] clip
    y = torch.arange(3).repeat_interleave(3)
    adv = learner.perturb(x, y)
    delta = (adv - x).abs()
    assert math.isclose(delta.max().item(), 0.05, rel_tol=1e-5)
    assert bool((delta <= 0.05 + 1e-6).all())

    def loss(z):
        with torch.no_grad():
            return F.cross_entropy(learner.head(learner.features(z)), y).item()

    assert loss(adv) > loss(x)


def test_fgsm_and_pgd_on_a_known_loss():
    target = torch.tensor([0.5, 0.1, 0.9])
    loss_fn = lambda z: ((z - target) ** 2).sum()
    x = torch.tensor([0.6, 0.3, 0.4])
    adv = fgsm(loss_fn, x, 0.1)
    torch.testing.assert_close(adv, torch.tensor([0.7, 0.4, 0.3]))  # moves away from the target
    far = pgd(loss_fn, x, 0.1, steps=5, step_size=0.04)
    assert bool(((far - x).abs() <= 0.1 + 1e-6).all()) and loss_fn(far) >= loss_fn(adv) - 1e-6
    assert bool((fgsm(loss_fn, torch.tensor([0.95, 0.05, 0.5]), 0.1) <= 1).all())  # clipped to [0, 1]


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_amtl_meta_step_freezes_the_extractor(attack):
    learner, ctx = make(AMTL, attack=attack, pgd_steps=2), make_ctx()
    learner.start_meta_training()
    before = {k: v for k, v in snapshot(learner.extractor).items() if "ss_" not in k}
    learner.meta_step(ctx)
    after = snapshot(learner.extractor)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is not None for p in ss_parameters(learner.extractor))


def test_amtl_loss_is_the_sum_of_the_two_cross_scores():
    learner, ctx = make(AMTL, epsilon=0.03), make_ctx()
    learner.start_meta_training()
    ep = ctx.sampler.sample(ways=3, shots=2, queries=2)
    out = learner.task_outcome(ep)
    c = learner.config
    s_adv, q_adv = learner.perturb(ep.support_x, ep.support_y), learner.perturb(ep.query_x, ep.query_y)
    fs, fs_adv = learner.features(ep.support_x), learner.features(s_adv)
    fq, fq_adv = learner.features(ep.query_x), learner.features(q_adv)
    clean = learner.adapt_head(fs, ep.support_y, c.inner_steps, c.first_order)
    robust = learner.adapt_head(fs_adv, ep.support_y, c.inner_steps, c.first_order)
    expected = (F.cross_entropy(learner.head_logits(clean, fq_adv), ep.query_y)
                + F.cross_entropy(learner.head_logits(robust, fq), ep.query_y))
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- tamtl


def test_prediction_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2) and (3/4, 1/4)
    h1 = math.log(2.0)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(prediction_entropy(logits).item(), (h1 + h2) / 2, rel_tol=1e-6)


def test_tamtl_entropy_term_matches_a_hand_computation():
    learner, ctx = make(TAMTL, regularizer="entropy", reg_weight=0.3), make_ctx()
    learner.start_meta_training()
    ep = ctx.sampler.sample(ways=3, shots=2, queries=2)
    out = learner.task_outcome(ep)
    with torch.no_grad():
        fq = learner.features(ep.query_x)
        p = torch.softmax(fq @ learner.head.weight.t() + learner.head.bias, dim=1)
        entropy = -(p * p.log()).sum(1).mean()
    torch.testing.assert_close(out.entropy.detach(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), (out.adapted_loss - 0.3 * entropy).detach(), rtol=1e-5, atol=1e-6)


def test_inequality_measures_by_hand():
    equal = torch.full((4,), 1.7)
    for measure in (theil_index, gini, lambda v: generalized_entropy(v, 2.0), lambda v: generalized_entropy(v, 0.0)):
        assert abs(measure(equal).item()) < 1e-7
    losses = torch.tensor([1.0, 3.0])  # mean 2: ratios 1/2 and 3/2
    theil = 0.5 * (0.5 * math.log(0.5) + 1.5 * math.log(1.5))
    assert math.isclose(theil_index(losses).item(), theil, rel_tol=1e-6)
    assert math.isclose(generalized_entropy(losses, 1.0).item(), theil, rel_tol=1e-6)
    assert math.isclose(generalized_entropy(losses, 2.0).item(), ((0.25 + 2.25) / 2 - 1) / 2, rel_tol=1e-6)
    assert math.isclose(generalized_entropy(losses, 0.0).item(), -(math.log(0.5) + math.log(1.5)) / 2, rel_tol=1e-6)
    assert math.isclose(gini(losses).item(), 0.25, rel_tol=1e-6)


@pytest.mark.parametrize("of", ["initial", "adapted"])
def test_tamtl_inequality_meta_loss(of):
    learner, ctx = make(TAMTL, regularizer="inequality", reg_weight=0.5, inequality_of=of), make_ctx()
    learner.start_meta_training()
    outcomes = [learner.task_outcome(ctx.sampler.sample(ways=3, shots=2, queries=2)) for _ in range(3)]
    per_task = torch.stack([o.initial_loss if of == "initial" else o.adapted_loss for o in outcomes])
    expected = torch.stack([o.adapted_loss for o in outcomes]).mean() + 0.5 * theil_index(per_task)
    torch.testing.assert_close(learner.meta_loss(outcomes), expected)
    learner.meta_step(ctx)  # and it trains


# --------------------------------------------------------------------------- predict and runs


@pytest.mark.parametrize("cls", [MTL, AMTL, TAMTL])
def test_predict_is_deterministic_and_changes_no_parameter(cls):
    learner, ctx = make(cls), make_ctx()
    learner.meta_train(ctx)
    ep = ctx.sampler.sample()
    before = snapshot(learner.extractor) | {f"head.{k}": v for k, v in snapshot(learner.head).items()}
    with torch.no_grad():
        first = learner.predict(ep.support_x, ep.support_y, ep.query_x)
        second = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    assert first.shape == (ep.query_x.shape[0], TINY.ways)
    assert torch.equal(first, second)
    after = snapshot(learner.extractor) | {f"head.{k}": v for k, v in snapshot(learner.head).items()}
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_backbone_without_convolutions_is_refused():
    from metabench_plugins.backbones.mlp import mlp

    with pytest.raises(ValueError, match="Conv2d"):
        make(backbone=mlp(1, 16))


@pytest.mark.parametrize("name, module", [("mtl", mtl_module), ("amtl", amtl_module), ("tamtl", tamtl_module)])
def test_smoke_run_through_the_runner(name, module):
    host = host_with(("tiny", tiny_plugin()), ("conv4", conv4_module), (name, module), builtins=False)
    request = RunRequest(learner=name, task="tiny-3w2s", budget="smoke", seed=3, episodes=5)
    first, second = execute(request, host), execute(request, host)
    assert first["per_episode"] == second["per_episode"]
    assert first["learner"]["transductive"] is False
    assert all(0.0 <= v <= 1.0 for v in first["per_episode"])
