"""Fine-grained (hierarchical) episodes: every class of an episode from one group of related classes.

Omniglot's harder protocol draws an episode's characters from one alphabet (Lake et al.);
tieredImageNet groups its classes under high-level categories; kanji under radical families.
Classes of one group look alike, so such episodes ask more of a learner than classes drawn from
the whole split.

A data source mixes in :class:`GroupedEpisodes` and says each class's group
(:meth:`~GroupedEpisodes.class_groups`, None for a class in no group). An episode then draws a
group uniformly among the groups with at least ``ways`` classes of at least shots + queries
examples (groups in sorted order), ``ways`` of its classes, and each class's examples, all from
the episode's own generator: evaluation episodes stay fixed and hashed exactly as any others
(:func:`metabench.episodes.episodes_sha256` of the class and example indices).
"""
from __future__ import annotations

from typing import Sequence

from .errors import MetabenchError
from .rng import SplitMix64
from .task import EpisodeDraw


class GroupedEpisodes:
    """Mixin for a :class:`metabench.ClassImageSource`: episodes within one group of classes."""

    def class_groups(self, split: str) -> Sequence[str | None]:  # pragma: no cover - abstract
        """The group of each class of ``split`` (in class order); None: the class is in no group."""
        raise NotImplementedError

    def eligible_groups(self, split: str, ways: int, need: int) -> list[list[int]]:
        """The groups (sorted by name) that can give a ``ways``-way episode: their classes (in class
        order) with at least ``need`` examples, where there are at least ``ways`` such."""
        sizes = self.class_sizes(split)
        members: dict[str, list[int]] = {}
        for c, group in enumerate(self.class_groups(split)):
            if group is not None and sizes[c] >= need:
                members.setdefault(group, []).append(c)
        return [members[g] for g in sorted(members) if len(members[g]) >= ways]

    def draw(self, rng: SplitMix64, split: str, ways: int, shots: int, queries: int) -> EpisodeDraw:
        groups = self._groups(split, ways, shots + queries)
        group = groups[rng.below(len(groups))]
        classes = [group[i] for i in rng.sample(len(group), ways)]
        return self._draw_examples(rng, classes, self.class_sizes(split), self.offsets(split), shots, queries)

    def draw_many(self, rng: SplitMix64, split: str, n: int, ways: int, shots: int, queries: int) -> list[EpisodeDraw]:
        return [self.draw(rng, split, ways, shots, queries) for _ in range(n)]

    def set_roots(self, roots) -> None:
        """As the source's own (where the data is), forgetting the eligible groups found in the old data."""
        self.__dict__.pop("_eligible_groups", None)
        super().set_roots(roots)

    def _groups(self, split: str, ways: int, need: int) -> list[list[int]]:
        """:meth:`eligible_groups`, kept per (split, ways, need); none is a one-line error (never kept,
        so asking again says the same)."""
        key = (split, ways, need)
        cache = self.__dict__.setdefault("_eligible_groups", {})
        if key not in cache:
            groups = self.eligible_groups(split, ways, need)
            if not groups:
                raise MetabenchError(f"no group of split {split!r} has {ways} classes of at least {need} examples "
                                     f"for {ways}-way fine-grained episodes")
            cache[key] = groups
        return cache[key]
