"""Fine-grained episodes: every class of a kanji_radical episode shares one radical family."""
from __future__ import annotations

import pytest

from metabench.episodes import TrainSampler, episodes_sha256, eval_draws
from metabench.errors import MetabenchError
from metabench.plugins import get_host
from metabench_plugins.datasets import kanji_data

HOST = get_host()


@pytest.mark.parametrize("task", ["kanji_radical-5w1s", "kanji_radical-5w5s"])
def test_every_episode_draws_its_classes_from_one_radical_family(task):
    protocol, source, _ = HOST.task(task)
    radicals = kanji_data.class_radicals("test")
    draws = eval_draws(protocol, source, "test", 200)
    families = [{radicals[c] for c in d.classes} for d in draws]
    assert all(len(f) == 1 and None not in f for f in families)
    assert all(len(set(d.classes)) == 5 for d in draws)
    assert len({next(iter(f)) for f in families}) >= 15  # the episodes spread over many families
    # every support and query example belongs to one of the episode's classes
    offsets = source.offsets("test")
    for d in draws[:20]:
        rows = set(d.support) | set(d.query)
        assert all(any(offsets[c] <= r < offsets[c] + 20 for c in d.classes) for r in rows)


def test_fine_grained_episodes_are_fixed_and_differ_from_the_plain_task():
    protocol, source, _ = HOST.task("kanji_radical-5w1s")
    a = episodes_sha256(eval_draws(protocol, source, "test", 50))
    b = episodes_sha256(eval_draws(protocol, source, "test", 50))
    plain, plain_source, _ = HOST.task("kanji-5w1s")
    assert a == b != episodes_sha256(eval_draws(plain, plain_source, "test", 50))


def test_training_episodes_are_fine_grained_too():
    protocol, source, _ = HOST.task("kanji_radical-5w1s")
    radicals = kanji_data.class_radicals("train")
    sampler = TrainSampler(protocol, source, 0)
    for _ in range(20):
        draw = sampler.draw()
        assert len({radicals[c] for c in draw.classes}) == 1


def test_the_eligible_families_are_the_committed_ones():
    _, source, _ = HOST.task("kanji_radical-5w1s")
    groups = source.eligible_groups("test", 5, 16)
    assert len(groups) == 24 and sum(map(len, groups)) == 303  # families of >= 5 test characters
    assert len(source.eligible_groups("val", 5, 16)) == 8


def test_too_many_ways_for_any_family_is_refused():
    _, source, _ = HOST.task("kanji_radical-5w1s")
    from metabench.rng import SplitMix64

    for _ in range(2):  # asked again in the same process (a sweep worker): the same one line, not a traceback
        with pytest.raises(MetabenchError, match="no group of split 'val' has 40 classes"):
            source.draw(SplitMix64(0), "val", 40, 1, 1)


def test_new_data_roots_forget_the_eligible_groups():
    _, source, _ = HOST.task("kanji_radical-5w1s")
    from metabench.data import DataRoots
    from metabench.rng import SplitMix64

    source.draw(SplitMix64(0), "val", 5, 1, 1)
    assert source.__dict__.get("_eligible_groups")
    source.set_roots(DataRoots.from_settings())
    assert not source.__dict__.get("_eligible_groups")


def test_the_radical_file_is_checked_by_its_digest(monkeypatch):
    monkeypatch.setattr(kanji_data, "RADICALS_SHA256", "0" * 64)
    kanji_data.committed_radicals.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="does not match its recorded SHA-256"):
            kanji_data.committed_radicals()
    finally:
        monkeypatch.undo()
        kanji_data.committed_radicals.cache_clear()
