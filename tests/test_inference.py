"""Test-time copies of a network (metabench/inference.py): same function, faster forms, rebuilt on change."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from metabench import inference
from metabench.inference import InferenceNet, fold_batchnorm
from metabench_plugins.backbones.conv4 import conv4


def trained_conv4(width: int = 8, size: int = 28) -> nn.Module:
    """conv4 with non-trivial BatchNorm running statistics and affine parameters, in eval mode."""
    torch.manual_seed(0)
    net = conv4(1, size, width=width).module
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        net.train()
        for _ in range(3):
            net(torch.rand(32, 1, size, size))
    return net.eval()


def test_fold_batchnorm_removes_every_batchnorm_and_keeps_the_function():
    net = trained_conv4()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the source is untouched
    x = torch.rand(10, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_leaves_batch_statistics_batchnorm_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.BatchNorm2d)


@pytest.mark.parametrize("batch", [100, 7])
def test_inference_net_agrees_with_the_eval_network_at_any_batch_size(batch):
    net = trained_conv4()
    fast = InferenceNet(net)
    fast(torch.rand(100, 1, 28, 28))  # built on one batch size
    assert fast.form == "frozen"  # CPU: the frozen TorchScript form is what runs
    x = torch.rand(batch, 1, 28, 28)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    # another batch size is checked against the plain network once (and would be rebuilt if it disagreed)
    assert fast.builds == 1 and fast.checks == (0 if batch == 100 else 1)
    fast(x)
    assert fast.checks == (0 if batch == 100 else 1)


def test_inference_net_checks_each_input_shape_so_a_shape_dependent_branch_cannot_slip_through():
    class ShapeBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.conv(x).flatten(1)
            return y * 2 if x.shape[0] > 10 else y  # a trace keeps the first input's branch

    net = ShapeBranch().eval()
    fast = InferenceNet(net)
    for n in (20, 5, 20):
        x = torch.rand(n, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)


def test_inference_net_is_rebuilt_when_the_weights_change():
    net = trained_conv4()
    fast = InferenceNet(net)
    x = torch.rand(20, 1, 28, 28)
    before = fast(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    net(x).pow(2).mean().backward()
    opt.step()
    net.eval()
    with torch.no_grad():
        expected = net(x)
    after = fast(x)
    assert (after - before).abs().max() > 1e-3  # the step changed the function ...
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)  # ... and the copy followed
    assert fast.builds == 2
    for _ in range(3):
        fast(x)
    assert fast.builds == 2  # unchanged weights: no rebuild, however often it is called


def test_inference_net_runs_the_plain_network_off_the_cpu():
    """Off the CPU (here the meta device stands in for a GPU) nothing is folded or traced."""
    net = trained_conv4().to("meta")
    fast = InferenceNet(net)
    out = fast(torch.empty(5, 1, 28, 28, device="meta"))
    assert out.device.type == "meta" and out.shape == (5, 8)
    assert fast.builds == 0 and fast.form == "plain"


def test_inference_net_falls_back_when_a_faster_form_fails(monkeypatch):
    def broken(folded, x):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(InferenceNet, "_freeze", staticmethod(broken))
    net = trained_conv4()
    fast = InferenceNet(net)
    x = torch.rand(12, 1, 28, 28)
    out = fast(x)
    assert fast.form == "folded"
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)


def test_inference_net_drops_a_form_that_disagrees(monkeypatch):
    """A faster form whose output differs from the plain network's is never used."""
    monkeypatch.setattr(inference, "fold_batchnorm", lambda m: _Scaled(m))
    net = trained_conv4()
    fast = InferenceNet(net, allow_frozen=False)
    x = torch.rand(12, 1, 28, 28)
    out = fast(x)
    assert fast.form == "plain"
    with torch.no_grad():
        torch.testing.assert_close(out, net(x))


class _Scaled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.01


def test_protonet_predict_matches_the_plain_network():
    from metabench_plugins.datasets.kanji import protocols
    from metabench_plugins.learners.protonet import ProtoNet, ProtoNetConfig, prototype_logits

    protocol = next(p for p in protocols() if p.name == "kanji-5w5s")
    torch.manual_seed(0)
    learner = ProtoNet(ProtoNetConfig(), conv4(1, 28, width=8), protocol, torch.device("cpu"))
    learner.net.load_state_dict(trained_conv4().state_dict())
    sx, qx = torch.rand(25, 1, 28, 28), torch.rand(75, 1, 28, 28)
    sy = torch.arange(5).repeat_interleave(5)
    logits = learner.predict(sx, sy, qx)
    with torch.no_grad():
        emb = learner.net.eval()(torch.cat([sx, qx]))
    expected = prototype_logits(emb[:25], sy, emb[25:], 5)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def _kanji_5w5s():
    from metabench_plugins.datasets.kanji import protocols

    return next(p for p in protocols() if p.name == "kanji-5w5s")


def test_matchingnet_predict_runs_the_test_time_copy_and_matches_the_plain_network():
    from metabench_plugins.learners.matchingnet import MatchingNet, MatchingNetConfig

    for fce in (False, True):
        torch.manual_seed(0)
        learner = MatchingNet(MatchingNetConfig(fce=fce), conv4(1, 28, width=8), _kanji_5w5s(), torch.device("cpu"))
        learner.net.load_state_dict(trained_conv4().state_dict())
        sx, qx = torch.rand(25, 1, 28, 28), torch.rand(75, 1, 28, 28)
        sy = torch.arange(5).repeat_interleave(5)
        learner.train_mode(True)  # predict must switch to running statistics itself
        out = learner.predict(sx, sy, qx)
        assert learner._inference.builds == 1 and learner._inference.form != "plain"
        learner.train_mode(False)
        with torch.no_grad():
            expected = learner.episode_logits(sx, sy, qx, 5)  # the plain eval-mode backbone
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(out.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("name", ["baseline", "baseline++"])
def test_baseline_predict_embeds_with_the_test_time_copy_and_matches_the_plain_network(name):
    from metabench_plugins.learners.baseline import Baseline, BaselineConfig, BaselinePlusPlus, BaselinePlusPlusConfig

    cls, config = (Baseline, BaselineConfig) if name == "baseline" else (BaselinePlusPlus, BaselinePlusPlusConfig)
    torch.manual_seed(0)
    learner = cls(config(finetune_steps=20), conv4(1, 28, width=8), _kanji_5w5s(), torch.device("cpu"))
    learner.net.load_state_dict(trained_conv4().state_dict())
    learner.net.train()
    sx, qx = torch.rand(25, 1, 28, 28), torch.rand(75, 1, 28, 28)
    sy = torch.arange(5).repeat_interleave(5)
    out = learner.predict(sx, sy, qx)
    assert learner._inference.builds == 1 and learner._inference.form != "plain" and not learner.net.training

    def plain(x):  # the plain eval-mode network, as predict embedded before the test-time copy
        with torch.no_grad():
            return learner.net.eval()(x)

    learner._inference = plain
    expected = learner.predict(sx, sy, qx)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(out.argmax(1), expected.argmax(1))
