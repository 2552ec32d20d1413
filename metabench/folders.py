"""Folder data sets with a committed class split: the part every such data set shares.

A :class:`SplitFolderSource` reads its class split from a JSON file checked by SHA-256, lists a
split's image files in the user's folder (refusing missing, foreign and short classes with one
line naming the path and the expected layout), and caches the decoded images (see
:mod:`metabench.data`). Built-in data sets (omniglot, miniimagenet, tieredimagenet, cub) and
third-party ones use it alike.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .data import FolderImageSource, ImageList, read_split_file
from .task import Protocol

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EPISODES = 600


@functools.lru_cache(maxsize=None)
def _read_split_file(path: Path, sha256: str) -> dict:
    doc = read_split_file(path, sha256)
    for split in ("train", "val", "test"):
        doc[split] = tuple(doc[split])
    return doc


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (.jpg, .jpeg, .png, any case; no hidden files), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def make_protocols(dataset: str, settings: Iterable[tuple[int, int, int]], image_size: int, channels: int,
                   what: str, version: int = 1) -> list[Protocol]:
    """One protocol per (ways, shots, queries), 600 test episodes each."""
    return [Protocol(name=f"{dataset}-{ways}w{shots}s", version=version, dataset=dataset, ways=ways, shots=shots,
                     queries=queries, episodes=EPISODES, image_size=image_size, channels=channels,
                     description=f"{ways}-way {shots}-shot on {what}")
            for ways, shots, queries in settings]


class SplitFolderSource(FolderImageSource):
    """A folder data set whose class split is a committed JSON file checked by its SHA-256.

    Subclasses set ``split_file``, ``split_sha256`` and ``min_images`` (the most images one class
    must give an episode of any of the data set's protocols: shots + queries), and implement
    :meth:`list_split` with the helpers below.

    ``splits`` (``{"train": [...], "val": [...], "test": [...]}``) replaces the committed lists,
    e.g. to read a small test copy of a data set with the same loading code.
    """

    split_file: Path
    split_sha256: str = ""
    min_images: int = 1

    def __init__(self, splits: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        self._split_override = None if splits is None else {s: tuple(splits[s]) for s in self.splits}

    def split_doc(self) -> dict:
        """The committed split file (digest-checked once per process)."""
        return _read_split_file(self.split_file, self.split_sha256)

    def split_classes(self, split: str) -> tuple[str, ...]:
        """The class names of ``split``, in the order classes are numbered."""
        self.check_split(split)
        if self._split_override is not None:
            return self._split_override[split]
        return self.split_doc()[split]

    def finish(self, split: str, classes: Sequence[str], files: Sequence[Sequence[Path]],
               where: Sequence[object]) -> ImageList:
        """The split's ImageList, after refusing classes with fewer than ``min_images`` files.

        ``where`` names, per class, the folder (or file) its images were listed from.
        """
        for name, found, place in zip(classes, files, where):
            if len(found) < self.min_images:
                raise self.error(f"class {name} of split {split!r} has {len(found)} images in {place}; "
                                 f"its protocols need at least {self.min_images} per class")
        return ImageList(tuple(classes), tuple(tuple(sorted(found)) for found in files))

    def class_folders(self, split_dir: Path, split: str) -> ImageList:
        """``split_dir/<class>/*.jpg|png`` for the split's classes; other class folders are refused."""
        expected = self.split_classes(split)
        present = {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        extra = sorted(present - set(expected))
        if extra:
            raise self.error(f"{split_dir / extra[0]}: class {extra[0]} is not in the committed {split} split "
                             f"({len(extra)} such folder(s)); is this another class split?")
        files = []
        for name in expected:
            if name not in present:
                raise self.error(f"class {name} of split {split!r} is missing: no folder {split_dir / name}")
            files.append(image_files(split_dir / name))
        return self.finish(split, expected, files, [split_dir / name for name in expected])
