"""Task plugin ``miniimagenet``: mini-ImageNet with Ravi & Larochelle's class split, read from the user's folder.

64 / 16 / 20 ImageNet classes of 600 images each, decoded once to 84 x 84 RGB (see
``splits/miniimagenet.json`` and ``splits/README.md``). Two layouts are accepted:

* Ravi & Larochelle's release: ``images/`` plus ``train.csv``, ``val.csv``, ``test.csv`` with rows
  ``filename,label`` (the image is ``images/<filename>``, or ``images/<label>/<filename>``);
* one folder per split: ``train/``, ``val/``, ``test/``, each with a ``<wnid>/`` folder of images per
  class.

The part shared by the folder data sets lives in :mod:`metabench.folders`.
"""
from __future__ import annotations

import csv
from pathlib import Path

from metabench import Protocol, hookimpl
from metabench.data import ImageList
from metabench.folders import SplitFolderSource, make_protocols

from . import SPLITS_DIR


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
