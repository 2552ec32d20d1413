"""Every registered learner, parametrized over the registry: a new plugin is tested without a new test."""
from __future__ import annotations

import math

import pytest

from metabench.plugins import PluginHost
from metabench.results import schema_problems
from metabench.runner import RunRequest, execute

HOST = PluginHost()
DEFAULT_TASK = {"classification": "kanji-5w1s", "regression": "sinusoid-5s"}


def task_for(learner: str) -> str | None:
    cls = HOST.learners.get(learner).obj
    for problem in sorted(cls.problem_types):
        name = DEFAULT_TASK.get(problem)
        if name and name in HOST.tasks:
            return name
    return None


@pytest.mark.parametrize("learner", HOST.learners.names())
def test_smoke_run_is_valid_and_deterministic(learner):
    task = task_for(learner) or pytest.skip(f"no built-in task for {learner}'s problem types")
    request = RunRequest(learner=learner, task=task, budget="smoke", seed=11, episodes=8)
    first = execute(request, HOST)
    assert schema_problems(first) == []
    if first["task"]["problem"] == "classification":
        assert all(0.0 <= v <= 1.0 for v in first["per_episode"])  # accuracies
    else:
        assert all(math.isfinite(v) and v >= 0.0 for v in first["per_episode"])  # squared errors
    second = execute(request, HOST)
    assert second["per_episode"] == first["per_episode"]  # same seed and config: same results on CPU
    assert second["task"]["episodes_sha256"] == first["task"]["episodes_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("learner", HOST.learners.names())
def test_quick_budget_beats_chance_by_a_wide_margin(learner):
    """At budget quick on kanji-5w1s (chance 20%), every learner must clear 50% (takes minutes)."""
    task = task_for(learner) or pytest.skip("no classification task")
    doc = execute(RunRequest(learner=learner, task=task, budget="quick", seed=0), HOST)
    assert doc["summary"]["mean"] - doc["summary"]["ci95"] > 0.5, doc["summary"]
