"""Tasks: a named, versioned evaluation protocol plus the data source it draws episodes from.

A *protocol* fixes everything that makes two results comparable: data set, evaluation split,
ways, shots, queries per class, number of test episodes, image size and problem type. Its name
has the form ``<dataset>-<ways>w<shots>s`` (e.g. ``kanji-5w1s``). Changing any of these, or the
data behind it, means a new ``version``; results record both.

A *data source* turns a random stream into episodes. Image data sets subclass
:class:`ClassImageSource`, which stores each split as one uint8 tensor so that an episode is an
index operation.
"""
from __future__ import annotations

import abc
import re
import struct
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch

from .rng import SplitMix64

PROBLEM_TYPES = ("classification", "regression")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*-[0-9]+w[0-9]+s$|^[a-z0-9][a-z0-9_]*-[0-9]+s$|^[a-z0-9][a-z0-9_]*-md$")


@dataclass(frozen=True)
class Protocol:
    """A named, versioned few-shot evaluation protocol."""

    name: str
    version: int
    dataset: str
    ways: int
    shots: int
    queries: int
    episodes: int
    image_size: int
    channels: int = 1
    problem: str = "classification"
    eval_split: str = "test"
    metric: str = "accuracy"
    higher_is_better: bool = True
    description: str = ""
    #: Backbone for runs that name none, before the learner's own default (e.g. "mlp" for
    #: regression on vectors, where an image backbone makes no sense).
    default_backbone: str | None = None
    #: SHA-256 of the data it is drawn from, where the task has no fixed release (a task file's
    #: folder: its class and file names); results record it as ``task.data_sha256``
    data_sha256: str | None = None
    #: the task file that defines it (metabench.task_file), as given on the command line
    task_file: str | None = None
    #: "fixed" (ways x shots, ways x queries) or "meta-dataset": variable ways and shots
    #: (metabench.variable_episodes; ways, shots and queries are then the sampler's caps)
    episode_sampler: str = "fixed"

    def __post_init__(self) -> None:
        problems = []
        if not _NAME_RE.match(self.name):
            problems.append(f"name {self.name!r} is not of the form <dataset>-<ways>w<shots>s "
                            "(<dataset>-<shots>s for regression, <dataset>-md for Meta-Dataset episodes)")
        elif not self.name.startswith(self.dataset + "-"):
            problems.append(f"name {self.name!r} does not start with its dataset {self.dataset!r}")
        for attr in ("version", "ways", "shots", "queries", "episodes", "image_size", "channels"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{attr} must be a positive integer, got {value!r}")
        if self.episode_sampler not in ("fixed", "meta-dataset"):
            problems.append(f"episode_sampler must be fixed or meta-dataset, got {self.episode_sampler!r}")
        if self.problem not in PROBLEM_TYPES:
            problems.append(f"problem must be one of {', '.join(PROBLEM_TYPES)}, got {self.problem!r}")
        if problems:
            raise ValueError("invalid protocol: " + "; ".join(problems))


@dataclass
class Episode:
    """One few-shot episode, ready for a learner.

    support_x: [ways*shots, C, H, W] float32 in [0, 1]   support_y: [ways*shots] int64 in [0, ways)
    query_x:   [ways*queries, C, H, W]                   query_y:   [ways*queries] int64
    (for regression the x are [N, in_dim] and the y [N, out_dim] float32.)
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


@dataclass(frozen=True)
class EpisodeDraw:
    """What a random draw chose: class indices and the image indices (rows of the split tensor).

    support: ways*shots row indices, class-major; query: ways*queries row indices, class-major.
    support_counts, query_counts: examples per class where they differ between episodes or classes
    (:mod:`metabench.variable_episodes`); empty: every class has len(support) / ways (and queries alike).
    """

    classes: tuple[int, ...]
    support: tuple[int, ...]
    query: tuple[int, ...]
    extra: tuple[float, ...] = field(default=())
    support_counts: tuple[int, ...] = field(default=())
    query_counts: tuple[int, ...] = field(default=())

    def fingerprint(self) -> bytes:
        """Bytes that identify this draw exactly (hashed into the episode-set SHA-256)."""
        ints = self.classes + self.support + self.query
        out = (
            struct.pack("<3I", len(self.classes), len(self.support), len(self.query))
            + struct.pack(f"<{len(ints)}q", *ints)
            + struct.pack(f"<{len(self.extra)}d", *self.extra)
        )
        if self.support_counts or self.query_counts:  # balanced draws hash as they always did
            counts = self.support_counts + self.query_counts
            out += b"counts" + struct.pack(f"<{len(counts)}q", *counts)
        return out

    def labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-major labels of the support [len(support)] and query [len(query)] examples."""
        ways = len(self.classes)
        if not (self.support_counts or self.query_counts):
            support_y, query_y = _episode_labels(ways, len(self.support) // ways, len(self.query) // ways)
            return support_y.clone(), query_y.clone()
        classes = torch.arange(ways)
        return (classes.repeat_interleave(torch.tensor(self.support_counts)),
                classes.repeat_interleave(torch.tensor(self.query_counts)))


class DataSource(abc.ABC):
    """Where a task's episodes come from. One source may serve several protocols."""

    splits: tuple[str, ...] = ("train", "val", "test")

    @abc.abstractmethod
    def draw(self, rng: SplitMix64, split: str, ways: int, shots: int, queries: int) -> EpisodeDraw:
        """Choose an episode's classes and examples with ``rng`` (must use no other randomness)."""

    def draw_many(self, rng: SplitMix64, split: str, n: int, ways: int, shots: int, queries: int) -> list[EpisodeDraw]:
        """``[self.draw(rng, split, ways, shots, queries) for _ in range(n)]``: the same draws and
        stream position; sources may do it in fewer operations."""
        return [self.draw(rng, split, ways, shots, queries) for _ in range(n)]

    @abc.abstractmethod
    def materialize(self, draw: EpisodeDraw, split: str) -> Episode:
        """Turn a draw into tensors (on the CPU)."""

    def materialize_many(self, draws: Sequence[EpisodeDraw], split: str) -> list[Episode]:
        """``[self.materialize(d, split) for d in draws]``; sources may do it in fewer operations."""
        return [self.materialize(d, split) for d in draws]

    def prepare(self, split: str, progress=None) -> None:
        """Load (and if needed build and cache) a split before episodes are materialized."""

    def set_roots(self, roots) -> None:
        """Where the user keeps data (a :class:`metabench.data.DataRoots`); built-in data ignores it."""

    def info(self) -> dict:
        """Per split, what is cached: ``{split: {"cached": bool, "classes": int, ...}}``."""
        return {}

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            from .errors import MetabenchError

            raise MetabenchError(f"unknown split {split!r}; accepted: {', '.join(self.splits)}")


class ClassImageSource(DataSource):
    """An image-classification data source whose split is one uint8 tensor, classes contiguous.

    Subclasses implement :meth:`class_sizes` (cheap, no image decoding) and :meth:`load_split`
    returning ``uint8 [N, C, H, W]`` with class ``c``'s images in rows
    ``offset[c] : offset[c] + class_sizes(split)[c]``.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, list[int]] = {}
        self._uniform: dict[str, int | None] = {}

    @abc.abstractmethod
    def class_sizes(self, split: str) -> Sequence[int]:
        """Images per class in ``split``, in class order."""

    @abc.abstractmethod
    def load_split(self, split: str, progress=None) -> torch.Tensor:
        """uint8 [N, C, H, W] images of ``split``, classes contiguous in class order."""

    def _uniform_size(self, split: str) -> int | None:
        """The common size of every class of ``split``, or None when sizes differ."""
        if split not in self._uniform:
            sizes = set(self.class_sizes(split))
            self._uniform[split] = sizes.pop() if len(sizes) == 1 else None
        return self._uniform[split]

    def offsets(self, split: str) -> list[int]:
        if split not in self._offsets:
            self.check_split(split)
            offsets, total = [], 0
            for size in self.class_sizes(split):
                offsets.append(total)
                total += size
            self._offsets[split] = offsets
        return self._offsets[split]

    def draw(self, rng: SplitMix64, split: str, ways: int, shots: int, queries: int) -> EpisodeDraw:
        return self.draw_many(rng, split, 1, ways, shots, queries)[0]

    def draw_many(self, rng: SplitMix64, split: str, n: int, ways: int, shots: int, queries: int) -> list[EpisodeDraw]:
        """``n`` episodes drawn one after another from ``rng``. When every class of the split has
        the same size, all their picks come from one vectorised :meth:`SplitMix64.samples` call:
        per episode, the classes (``sample(classes, ways)``), then each class's examples
        (``sample(size, shots + queries)``, shifted to the class's first row, ``c * size``), the
        same stream as drawing them one by one."""
        sizes = self.class_sizes(split)
        if ways > len(sizes):
            from .errors import MetabenchError

            raise MetabenchError(f"{ways}-way episodes need {ways} classes; split {split!r} has {len(sizes)}")
        k = shots + queries
        size = self._uniform_size(split)
        if size is None or size < k:
            return [self._draw_general(rng, split, ways, shots, queries) for _ in range(n)]
        group = ways + 1  # requests per episode: its classes, then one per class

        def first_row(r: int, done: list[list[int]]) -> int:
            local = r % group
            return done[r - local][local - 1] * size if local else 0

        picks = rng.samples(([(len(sizes), ways)] + [(size, k)] * ways) * n, first_row)
        out = []
        for e in range(0, len(picks), group):
            support: list[int] = []
            query: list[int] = []
            for rows in picks[e + 1:e + group]:
                support += rows[:shots]
                query += rows[shots:]
            out.append(EpisodeDraw(tuple(picks[e]), tuple(support), tuple(query)))
        return out

    def _draw_general(self, rng: SplitMix64, split: str, ways: int, shots: int, queries: int) -> EpisodeDraw:
        """One episode from classes of any sizes: the classes, then one sample per class."""
        sizes = self.class_sizes(split)
        offsets = self.offsets(split)
        classes = rng.sample(len(sizes), ways)
        for c in classes:
            if sizes[c] < shots + queries:
                from .errors import MetabenchError

                raise MetabenchError(
                    f"class {c} of split {split!r} has {sizes[c]} examples; "
                    f"{shots} shots + {queries} queries need {shots + queries}"
                )
        return self._draw_examples(rng, classes, sizes, offsets, shots, queries)

    @staticmethod
    def _draw_examples(rng: SplitMix64, classes: Sequence[int], sizes: Sequence[int], offsets: Sequence[int],
                       shots: int, queries: int) -> EpisodeDraw:
        """The episode of the chosen ``classes``: each class's shots + queries examples (as rows of
        the split), all classes' picks in one vectorised pass, the same stream as one sample() per class."""
        support, query = [], []
        for rows in rng.samples([(sizes[c], shots + queries) for c in classes], [offsets[c] for c in classes]):
            support += rows[:shots]
            query += rows[shots:]
        return EpisodeDraw(tuple(classes), tuple(support), tuple(query))

    def prepare(self, split: str, progress=None) -> None:
        if split not in self._loaded:
            self.check_split(split)
            images = self.load_split(split, progress=progress)
            expected = sum(self.class_sizes(split))
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != expected:
                raise RuntimeError(
                    f"{type(self).__name__}.load_split({split!r}) gave {images.dtype} {tuple(images.shape)}; "
                    f"expected uint8 [{expected}, C, H, W]"
                )
            self._loaded[split] = images

    def images(self, split: str) -> torch.Tensor:
        """uint8 [N, C, H, W] of the split (loading it if needed)."""
        self.prepare(split)
        return self._loaded[split]

    def materialize(self, draw: EpisodeDraw, split: str) -> Episode:
        return self._materialize_group((draw,), self.images(split))[0]

    def materialize_many(self, draws: Sequence[EpisodeDraw], split: str) -> list[Episode]:
        """The episodes of ``draws``, equal to materializing them one by one, with one gather and
        one scaling per group of episodes whose float32 images take at most
        ``MATERIALIZE_BLOCK_BYTES`` (bigger blocks fall out of the caches and, with glibc's default
        settings, come from fresh pages every time). Each episode's x are contiguous views of its
        group's block (one episode per slice; none overlaps another's).

        A subclass that overrides :meth:`materialize` (e.g. to rotate images) gets one
        ``materialize`` call per draw unless it overrides this method too."""
        if type(self).materialize is not ClassImageSource.materialize:
            return DataSource.materialize_many(self, draws, split)
        images = self.images(split)
        per_image = images[0].numel() * 4 if len(images) else 1
        out, group, group_bytes = [], [], 0
        for d in draws:
            size = (len(d.support) + len(d.query)) * per_image
            if group and group_bytes + size > MATERIALIZE_BLOCK_BYTES:
                out += self._materialize_group(group, images)
                group, group_bytes = [], 0
            group.append(d)
            group_bytes += size
        if group:
            out += self._materialize_group(group, images)
        return out

    def _materialize_group(self, draws: Sequence[EpisodeDraw], images: torch.Tensor) -> list[Episode]:
        """One gather of the draws' support and query rows, then float32 and an in-place / 255 (the
        same values as torch.div(uint8, 255.0), whose type-promoting kernel is slower; see
        benchmarks/RESULTS.md, section 1); each episode's support and query are contiguous views of
        the result. The index tensor is built from an int64 buffer rather than a list of ints."""
        if len(draws) == 1:  # the one-episode hot path: no list building
            rows = draws[0].support + draws[0].query
        else:
            gathered: list[int] = []
            for d in draws:
                gathered += d.support
                gathered += d.query
            rows = tuple(gathered)
        x = images.index_select(0, _index_tensor(rows)).float().div_(255.0)
        out, at = [], 0
        for d in draws:
            n_support, n_query = len(d.support), len(d.query)
            support_y, query_y = d.labels()
            out.append(Episode(x[at:at + n_support], support_y, x[at + n_support:at + n_support + n_query], query_y))
            at += n_support + n_query
        return out

    def pooled(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of a split with their class labels: (uint8 [N, C, H, W], int64 [N])."""
        sizes = torch.tensor(list(self.class_sizes(split)))
        return self.images(split), torch.repeat_interleave(torch.arange(len(sizes)), sizes)


#: the most float32 image bytes ``ClassImageSource.materialize_many`` produces in one operation
MATERIALIZE_BLOCK_BYTES = 8 * 1024 * 1024


def _index_tensor(rows: tuple[int, ...]) -> torch.Tensor:
    """int64 [len(rows)] tensor of ``rows``."""
    if not rows:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array("q", rows), dtype=torch.int64)


@lru_cache(maxsize=64)
def _episode_labels(ways: int, shots: int, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-major labels: support [ways*shots], query [ways*queries] (callers clone them)."""
    labels = torch.arange(ways)
    return labels.repeat_interleave(shots), labels.repeat_interleave(queries)
