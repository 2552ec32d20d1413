"""Result files: schema round-trip, atomic writes that never overwrite, clear errors on bad files."""
import json

import pytest

from metabench import MetabenchError
from metabench.results import SCHEMA_VERSION, load_result, schema_problems, write_result
from metabench.runner import RunRequest, execute


@pytest.fixture
def doc(tiny_host):
    return execute(RunRequest(learner="toy", task="tiny-3w2s", budget="smoke"), tiny_host)


def test_round_trip_keeps_every_required_key(doc, tmp_path):
    path = write_result(doc, tmp_path)
    back = load_result(path)
    assert back == json.loads(json.dumps(doc))
    assert back["schema_version"] == SCHEMA_VERSION
    assert set(back["task"]) >= {"name", "version", "ways", "shots", "queries", "episodes", "episodes_sha256",
                                 "metric", "higher_is_better"}
    assert set(back["learner"]) >= {"name", "plugin", "version", "config"}
    assert set(back["summary"]) >= {"mean", "std", "n", "ci95", "ci_method"}
    assert set(back["timing"]) >= {"meta_train_s", "eval_s"}
    assert set(back["environment"]) >= {"python", "torch", "device", "git_commit"}
    assert len(back["per_episode"]) == back["task"]["episodes"] == back["summary"]["n"] == 20
    assert back["learner"]["config"] == {"steps": 2, "scale": 1.0}  # the smoke budget's override


def test_write_never_overwrites_and_leaves_no_temp_files(doc, tmp_path):
    first = write_result(doc, tmp_path)
    before = first.read_bytes()
    second = write_result(doc, tmp_path)
    assert first != second and first.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])


def test_invalid_result_is_not_written(doc, tmp_path):
    bad = dict(doc, per_episode=doc["per_episode"][:-1])
    with pytest.raises(ValueError, match="per_episode has 19 values"):
        write_result(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("summary"), "missing summary"),
    (lambda d: d["task"].update(episodes="600"), "task.episodes should be int"),
    (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda d: d["per_episode"].__setitem__(0, "x"), "per_episode must hold finite numbers"),
])
def test_schema_problems_are_named(doc, mutate, message):
    doc = json.loads(json.dumps(doc))
    mutate(doc)
    assert any(message in p for p in schema_problems(doc)), schema_problems(doc)


def test_load_names_the_file_and_the_problem(tmp_path):
    broken = tmp_path / "half.json"
    broken.write_text('{"schema_version": 1, "task": {')
    with pytest.raises(MetabenchError, match=r"half.json: not a metabench result \(invalid JSON"):
        load_result(broken)
    with pytest.raises(MetabenchError, match="no such result file"):
        load_result(tmp_path / "missing.json")
