"""A tiny deterministic random number generator for drawing episodes.

Episodes must be identical on every machine, Python, NumPy and PyTorch version, so they are
drawn with SplitMix64 (Steele et al. 2014) on plain Python integers rather than a library
generator whose stream may change between releases.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
#: below this many draws, :meth:`SplitMix64.samples` stays in plain Python (NumPy's per-call cost wins)
_VECTOR_MIN = 24


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from the SHA-256 of the parts' text, joined by '|' (stable everywhere)."""
    text = "|".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


class SplitMix64:
    """SplitMix64 stream. ``below`` is unbiased (rejection sampling)."""

    def __init__(self, seed: int):
        self._state = seed & _MASK

    def getstate(self) -> int:
        """The stream position (for :meth:`setstate`)."""
        return self._state

    def setstate(self, state: int) -> None:
        """Return to a position :meth:`getstate` gave."""
        self._state = state & _MASK

    def next_u64(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        if n <= 0:
            raise ValueError(f"below() needs n > 0, got {n}")
        limit = ((1 << 64) // n) * n
        while True:
            r = self.next_u64()
            if r < limit:
                return r % n

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        """A float in [low, high) with 53 random bits."""
        return low + (high - low) * ((self.next_u64() >> 11) / float(1 << 53))

    def sample(self, n: int, k: int) -> list[int]:
        """k distinct integers from range(n), in random order (partial Fisher-Yates).

        The j-th pick is ``i + below(n - i)``; :meth:`below` and :meth:`next_u64` are inlined
        here (episode drawing spends most of its time in this loop), and a list stands in for
        the sparse swap map when most of range(n) is drawn. Same stream, same result.
        """
        if not 0 <= k <= n:
            raise ValueError(f"cannot draw {k} distinct items from {n}")
        state = self._state
        pool = list(range(n)) if 4 * k >= n else None
        swapped: dict[int, int] = {}
        out = []
        for i in range(k):
            m = n - i
            limit = ((1 << 64) // m) * m
            while True:
                state = (state + 0x9E3779B97F4A7C15) & _MASK
                z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
                z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
                z ^= z >> 31
                if z < limit:
                    break
            j = i + z % m
            if pool is not None:
                out.append(pool[j])
                pool[j] = pool[i]
            else:
                out.append(swapped.get(j, j))
                swapped[j] = swapped.get(i, i)
        self._state = state
        return out

    def samples(self, requests: Sequence[tuple[int, int]],
                starts: Sequence[int] | Callable[[int, list[list[int]]], int] | None = None) -> list[list[int]]:
        """``[self.sample(n, k) for n, k in requests]``: the same lists and stream position.

        With ``starts``, request r's picks are shifted by ``starts[r]``, or by ``starts(r, done)``
        where ``done`` holds the picks of requests 0 .. r-1 (a start that depends on earlier
        picks, e.g. the first row of a class drawn by request 0).

        The SplitMix64 output at stream position p is a pure function of ``state + p * gamma``,
        and a rejection in :meth:`below` has probability below n / 2**64, so every output of
        all the requests is mixed at once in NumPy uint64 arithmetic (which wraps modulo 2**64
        as the Python code masks). If any output falls in a rejection zone (checked
        conservatively), the requests are drawn one by one by :meth:`sample` instead, which
        consumes the stream exactly as the definition says. Only the swaps of the partial
        Fisher-Yates stay in Python.
        """
        total = 0
        for n, k in requests:
            if not 0 <= k <= n:
                raise ValueError(f"cannot draw {k} distinct items from {n}")
            total += k
        if total < _VECTOR_MIN:
            return self._one_by_one(requests, starts)
        bounds, safe_below, firsts, steps = _bounds(tuple(requests))
        with np.errstate(over="ignore"):
            z = steps + np.uint64(self._state)  # the states after 1, 2, ..., total steps
            t = z >> _S30
            z ^= t
            z *= _M1
            np.right_shift(z, _S27, out=t)
            z ^= t
            z *= _M2
            np.right_shift(z, _S31, out=t)
            z ^= t
        if z.max() >= safe_below:  # about one episode in 10**15: take the exact slow path
            return self._one_by_one(requests, starts)
        z %= bounds
        z += firsts
        js = z.tolist()  # the swap partner of each pick: i + below(n - i)
        self._state = (self._state + total * _GAMMA) & _MASK
        out, pos = [], 0
        for r, (n, k) in enumerate(requests):
            out.append(_fisher_yates_picks(n, js[pos:pos + k], _request_start(starts, r, out)))
            pos += k
        return out

    def _one_by_one(self, requests, starts) -> list[list[int]]:
        out: list[list[int]] = []
        for r, (n, k) in enumerate(requests):
            start = _request_start(starts, r, out)
            out.append([start + j for j in self.sample(n, k)])
        return out


def _request_start(starts, r: int, done: list[list[int]]) -> int:
    """The shift of request ``r``'s picks in :meth:`SplitMix64.samples` (0 without ``starts``)."""
    if starts is None:
        return 0
    return starts(r, done) if callable(starts) else starts[r]


def _fisher_yates_picks(n: int, partners: list[int], start: int) -> list[int]:
    """The picks of a partial Fisher-Yates over range(n), shifted by ``start``, given each step
    i's swap partner j (i <= j < n): the swaps of :meth:`SplitMix64.sample`, which inlines them
    next to its generator (a list for the pool when most of range(n) is drawn, else a sparse map)."""
    k = len(partners)
    if 4 * k >= n:
        pool = list(range(start, start + n))
        picks = [0] * k
        for i, j in enumerate(partners):
            picks[i] = pool[j]
            pool[j] = pool[i]
        return picks
    swapped: dict[int, int] = {}
    picks = []
    for i, j in enumerate(partners):
        picks.append(swapped.get(j, j) + start)
        swapped[j] = swapped.get(i, i)
    return picks


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@lru_cache(maxsize=256)
def _bounds(requests: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.uint64, np.ndarray, np.ndarray]:
    """For the draws of ``requests``: the bound m = n - i of each :meth:`SplitMix64.below`; a
    value below which every output is accepted by every draw (``below(m)`` accepts all r below
    ``2**64 // m * m``, which is at least ``2**64 - m``); each draw's index i within its request;
    and the state increments ``p * gamma`` (mod 2**64) of stream positions p = 1, 2, ..."""
    m = np.concatenate([np.arange(n, n - k, -1, dtype=np.uint64) for n, k in requests])
    i = np.concatenate([np.arange(k, dtype=np.uint64) for _, k in requests])
    total = len(m)
    with np.errstate(over="ignore"):
        steps = np.arange(1, total + 1, dtype=np.uint64) * np.uint64(_GAMMA)
    safe_below = np.uint64(_MASK - max(n for n, k in requests if k) + 1)  # 2**64 - max m
    return m, safe_below, i, steps
