"""Fixed evaluation episodes and seeded training episodes.

Evaluation episode ``i`` of (protocol, split) is drawn by its own generator, seeded from
``(protocol name, protocol version, split, i)`` alone, so it is the same for every learner,
every training seed and every machine. The SHA-256 of all draws, in order, names the set.
"""
from __future__ import annotations

import hashlib
from collections import deque
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

    :meth:`sample` reads ahead: when the same shape is asked for again, it draws the next
    episodes of that shape in one pass (``DataSource.draw_many``) and builds them in one gather
    (``materialize_many``), as many as fit in ``READ_AHEAD_BYTES`` of images (at most
    ``READ_AHEAD_MAX``), and hands them out one per call. The episodes and their order are the
    ones drawing one per call gives: when a request of another shape (or :meth:`draw`, or
    :meth:`sample_many`) comes while episodes are still waiting, the stream is put back where
    one-per-call drawing would have left it, the waiting episodes are dropped, and this sampler
    stops reading ahead (a learner that alternates shapes would otherwise pay for episodes it
    never takes).

    The images of episodes read ahead together (and of one :meth:`sample_many` block) are
    non-overlapping views of one tensor, which stays alive while any of them does: a learner that
    keeps many episodes (a replay buffer) should keep clones, or set ``read_ahead = False``.
    """

    #: the most episodes :meth:`sample` reads ahead
    READ_AHEAD_MAX = 32
    #: the most image bytes (float32) of the episodes :meth:`sample` reads ahead
    READ_AHEAD_BYTES = 4 * 1024 * 1024

    def __init__(self, protocol: Protocol, source: DataSource, seed: int, split: str = "train", device="cpu"):
        source.check_split(split)
        self.protocol, self.source, self.split, self.device = protocol, source, split, device
        self._rng = SplitMix64(derive_seed("metabench-train-episodes", protocol.name, protocol.version, split, seed))
        self.read_ahead = True
        self._ahead: deque[Episode] = deque()
        self._ahead_shape: tuple[int, int, int] | None = None
        self._ahead_from = 0  # stream state before the waiting episodes' batch was drawn
        self._ahead_taken = 0  # episodes of that batch already handed out
        self._episode_bytes: dict[tuple[int, int, int], int] = {}

    def _shape(self, ways, shots, queries) -> tuple[int, int, int]:
        p = self.protocol
        return ways or p.ways, shots or p.shots, queries or p.queries

    def _rewind(self) -> None:
        """Drop the waiting episodes and put the stream where one-per-call drawing would be."""
        if self._ahead:
            self._rng.setstate(self._ahead_from)
            self.source.draw_many(self._rng, self.split, self._ahead_taken, *self._ahead_shape)
            self._ahead.clear()
            self.read_ahead = False

    def draw(self, ways: int | None = None, shots: int | None = None, queries: int | None = None) -> EpisodeDraw:
        self._rewind()
        return self.source.draw(self._rng, self.split, *self._shape(ways, shots, queries))

    def sample(self, ways: int | None = None, shots: int | None = None, queries: int | None = None) -> Episode:
        """The next training episode, on the run's device."""
        shape = self._shape(ways, shots, queries)
        if self._ahead and shape != self._ahead_shape:
            self._rewind()
        if not self._ahead:
            n = 1
            if self.read_ahead and shape in self._episode_bytes:
                n = max(1, min(self.READ_AHEAD_MAX, self.READ_AHEAD_BYTES // max(1, self._episode_bytes[shape])))
            self._ahead_from, self._ahead_shape, self._ahead_taken = self._rng.getstate(), shape, 0
            draws = self.source.draw_many(self._rng, self.split, n, *shape)
            self._ahead.extend(self.source.materialize_many(draws, self.split))
            if shape not in self._episode_bytes:
                first = self._ahead[0]
                self._episode_bytes[shape] = first.support_x.nbytes + first.query_x.nbytes
        self._ahead_taken += 1
        return self._ahead.popleft().to(self.device)

    def sample_many(self, n: int, ways: int | None = None, shots: int | None = None,
                    queries: int | None = None) -> list[Episode]:
        """The next ``n`` training episodes, on the run's device: the same episodes, in the same
        order, as ``n`` calls of :meth:`sample` (drawn one after another from the stream), drawn
        in one pass and with their images gathered and scaled in one operation per block
        (``DataSource.draw_many``, ``DataSource.materialize_many``)."""
        self._rewind()
        draws = self.source.draw_many(self._rng, self.split, n, *self._shape(ways, shots, queries))
        return [e.to(self.device) for e in self.source.materialize_many(draws, self.split)]

    def state_dict(self) -> dict:
        """The stream position that drawing one episode per call would have reached (episodes read
        ahead but not yet handed out are not kept: they are drawn again after :meth:`load_state_dict`)."""
        if self._ahead:
            rng = SplitMix64(0)
            rng.setstate(self._ahead_from)
            self.source.draw_many(rng, self.split, self._ahead_taken, *self._ahead_shape)
            position = rng.getstate()
        else:
            position = self._rng.getstate()
        return {"position": position, "read_ahead": self.read_ahead}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream from a position :meth:`state_dict` gave."""
        self._ahead.clear()
        self._rng.setstate(int(state["position"]))
        self.read_ahead = bool(state["read_ahead"])

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()
