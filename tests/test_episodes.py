"""Fixed evaluation episodes: same for every learner, seed, process and global RNG state."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import torch

from metabench.episodes import TrainSampler, episodes_sha256, eval_draws
from metabench.rng import SplitMix64, derive_seed
from metabench.runner import RunRequest, execute

from conftest import TINY, TinySource


def test_splitmix64_reference_values():
    # First outputs of SplitMix64 seeded with 0, from the reference C implementation (Vigna).
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_sample_is_distinct_and_uniform_enough():
    rng = SplitMix64(7)
    counts = [0] * 10
    for _ in range(3000):
        picks = rng.sample(10, 3)
        assert len(set(picks)) == 3
        for p in picks:
            counts[p] += 1
    assert min(counts) > 800 and max(counts) < 1000  # expected 900 each


def test_sample_matches_the_plain_fisher_yates_definition():
    # sample() inlines below() for speed; its picks and the stream position must be exactly those
    # of the textbook partial Fisher-Yates on below(), for sparse and dense draws alike.
    def reference(rng, n, k):
        swapped, out = {}, []
        for i in range(k):
            j = i + rng.below(n - i)
            out.append(swapped.get(j, j))
            swapped[j] = swapped.get(i, i)
        return out

    for seed, n, k in [(1, 10, 3), (2, 10, 10), (3, 1500, 5), (4, 20, 16), (5, 7, 0), (6, 3, 2), (7, 2**40, 4)]:
        fast, slow = SplitMix64(seed), SplitMix64(seed)
        assert fast.sample(n, k) == reference(slow, n, k), (seed, n, k)
        assert fast.next_u64() == slow.next_u64(), (seed, n, k)


def test_samples_equals_one_sample_per_request():
    """The vectorised ``samples`` gives exactly the picks and stream position of one ``sample``
    per request, whether it takes the NumPy path (many draws) or the plain one (few)."""
    import random

    rnd = random.Random(0)
    for _ in range(400):
        seed = rnd.getrandbits(64)
        requests = [(n, rnd.randint(0, n)) for n in (rnd.randint(1, 60) for _ in range(rnd.randint(1, 8)))]
        starts = [rnd.randint(0, 1000) for _ in requests]
        one, many = SplitMix64(seed), SplitMix64(seed)
        expected = [[s + j for j in one.sample(n, k)] for (n, k), s in zip(requests, starts)]
        assert many.samples(requests, starts) == expected, (seed, requests)
        assert many.next_u64() == one.next_u64()
    big = [(2**40, 30), (10**6, 3)]  # sparse draws from huge ranges, vectorised
    one, many = SplitMix64(5), SplitMix64(5)
    assert many.samples(big) == [one.sample(n, k) for n, k in big]


def test_samples_takes_the_exact_path_when_an_output_may_be_rejected(monkeypatch):
    """Force every vectorised output into the (conservative) rejection zone: the result must
    still be the definition's, drawn one request at a time."""
    import numpy as np

    from metabench import rng as rng_module

    original = rng_module._bounds

    def no_limits(requests):
        m, safe_below, first, steps = original(requests)
        return m, np.uint64(0), first, steps

    monkeypatch.setattr(rng_module, "_bounds", no_limits)
    requests = [(20, 20)] * 5
    one, many = SplitMix64(9), SplitMix64(9)
    assert many.samples(requests) == [one.sample(n, k) for n, k in requests]
    assert many.next_u64() == one.next_u64()
    # a start computed from earlier picks (as ClassImageSource.draw does) on the exact path too
    requests = [(30, 4)] + [(20, 20)] * 4
    one, many = SplitMix64(10), SplitMix64(10)
    classes = one.sample(30, 4)
    expected = [classes] + [[c * 20 + j for j in one.sample(20, 20)] for c in classes]
    assert many.samples(requests, lambda r, done: done[0][r - 1] * 20 if r else 0) == expected


def test_draw_of_equal_sized_classes_takes_the_one_pass_path_with_the_same_result(monkeypatch):
    """Classes of one size are drawn in one vectorised pass; it must give exactly the draws (and
    stream position) of the general path: classes first, then one sample per class."""
    from metabench.task import ClassImageSource

    fast, slow = TinySource(), TinySource()
    monkeypatch.setattr(slow, "_uniform_size", lambda split: None)  # the general path
    rng_fast, rng_slow = SplitMix64(11), SplitMix64(11)
    for ways, shots, queries in [(3, 2, 3), (12, 1, 9), (5, 5, 5), (2, 1, 1)]:
        for _ in range(20):
            assert fast.draw(rng_fast, "train", ways, shots, queries) == slow.draw(rng_slow, "train", ways, shots, queries)
    assert rng_fast.next_u64() == rng_slow.next_u64()
    assert fast._uniform_size("train") == 10
    assert isinstance(fast, ClassImageSource)


def test_draw_many_equals_drawing_one_by_one(monkeypatch):
    """draw_many's one vectorised pass gives exactly n consecutive draws and the same stream
    position, for equal-sized classes, for classes of other sizes (the general path), and when
    an output may be rejected (the exact path)."""
    import numpy as np

    from metabench import rng as rng_module

    def check(source, seed):
        for n, (ways, shots, queries) in [(0, (3, 2, 3)), (1, (3, 2, 3)), (7, (3, 2, 3)), (26, (5, 1, 9)),
                                         (3, (12, 5, 5)), (4, (2, 1, 1))]:
            one, many = SplitMix64(seed + n), SplitMix64(seed + n)
            expected = [source.draw(one, "train", ways, shots, queries) for _ in range(n)]
            assert source.draw_many(many, "train", n, ways, shots, queries) == expected, (n, ways, shots, queries)
            assert many.next_u64() == one.next_u64()

    check(TinySource(), 30)
    general = TinySource()
    monkeypatch.setattr(general, "_uniform_size", lambda split: None)
    check(general, 40)
    # the general path is the definition: classes first, then one sample per class
    rng = SplitMix64(3)
    classes = rng.sample(12, 3)
    rows = [[c * 10 + j for j in rng.sample(10, 5)] for c in classes]
    assert general.draw_many(SplitMix64(3), "train", 1, 3, 2, 3)[0] == \
        TinySource().draw(SplitMix64(3), "train", 3, 2, 3)
    assert TinySource().draw(SplitMix64(3), "train", 3, 2, 3).classes == tuple(classes)
    assert TinySource().draw(SplitMix64(3), "train", 3, 2, 3).support == tuple(r for c in rows for r in c[:2])
    original = rng_module._bounds
    monkeypatch.setattr(rng_module, "_bounds", lambda requests: (*original(requests)[:1], np.uint64(0),
                                                                 *original(requests)[2:]))
    check(TinySource(), 50)


def test_materialize_many_equals_materializing_one_by_one():
    source = TinySource()
    rng = SplitMix64(3)
    draws = [source.draw(rng, "train", 3, 2, 3) for _ in range(6)] + [source.draw(rng, "train", 4, 1, 2)]
    many = source.materialize_many(draws, "train")
    for d, got in zip(draws, many):
        want = source.materialize(d, "train")
        for a, b in zip((got.support_x, got.support_y, got.query_x, got.query_y),
                        (want.support_x, want.support_y, want.query_x, want.query_y)):
            assert a.dtype == b.dtype and torch.equal(a, b)
    many[0].support_y.add_(1)  # labels are each episode's own tensors
    from metabench import task

    small = task.MATERIALIZE_BLOCK_BYTES
    try:  # blocks of at most two episodes' images: the groups split, the episodes stay the same
        task.MATERIALIZE_BLOCK_BYTES = 2 * 11 * 16 * 16 * 4
        for d, got in zip(draws[1:], source.materialize_many(draws[1:], "train")):
            assert torch.equal(got.query_x, source.materialize(d, "train").query_x)
    finally:
        task.MATERIALIZE_BLOCK_BYTES = small
    assert torch.equal(many[1].support_y, source.materialize(draws[1], "train").support_y)


def test_materialize_many_respects_an_overridden_materialize():
    """A source that builds its own episodes (as Omniglot's rotations do) must get them from
    materialize_many and from the sampler's read-ahead, not the plain gather of its rows."""
    from metabench.task import Episode

    class Flipped(TinySource):
        def materialize(self, draw, split):
            e = super().materialize(draw, split)
            return Episode(e.support_x.flip(-1), e.support_y, e.query_x.flip(-1), e.query_y)

    source = Flipped()
    draws = source.draw_many(SplitMix64(2), "train", 3, 3, 2, 3)
    for d, got in zip(draws, source.materialize_many(draws, "train")):
        assert torch.equal(got.query_x, TinySource().materialize(d, "train").query_x.flip(-1))
    sampler, plain = TrainSampler(TINY, source, seed=1), TrainSampler(TINY, TinySource(), seed=1)
    for _ in range(5):
        assert torch.equal(sampler.sample().support_x, plain.sample().support_x.flip(-1))


def test_sample_many_gives_the_episodes_sample_would():
    one = TrainSampler(TINY, TinySource(), seed=4)
    many = TrainSampler(TINY, TinySource(), seed=4)
    expected = [one.sample() for _ in range(5)]
    got = many.sample_many(5)
    assert all(torch.equal(a.query_x, b.query_x) and torch.equal(a.support_y, b.support_y)
               for a, b in zip(expected, got))
    assert torch.equal(one.sample().support_x, many.sample().support_x)  # the streams stay in step


def _definition(sampler: TrainSampler, calls):
    """What the sampler must hand out: one source.draw + materialize per call, on its stream."""
    rng = SplitMix64(sampler._rng.getstate())
    source = sampler.source
    out = []
    for kind, shape in calls:
        shape = sampler._shape(*shape)
        if kind == "many":
            out += [source.materialize(source.draw(rng, "train", *shape), "train") for _ in range(4)]
        elif kind == "draw":
            out.append(source.draw(rng, "train", *shape))
        else:
            out.append(source.materialize(source.draw(rng, "train", *shape), "train"))
    return out, rng


def _same(a, b) -> bool:
    if not hasattr(a, "support_x"):
        return a == b
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in
               zip((a.support_x, a.support_y, a.query_x, a.query_y), (b.support_x, b.support_y, b.query_x, b.query_y)))


def test_sample_reads_ahead_and_hands_out_the_one_per_call_episodes():
    sampler = TrainSampler(TINY, TinySource(), seed=8)
    calls = [("sample", (None, None, None))] * 40
    expected, rng = _definition(sampler, calls)
    got = [sampler.sample() for _ in range(40)]
    assert all(_same(a, b) for a, b in zip(got, expected))
    # it did read ahead: the first call learned the episode's size, the second took a batch
    per_episode = 15 * 16 * 16 * 4
    assert sampler._episode_bytes[(3, 2, 3)] == per_episode
    assert TrainSampler.READ_AHEAD_MAX == 32  # 16x16 px: far below READ_AHEAD_BYTES
    assert sampler.read_ahead and len(sampler._ahead) == 1 + 2 * 32 - 40  # calls 1 | 2-33 | 34-65
    # episodes handed out share no memory: writing into one changes no other
    before = got[2].support_x.clone()
    got[1].support_x.fill_(7.0)
    got[1].query_x.fill_(7.0)
    got[1].support_y.add_(1)
    assert torch.equal(got[2].support_x, before) and torch.equal(got[2].support_y, expected[2].support_y)


def test_read_ahead_rewinds_when_the_request_changes():
    """Shape changes, draw() and sample_many() between samples: the episodes are still the
    one-per-call ones, the stream ends where one-per-call drawing leaves it, and the sampler
    stops reading ahead after its first rewind."""
    calls = ([("sample", (None, None, None))] * 5 + [("sample", (4, 1, 2))] * 3 + [("draw", (None, None, None))]
             + [("sample", (None, None, None))] * 3 + [("many", (None, 1, 1))] + [("sample", (5, None, None))] * 6)
    sampler = TrainSampler(TINY, TinySource(), seed=9)
    expected, rng = _definition(sampler, calls)
    got = []
    for kind, shape in calls:
        if kind == "many":
            got += sampler.sample_many(4, *shape)
        elif kind == "draw":
            got.append(sampler.draw(*shape))
        else:
            got.append(sampler.sample(*shape))
            if len(got) == 5:
                assert len(sampler._ahead) > 0  # episodes were waiting when the shape changed
    assert len(got) == len(expected) and all(_same(a, b) for a, b in zip(got, expected))
    assert not sampler.read_ahead and not sampler._ahead
    sampler._rewind()
    assert sampler._rng.getstate() == rng.getstate()


def test_read_ahead_is_bounded_by_bytes():
    sampler = TrainSampler(TINY, TinySource(), seed=10)
    sampler.READ_AHEAD_BYTES = 2 * 15 * 16 * 16 * 4  # two episodes' images
    expected, _ = _definition(sampler, [("sample", (None, None, None))] * 6)
    got = [sampler.sample() for _ in range(4)]
    assert len(sampler._ahead) == 1  # 1 (learn the size), then 2 at a time: one still waits
    got += [sampler.sample() for _ in range(2)]
    assert all(_same(a, b) for a, b in zip(got, expected))


def test_eval_draws_ignore_global_randomness():
    source = TinySource()
    torch.manual_seed(0)
    first = eval_draws(TINY, source)
    torch.manual_seed(12345)
    torch.rand(100)
    second = eval_draws(TINY, source)
    assert first == second and len(first) == TINY.episodes
    assert len({d.classes for d in first}) > 1  # episodes differ from each other


def test_episode_set_hash_depends_on_protocol_version_and_split():
    source = TinySource()
    base = episodes_sha256(eval_draws(TINY, source))
    assert episodes_sha256(eval_draws(replace(TINY, version=2), source)) != base
    assert episodes_sha256(eval_draws(TINY, source, "val")) != base
    # a prefix of the set is the same episodes: episode i does not depend on how many are drawn
    assert eval_draws(TINY, source, n=5) == eval_draws(TINY, source)[:5]


def test_every_learner_and_seed_sees_the_same_evaluation_episodes(tiny_host, monkeypatch):
    """Record what the evaluation shows each learner: identical across learners and training seeds."""
    seen = {}
    for learner, seed in (("toy", 0), ("toy", 5), ("protonet", 1)):
        cls = tiny_host.learners.get(learner).obj
        shown = []
        original = cls.predict

        def spy(self, sx, sy, qx, _orig=original, _shown=shown):
            _shown.append((sx.clone(), qx.clone()))
            return _orig(self, sx, sy, qx)

        monkeypatch.setattr(cls, "predict", spy)
        doc = execute(RunRequest(learner=learner, task="tiny-3w2s", seed=seed, budget="smoke", episodes=6),
                      tiny_host)
        monkeypatch.undo()
        seen[(learner, seed)] = (doc["task"]["episodes_sha256"], shown)
    reference_hash, reference = seen[("toy", 0)]
    for key, (digest, shown) in seen.items():
        assert digest == reference_hash, key
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(shown, reference)), key


def test_training_episodes_follow_the_seed():
    source = TinySource()
    a = [TrainSampler(TINY, source, seed=1).draw() for _ in range(1)]
    s1, s1b, s2 = (TrainSampler(TINY, source, seed=s) for s in (1, 1, 2))
    seq1 = [s1.draw() for _ in range(5)]
    assert seq1 == [s1b.draw() for _ in range(5)]
    assert seq1 != [s2.draw() for _ in range(5)]
    assert a[0] == seq1[0]


def test_episode_hash_is_the_same_in_a_fresh_process():
    """A different process (other hash seed, other torch seed) prints the same kanji episode-set hash."""
    from metabench.plugins import PluginHost

    protocol, source, _ = PluginHost().task("kanji-5w1s")
    here = episodes_sha256(eval_draws(protocol, source))
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-m", "metabench.cli", "episodes", "--task", "kanji-5w1s"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == here


def test_seed_derivation_is_stable():
    # Pinned: changing derive_seed would silently change every published episode set.
    assert derive_seed("metabench-eval-episode", "kanji-5w1s", 1, "test", 0) == derive_seed(
        "metabench-eval-episode", "kanji-5w1s", 1, "test", 0)
    assert derive_seed("a", 1) != derive_seed("a", 2)
