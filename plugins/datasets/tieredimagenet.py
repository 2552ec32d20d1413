"""Task plugin ``tieredimagenet``: tieredImageNet with Ren et al.'s class split, read from the user's folder.

351 / 97 / 160 ImageNet classes (under 20 / 6 / 8 high-level categories), decoded once to 84 x 84
RGB (see ``splits/tieredimagenet.json`` and ``splits/README.md``). Two layouts are accepted, per
split:

* one folder per split: ``train/``, ``val/``, ``test/``, each with a ``<wnid>/`` folder of .jpg or
  .png images per class (e.g. what tiered-imagenet-tools writes);
* Ren et al.'s pickles: ``<split>_images_png.pkl`` (a list of PNG-encoded images, numpy uint8
  arrays or bytes) and ``<split>_labels.pkl`` (a dict with ``label_specific``, one class index per
  image, and ``label_specific_str``, the class names). Names that are not WordNet ids are mapped
  through ``synsets.txt`` and ``class_names.txt`` (line-aligned, as shipped with the pickles).
  The pickles are read with an unpickler that only builds numpy arrays and plain containers; the
  original protocol-2 files and the same arrays pickled again with protocol 5 (numpy 1.16+ or 2)
  are accepted alike.

Classes are numbered in the split file's order (Ren et al.'s csv order), whatever the order of the
class indices inside the pickles.

``tieredimagenet_category-5w{1,5}s`` are the fine-grained variant (:mod:`metabench.grouped`): every
episode, in training and test, draws its classes from one of Ren et al.'s high-level categories,
the split file's ``category`` map (20 / 6 / 8 categories of 10 to 30 classes; checked by the split
file's SHA-256 with the classes). They share the plain tasks' folder and image cache.
"""
from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import numpy as np

from metabench import MetabenchError, hookimpl
from metabench.data import ImageList, build_image_cache, decode_image
from metabench.grouped import GroupedEpisodes

from metabench.folders import SplitFolderSource, make_protocols

from . import SPLITS_DIR

SETTINGS = ((5, 1, 15), (5, 5, 15))
_WNID = re.compile(r"^n\d{8}$")
_PICKLE_MARK = "#"  # an image inside a pickle is listed as Path("<pickle>#<row, 8 digits>")
#: version of the within-category protocols (bump when their groups or the grouped draw change)
CATEGORY_VERSION = 1


def protocols():
    return make_protocols("tieredimagenet", SETTINGS, 84, 3,
                          "the 160 test classes of tieredImageNet (Ren et al. split, 84 px)")


def category_protocols():
    return make_protocols("tieredimagenet_category", SETTINGS, 84, 3,
                          "the 160 test classes of tieredImageNet, every episode within one of its 8 "
                          "high-level categories (fine-grained, 84 px)", version=CATEGORY_VERSION)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings, bytes, lists and dicts, and nothing that runs other code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        # pickle protocol 5 rebuilds an array from its buffer (numpy 1.16+ / numpy 2 name); frombuffer
        # refuses object dtypes, so this builds plain arrays only
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            with warnings.catch_warnings():  # numpy 2 warns about the numpy.core alias old pickles name
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TieredImageNetSource(SplitFolderSource):
    """tieredImageNet, 84 x 84 RGB; each split one uint8 cache [N, 3, 84, 84]."""

    dataset = "tieredimagenet"
    folder_names = ("tieredimagenet", "tiered-imagenet", "tiered_imagenet", "tieredImageNet", "tiered-ImageNet")
    layout = ("train/, val/, test/ with one <wnid>/ folder of .jpg/.png files per class, "
              "or <split>_images_png.pkl + <split>_labels.pkl (Ren et al.)")
    image_size = 84
    channels = 3
    split_file = SPLITS_DIR / "tieredimagenet.json"
    split_sha256 = "e0749fe07cbf33cf104983d830b6b1052f7794a69e9cfeb919989f4161dc3975"
    min_images = max(s + q for _, s, q in SETTINGS)

    def list_split(self, root: Path, split: str) -> ImageList:
        if (root / f"{split}_images_png.pkl").is_file():
            return self._from_pickles(root, split)
        if (root / split).is_dir():
            return self.class_folders(root / split, split)
        raise self.error(f"{root} has neither {split}_images_png.pkl + {split}_labels.pkl nor a {split}/ folder")

    # --------------------------------------------------------------------- pickles
    def load_pickle(self, path: Path):
        try:
            with open(path, "rb") as fh:
                return _ArraysOnly(fh, encoding="latin1").load()
        except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError, AttributeError, ImportError) as exc:
            raise self.error(f"cannot read {path}: {type(exc).__name__}: {exc}") from None

    def _from_pickles(self, root: Path, split: str) -> ImageList:
        images_pkl, labels_pkl = root / f"{split}_images_png.pkl", root / f"{split}_labels.pkl"
        if not labels_pkl.is_file():
            raise self.error(f"{images_pkl} has no {labels_pkl.name} next to it")
        data = self.load_pickle(labels_pkl)
        data = {_text(k): v for k, v in data.items()} if isinstance(data, dict) else {}
        if "label_specific" not in data or "label_specific_str" not in data:
            raise self.error(f"{labels_pkl} is not a dict with label_specific and label_specific_str")
        labels = np.asarray(data["label_specific"]).reshape(-1)
        names = [_text(n) for n in data["label_specific_str"]]
        if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(names)):
            raise self.error(f"{labels_pkl}: label_specific must be class indices into label_specific_str "
                             f"({len(names)} names)")
        expected = self.split_classes(split)
        wnids = self._wnids(root, names, labels_pkl, expected)
        index = {wnid: i for i, wnid in enumerate(wnids)}
        used = set(np.unique(labels).tolist())
        extra = sorted(w for w, i in index.items() if i in used and w not in set(expected))
        if extra:
            raise self.error(f"{labels_pkl} has class {extra[0]}, which is not in the committed {split} split "
                             f"({len(extra)} such class(es)); is this another class split?")
        files = []
        for wnid in expected:
            if wnid not in index:
                raise self.error(f"class {wnid} of split {split!r} is missing from {labels_pkl}")
            rows = np.flatnonzero(labels == index[wnid])
            files.append([Path(f"{images_pkl}{_PICKLE_MARK}{row:08d}") for row in rows.tolist()])
        return self.finish(split, expected, files, [f"{labels_pkl}"] * len(expected))

    def _wnids(self, root: Path, names: list[str], labels_pkl: Path, expected) -> list[str]:
        """WordNet ids of the pickle's class names (which are either ids or ImageNet class names)."""
        if all(_WNID.match(n) for n in names):
            return names
        synsets, words = root / "synsets.txt", root / "class_names.txt"
        if not (synsets.is_file() and words.is_file()):
            raise self.error(f"{labels_pkl} names classes by words ({names[0]!r}); {synsets.name} and "
                             f"{words.name} are needed next to it to map them to WordNet ids")
        by_name: dict[str, list[str]] = {}
        for wnid, name in zip(synsets.read_text().splitlines(), words.read_text().splitlines()):
            by_name.setdefault(name.strip(), []).append(wnid.strip())
        committed = set(expected) | {w for s in self.splits for w in self.split_classes(s)}
        out = []
        for name in names:
            candidates = by_name.get(name.strip(), [])
            if len(candidates) > 1:  # ImageNet repeats a few names (e.g. 'crane'): keep the split's one
                candidates = [w for w in candidates if w in committed]
            if len(candidates) != 1:
                raise self.error(f"{labels_pkl}: class name {name!r} matches {len(candidates)} lines of {words}")
            out.append(candidates[0])
        return out

    @staticmethod
    def _pickle_source(listing: ImageList) -> Path | None:
        first = listing.files[0][0] if listing.files and listing.files[0] else None
        if first is None or _PICKLE_MARK not in first.name or not first.name.partition(_PICKLE_MARK)[0].endswith(".pkl"):
            return None
        return first.with_name(first.name.partition(_PICKLE_MARK)[0])

    def source_files(self, split: str) -> list[Path] | None:
        """A pickle split's bytes are its images pickle (its labels are in the listing itself)."""
        images_pkl = self._pickle_source(self.listing(split))
        return None if images_pkl is None else [images_pkl]

    def build_cache(self, split: str, progress=None) -> None:
        listing = self.listing(split)
        images_pkl = self._pickle_source(listing)
        if images_pkl is None:
            super().build_cache(split, progress)
        else:
            self._build_from_pickle(self.cache_key(split), listing, images_pkl, progress)

    def decode_png(self, blob, where: str) -> np.ndarray:
        """One PNG (numpy uint8 array or bytes) as uint8 [3, 84, 84]."""
        try:
            data = blob.tobytes() if isinstance(blob, np.ndarray) else bytes(blob)
            return decode_image(io.BytesIO(data), self.image_size, self.channels)
        except (MetabenchError, TypeError, ValueError):
            raise self.error(f"cannot read image {where}: not an encoded image") from None

    def _build_from_pickle(self, key: str, listing: ImageList, images_pkl: Path, progress):
        """Decode the listed images of the pickle into the same cache files ``build_image_cache`` writes."""
        blobs = self.load_pickle(images_pkl)
        if not isinstance(blobs, (list, tuple)):
            raise self.error(f"{images_pkl} does not hold a list of PNG-encoded images")
        rows = [[int(f.name.rpartition(_PICKLE_MARK)[2]) for f in files] for files in listing.files]
        if rows and max(max(r) for r in rows) >= len(blobs):
            raise self.error(f"{images_pkl} holds {len(blobs)} images, fewer than its labels file counts")

        def read(item: Path) -> np.ndarray:
            row = int(item.name.rpartition(_PICKLE_MARK)[2])
            return self.decode_png(blobs[row], f"#{row} of {images_pkl}")

        return build_image_cache(key, listing, self.image_size, self.channels, progress, read=read)


class TieredImageNetCategorySource(GroupedEpisodes, TieredImageNetSource):
    """tieredImageNet, each episode's classes drawn from one high-level category.

    Its data set name, folder and cache are the plain source's (``dataset = "tieredimagenet"``)."""

    def class_groups(self, split: str) -> list[str | None]:
        """The committed category (a WordNet id, e.g. ``n01524359`` passerine) of each class of ``split``."""
        category = self.split_doc()["category"]
        return [category.get(name) for name in self.split_classes(split)]


@hookimpl
def metabench_register_tasks(register):
    source = TieredImageNetSource()  # shared by both protocols, so a split is decoded and loaded once
    for protocol in protocols():
        register(protocol, source)
    grouped = TieredImageNetCategorySource()  # the within-category protocols: same folder and image cache
    for protocol in category_protocols():
        register(protocol, grouped)
