"""Variable-way, variable-shot episodes: Meta-Dataset's episode sampler (Triantafillou et al.,
"Meta-Dataset", ICLR 2020, section 3.2), on any class-image data set.

An episode draws, from its own generator:

1. its way count ``k`` uniformly in [MIN_WAYS, min(ways, classes in the split)] (Meta-Dataset: 5
   to 50; here ``ways`` is the protocol's cap);
2. ``k`` classes uniformly, without replacement;
3. one query count for every class, ``q = min(queries, floor(0.5 * the smallest chosen class))``
   (Meta-Dataset: queries = 10);
4. a support size ``|S| = min(MAX_SUPPORT, sum_c ceil(beta * min(shots, n_c - q)))`` with beta
   uniform in (0, 1] (Meta-Dataset: shots = 100, MAX_SUPPORT = 500);
5. each class's share of it: ``R_c = exp(a_c) n_c / sum_c' exp(a_c') n_c'`` with a_c uniform in
   [log 0.5, log 2), and ``K_c = min(floor(R_c (|S| - k)) + 1, n_c - q)`` support examples;
6. each class's ``K_c + q`` examples, uniformly without replacement.

Departures: no class hierarchy (Meta-Dataset draws ImageNet classes under one node of its
hierarchy and Omniglot's within one alphabet: :mod:`metabench.grouped` does that separately), and
the uniforms come from SplitMix64 (53 bits) so that episodes are the same on every machine (one
``math.exp`` per class; the episode-set SHA-256 pins the result). The draw records the per-class
counts, so the episode's labels and its hash follow them.
"""
from __future__ import annotations

import math

from .errors import MetabenchError
from .rng import SplitMix64
from .task import EpisodeDraw

MIN_WAYS = 5
MAX_SUPPORT = 500
SAMPLER = "meta-dataset"


class MetaDatasetEpisodes:
    """Mixin for a :class:`metabench.ClassImageSource`: ``draw(rng, split, ways, shots, queries)``
    reads ways, shots and queries as Meta-Dataset's caps (50, 100 and 10 in the paper)."""

    def draw(self, rng: SplitMix64, split: str, ways: int, shots: int, queries: int) -> EpisodeDraw:
        sizes, offsets = self.class_sizes(split), self.offsets(split)
        usable = [c for c, n in enumerate(sizes) if n >= 2]
        top = min(ways, len(usable))
        if top < MIN_WAYS:
            raise MetabenchError(f"split {split!r} has {len(usable)} classes of at least 2 examples; Meta-Dataset "
                                 f"episodes need {MIN_WAYS}")
        k = MIN_WAYS + rng.below(top - MIN_WAYS + 1)
        classes = [usable[i] for i in rng.sample(len(usable), k)]
        n = [sizes[c] for c in classes]
        q = max(1, min(queries, min(n) // 2))
        beta = 1.0 - rng.uniform()  # (0, 1]
        support_size = min(MAX_SUPPORT, sum(math.ceil(beta * min(shots, m - q)) for m in n))
        low, high = math.log(0.5), math.log(2.0)
        weights = [math.exp(rng.uniform(low, high)) * m for m in n]
        total = sum(weights)
        counts = [max(1, min(math.floor(w / total * (support_size - k)) + 1, m - q)) for w, m in zip(weights, n)]
        support: list[int] = []
        query: list[int] = []
        for c, kc, rows in zip(classes, counts, rng.samples([(sizes[c], kc + q) for c, kc in zip(classes, counts)],
                                                           [offsets[c] for c in classes])):
            support += rows[:kc]
            query += rows[kc:]
        return EpisodeDraw(tuple(classes), tuple(support), tuple(query), support_counts=tuple(counts),
                           query_counts=(q,) * k)

    def draw_many(self, rng: SplitMix64, split: str, n: int, ways: int, shots: int, queries: int) -> list[EpisodeDraw]:
        return [self.draw(rng, split, ways, shots, queries) for _ in range(n)]
