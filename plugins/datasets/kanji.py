"""Built-in task plugin: ``kanji``, the default data set (Omniglot-like, rendered from KanjiVG).

2,340 characters of at most 10 strokes, 20 jittered renderings each at 28 x 28 px; classes split
1,500 train / 240 val / 600 test (see :mod:`metabench_plugins.datasets.kanji_data`). Protocols follow the
Omniglot conventions: 5-way with 15 queries per class, 20-way with 5, 600 test episodes.
``kanji_radical-5w1s`` / ``-5w5s`` are the fine-grained variant: every episode (training and test)
draws its classes from one radical family (:mod:`metabench.grouped`).

``kanji_hand`` renders the same characters as if by different hands (every stroke's ends and
curvature drawn anew per instance, larger jitter: :data:`~.kanji_data.KANJI_HAND`), with the same
protocols; its fine-grained ``kanji_hand_radical-5w1s`` is metabench's default task.
"""
from __future__ import annotations

import torch

from metabench import ClassImageSource, Protocol, hookimpl
from metabench.grouped import GroupedEpisodes
from metabench.variable_episodes import MetaDatasetEpisodes

from . import kanji_data

EPISODES = 600


class KanjiSource(ClassImageSource):
    """The rendered kanji classes in one :class:`~.kanji_data.RenderStyle`; each split one uint8
    tensor [n_classes * 20, 1, 28, 28]."""

    def __init__(self, style: kanji_data.RenderStyle = kanji_data.KANJI):
        super().__init__()
        self.style = style

    def class_sizes(self, split: str) -> list[int]:
        self.check_split(split)
        return kanji_data.class_sizes(split)

    def load_split(self, split: str, progress=None) -> torch.Tensor:
        return kanji_data.load_split(split, progress=progress, style=self.style)

    def info(self) -> dict:
        """The one cache file holds every split; its digest is the style's committed SHA-256."""
        path = kanji_data.cache_path(self.style)
        cached = path.exists()
        out = {}
        for split in self.splits:
            row = {"cached": cached, "classes": len(self.class_sizes(split)), "images": sum(self.class_sizes(split)),
                   "min_per_class": kanji_data.INSTANCES_PER_CLASS, "max_per_class": kanji_data.INSTANCES_PER_CLASS}
            if cached:
                row.update(path=str(path), bytes=path.stat().st_size, sha256=self.style.sha256 + " (all splits)")
            out[split] = row
        return out


class KanjiRadicalSource(GroupedEpisodes, KanjiSource):
    """The kanji classes, each episode's drawn from one radical family (the general radical KanjiVG
    marks: 木, 氵, 艹, ...; characters it marks none for are left out)."""

    def class_groups(self, split: str) -> list[str | None]:
        self.check_split(split)
        return kanji_data.class_radicals(split)


#: version of the fine-grained protocols on ``kanji`` (bump when the radical file or the grouped draw changes)
RADICAL_VERSION = 1
#: the fine-grained protocols on ``kanji_hand``: its render version, so either change makes a new one
HAND_RADICAL_VERSION = kanji_data.KANJI_HAND.version


def radical_protocols(style: kanji_data.RenderStyle = kanji_data.KANJI) -> list[Protocol]:
    version = RADICAL_VERSION if style is kanji_data.KANJI else HAND_RADICAL_VERSION
    return [Protocol(
        name=f"{style.dataset}_radical-{ways}w{shots}s", version=version, dataset=f"{style.dataset}_radical",
        ways=ways, shots=shots, queries=queries, episodes=EPISODES, image_size=kanji_data.IMAGE_SIZE, channels=1,
        description=f"{ways}-way {shots}-shot {style.dataset}, every episode within one radical family (fine-grained)")
        for ways, shots, queries in ((5, 1, 15), (5, 5, 15))]


class KanjiMetaDatasetSource(MetaDatasetEpisodes, KanjiSource):
    """The kanji classes in Meta-Dataset's variable-way, variable-shot episodes."""


def meta_dataset_protocol() -> Protocol:
    """kanji-md: Meta-Dataset's sampler with its caps (up to 50 ways, 100 shots per class and 10
    queries per class; kanji's 20 images per class make it 5-50 ways, up to 10 shots, 10 queries)."""
    return Protocol(name="kanji-md", version=1, dataset="kanji", ways=50, shots=100, queries=10, episodes=EPISODES,
                    image_size=kanji_data.IMAGE_SIZE, channels=1, episode_sampler="meta-dataset",
                    description="Meta-Dataset episodes (Triantafillou et al. 2020): 5-50 ways, imbalanced shots")


def protocols(style: kanji_data.RenderStyle = kanji_data.KANJI) -> list[Protocol]:
    drawn = "hand-drawn " if style.hand_drawn else ""
    out = []
    for ways, shots, queries in ((5, 1, 15), (5, 5, 15), (20, 1, 5), (20, 5, 5)):
        out.append(Protocol(
            name=f"{style.dataset}-{ways}w{shots}s", version=style.version, dataset=style.dataset, ways=ways,
            shots=shots, queries=queries, episodes=EPISODES, image_size=kanji_data.IMAGE_SIZE, channels=1,
            description=f"{ways}-way {shots}-shot on 600 held-out {drawn}KanjiVG characters (28 px)",
        ))
    return out


@hookimpl
def metabench_register_tasks(register):
    for style in (kanji_data.KANJI, kanji_data.KANJI_HAND):
        source = KanjiSource(style)  # one source shared by a style's protocols, so a split loads once
        for protocol in protocols(style):
            register(protocol, source)
        grouped = KanjiRadicalSource(style)
        for protocol in radical_protocols(style):
            register(protocol, grouped)
    register(meta_dataset_protocol(), KanjiMetaDatasetSource())
