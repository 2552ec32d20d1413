"""Correctness of the speed work (never timing): task-batched and checkpointed MAML give the loop's
meta-gradient, and every benchmark script runs in its ``--quick`` setting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metabench.task import Episode
from metabench_plugins.learners.checkpointed_inner_loop import adapt_checkpointed, maml_meta_backward
from metabench_plugins.backbones.conv4 import conv4
from metabench_plugins.learners.maml import adapt, batch_statistics_only, maml_meta_loss
from metabench_plugins.learners.maml_vmap import BasicBatchNorm, StackedTasks, maml_meta_loss_vmap

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["bench_episodes.py", "bench_maml.py", "bench_memory.py", "bench_eval.py", "bench_end_to_end.py"]


def tiny_maml(seed: int = 0, width: int = 4, size: int = 16, ways: int = 3):
    """A float64 conv4 (width 4) + head with batch-statistics BatchNorm, and its parameter dict."""
    torch.manual_seed(seed)
    backbone = conv4(1, size, width=width)
    model = batch_statistics_only(nn.Sequential(backbone.module, nn.Linear(backbone.out_features, ways))).double()
    for m in model.modules():  # non-trivial BatchNorm scale and shift
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model, dict(model.named_parameters())


def tiny_tasks(n: int = 2, ways: int = 3, shots: int = 2, queries: int = 3, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return [Episode(torch.rand(ways * shots, 1, size, size, generator=g, dtype=torch.float64),
                    labels.repeat_interleave(shots),
                    torch.rand(ways * queries, 1, size, size, generator=g, dtype=torch.float64),
                    labels.repeat_interleave(queries)) for _ in range(n)]


def meta_grad(loss_fn, params):
    loss = loss_fn()
    return loss.detach(), torch.autograd.grad(loss, list(params.values()))


def assert_close(got, want, tol):
    """Largest absolute difference relative to the largest entry (conv biases before BatchNorm
    have meta-gradients of ~1e-16, so per-tensor relative errors would test rounding noise)."""
    scale = max(w.abs().max().item() for w in want)
    assert scale > 0
    error = max((g - w).abs().max().item() for g, w in zip(got, want))
    assert error / scale < tol, f"relative error {error / scale:.3g}"


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_meta_gradient_equals_loop(first_order):
    model, params = tiny_maml()
    tasks = tiny_tasks()
    loss_loop, g_loop = meta_grad(lambda: maml_meta_loss(model, params, tasks, 0.4, 2, first_order), params)
    loss_vmap, g_vmap = meta_grad(lambda: maml_meta_loss_vmap(model, params, tasks, 0.4, 2, first_order), params)
    assert torch.allclose(loss_vmap, loss_loop, rtol=0, atol=1e-12)
    assert_close(g_vmap, g_loop, 1e-10)
    assert any(g.abs().max() > 0 for g in g_loop)


def test_vmap_accepts_stacked_tasks_and_rejects_ragged():
    model, params = tiny_maml()
    tasks = tiny_tasks()
    a = maml_meta_loss_vmap(model, params, tasks, 0.4, 1)
    b = maml_meta_loss_vmap(model, params, StackedTasks.of(tasks), 0.4, 1)
    assert torch.equal(a, b)
    ragged = tasks[:1] + tiny_tasks(1, shots=1)
    with pytest.raises(ValueError, match="equal shapes"):
        maml_meta_loss_vmap(model, params, ragged, 0.4, 1)


def test_basic_batchnorm_matches_batchnorm2d():
    bn = nn.BatchNorm2d(5, track_running_stats=False).double()
    bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    assert torch.allclose(BasicBatchNorm.like(bn)(x), bn(x), atol=1e-12)


def test_checkpointed_adapt_gives_same_parameters_and_meta_gradient():
    model, params = tiny_maml()
    t = tiny_tasks(1)[0]

    def meta(adapt_fn):
        adapted = adapt_fn()
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, adapted, (t.query_x,)), t.query_y)
        return adapted, torch.autograd.grad(loss, list(params.values()))

    plain, g_plain = meta(lambda: adapt(model, params, t.support_x, t.support_y, 0.4, 3, first_order=False))
    ckpt, g_ckpt = meta(lambda: adapt_checkpointed(model, params, t.support_x, t.support_y, 0.4, 3))
    assert_close([ckpt[n] for n in params], [plain[n] for n in params], 1e-12)
    assert_close(g_ckpt, g_plain, 1e-10)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_meta_backward_accumulates_the_loop_meta_gradient(checkpoint):
    model, params = tiny_maml()
    tasks = tiny_tasks(3)
    loss, g_loop = meta_grad(lambda: maml_meta_loss(model, params, tasks, 0.4, 2), params)
    value = maml_meta_backward(model, params, tasks, 0.4, 2, checkpoint=checkpoint)
    assert abs(value - loss.item()) < 1e-12
    assert_close([p.grad for p in params.values()], g_loop, 1e-10)


def test_benchmark_scripts_run_quick(tmp_path):
    """Each script in its tiny setting, in one process (peers missing: skipped with a message)."""
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "for script, out in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    sys.argv = [script, '--quick', '--reps', '1', '--json', out]\n"
        "    runpy.run_path(script, run_name='__main__')\n"
    )
    args = []
    for name in SCRIPTS:
        args += [str(ROOT / "benchmarks" / name), str(tmp_path / (name + ".json"))]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in SCRIPTS:
        doc = json.loads((tmp_path / (name + ".json")).read_text())
        assert doc["markdown"].startswith("## ")


def test_gpu_benchmark_dry_runs_on_cpu(tmp_path):
    """bench_gpu.py's every section at tiny sizes on the CPU (what runs on a lent GPU, minus CUDA):
    its JSON is a run_all section, and a whole run through the CLI took part."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["markdown"].startswith("## 6. GPU path")
    assert set(doc["data"]) >= {"ceilings", "maml", "eval", "targets", "runs"}
    targets = doc["data"]["targets"]["configs"]  # MAML's paper configurations, projected to 60,000 steps
    assert [k.split()[0] for k in targets] == ["omniglot-5w1s", "miniimagenet-5w1s"]
    assert all(t["meta_steps"] == 60000 and t["projected_minutes"] > 0 for t in targets.values())
    assert [t["inner_steps"] for t in targets.values()] == [1, 5]
    assert "metabench grouped" in {row[1] for row in doc["data"]["maml"]["rows"]}
    assert doc["data"]["runs"]["smoke"]["protonet"]["mean"] > 0
    assert doc["data"]["maml"]["configs"]  # one configuration measured, meta-gradients checked
    assert all(v < 1e-5 for cfg in doc["data"]["maml"]["configs"].values()
               for v in cfg["meta_gradient_relative_difference"].values())


def test_end_to_end_tabulates_stored_results(tmp_path):
    """--from-results reads result files only: per learner, the median of the stored timings."""
    for seed, (train, evaluate) in enumerate([(10.0, 2.0), (30.0, 4.0), (20.0, 3.0)]):
        doc = {"task": {"name": "kanji-5w1s", "episodes": 600}, "budget": "quick", "seed": seed,
               "learner": {"name": "toy"}, "timing": {"meta_train_s": train, "eval_s": evaluate},
               "environment": {"threads": 1, "git_commit": "abcdef0123"}}
        (tmp_path / f"r{seed}.json").write_text(json.dumps(doc))
    (tmp_path / "other.json").write_text(json.dumps({**doc, "budget": "smoke", "learner": {"name": "skipped"}}))
    out = tmp_path / "section.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_end_to_end.py"), "--from-results",
                           str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    markdown = json.loads(out.read_text())["markdown"]
    assert "| toy | 3 | 20 | 3.0 | 23 | 200 | 1 | abcdef0 |" in markdown
    assert "skipped" not in markdown


# ----------------------------------------------------------------------------- the maml learner's options


def learner_meta_grad(problem: str, **options):
    """float64 meta-gradient of one meta-batch through MAML.meta_backward with ``options``."""
    from metabench.task import Protocol
    from metabench_plugins.learners.maml import MAML, MAMLConfig
    from metabench_plugins.backbones.mlp import mlp

    torch.manual_seed(0)
    if problem == "classification":
        backbone = conv4(1, 16, width=4)
        protocol = Protocol(name="t-3w2s", version=1, dataset="t", ways=3, shots=2, queries=3, episodes=1, image_size=16)
        tasks = tiny_tasks()
    else:
        backbone = mlp(1, 1)
        protocol = Protocol(name="s-5s", version=1, dataset="s", ways=1, shots=5, queries=5, episodes=1, image_size=1,
                            problem="regression", metric="mse", higher_is_better=False)
        g = torch.Generator().manual_seed(3)
        tasks = [Episode(torch.randn(5, 1, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64),
                         torch.randn(7, 1, generator=g, dtype=torch.float64), torch.randn(7, 1, generator=g, dtype=torch.float64))
                 for _ in range(3)]
    config = MAMLConfig(meta_steps=1, meta_batch=len(tasks), inner_lr=0.1, inner_steps=3, **options)
    learner = MAML(config, backbone, protocol, torch.device("cpu"))
    learner.model.double()
    loss = learner.meta_backward(tasks)
    return loss, [p.grad.clone() for p in learner.model.parameters()]


@pytest.mark.parametrize("problem", ["classification", "regression"])
@pytest.mark.parametrize("options", [dict(task_batching="vmap"), dict(per_task_backward=True), dict(task_batching="grouped"),
                                     dict(first_order=True, task_batching="grouped"),
                                     dict(inner_checkpoint=True), dict(first_order=True, per_task_backward=True),
                                     dict(first_order=True, task_batching="vmap")])
def test_maml_learner_options_give_the_loops_meta_gradient(problem, options):
    first_order = options.get("first_order", False)
    loss_loop, g_loop = learner_meta_grad(problem, first_order=first_order, task_batching="loop")
    loss, grads = learner_meta_grad(problem, **options)
    assert abs(loss - loss_loop) < 1e-12
    assert_close(grads, g_loop, 1e-10)


@pytest.mark.parametrize("options,message", [
    (dict(task_batching="groups"), "task_batching must be one of auto, loop, vmap, stacked, grouped"),
    (dict(task_batching="grouped", per_task_backward=True), "cannot be combined"),
    (dict(task_batching="vmap", inner_checkpoint=True), "cannot be combined"),
    (dict(inner_checkpoint=True, first_order=True), "second-order"),
    (dict(per_task_backward="yes"), "true or false"),
])
def test_maml_learner_rejects_impossible_options(options, message):
    with pytest.raises(ValueError, match=message):
        learner_meta_grad("classification", **options)


@pytest.mark.parametrize("learner_name,device,options,expected", [
    ("maml", "cpu", {}, "loop"),
    ("maml", "cuda", {}, "grouped"),  # conv4: one grouped convolution per layer for the meta-batch
    ("metasgd", "cuda", {}, "grouped"),
    ("maml", "cuda", dict(task_batching="vmap"), "vmap"),
    ("maml", "cuda", dict(per_task_backward=True), "loop"),
    ("maml", "cuda", dict(inner_checkpoint=True), "loop"),
    ("anil", "cuda", {}, "loop"),  # ANIL computes its own meta-loss
    ("maml", "cpu", dict(task_batching="vmap"), "vmap"),
])
def test_task_batching_auto_picks_grouped_or_vmap_on_cuda_only(learner_name, device, options, expected):
    """The default ``task_batching = "auto"`` resolves per device (checked without a GPU: the
    resolution reads only ``learner.device``); what it resolved to is what the result records."""
    from metabench_plugins.learners.anil import ANIL
    from metabench_plugins.datasets.kanji import protocols
    from metabench_plugins.learners.maml import MAML
    from metabench_plugins.learners.metasgd import MetaSGD

    cls = {"maml": MAML, "anil": ANIL, "metasgd": MetaSGD}[learner_name]
    protocol = next(p for p in protocols() if p.name == "kanji-5w1s")
    learner = cls(cls.Config(**options), conv4(1, 28, width=4), protocol, torch.device("cpu"))
    learner.config.task_batching = options.get("task_batching", "auto")
    learner.device = torch.device(device)
    learner.check_meta_gradient_options(learner_name)
    assert learner.config.task_batching == expected


def test_check_inference_compares_both_paths(tmp_path):
    """The test-time-copy check runs end to end (smoke budget, 3 episodes) and finds the copy
    in use and agreeing with the plain network."""
    import os

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_inference.py"), "matchingnet",
                          "--budget", "smoke", "--episodes", "3"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["episodes"] == 3 and stats["queries"] == 3 * 5 * 15
    assert stats["form"] in ("frozen", "folded") and stats["predicted_class_differs"] == 0
    assert stats["max_abs_output_difference"] < 1e-3


@pytest.mark.slow
def test_gpu_check_dry_runs_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh's steps run end to end with DEVICE=cpu QUICK=1 and write the summary."""
    env = dict(os.environ, DEVICE="cpu", QUICK="1", OUT=str(tmp_path), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = ["bench_gpu", "torchrun", "repeat_protonet_a", "repeat_protonet_b", "repeat_maml_a", "repeat_maml_b",
             "eval_batch_16", "eval_batch_16-again", "eval_batch_1", "bf16"]
    assert {name: step["exit"] for name, step in summary["steps"].items()} == dict.fromkeys(steps, 0)
    assert summary["torchrun"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    # on a CPU every check passes: repeated runs and evaluations are bit-identical, and so are
    # --eval-batch 16 and 1
    assert summary["checks"] == dict.fromkeys(["repeat protonet", "repeat maml", "eval repeat (batch 16)",
                                               "eval batch 16 vs 1 ran", "bf16 run"], "PASS")
    assert summary["repeat_protonet"]["trained_state_identical"] is True
    assert summary["eval_batch"]["identical"] and summary["eval_batch"]["batch"] == [1, 16]
    assert summary["bf16"]["precision"] == "bf16"


def test_grouped_needs_a_plain_chain_of_convolutions_and_cuda_falls_back_to_vmap():
    """ResNet-12 (residual blocks, not a chain) is not groupable: ``grouped`` is refused naming what it
    needs, and ``auto`` on CUDA takes vmap there."""
    from metabench.stacked_tasks import groupable
    from metabench_plugins.backbones.resnet12 import resnet12
    from metabench_plugins.datasets.kanji import protocols
    from metabench_plugins.learners.maml import MAML

    protocol = next(p for p in protocols() if p.name == "kanji-5w1s")
    model, _ = tiny_maml()
    assert groupable(model)
    with pytest.raises(ValueError, match="grouped\" needs a plain chain of convolutions"):
        MAML(MAML.Config(task_batching="grouped"), resnet12(1, 28), protocol, torch.device("cpu"))
    learner = MAML(MAML.Config(), resnet12(1, 28), protocol, torch.device("cpu"))
    assert not groupable(learner.model)
    learner.config.task_batching, learner.device = "auto", torch.device("cuda")
    learner.check_meta_gradient_options("maml")
    assert learner.config.task_batching == "vmap"
    assert not groupable(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten()))  # running statistics
    assert not groupable(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()))
    assert not groupable(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))  # no convolution: that is "stacked"


@pytest.mark.parametrize("first_order", [False, True])
def test_grouped_meta_gradient_equals_loop_with_grouped_convolutions_and_metasgd_step_sizes(first_order):
    """A conv layer with groups=2 and stride 2, average pooling, and Meta-SGD's per-element step
    sizes (a mapping): the grouped forward's meta-loss and meta-gradient are the loop's in float64."""
    from metabench.stacked_tasks import stacked_meta_loss

    torch.manual_seed(0)
    model = batch_statistics_only(nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(6), nn.ELU(), nn.AvgPool2d(2)),
        nn.Flatten(), nn.Linear(24, 5), nn.Tanh(), nn.Linear(5, 3))).double()
    params = dict(model.named_parameters())
    steps = {n: torch.rand_like(p) * 0.3 for n, p in params.items()}
    tasks = tiny_tasks(n=3)
    loss_loop, g_loop = meta_grad(lambda: maml_meta_loss(model, params, tasks, steps, 2, first_order), params)
    loss, grads = meta_grad(lambda: stacked_meta_loss(model, params, tasks, steps, 2, first_order,
                                                      convolutions=True), params)
    assert torch.allclose(loss, loss_loop, rtol=0, atol=1e-12)
    assert_close(grads, g_loop, 1e-10)


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_learner_grouped_gives_the_loops_meta_gradient_for_weights_and_step_sizes(first_order):
    """Meta-SGD through its own meta_backward: the grouped meta-batch's gradients of theta and of the
    learned step sizes alpha are the loop's (float64)."""
    from metabench.task import Protocol
    from metabench_plugins.learners.metasgd import MetaSGD

    protocol = Protocol(name="t-3w2s", version=1, dataset="t", ways=3, shots=2, queries=3, episodes=1, image_size=16)

    def grads(task_batching):
        torch.manual_seed(0)
        config = MetaSGD.Config(meta_steps=1, meta_batch=2, inner_steps=2, alpha_init=0.05, alpha_init_max=0.2,
                                first_order=first_order, task_batching=task_batching)
        learner = MetaSGD(config, conv4(1, 16, width=4), protocol, torch.device("cpu"))
        learner.model.double()
        for t in learner.optimized_tensors():
            t.data = t.data.double()
        loss = learner.meta_backward(tiny_tasks())
        assert len(learner.optimized_tensors()) == 2 * len(list(learner.model.parameters()))  # theta and alpha
        return learner.config.task_batching, loss, [t.grad.clone() for t in learner.optimized_tensors()]

    mode_loop, loss_loop, g_loop = grads("loop")
    mode, loss, g = grads("grouped")
    assert (mode_loop, mode) == ("loop", "grouped")
    assert abs(loss - loss_loop) < 1e-12
    assert_close(g, g_loop, 1e-10)
    half = len(g) // 2
    assert all(a.abs().max() > 0 for a in g[half:])  # alpha is learned: its meta-gradient is not zero
