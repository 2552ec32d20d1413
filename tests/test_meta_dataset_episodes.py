"""Meta-Dataset episodes (variable ways, imbalanced shots) on kanji: kanji-md."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from metabench.cli import main
from metabench.episodes import episodes_sha256, eval_draws
from metabench.plugins import get_host
from metabench.variable_episodes import MAX_SUPPORT, MIN_WAYS

HOST = get_host()


def test_episodes_vary_in_ways_and_shots_within_meta_datasets_rules():
    protocol, source, _ = HOST.task("kanji-md")
    draws = eval_draws(protocol, source, "test", 100)
    ways = [len(d.classes) for d in draws]
    assert min(ways) >= MIN_WAYS and max(ways) <= 50 and len(set(ways)) > 20
    imbalanced = 0
    for d in draws:
        k = len(d.classes)
        assert len(set(d.classes)) == k and len(d.support_counts) == len(d.query_counts) == k
        q = d.query_counts[0]
        assert set(d.query_counts) == {q} and 1 <= q <= 10  # one query count per episode, at most 10
        assert all(1 <= s <= 20 - q for s in d.support_counts) and sum(d.support_counts) <= MAX_SUPPORT
        assert len(d.support) == sum(d.support_counts) and len(d.query) == q * k
        imbalanced += len(set(d.support_counts)) > 1
        episode = source.materialize(d, "test")
        assert Counter(episode.support_y.tolist()) == dict(enumerate(d.support_counts))
        assert Counter(episode.query_y.tolist()) == {c: q for c in range(k)}
    assert imbalanced > 50  # shots differ between the classes of most episodes


def test_episodes_are_fixed():
    protocol, source, _ = HOST.task("kanji-md")
    a = episodes_sha256(eval_draws(protocol, source, "test", 40))
    assert a == episodes_sha256(eval_draws(protocol, source, "test", 40))


def test_learners_that_need_fixed_ways_are_refused_the_others_run(capsys, tmp_path):
    code = main(["run", "--learner", "maml", "--task", "kanji-md", "--budget", "smoke", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "needs episodes of a fixed way count with balanced shots" in err and "Traceback" not in err
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
    for learner in ("protonet", "baseline"):
        out = tmp_path / learner
        code = main(["run", "--learner", learner, "--task", "kanji-md", "--budget", "smoke", "--episodes", "4",
                     "--no-save", "--out", str(out)])
        capsys.readouterr()
        assert code == 0
        (path,) = out.glob("*.json")
        doc = json.loads(path.read_text())
        assert doc["task"]["episode_sampler"] == "meta-dataset" and len(doc["per_episode"]) == 4


@pytest.mark.parametrize("name", ["kanji-5w1s", "kanji_radical-5w1s"])
def test_balanced_episodes_hash_as_before(name):
    protocol, source, _ = HOST.task(name)
    assert all(not d.support_counts for d in eval_draws(protocol, source, "test", 5))
