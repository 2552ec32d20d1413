"""Fixed evaluation episodes and seeded training episodes.

Evaluation episode ``i`` of (protocol, split) is drawn by its own generator, seeded from
``(protocol name, protocol version, split, i)`` alone, so it is the same for every learner,
every training seed and every machine. The SHA-256 of all draws, in order, names the set.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

from .rng import SplitMix64, derive_seed
from .task import DataSource, Episode, EpisodeDraw, Protocol


def eval_episode_seed(protocol: Protocol, split: str, index: int) -> int:
    """The seed of evaluation episode ``index``: a function of the protocol, split and index only."""
    return derive_seed("metabench-eval-episode", protocol.name, protocol.version, split, index)


def eval_draws(protocol: Protocol, source: DataSource, split: str | None = None, n: int | None = None) -> list[EpisodeDraw]:
    """The first ``n`` (default: all ``protocol.episodes``) fixed evaluation draws of ``split``."""
    split = split or protocol.eval_split
    source.check_split(split)
    n = protocol.episodes if n is None else n
    return [
        source.draw(SplitMix64(eval_episode_seed(protocol, split, i)), split, protocol.ways, protocol.shots, protocol.queries)
        for i in range(n)
    ]


def episodes_sha256(draws: list[EpisodeDraw]) -> str:
    """SHA-256 (hex) of the class and example indices of every draw, in order."""
    digest = hashlib.sha256()
    for draw in draws:
        digest.update(draw.fingerprint())
    return digest.hexdigest()


class TrainSampler:
    """Training episodes of a run: one stream seeded from (run seed, protocol, split).

    A learner may ask for other ways/shots/queries than the protocol's (e.g. ProtoNet's
    higher-way training); the stream stays deterministic for a fixed sequence of requests.
    """

    def __init__(self, protocol: Protocol, source: DataSource, seed: int, split: str = "train", device="cpu"):
        source.check_split(split)
        self.protocol, self.source, self.split, self.device = protocol, source, split, device
        self._rng = SplitMix64(derive_seed("metabench-train-episodes", protocol.name, protocol.version, split, seed))

    def draw(self, ways: int | None = None, shots: int | None = None, queries: int | None = None) -> EpisodeDraw:
        p = self.protocol
        return self.source.draw(self._rng, self.split, ways or p.ways, shots or p.shots, queries or p.queries)

    def sample(self, ways: int | None = None, shots: int | None = None, queries: int | None = None) -> Episode:
        """The next training episode, on the run's device."""
        return self.source.materialize(self.draw(ways, shots, queries), self.split).to(self.device)

    def sample_many(self, n: int, ways: int | None = None, shots: int | None = None,
                    queries: int | None = None) -> list[Episode]:
        """The next ``n`` training episodes, on the run's device: the same episodes, in the same
        order, as ``n`` calls of :meth:`sample` (drawn one after another from the stream), with
        their images gathered and scaled in one operation (``DataSource.materialize_many``)."""
        draws = [self.draw(ways, shots, queries) for _ in range(n)]
        return [e.to(self.device) for e in self.source.materialize_many(draws, self.split)]

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()
