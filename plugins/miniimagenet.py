"""Task plugin ``miniimagenet``: mini-ImageNet with Ravi & Larochelle's class split, read from the user's folder.

64 / 16 / 20 ImageNet classes of 600 images each, decoded once to 84 x 84 RGB (see
``splits/miniimagenet.json`` and ``splits/README.md``). Two layouts are accepted:

* Ravi & Larochelle's release: ``images/`` plus ``train.csv``, ``val.csv``, ``test.csv`` with rows
  ``filename,label`` (the image is ``images/<filename>``, or ``images/<label>/<filename>``);
* one folder per split: ``train/``, ``val/``, ``test/``, each with a ``<wnid>/`` folder of images per
  class.

This module also holds :class:`SplitFolderSource`, the part shared by the folder data sets
(``omniglot``, ``tieredimagenet``, ``cub`` import it): the committed class split, the per-class
minimum, and one-line errors.
"""
from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from metabench import MetabenchError, Protocol, hookimpl
from metabench.data import FolderImageSource, ImageList, read_split_file

SPLITS_DIR = Path(__file__).with_name("splits")
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

    def error(self, message: str) -> MetabenchError:
        """A one-line error: the data set, what is wrong (naming the path), and the expected layout."""
        return MetabenchError(f"{self.dataset}: {message} (expected {self.layout})")

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

    def cached(self, split: str, progress=None):
        try:
            return super().cached(split, progress)
        except MetabenchError as exc:
            if str(exc).startswith("cannot read image"):
                raise self.error(str(exc)) from None
            raise


# ----------------------------------------------------------------------------- mini-ImageNet
SETTINGS = ((5, 1, 15), (5, 5, 15))


def protocols() -> list[Protocol]:
    return make_protocols("miniimagenet", SETTINGS, 84, 3,
                          "the 20 test classes of mini-ImageNet (Ravi & Larochelle split, 84 px)")


class MiniImageNetSource(SplitFolderSource):
    """mini-ImageNet, 84 x 84 RGB; classes numbered in the split file's order (sorted WordNet ids)."""

    dataset = "miniimagenet"
    folder_names = ("miniimagenet", "mini-imagenet", "mini_imagenet", "miniImageNet", "mini-ImageNet")
    layout = ("images/ + train.csv, val.csv, test.csv with rows filename,label (Ravi & Larochelle), "
              "or train/, val/, test/ with one <wnid>/ folder of .jpg files per class")
    image_size = 84
    channels = 3
    split_file = SPLITS_DIR / "miniimagenet.json"
    split_sha256 = "e02f72b8a73688e852cab71186f6f2414f448e0727e02813d2592a5cde0f0dd1"
    min_images = max(s + q for _, s, q in SETTINGS)

    def list_split(self, root: Path, split: str) -> ImageList:
        if (root / "images").is_dir() and (root / f"{split}.csv").is_file():
            return self._from_csv(root, split)
        if (root / split).is_dir():
            return self.class_folders(root / split, split)
        raise self.error(f"{root} has neither images/ + {split}.csv nor a {split}/ folder")

    def _from_csv(self, root: Path, split: str) -> ImageList:
        table = root / f"{split}.csv"
        expected = self.split_classes(split)
        wanted = set(expected)
        names: dict[str, list[str]] = {name: [] for name in expected}
        with open(table, newline="", encoding="utf-8") as fh:
            for line, row in enumerate(csv.reader(fh), start=1):
                if not row or (line == 1 and row == ["filename", "label"]):
                    continue
                if len(row) != 2:
                    raise self.error(f"{table} line {line} is not 'filename,label'")
                filename, label = (cell.strip() for cell in row)
                if label not in wanted:
                    raise self.error(f"{table} line {line} has class {label}, which is not in the committed "
                                     f"{split} split; is this another class split?")
                names[label].append(filename)
        images = root / "images"
        files = []
        for name in expected:
            if not names[name]:
                raise self.error(f"class {name} of split {split!r} is missing from {table}")
            paths = []
            for filename in names[name]:
                path = images / filename
                if not path.is_file():
                    nested = images / name / filename
                    if not nested.is_file():
                        raise self.error(f"{table} lists {filename}, but {path} does not exist")
                    path = nested
                paths.append(path)
            files.append(paths)
        return self.finish(split, expected, files, [f"{table} (images/)"] * len(expected))


@hookimpl
def metabench_register_tasks(register):
    source = MiniImageNetSource()  # shared by both protocols, so a split is decoded and loaded once
    for protocol in protocols():
        register(protocol, source)
