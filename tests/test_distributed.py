"""One run on two processes (torchrun, gloo on CPU) equals the one-process run.

Every rank draws the same meta-batch, computes its share, and the gradients are averaged before
the optimiser steps; evaluation episodes are shared out by index. The training losses agree with
the one-process run's to float rounding (measured below 5e-7 relative), and so do the per-episode
results and the trained state (BatchNorm running statistics included, for ProtoNet's episodes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import flat_tensors

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "maml": ["--set", "meta_steps=4", "--set", "meta_batch=4"],
    "mtl": ["--set", "pretrain_steps=0", "--set", "meta_steps=4", "--set", "hard_tasks=true",
            "--set", "hard_task_count=2"],
    "protonet": ["--set", "meta_steps=4", "--set", "episodes_per_step=2"],
}


def run(out: Path, learner: str, processes: int, *extra: str) -> subprocess.CompletedProcess:
    argv = ["run", "--learner", learner, "--budget", "smoke", "--episodes", "7", "--out", str(out),
            *CASES.get(learner, []), *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, "-m", "metabench", *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def load(out: Path) -> tuple[dict, dict, list]:
    (result,) = out.glob("*.json")
    (saved,) = out.glob("*.learner.pt")
    (curve,) = out.glob("*.curve.jsonl")
    flat = flat_tensors(torch.load(saved, weights_only=True)["state"])
    losses = [json.loads(line)["loss"] for line in curve.read_text().splitlines()]
    return json.loads(result.read_text()), flat, losses


@pytest.mark.parametrize("learner", sorted(CASES))
def test_two_processes_compute_the_one_process_run(tmp_path, learner):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run(one, learner, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(two, learner, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (a, state_a, losses_a), (b, state_b, losses_b) = load(one), load(two)
    assert b["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in a
    assert b["task"]["episodes_sha256"] == a["task"]["episodes_sha256"]
    assert b["per_episode"] == a["per_episode"]
    assert len(losses_a) == len(losses_b) == 4
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    for key, value in state_a.items():
        if value.is_floating_point() and not (learner == "maml" and key.endswith(".bias")):
            # MAML's convolution biases sit before BatchNorm, which cancels them: their gradients are
            # float noise that Adam scales up to full steps, so they differ between any two summation orders
            assert torch.allclose(value, state_b[key], rtol=1e-4, atol=1e-6), key
    assert len(list(two.glob("*.json"))) == 1  # rank 0 alone writes


def test_a_learner_that_cannot_split_is_refused_in_one_line(tmp_path):
    proc = run(tmp_path, "reptile", 2)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("metabench: error:")]
    assert lines and "learner 'reptile' (plugin 'reptile') cannot split its training steps" in lines[0]
    assert not list(tmp_path.glob("*.json"))


def test_a_meta_batch_that_does_not_divide_is_refused(tmp_path):
    proc = run(tmp_path, "maml", 2, "--set", "meta_batch=3")
    assert proc.returncode != 0
    assert "3 tasks per step cannot be split evenly across 2 processes" in proc.stderr
