"""Task plugin ``cub``: CUB-200-2011 birds with Chen et al.'s class split, read from the user's folder.

The release as extracted (``CUB_200_2011/``): ``images/<class>/<image>.jpg`` plus ``images.txt``
(``<image id> <path under images/>``), ``image_class_labels.txt`` (``<image id> <class id>``) and
``classes.txt`` (``<class id> <class name>``; without it a class is named by its images' folder).
Classes are split 100 / 50 / 50 as in Chen et al. (2019) (see ``splits/cub.json`` and
``splits/README.md``) and decoded once to 84 x 84 RGB (whole image, no bounding-box crop).
"""
from __future__ import annotations

from pathlib import Path

from metabench import hookimpl
from metabench.data import ImageList

from metabench.folders import SplitFolderSource, make_protocols

from . import SPLITS_DIR

SETTINGS = ((5, 1, 15), (5, 5, 15))


def protocols():
    return make_protocols("cub", SETTINGS, 84, 3,
                          "the 50 test classes of CUB-200-2011 (Chen et al. 2019 split, 84 px)")


class CUBSource(SplitFolderSource):
    """CUB-200-2011, 84 x 84 RGB; classes numbered in id order within each split."""

    dataset = "cub"
    folder_names = ("cub", "CUB_200_2011", "CUB-200-2011", "CUB")
    layout = ("CUB_200_2011/ with images/<class>/*.jpg, images.txt, image_class_labels.txt "
              "and classes.txt")
    image_size = 84
    channels = 3
    split_file = SPLITS_DIR / "cub.json"
    split_sha256 = "8fb3b69894444607be8ded63cf3e705c725a835b004e55e3bad53898785de04a"
    min_images = max(s + q for _, s, q in SETTINGS)

    def _table(self, path: Path) -> dict[str, str]:
        """``<id> <value>`` lines as {id: value}; a line of another shape is a layout error."""
        out = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            key, _, value = line.strip().partition(" ")
            if not value.strip():
                raise self.error(f"{path} line {number} is not '<id> <value>'")
            out[key] = value.strip()
        return out

    def list_split(self, root: Path, split: str) -> ImageList:
        if (root / "CUB_200_2011" / "images.txt").is_file() and not (root / "images.txt").is_file():
            root = root / "CUB_200_2011"  # the archive's own top folder, one level down
        images_txt, labels_txt, classes_txt = (root / n for n in ("images.txt", "image_class_labels.txt", "classes.txt"))
        if not ((root / "images").is_dir() and images_txt.is_file() and labels_txt.is_file()):
            raise self.error(f"{root} lacks images/, images.txt or image_class_labels.txt")
        paths, labels = self._table(images_txt), self._table(labels_txt)
        class_names = self._table(classes_txt) if classes_txt.is_file() else None
        expected = self.split_classes(split)
        members: dict[str, list[Path]] = {name: [] for name in expected}
        for image_id, relative in paths.items():
            if image_id not in labels:
                raise self.error(f"image {image_id} of {images_txt} has no line in {labels_txt}")
            if class_names is not None:
                if labels[image_id] not in class_names:
                    raise self.error(f"{labels_txt} gives image {image_id} class {labels[image_id]}, "
                                     f"which {classes_txt} does not name")
                name = class_names[labels[image_id]]
            else:
                name = Path(relative).parent.name
            if name in members:
                members[name].append(root / "images" / relative)
        files = []
        for name in expected:
            if not members[name]:
                raise self.error(f"class {name} of split {split!r} is missing: no image of it in {images_txt}")
            missing = next((p for p in members[name] if not p.is_file()), None)
            if missing is not None:
                raise self.error(f"{images_txt} lists {missing}, which does not exist")
            files.append(members[name])
        return self.finish(split, expected, files, [root / "images" / name for name in expected])


@hookimpl
def metabench_register_tasks(register):
    source = CUBSource()  # shared by both protocols, so a split is decoded and loaded once
    for protocol in protocols():
        register(protocol, source)
