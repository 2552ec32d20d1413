"""Runs that last: checkpoints, --resume after SIGKILL, refusals, the NaN stop, Ctrl-C.

A run killed with SIGKILL (in training, in evaluation, while writing a checkpoint) and resumed
with ``--resume`` must end with the per-episode values and the trained state of an uninterrupted
run, bit for bit (CPU, same thread count). The kills come from ``METABENCH_FAULT``
(metabench/faults.py) at a chosen step, and, in one test, from outside at whatever moment.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import error_line, flat_tensors, run_cli

from metabench.checkpoint import CheckpointFolder, identity_difference
from metabench.resume import CheckpointInterval

ROOT = Path(__file__).resolve().parents[1]

#: (learner, steps setting, its value): enough steps for two checkpoints before the kill
SHORT = {
    "maml": ["--set", "meta_steps=6"],
    "protonet": ["--set", "meta_steps=6"],
    "reptile": ["--set", "meta_steps=6"],
    "baseline": ["--set", "pretrain_steps=6"],
    "mtl": ["--set", "pretrain_steps=5", "--set", "meta_steps=5", "--set", "hard_tasks=true"],
}


def args(learner: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--learner", learner, "--task", "kanji-5w1s", "--budget", "smoke", "--episodes", "6",
            "--checkpoint-every", "2", "--out", str(out), *SHORT[learner], *extra]


def env(fault: str | None = None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    e.pop("METABENCH_FAULT", None)
    if fault:
        e["METABENCH_FAULT"] = fault
    return e


def subprocess_run(argv: list[str], fault: str | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metabench.cli", *argv], env=env(fault), capture_output=True,
                          text=True, timeout=300, cwd=ROOT, **kw)


def cli(capsys, *argv: str) -> tuple[int, str]:
    code, _, err = run_cli(capsys, *argv)
    return code, err


def result(out: Path) -> dict:
    (path,) = [p for p in out.glob("*.json")]
    return json.loads(path.read_text())


def flat_state(out: Path) -> dict[str, torch.Tensor]:
    (path,) = out.glob("*.learner.pt")
    return flat_tensors(torch.load(path, weights_only=True)["state"])


def curve(out: Path) -> list[tuple]:
    """The training curve without its clock: (phase, step, loss) of every line."""
    (path,) = out.glob("*.curve.jsonl")
    return [(p["phase"], p["step"], p.get("loss")) for p in map(json.loads, path.read_text().splitlines())]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def killed_protonet(tmp_path_factory) -> Path:
    """An --out folder holding the checkpoints of a protonet run killed at meta-train step 5 (made once)."""
    out = tmp_path_factory.mktemp("killed-protonet")
    subprocess_run(args("protonet", out), "kill@meta-train:5")
    return out


@pytest.fixture
def killed(killed_protonet, tmp_path) -> Path:
    """A fresh copy of it for one test."""
    shutil.copytree(killed_protonet, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each learner's uninterrupted run (per-episode values, trained state), made once."""
    cache = {}

    def get(learner: str):
        if learner not in cache:
            out = tmp_path_factory.mktemp(f"full-{learner}")
            proc = subprocess_run(args(learner, out))
            assert proc.returncode == 0, proc.stderr[-2000:]
            cache[learner] = (result(out), flat_state(out), curve(out))
        return cache[learner]

    return get


@pytest.mark.parametrize("learner,fault", [
    # the evaluation path is the harness's, the same for every learner: maml's case runs in CI, the others with -m slow
    ("maml", "kill@meta-train:5"), ("maml", "kill@evaluate:3"),
    ("protonet", "kill@meta-train:5"), pytest.param("protonet", "kill@evaluate:3", marks=pytest.mark.slow),
    ("reptile", "kill@meta-train:5"), pytest.param("reptile", "kill@evaluate:3", marks=pytest.mark.slow),
    ("baseline", "kill@pre-train:5"), pytest.param("baseline", "kill@evaluate:3", marks=pytest.mark.slow),
    ("mtl", "kill@pre-train:4"), ("mtl", "kill@meta-train:4"),
    pytest.param("mtl", "kill@evaluate:3", marks=pytest.mark.slow),
])
def test_sigkill_then_resume_equals_an_uninterrupted_run(capsys, tmp_path, uninterrupted, learner, fault):
    full, full_state, full_curve = uninterrupted(learner)
    killed = subprocess_run(args(learner, tmp_path), fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list(tmp_path.glob("*.json"))  # no result from the killed run
    assert CheckpointFolder(next((tmp_path / "checkpoints").iterdir())).files()  # it left checkpoints
    code, err = cli(capsys, *args(learner, tmp_path), "--resume")
    assert code == 0, err
    resumed = result(tmp_path)
    assert resumed["per_episode"] == full["per_episode"]
    assert same_state(flat_state(tmp_path), full_state)
    assert curve(tmp_path) == full_curve  # the curve continued where the checkpoint was: each step once
    phase = fault.split("@")[1].split(":")[0]
    assert resumed["resumed"] and (phase in resumed["resumed"][-1] or "evaluation" in resumed["resumed"][-1])
    assert not (tmp_path / "checkpoints").exists()  # a finished run keeps no checkpoints


def test_an_evaluation_in_groups_killed_midway_resumes_to_the_one_at_a_time_values(capsys, tmp_path, uninterrupted):
    """--eval-batch 4: killed before episode 3 of the first group is recorded, resumed in groups of 4
    from the last episode on record; every value equals the uninterrupted run's (one per call)."""
    full, full_state, _ = uninterrupted("protonet")
    killed = subprocess_run(args("protonet", tmp_path, "--eval-batch", "4"), "kill@evaluate:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    code, err = cli(capsys, *args("protonet", tmp_path, "--eval-batch", "4"), "--resume")
    assert code == 0, err
    resumed = result(tmp_path)
    assert resumed["per_episode"] == full["per_episode"] and resumed["evaluation"]["batch"] == 4
    assert "evaluation after 2 episodes" in resumed["resumed"][-1]  # the progress file of episode 2 of the group
    assert same_state(flat_state(tmp_path), full_state)


def test_a_kill_while_writing_a_checkpoint_resumes_from_the_one_before(capsys, tmp_path, uninterrupted):
    full, _, _ = uninterrupted("protonet")
    killed = subprocess_run(args("protonet", tmp_path), "kill@checkpoint:2")
    assert killed.returncode == -signal.SIGKILL
    (folder,) = (tmp_path / "checkpoints").iterdir()
    assert [p.name for p in CheckpointFolder(folder).files()] == ["checkpoint-000001.pt"]
    assert list(folder.glob(".checkpoint-000002.pt.*.tmp"))  # the write it did not finish
    code, err = cli(capsys, *args("protonet", tmp_path), "--resume")
    assert code == 0, err
    assert result(tmp_path)["per_episode"] == full["per_episode"]
    assert result(tmp_path)["resumed"] == ["meta-train step 2"]


def test_an_outside_sigkill_at_any_moment_resumes_identically(capsys, tmp_path, uninterrupted):
    full, _, _ = uninterrupted("maml")
    argv = args("maml", tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "metabench.cli", *argv], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(str(tmp_path / "checkpoints" / "*" / "checkpoint-*.pt")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if list(tmp_path.glob("*.json")):
        pytest.skip("the run finished before the kill")
    code, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert result(tmp_path)["per_episode"] == full["per_episode"]


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_continue(capsys, tmp_path, uninterrupted):
    full, _, _ = uninterrupted("protonet")
    argv = args("protonet", tmp_path)
    i = argv.index("meta_steps=6")
    argv[i] = "meta_steps=400"  # long enough to be interrupted
    argv[argv.index("--checkpoint-every") + 1] = "off"
    proc = subprocess.Popen([sys.executable, "-m", "metabench.cli", *argv], env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    curve = None
    while time.time() < deadline and curve is None:  # training has started once its curve file exists
        found = glob.glob(str(tmp_path / ".*.curve.jsonl.partial"))
        curve = found[0] if found and Path(found[0]).stat().st_size else None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT at meta-train step" in err and "--resume" in err and "Traceback" not in err
    (folder,) = (tmp_path / "checkpoints").iterdir()
    (ckpt,) = CheckpointFolder(folder).files()
    doc = torch.load(ckpt, weights_only=True)
    assert doc["phase"] == "meta-train" and 0 < doc["done"]["meta-train"] < 400


def test_a_fresh_run_will_not_overwrite_an_unfinished_one(capsys, killed):
    tmp_path = killed
    (folder,) = (tmp_path / "checkpoints").iterdir()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, err = cli(capsys, *args("protonet", tmp_path))
    assert code == 2 and "add --resume to continue it" in error_line(err)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("change,fragment", [
    (["--set", "lr=0.01"], "setting lr=0.001 in the checkpoint, 0.01 now"),
    (["--seed", "3"], "seed 0 in the checkpoint, 3 now"),
    (["--budget", "quick"], "budget 'smoke' in the checkpoint, 'quick' now"),
    (["--set", "backbone.width=32"], "backbone options"),
    (["--task", "kanji-5w5s"], "task 'kanji-5w1s (version 2)' in the checkpoint, 'kanji-5w5s (version 2)' now"),
    (["--backbone", "resnet12"], "backbone 'conv4' in the checkpoint, 'resnet12' now"),
    (["--episodes", "5"], "episodes 6 in the checkpoint, 5 now"),
])
def test_a_resume_of_another_run_is_refused_naming_the_difference(capsys, killed, change, fragment):
    tmp_path = killed
    code, err = cli(capsys, *args("protonet", tmp_path), *change, "--resume")
    assert code == 2
    assert fragment in error_line(err)


def test_a_resume_of_another_learner_or_metabench_version_is_refused(capsys, killed, monkeypatch):
    tmp_path = killed
    code, err = cli(capsys, *args("maml", tmp_path), "--resume")
    assert code == 2 and "learner 'protonet' in the checkpoint, 'maml' now" in error_line(err)
    monkeypatch.setattr("metabench.runner.__version__", "99.0")
    code, err = cli(capsys, *args("protonet", tmp_path), "--resume")
    assert code == 2 and "metabench version" in error_line(err) and "'99.0' now" in error_line(err)


def test_a_corrupt_checkpoint_is_refused_and_the_older_one_kept(capsys, killed):
    tmp_path = killed
    (folder,) = (tmp_path / "checkpoints").iterdir()
    older, newest = CheckpointFolder(folder).files()
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    kept = older.read_bytes()
    code, err = cli(capsys, *args("protonet", tmp_path), "--resume")
    line = error_line(err)
    assert code == 2 and str(newest) in line and "corrupt or truncated" in line and older.name in line
    assert older.read_bytes() == kept
    newest.unlink()  # as the message says: resume from the older one
    code, err = cli(capsys, *args("protonet", tmp_path), "--resume")
    assert code == 0, err
    assert result(tmp_path)["resumed"] == ["meta-train step 2"]


def test_a_resume_with_nothing_to_continue_is_refused(capsys, tmp_path):
    code, err = cli(capsys, *args("protonet", tmp_path), "--resume")
    assert code == 2 and "no checkpoint to continue" in error_line(err)


def test_a_nan_stops_the_run_at_that_step_and_keeps_the_last_good_checkpoint(capsys, tmp_path):
    os.environ["METABENCH_FAULT"] = "nan@meta-train:5"
    try:
        code, err = cli(capsys, *args("maml", tmp_path))
    finally:
        del os.environ["METABENCH_FAULT"]
    line = error_line(err)
    assert code == 1
    assert "learner 'maml'" in line and "meta-train step 5" in line and "no score is written" in line
    assert "checkpoint-000002.pt" in line
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.learner.pt"))
    (folder,) = (tmp_path / "checkpoints").iterdir()
    newest = CheckpointFolder(folder).files()[-1]
    assert torch.load(newest, weights_only=True)["done"] == {"meta-train": 4}


def test_checkpoints_hold_plain_data_only(capsys, tmp_path):
    subprocess_run(args("mtl", tmp_path), "kill@meta-train:3")
    (folder,) = (tmp_path / "checkpoints").iterdir()
    doc = torch.load(CheckpointFolder(folder).files()[-1], weights_only=True)  # would raise on any object
    assert set(doc["rng"]) >= {"torch", "python", "numpy"}
    assert {"extractor", "head", "meta_optimizer", "meta_scheduler", "failure_classes",
            "pretrain_batches"} <= set(doc["tracked"])
    assert isinstance(doc["sampler"]["position"], int) and doc["phase"] == "meta-train"


def test_checkpoint_interval_parsing():
    assert CheckpointInterval.parse("25").steps == 25
    assert CheckpointInterval.parse("10m").seconds == 600
    assert CheckpointInterval.parse("off").steps is None and CheckpointInterval.parse("off").seconds is None
    for bad in ("0", "-3", "ten", "5x", "0s"):
        with pytest.raises(Exception, match="accepted: a number of steps"):
            CheckpointInterval.parse(bad)


def test_identity_difference_names_the_first_difference():
    a = {"learner": "maml", "seed": 0, "config": {"inner_lr": 0.4}}
    assert identity_difference(a, dict(a)) is None
    assert identity_difference(a, {**a, "seed": 1}) == "seed 0 in the checkpoint, 1 now"
    assert identity_difference(a, {**a, "config": {"inner_lr": 0.1}}) == \
        "setting inner_lr=0.4 in the checkpoint, 0.1 now"
