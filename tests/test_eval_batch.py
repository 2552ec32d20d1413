"""How a run computes (issue 16, GPU protocols): several test episodes per call (``--eval-batch``),
deterministic evaluation settings on CUDA, and ``--precision bf16`` training.

On a CPU, ``--eval-batch N`` must give every episode the value one episode per call gives: the
per-episode accuracies equal, the logits within 1e-5 (ProtoNet on kanji-5w1s, N = 1, 3 and 16 over
20 episodes, so the last group is short), also sharded over ranks and resumed. Every registered
learner that overrides ``predict_batch`` (protonet, matchingnet, relationnet, baseline, baseline++,
mtl, amtl, tamtl; found from the plugin host, so a new one is covered) is checked fresh (untrained)
on 7 kanji-5w1s episodes in groups of 3: the same shapes, logits within 1e-5 and the same predicted
classes as ``predict``; every inductive built-in must override it. The GPU side
(deterministic cuDNN, no TF32) is checked here only as settings set and put back;
benchmarks/gpu_check.sh runs it on a GPU.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import TINY, ToyLearner, error_line, host_with, run_cli, tiny_plugin

from metabench import Learner, hookimpl
from metabench.checkpoint import identity_difference
from metabench.config import read_toml
from metabench.cross_task import evaluate_saved, load_saved_learner
from metabench.distributed import World
from metabench.errors import MetabenchError, PluginError
from metabench.evaluation import Scores, evaluate
from metabench.episodes import eval_draws
from metabench.numerics import deterministic_cuda, evaluation_numerics, resolve_eval_batch, training_precision
from metabench.results import schema_problems
from metabench.runner import NoProgress, RunRequest, build_learner, execute, prepare

TASK = "kanji-5w1s"


def smoke(learner: str, *extra: str) -> list[str]:
    return ["run", "--learner", learner, "--task", TASK, "--budget", "smoke", "--seed", "0", "--episodes", "20",
            *extra]


@pytest.fixture(scope="module")
def host():
    return host_with()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, host):
    """A protonet smoke run on kanji-5w1s (eval batch 1): its result and its saved learner, made once."""
    from metabench.cli import main

    out = tmp_path_factory.mktemp("protonet")
    assert main(smoke("protonet", "--out", str(out), "--eval-batch", "1")) == 0
    (result,) = out.glob("*.json")
    (saved,) = out.glob("*.learner.pt")
    return json.loads(result.read_text()), saved


def saved_learner_and_draws(saved: Path, host, episodes: int = 20):
    loaded = load_saved_learner(saved, host, episodes=episodes)
    plan = loaded.plan
    plan.source.prepare(plan.protocol.eval_split)
    return loaded.learner, plan, eval_draws(plan.protocol, plan.source, plan.protocol.eval_split, episodes)


def scored(learner, plan, draws, batch: int, world=None, start: Scores | None = None) -> list[float]:
    scores = start or Scores(plan.protocol.problem)
    evaluate(learner, plan.protocol, plan.source, plan.protocol.eval_split, draws, plan.who, NoProgress(),
             plan.device, scores, world=world, batch=batch)
    return scores.per_episode


# ------------------------------------------------------------------------------------ --eval-batch


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_protonet_episodes_in_groups_score_as_one_at_a_time(trained, host, batch):
    result, saved = trained
    learner, plan, draws = saved_learner_and_draws(saved, host)
    assert scored(learner, plan, draws, batch) == result["per_episode"]  # exactly, every episode
    episodes = [plan.source.materialize(d, plan.protocol.eval_split) for d in draws]
    with torch.no_grad():
        alone = [learner.predict(e.support_x, e.support_y, e.query_x) for e in episodes]
        grouped = []
        for i in range(0, len(episodes), batch):  # 20 episodes: the last group is short for 3 and 16
            group = episodes[i:i + batch]
            grouped += learner.predict_batch([(e.support_x, e.support_y, e.query_x) for e in group])
    assert len(grouped) == len(alone) == 20
    for a, b in zip(alone, grouped):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_the_run_records_its_eval_batch_and_metabench_eval_takes_one(trained, host):
    result, saved = trained
    assert result["evaluation"] == {"batch": 1, "precision": "fp32"} and result["precision"] == "fp32"
    doc = evaluate_saved(saved, host, episodes=20, eval_batch=3)
    assert doc["per_episode"] == result["per_episode"]
    assert doc["evaluation"] == {"batch": 3, "precision": "fp32"} and doc["precision"] == "fp32"  # the file says
    assert schema_problems(doc) == []


def test_a_saved_bf16_learner_says_so_and_its_evaluation_is_recorded_as_bf16(host, tmp_path):
    """The learner file keeps the training precision; ``metabench eval`` puts it in the result (so the
    leaderboard keeps the row apart from fp32 ones); a file from before it said gives no precision;
    a damaged one is refused in one line."""
    from metabench.cli import main
    from metabench.learner_file import read_learner_file

    assert main(smoke("protonet", "--episodes", "4", "--precision", "bf16", "--out", str(tmp_path))) == 0
    (saved,) = tmp_path.glob("*.learner.pt")
    (result,) = tmp_path.glob("*.json")
    assert read_learner_file(saved)["precision"] == "bf16"
    doc = evaluate_saved(saved, host, episodes=4)
    assert doc["precision"] == "bf16" and doc["evaluation"]["precision"] == "fp32"
    assert doc["per_episode"] == json.loads(result.read_text())["per_episode"]
    old = Path(__file__).parent / "fixtures" / "learner_format1_maml_sinusoid-5s.learner.pt"
    assert "precision" not in read_learner_file(old)
    damaged = torch.load(saved, weights_only=True)
    damaged["precision"] = "fp8"
    torch.save(damaged, tmp_path / "damaged.learner.pt")
    with pytest.raises(MetabenchError, match=r"damaged learner file \(precision 'fp8'; accepted: fp32, bf16\)"):
        read_learner_file(tmp_path / "damaged.learner.pt")


def test_sharded_ranks_group_their_own_episodes(trained, host, monkeypatch):
    """Two ranks, each scoring its share (episode i on rank i mod 2) in groups of 3: merged, the
    one-process values."""
    result, saved = trained
    learner, plan, draws = saved_learner_and_draws(saved, host)
    shares = {}

    def gather(local, world):  # what each rank computed; the other rank's entries filled with 0
        shares[world.rank] = dict(local)
        return {i: local.get(i, (0.0, None)) for i in range(len(draws))}

    monkeypatch.setattr("metabench.distributed.gather_by_index", gather)
    calls = []
    real = learner.predict_batch
    monkeypatch.setattr(learner, "predict_batch", lambda episodes: calls.append(len(episodes)) or real(episodes))
    for rank in (0, 1):
        scored(learner, plan, draws, 3, world=World(rank=rank, size=2, backend="gloo"))
    assert sorted(shares[0]) == list(range(0, 20, 2)) and sorted(shares[1]) == list(range(1, 20, 2))
    merged = {**shares[0], **shares[1]}
    assert [merged[i][0] for i in range(20)] == result["per_episode"]
    assert calls == [3, 3, 3] * 2  # each rank: 10 episodes, groups of 3, 3, 3 and one alone (predict)


def test_an_evaluation_continued_midway_groups_what_is_left(trained, host):
    result, saved = trained
    learner, plan, draws = saved_learner_and_draws(saved, host)
    start = Scores(plan.protocol.problem, result["per_episode"][:7], None, started=True)
    assert scored(learner, plan, draws, 4, start=start) == result["per_episode"]


# ------------------------------------------------- every learner's predict_batch against its predict


def batching_learners(host) -> list[str]:
    """The registered learners whose class overrides ``Learner.predict_batch``."""
    return sorted(e.name for e in host.learners if e.obj.predict_batch is not Learner.predict_batch)


BATCHING = batching_learners(host_with())  # at collection: a learner that gains predict_batch is tested


def fresh_learner_and_episodes(host, learner: str, episodes: int = 7):
    """An untrained learner (quick budget's test-time settings, weights seeded) on kanji-5w1s and its
    first ``episodes`` fixed test episodes."""
    plan = prepare(RunRequest(learner=learner, task=TASK, budget="quick"), host)
    torch.manual_seed(0)
    built = build_learner(plan, host)
    split = plan.protocol.eval_split
    plan.source.prepare(split)
    return built, [plan.source.materialize(d, split).to(plan.device)
                   for d in eval_draws(plan.protocol, plan.source, split, episodes)]


def alone_and_grouped(learner, episodes, batch: int):
    """Each episode's ``predict`` and its ``predict_batch`` output in groups of ``batch`` (the last
    group short), both under no_grad as the harness calls them."""
    with torch.no_grad():
        alone = [learner.predict(e.support_x, e.support_y, e.query_x) for e in episodes]
        grouped = []
        for i in range(0, len(episodes), batch):
            grouped += learner.predict_batch([(e.support_x, e.support_y, e.query_x) for e in episodes[i:i + batch]])
    return alone, grouped


def test_every_builtin_inductive_learner_takes_several_episodes_per_call(host):
    builtin = [e for e in host.learners if e.obj.__module__.startswith("metabench_plugins.")]
    inductive = sorted(e.name for e in builtin if not e.obj.transductive)
    assert {"protonet", "matchingnet", "baseline", "baseline++", "relationnet", "mtl", "amtl", "tamtl"} <= \
        set(inductive)
    assert [name for name in inductive if name not in batching_learners(host)] == []
    assert set(inductive) <= set(BATCHING)


@pytest.mark.parametrize("learner", BATCHING)
def test_predict_batch_gives_what_predict_gives_per_episode(host, learner):
    """A fresh learner, 7 test episodes in groups of 3 (3, 3, 1): per episode the same shape, logits
    within 1e-5 and the same predicted classes (a grouped pick may differ only where predict's own
    scores tie within that tolerance: an untrained relation module's scores are nearly flat)."""
    built, episodes = fresh_learner_and_episodes(host, learner)
    alone, grouped = alone_and_grouped(built, episodes, 3)
    assert len(grouped) == len(alone) == 7
    for a, b in zip(alone, grouped):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        picked = b.argmax(1)
        differ = picked != a.argmax(1)
        near_tie = a.gather(1, picked[:, None]).squeeze(1) >= a.max(1).values - 1e-5
        assert bool((~differ | near_tie).all())
        assert int(differ.sum()) == 0 or learner == "relationnet"


def test_relationnet_scores_a_group_in_one_relation_forward_or_in_whole_episode_chunks(host, monkeypatch):
    built, episodes = fresh_learner_and_episodes(host, "relationnet", episodes=3)
    forwards = []
    built.relation.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    alone, grouped = alone_and_grouped(built, episodes, 3)
    pairs = [e.query_x.shape[0] * built.protocol.ways for e in episodes]  # [Q_i * ways] pairs per episode
    assert forwards == [*pairs, sum(pairs)]  # predict: one episode's pairs; predict_batch: all in one forward
    forwards.clear()
    module = sys.modules[type(built).__module__]
    per_episode = pairs[0] * 2 * built.map_shape[0] * built.map_shape[1] * built.map_shape[2]
    monkeypatch.setattr(module, "RELATION_BATCH_ELEMENTS", 2 * per_episode)  # two episodes' pairs per forward
    _, chunked = alone_and_grouped(built, episodes, 3)
    assert forwards == [*pairs, pairs[0] + pairs[1], pairs[2]]  # predict_batch: two forwards, whole episodes
    for a, b, c in zip(alone, grouped, chunked):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, b, atol=1e-5, rtol=0)


@dataclass
class GroupLog:
    sizes: list


class BatchedToy(ToyLearner):
    """The toy learner with a predict_batch that logs the group sizes it gets."""

    log = GroupLog([])

    def predict_batch(self, episodes):
        self.log.sizes.append(len(episodes))
        return [self.predict(*e) for e in episodes]


class SeesAutocast(ToyLearner):
    """Allows bf16 and evaluates in it: logs whether autocast was on in meta_train and predict."""

    precisions = frozenset({"fp32", "bf16"})
    evaluates_in_precision = True
    seen: dict = {}

    def meta_train(self, ctx):
        self.seen["meta_train"] = torch.is_autocast_enabled("cpu")
        super().meta_train(ctx)

    def predict(self, support_x, support_y, query_x):
        self.seen["predict"] = torch.is_autocast_enabled("cpu")
        return super().predict(support_x, support_y, query_x)


class WrongCount(ToyLearner):
    def predict_batch(self, episodes):
        return [self.predict(*e) for e in episodes[1:]]


def toy_host():
    class Plugin:
        @hookimpl
        def metabench_register_learners(self, register):
            register("batched_toy", BatchedToy)
            register("wrong_count", WrongCount)
            register("sees_autocast", SeesAutocast)

    return host_with(("tiny", tiny_plugin()), ("toys", Plugin()))


def test_groups_go_to_predict_batch_and_a_learner_without_it_gets_one_episode_per_call():
    host = toy_host()
    plain = execute(RunRequest(learner="toy", task=TINY.name, budget="smoke", eval_batch=16), host)
    BatchedToy.log.sizes.clear()
    batched = execute(RunRequest(learner="batched_toy", task=TINY.name, budget="smoke", eval_batch=16), host)
    assert BatchedToy.log.sizes == [16, 4]  # 20 episodes (smoke)
    assert batched["per_episode"] == plain["per_episode"]
    assert plain["evaluation"]["batch"] == 1 and batched["evaluation"]["batch"] == 16


def test_predict_batch_returning_the_wrong_count_is_the_plugins_failure():
    with pytest.raises(PluginError, match=r"predict_batch returned 15 outputs for 16 episodes \(episodes 0 to 15\)"):
        execute(RunRequest(learner="wrong_count", task=TINY.name, budget="smoke", eval_batch=16), toy_host())


def test_eval_batch_defaults_per_device_and_refuses_what_is_not_a_positive_integer(tmp_path):
    assert resolve_eval_batch(None, torch.device("cpu")) == 1
    assert resolve_eval_batch(None, torch.device("cuda")) == 16
    assert resolve_eval_batch(5, torch.device("cpu")) == 5
    for bad in (0, -2, True, 1.5):
        with pytest.raises(MetabenchError, match="--eval-batch .*: must be a positive integer"):
            resolve_eval_batch(bad, torch.device("cpu"))
    config = tmp_path / "run.toml"
    config.write_text('[run]\neval_batch = 4\nprecision = "bf16"\n')
    assert read_toml(config)["run"] == {"eval_batch": 4, "precision": "bf16"}
    config.write_text('[run]\neval_batch = "4"\n')
    with pytest.raises(MetabenchError, match=r"\[run\] eval_batch must be an integer"):
        read_toml(config)


# ----------------------------------------------------------------------- deterministic CUDA settings


def cuda_settings():
    return (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())


@pytest.fixture
def loose_settings():
    """The opposite of deterministic_cuda's settings for the test (put back after it)."""
    before = cuda_settings()
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")  # TF32 matmuls: matmul.allow_tf32 becomes True too
    yield cuda_settings()
    torch.set_float32_matmul_precision(before[4])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = before[:4]


def test_deterministic_cuda_sets_its_settings_inside_and_puts_them_back(loose_settings):
    assert loose_settings == (False, True, True, True, "high")
    with deterministic_cuda():
        assert cuda_settings() == (True, False, False, False, "highest")
    assert cuda_settings() == loose_settings
    with pytest.raises(RuntimeError, match="inside"):
        with deterministic_cuda():
            raise RuntimeError("inside")
    assert cuda_settings() == loose_settings


def test_evaluation_runs_in_float32_inside_bf16_training():
    with training_precision("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        with evaluation_numerics(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    with training_precision("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------------------------- --precision


class Losses(NoProgress):
    def __init__(self):
        self.losses = []

    def update(self, phase, completed, **metrics):
        if "loss" in metrics:
            self.losses.append(metrics["loss"])


def test_bf16_training_runs_is_recorded_and_trains_differently(host):
    runs = {}
    for precision in ("fp32", "bf16"):
        progress = Losses()
        doc = execute(RunRequest(learner="protonet", task=TASK, budget="smoke", episodes=4, precision=precision),
                      host, progress)
        runs[precision] = doc, progress.losses
    (fp32, fp32_losses), (bf16, bf16_losses) = runs["fp32"], runs["bf16"]
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert bf16["evaluation"]["precision"] == "fp32"  # evaluation in float32 unless the learner says otherwise
    assert len(bf16_losses) == len(fp32_losses) == 5 and bf16_losses != fp32_losses
    assert schema_problems(bf16) == []


def test_a_learner_may_evaluate_in_the_runs_precision():
    host = toy_host()
    doc = execute(RunRequest(learner="sees_autocast", task=TINY.name, budget="smoke", precision="bf16"), host)
    assert SeesAutocast.seen == {"meta_train": True, "predict": True}
    assert doc["precision"] == "bf16" and doc["evaluation"]["precision"] == "bf16"
    doc = execute(RunRequest(learner="sees_autocast", task=TINY.name, budget="smoke"), host)
    assert SeesAutocast.seen == {"meta_train": False, "predict": False} and doc["evaluation"]["precision"] == "fp32"


def test_second_order_maml_in_bf16_is_refused_naming_what_it_accepts(capsys, tmp_path):
    code, _, err = run_cli(capsys, *smoke("maml", "--precision", "bf16", "--out", str(tmp_path)))
    assert code == 2
    line = error_line(err)
    assert "learner 'maml' (plugin 'maml') cannot train in bf16: second-order meta-gradients stay float32" in line
    assert line.endswith("accepted: fp32") and "first_order=true" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("learner,precision,fragment", [
    ("protonet", "fp16", "--precision 'fp16': accepted: fp32, bf16"),
    ("reptile", "bf16", "learner 'reptile' (plugin 'reptile') cannot train in bf16: it does not declare bf16 "
                        "in its precisions; accepted: fp32"),
])
def test_a_precision_not_accepted_is_refused_in_one_line(capsys, tmp_path, learner, precision, fragment):
    code, _, err = run_cli(capsys, *smoke(learner, "--precision", precision, "--out", str(tmp_path)))
    assert code == 2 and fragment in error_line(err)


def test_precision_is_part_of_the_run_identity():
    identity = {"learner": "protonet", "seed": 0, "precision": "bf16", "config": {}}
    assert identity_difference({**identity, "precision": "fp32"}, identity) == \
        "precision 'fp32' in the checkpoint, 'bf16' now"
    old = {k: v for k, v in identity.items() if k != "precision"}  # written before runs had a precision: fp32
    assert identity_difference(old, {**identity, "precision": "fp32"}) is None
    assert identity_difference(old, identity) == "precision 'fp32' in the checkpoint, 'bf16' now"


def test_the_schema_checks_precision_and_evaluation_where_present(trained):
    result, _ = trained
    assert schema_problems(result) == []
    assert schema_problems({**result, "precision": "fp16"}) == ["precision 'fp16' is not one of fp32, bf16"]
    assert schema_problems({**result, "evaluation": {"batch": 0, "precision": "fp32"}}) == \
        ["evaluation.batch must be a positive integer, got 0"]
    assert schema_problems({**result, "evaluation": []}) == ["evaluation must be an object"]
    assert schema_problems({k: v for k, v in result.items() if k not in ("precision", "evaluation")}) == []
