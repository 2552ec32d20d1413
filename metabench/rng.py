"""A tiny deterministic random number generator for drawing episodes.

Episodes must be identical on every machine, Python, NumPy and PyTorch version, so they are
drawn with SplitMix64 (Steele et al. 2014) on plain Python integers rather than a library
generator whose stream may change between releases.
"""
from __future__ import annotations

import hashlib

_MASK = (1 << 64) - 1


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from the SHA-256 of the parts' text, joined by '|' (stable everywhere)."""
    text = "|".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


class SplitMix64:
    """SplitMix64 stream. ``below`` is unbiased (rejection sampling)."""

    def __init__(self, seed: int):
        self._state = seed & _MASK

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
