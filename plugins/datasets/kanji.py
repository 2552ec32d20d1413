"""Built-in task plugin: ``kanji``, the default data set (Omniglot-like, rendered from KanjiVG).

2,340 characters of at most 10 strokes, 20 jittered renderings each at 28 x 28 px; classes split
1,500 train / 240 val / 600 test (see :mod:`metabench_plugins.datasets.kanji_data`). Protocols follow the
Omniglot conventions: 5-way with 15 queries per class, 20-way with 5, 600 test episodes.
``kanji_radical-5w1s`` / ``-5w5s`` are the fine-grained variant: every episode (training and test)
draws its classes from one radical family (:mod:`metabench.grouped`).
"""
from __future__ import annotations

import torch

from metabench import ClassImageSource, Protocol, hookimpl
from metabench.grouped import GroupedEpisodes
from metabench.variable_episodes import MetaDatasetEpisodes

from . import kanji_data

VERSION = kanji_data.DATA_VERSION
EPISODES = 600


class KanjiSource(ClassImageSource):
    """The rendered kanji classes; each split one uint8 tensor [n_classes * 20, 1, 28, 28]."""

    def class_sizes(self, split: str) -> list[int]:
        self.check_split(split)
        return kanji_data.class_sizes(split)

    def load_split(self, split: str, progress=None) -> torch.Tensor:
        return kanji_data.load_split(split, progress=progress)

    def info(self) -> dict:
        """The one cache file holds every split; its digest is the committed RENDER_SHA256."""
        path = kanji_data.cache_path()
        cached = path.exists()
        out = {}
        for split in self.splits:
            row = {"cached": cached, "classes": len(self.class_sizes(split)), "images": sum(self.class_sizes(split)),
                   "min_per_class": kanji_data.INSTANCES_PER_CLASS, "max_per_class": kanji_data.INSTANCES_PER_CLASS}
            if cached:
                row.update(path=str(path), bytes=path.stat().st_size, sha256=kanji_data.RENDER_SHA256 + " (all splits)")
            out[split] = row
        return out


class KanjiRadicalSource(GroupedEpisodes, KanjiSource):
    """The kanji classes, each episode's drawn from one radical family (the general radical KanjiVG
    marks: 木, 氵, 艹, ...; characters it marks none for are left out)."""

    def class_groups(self, split: str) -> list[str | None]:
        self.check_split(split)
        return kanji_data.class_radicals(split)


#: version of the fine-grained protocols (bump when the radical file or the grouped draw changes)
RADICAL_VERSION = 1


def radical_protocols() -> list[Protocol]:
    return [Protocol(
        name=f"kanji_radical-{ways}w{shots}s", version=RADICAL_VERSION, dataset="kanji_radical", ways=ways,
        shots=shots, queries=queries, episodes=EPISODES, image_size=kanji_data.IMAGE_SIZE, channels=1,
        description=f"{ways}-way {shots}-shot kanji, every episode within one radical family (fine-grained)")
        for ways, shots, queries in ((5, 1, 15), (5, 5, 15))]


class KanjiMetaDatasetSource(MetaDatasetEpisodes, KanjiSource):
    """The kanji classes in Meta-Dataset's variable-way, variable-shot episodes."""


def meta_dataset_protocol() -> Protocol:
    """kanji-md: Meta-Dataset's sampler with its caps (up to 50 ways, 100 shots per class and 10
    queries per class; kanji's 20 images per class make it 5-50 ways, up to 10 shots, 10 queries)."""
    return Protocol(name="kanji-md", version=1, dataset="kanji", ways=50, shots=100, queries=10, episodes=EPISODES,
                    image_size=kanji_data.IMAGE_SIZE, channels=1, episode_sampler="meta-dataset",
                    description="Meta-Dataset episodes (Triantafillou et al. 2020): 5-50 ways, imbalanced shots")


def protocols() -> list[Protocol]:
    out = []
    for ways, shots, queries in ((5, 1, 15), (5, 5, 15), (20, 1, 5), (20, 5, 5)):
        out.append(Protocol(
            name=f"kanji-{ways}w{shots}s", version=VERSION, dataset="kanji", ways=ways, shots=shots,
            queries=queries, episodes=EPISODES, image_size=kanji_data.IMAGE_SIZE, channels=1,
            description=f"{ways}-way {shots}-shot on 600 held-out KanjiVG characters (28 px)",
        ))
    return out


@hookimpl
def metabench_register_tasks(register):
    source = KanjiSource()  # one source shared by the four protocols, so a split loads once
    for protocol in protocols():
        register(protocol, source)
    grouped = KanjiRadicalSource()
    for protocol in radical_protocols():
        register(protocol, grouped)
    register(meta_dataset_protocol(), KanjiMetaDatasetSource())
