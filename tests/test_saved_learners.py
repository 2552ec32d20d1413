"""Saved learner files and ``metabench eval``; validation-selected best states."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, TinySource, ToyLearner, error_line, host_with, run_cli, tiny_plugin
from metabench import Protocol, hookimpl
from metabench.cross_task import evaluate_saved
from metabench.learner_file import FORMAT_VERSION, read_learner_file
from metabench.plugins import get_host
from metabench.runner import RunControl, RunRequest, execute, prepare

FIXTURES = Path(__file__).parent / "fixtures"
OLD_FILE = FIXTURES / "learner_format1_maml_sinusoid-5s.learner.pt"


cli = run_cli


def run(capsys, out: Path, learner: str, *extra: str) -> tuple[dict, Path | None]:
    code, _, err = cli(capsys, "run", "--learner", learner, "--task", "kanji-5w1s", "--budget", "smoke", "--episodes", "8",
                       "--out", str(out), *extra)
    assert code == 0, err
    (path,) = out.glob("*.json")
    files = list(out.glob("*.learner.pt"))
    return json.loads(path.read_text()), (files[0] if files else None)


@pytest.mark.parametrize("learner", ["protonet", "maml"])
def test_a_saved_learner_scores_exactly_what_its_run_scored(capsys, tmp_path, learner):
    doc, saved = run(capsys, tmp_path / "run", learner)
    assert saved is not None and doc["learner_file"] == saved.name
    content = read_learner_file(saved)
    assert content["task"]["name"] == "kanji-5w1s" and content["learner"]["name"] == learner
    assert content["format_version"] == FORMAT_VERSION and content["seed"] == 0
    code, out, err = cli(capsys, "eval", str(saved), "--episodes", "8", "--out", str(tmp_path / "eval"))
    assert code == 0, err
    (path,) = (tmp_path / "eval").glob("*.json")
    again = json.loads(path.read_text())
    assert again["per_episode"] == doc["per_episode"]
    assert again["trained_on"]["task"] == "kanji-5w1s" and again["task"]["name"] == "kanji-5w1s"


def test_no_save_keeps_no_learner_file(capsys, tmp_path):
    doc, saved = run(capsys, tmp_path, "protonet", "--no-save")
    assert saved is None and "learner_file" not in doc


def test_a_metric_learner_is_tested_on_more_ways_and_shots(capsys, tmp_path):
    _, saved = run(capsys, tmp_path / "run", "protonet")
    code, out, err = cli(capsys, "eval", str(saved), "--task", "kanji-20w5s", "--episodes", "4",
                         "--out", str(tmp_path / "eval"))
    assert code == 0, err
    (path,) = (tmp_path / "eval").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["task"]["ways"] == 20 and doc["trained_on"]["task"] == "kanji-5w1s"
    assert "from-kanji-5w1s" in path.name and "trained on kanji-5w1s, tested on kanji-20w5s" in out
    assert len(doc["per_episode"]) == 4


def test_a_fixed_way_learner_is_refused_another_way_count(capsys, tmp_path):
    _, saved = run(capsys, tmp_path / "run", "maml")
    code, _, err = cli(capsys, "eval", str(saved), "--task", "kanji-20w1s", "--out", str(tmp_path / "eval"))
    assert code == 2
    assert "trained on 5-way episodes and cannot change its way count" in error_line(err)
    code, _, err = cli(capsys, "eval", str(saved), "--task", "sinusoid-5s", "--out", str(tmp_path / "eval"))
    assert code == 2 and "is regression" in error_line(err)
    assert not (tmp_path / "eval").exists()


def test_unreadable_learner_files_are_refused_in_one_line(capsys, tmp_path):
    doc = torch.load(OLD_FILE, weights_only=True)
    cases = {
        "future.learner.pt": {**doc, "format_version": 99},
        "missing-plugin.learner.pt": {**doc, "learner": {**doc["learner"], "name": "nosuch", "plugin": "elsewhere"}},
        "not-a-learner.learner.pt": {"hello": 1},
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "truncated.learner.pt").write_bytes(OLD_FILE.read_bytes()[:500])
    expected = {"future.learner.pt": "learner file format 99", "missing-plugin.learner.pt":
                "learner 'nosuch' (plugin 'elsewhere') is not installed",
                "not-a-learner.learner.pt": "not a saved metabench learner",
                "truncated.learner.pt": "corrupt or truncated"}
    for name, fragment in expected.items():
        code, _, err = cli(capsys, "eval", str(tmp_path / name), "--out", str(tmp_path / "eval"))
        assert code == 2, name
        line = error_line(err)
        assert fragment in line and name in line, line
    assert not (tmp_path / "eval").exists()


def test_a_learner_file_of_format_1_keeps_loading():
    """The committed file was written by metabench's first learner-file format; every later version
    must read it and score the recorded values (tests/fixtures/*.expected.json)."""
    expected = json.loads((FIXTURES / "learner_format1_maml_sinusoid-5s.expected.json").read_text())
    doc = evaluate_saved(OLD_FILE, get_host(), episodes=expected["episodes"])
    assert doc["per_episode"] == pytest.approx(expected["per_episode"], rel=1e-6, abs=1e-9)
    assert doc["trained_on"]["task"] == "sinusoid-5s" and doc["task"]["name"] == "sinusoid-5s"


# ------------------------------------------------------------------ another image size

TINY_20 = Protocol(name="tiny20-3w2s", version=1, dataset="tiny20", ways=3, shots=2, queries=3, episodes=10,
                   image_size=20)


class Tiny20Source(TinySource):
    def load_split(self, split, progress=None):
        small = super().load_split(split).float()
        return torch.nn.functional.interpolate(small, size=(20, 20), mode="nearest").to(torch.uint8)


class SizeLearner(ToyLearner):
    """The toy learner, checking that it is handed images of the size it was built for."""

    def __init__(self, config, backbone, protocol, device):
        super().__init__(config, backbone, protocol, device)
        self.bias = torch.zeros(1)

    def meta_train(self, ctx):
        ctx.track("bias", self.bias)
        for _ in ctx.steps("meta-train", self.config.steps):
            ctx.sampler.sample()
            self.bias += 1.0
            ctx.step(None, 0.5)

    def predict(self, support_x, support_y, query_x):
        assert support_x.shape[-1] == self.protocol.image_size == 16, support_x.shape
        return super().predict(support_x, support_y, query_x)


def test_images_of_another_size_are_resized_to_the_training_size(tmp_path):
    class Plugin:
        @hookimpl
        def metabench_register_tasks(self, register):
            register(TINY_20, Tiny20Source())

        @hookimpl
        def metabench_register_learners(self, register):
            register("sized", SizeLearner)

    host = host_with(("tiny", tiny_plugin()), ("tiny20", Plugin()))
    plan = prepare(RunRequest(learner="sized", task=TINY.name, budget="smoke"), host)
    execute(plan, host, control=RunControl(tmp_path))
    (saved,) = tmp_path.glob("*.learner.pt")
    assert read_learner_file(saved)["state"]["bias"].item() == 2.0  # smoke: 2 steps
    doc = evaluate_saved(saved, host, TINY_20.name)
    assert doc["resized"] == {"from": 20, "to": 16, "mode": "bilinear, antialiased"}
    assert doc["trained_on"]["task"] == TINY.name and len(doc["per_episode"]) == 10


# ------------------------------------------------------------------ validation

def test_validation_keeps_the_best_state_and_does_not_change_training(capsys, tmp_path):
    steps = ["--set", "meta_steps=6"]
    plain, _ = run(capsys, tmp_path / "plain", "protonet", *steps, "--no-save")
    doc, saved = run(capsys, tmp_path / "val", "protonet", *steps, "--validate-every", "2",
                     "--validation-episodes", "3")
    v = doc["validation"]
    assert [p["step"] for p in v["curve"]] == [2, 4, 6] and v["episodes"] == 3 and v["split"] == "val"
    best = max(v["curve"], key=lambda p: p["value"])  # first best on ties, like the run
    assert v["best_step"] == best["step"] and v["best_value"] == best["value"] and v["tested"] == "best"
    # training saw the same losses with and without validation in between
    curve = [json.loads(line) for line in next((tmp_path / "val").glob("*.curve.jsonl")).read_text().splitlines()]
    plain_curve = [json.loads(line) for line in
                   next((tmp_path / "plain").glob("*.curve.jsonl")).read_text().splitlines()]
    losses = [(p["step"], p["loss"]) for p in curve if p["phase"] == "meta-train"]
    assert losses == [(p["step"], p["loss"]) for p in plain_curve if p["phase"] == "meta-train"]
    assert [p["step"] for p in curve if p["phase"] == "validation"] == [2, 4, 6]
    assert [p["acc"] for p in curve if p["phase"] == "validation"] == [p["value"] for p in v["curve"]]
    result_path = next((tmp_path / "val").glob("*.json"))
    code, _, err = cli(capsys, "plot", str(result_path), "--out", str(tmp_path / "curve.svg"))
    assert code == 0, err
    assert "validation" in (tmp_path / "curve.svg").read_text()  # drawn with the training curve
    # the saved learner is the tested (best) state: evaluating it again scores the same
    code, _, err = cli(capsys, "eval", str(saved), "--episodes", "8", "--out", str(tmp_path / "eval"))
    assert code == 0, err
    (path,) = (tmp_path / "eval").glob("*.json")
    assert json.loads(path.read_text())["per_episode"] == doc["per_episode"]
    if best["step"] != 6:
        assert doc["per_episode"] != plain["per_episode"]


def test_validation_is_resumed_with_its_curve_and_best_state(capsys, tmp_path):
    import os
    import subprocess
    import sys

    argv = ["run", "--learner", "protonet", "--budget", "smoke", "--episodes", "6", "--set", "meta_steps=6",
            "--validate-every", "2", "--validation-episodes", "3", "--checkpoint-every", "2", "--no-save"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    full = subprocess.run([sys.executable, "-m", "metabench.cli", *argv, "--out", str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = subprocess.run([sys.executable, "-m", "metabench.cli", *argv, "--out", str(tmp_path / "cut")],
                            env={**env, "METABENCH_FAULT": "kill@meta-train:5"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode < 0
    code, _, err = cli(capsys, *argv, "--out", str(tmp_path / "cut"), "--resume")
    assert code == 0, err
    a, b = (json.loads(next((tmp_path / d).glob("*.json")).read_text()) for d in ("full", "cut"))
    assert a["per_episode"] == b["per_episode"] and a["validation"] == b["validation"]


def test_validation_settings_are_checked(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "--learner", "protonet", "--budget", "smoke", "--validate-every", "-1",
                       "--out", str(tmp_path))
    assert code == 2 and "validation every must be a non-negative integer" in error_line(err)
    code, _, err = cli(capsys, "run", "--learner", "protonet", "--budget", "smoke", "--validate-every", "2",
                       "--validation-episodes", "0", "--out", str(tmp_path))
    assert code == 2 and "validation episodes must be at least 1" in error_line(err)
    assert not list(tmp_path.iterdir())


def test_paper_configs_say_when_the_paper_selected_on_validation():
    host = get_host()
    plan = prepare(RunRequest(learner="protonet", task="kanji-5w1s", budget="paper"), host)
    assert plan.validation is None  # no paper table for kanji
    plan = prepare(RunRequest(learner="protonet", task="omniglot-5w1s", budget="paper"), host)
    assert plan.validation is not None and plan.validation.every > 0
    plan = prepare(RunRequest(learner="protonet", task="omniglot-5w1s", budget="paper",
                              validation={"every": 0}), host)
    assert plan.validation is None  # --validate-every 0 turns it off
    plan = prepare(RunRequest(learner="maml", task="omniglot-5w1s", budget="paper"), host)
    assert plan.validation is None  # Finn et al. test the final state
    plan = prepare(RunRequest(learner="mtl", task="miniimagenet-5w1s", budget="paper"), host)
    assert plan.validation is not None and plan.validation.phase == "meta-train"
    plan = prepare(RunRequest(learner="protonet", task="omniglot-5w1s", budget="quick"), host)
    assert plan.validation is None  # paper configs apply at budget paper only
