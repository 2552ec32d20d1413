"""Data on disk: where users keep data sets, and the decoded uint8 cache episodes index into.

Roots: a data set ``name`` is looked for in, first to last,
  1. a per-data-set folder from the config file (``[data] name = "/path"``) or ``--data-root``'s
     ``name=/path`` form,
  2. ``<root>/<folder>`` for each of the data set's usual folder names, where ``<root>`` is
     ``--data-root DIR``, else ``$METABENCH_DATA``.

Cache: :func:`build_image_cache` decodes a list of image files once into one uint8 array
``[N, C, H, W]`` (a ``.npy`` file, written atomically, with a JSON sidecar holding its SHA-256,
class names and class sizes); :func:`open_image_cache` memory-maps it back. An episode is then an
index operation whatever the original file format was.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .cache import cache_dir
from .errors import MetabenchError
from .task import ClassImageSource

DATA_ENV = "METABENCH_DATA"


@dataclass
class DataRoots:
    """Where to find data sets: one general root and per-data-set folders."""

    root: Path | None = None
    per_dataset: dict[str, Path] | None = None

    @classmethod
    def from_settings(cls, root: str | None = None, per_dataset: dict[str, str] | None = None) -> "DataRoots":
        """Build from ``--data-root`` / config values, falling back to $METABENCH_DATA."""
        chosen = root or os.environ.get(DATA_ENV) or None
        return cls(Path(chosen).expanduser() if chosen else None,
                   {k: Path(v).expanduser() for k, v in (per_dataset or {}).items()})

    def locate(self, dataset: str, folder_names: Sequence[str], layout: str) -> Path:
        """The folder holding ``dataset``; a missing one is a MetabenchError naming what was tried."""
        if self.per_dataset and dataset in self.per_dataset:
            path = self.per_dataset[dataset]
            if not path.is_dir():
                raise MetabenchError(f"{dataset}: data folder {path} does not exist (expected {layout})")
            return path
        if self.root is None:
            raise MetabenchError(f"{dataset}: no data folder given; pass --data-root DIR (or set ${DATA_ENV}) "
                                 f"with {dataset} in DIR/{folder_names[0]}/ ({layout})")
        tried = [self.root / name for name in folder_names]
        for path in tried:
            if path.is_dir():
                return path
        raise MetabenchError(f"{dataset}: not found under {self.root} (tried {', '.join(str(p) for p in tried)}; "
                             f"expected {layout})")


@dataclass(frozen=True)
class ImageList:
    """The images of one split: class names and, per class, its image files (sorted)."""

    classes: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]

    def sizes(self) -> list[int]:
        return [len(f) for f in self.files]

    def fingerprint(self) -> str:
        """SHA-256 of class names and file names (not contents): names the cache entry."""
        digest = hashlib.sha256()
        for name, files in zip(self.classes, self.files):
            digest.update(name.encode() + b"\0" + b"\0".join(f.name.encode() for f in files) + b"\1")
        return digest.hexdigest()


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file as uint8 [channels, size, size] (resized with a box-antialiased bilinear filter)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MetabenchError(f"cannot read image {path}: {exc}") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


@dataclass
class CachedImages:
    """A decoded split: ``images`` uint8 [N, C, H, W] (memory-mapped) and its description."""

    images: torch.Tensor
    classes: list[str]
    sizes: list[int]
    sha256: str
    path: Path
    extra: dict | None = None


def _atomic_write_bytes(path: Path, write: Callable[[object], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_paths(key: str) -> tuple[Path, Path]:
    base = cache_dir() / key
    return base.with_suffix(".npy"), base.with_suffix(".json")


def build_image_cache(key: str, listing: ImageList, size: int, channels: int,
                      progress: Callable[[int, int], None] | None = None,
                      read: Callable[[Path], np.ndarray] | None = None) -> CachedImages:
    """Decode every item of ``listing`` into ``cache_dir()/key.npy`` (+ ``.json``) and open it.

    Images land in listing order: class 0's files, then class 1's, ... ``progress(done, total)``
    is called per class. ``read(item) -> uint8 [channels, size, size]`` decodes one item
    (default: the image file at that path); a data set whose images live inside an archive
    passes its own. The array is written through a memory map, so it never has to fit in RAM.
    """
    read = read or (lambda path: decode_image(path, size, channels))
    total = sum(listing.sizes())
    npy, meta = cache_paths(key)
    npy.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(str(npy) + ".partial", mode="w+", dtype=np.uint8,
                                      shape=(total, channels, size, size))
    try:
        row = 0
        for c, files in enumerate(listing.files):
            for f in files:
                array[row] = read(f)
                row += 1
            if progress:
                progress(c + 1, len(listing.files))
        array.flush()
        digest = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()
        del array
        os.replace(str(npy) + ".partial", npy)
    except BaseException:
        if os.path.exists(str(npy) + ".partial"):
            os.unlink(str(npy) + ".partial")
        raise
    _write_description(meta, list(listing.classes), listing.sizes(), digest, [total, channels, size, size],
                       listing.fingerprint(), None)
    return open_image_cache(key, verify=False)


def _write_description(meta: Path, classes, sizes, digest, shape, source, extra) -> None:
    description = {"classes": list(classes), "sizes": list(sizes), "sha256": digest, "shape": list(shape),
                   "source": source, "extra": extra}
    _atomic_write_bytes(meta, lambda fh: fh.write(json.dumps(description, indent=1).encode()))


def write_image_cache(key: str, images: np.ndarray, classes: Sequence[str], sizes: Sequence[int], source: str,
                      extra: dict | None = None) -> CachedImages:
    """Store images that already are an array (uint8 [N, C, H, W], classes contiguous) under ``key``.

    ``extra`` (JSON-able) is kept in the sidecar and returned as ``CachedImages.extra``.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != sum(sizes):
        raise ValueError(f"write_image_cache: expected uint8 [{sum(sizes)}, C, H, W], got {images.dtype} {images.shape}")
    images = np.ascontiguousarray(images)
    npy, meta = cache_paths(key)
    npy.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(npy, lambda fh: np.save(fh, images, allow_pickle=False))
    _write_description(meta, classes, sizes, hashlib.sha256(images.data).hexdigest(), images.shape, source, extra)
    return open_image_cache(key)


def open_image_cache(key: str, verify: bool = False) -> CachedImages | None:
    """The cached split ``key``, memory-mapped, or None when absent or inconsistent."""
    npy, meta = cache_paths(key)
    if not (npy.exists() and meta.exists()):
        return None
    try:
        description = json.loads(meta.read_text())
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if list(array.shape) != description.get("shape") or array.dtype != np.uint8:
        return None
    if verify and hashlib.sha256(np.ascontiguousarray(array).data).hexdigest() != description["sha256"]:
        return None
    with warnings.catch_warnings():  # a read-only memory map: torch warns that it is not writable
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(array)
    return CachedImages(images, description["classes"], description["sizes"], description["sha256"], npy,
                        description.get("extra"))


class FolderImageSource(ClassImageSource):
    """Base of data sets read from a user's folder and cached as uint8 arrays.

    Subclasses set ``dataset``, ``folder_names`` (usual folder names under a data root),
    ``layout`` (one line describing the expected files, shown in errors), ``image_size`` and
    ``channels``, and implement :meth:`list_split` (scan ``root`` and return the split's
    :class:`ImageList`, raising MetabenchError naming the path on any problem).
    """

    dataset: str = ""
    folder_names: tuple[str, ...] = ()
    layout: str = ""
    image_size: int = 84
    channels: int = 3

    def __init__(self) -> None:
        super().__init__()
        self.roots = DataRoots.from_settings()
        self._listings: dict[str, ImageList] = {}
        self._cached: dict[str, CachedImages] = {}

    def set_roots(self, roots: DataRoots) -> None:
        """Where to look for the data (the CLI's --data-root and config); forgets what was loaded."""
        if roots == self.roots:
            return
        self.roots = roots
        self._listings.clear()
        self._cached.clear()
        self._loaded.clear()
        self._offsets.clear()

    @property
    def root(self) -> Path:
        return self.roots.locate(self.dataset, self.folder_names, self.layout)

    def list_split(self, root: Path, split: str) -> ImageList:  # pragma: no cover - abstract
        raise NotImplementedError

    def listing(self, split: str) -> ImageList:
        self.check_split(split)
        if split not in self._listings:
            self._listings[split] = self.list_split(self.root, split)
        return self._listings[split]

    def cache_key(self, split: str) -> str:
        return f"{self.dataset}-{split}-{self.channels}x{self.image_size}px-{self.listing(split).fingerprint()[:16]}"

    def class_sizes(self, split: str) -> list[int]:
        return self.listing(split).sizes()

    def error(self, message: str) -> MetabenchError:
        """A one-line error naming the data set and the expected layout."""
        return MetabenchError(f"{self.dataset}: {message} (expected {self.layout})")

    def cached(self, split: str, progress=None) -> CachedImages:
        """The decoded split, building the cache first if needed (an unreadable image: one line
        naming it, from :meth:`error`)."""
        if split not in self._cached:
            key = self.cache_key(split)
            found = open_image_cache(key)
            if found is None or found.sizes != self.listing(split).sizes():
                try:
                    found = build_image_cache(key, self.listing(split), self.image_size, self.channels, progress)
                except MetabenchError as exc:
                    if str(exc).startswith("cannot read image"):
                        raise self.error(str(exc)) from None
                    raise
            self._cached[split] = found
        return self._cached[split]

    def load_split(self, split: str, progress=None) -> torch.Tensor:
        return self.cached(split, progress).images

    def info(self) -> dict:
        """What is cached per split: path, bytes, SHA-256, class count, images per class."""
        out = {}
        for split in self.splits:
            key = self.cache_key(split)
            found = open_image_cache(key)
            if found is None:
                out[split] = {"cached": False, "classes": len(self.listing(split).classes),
                              "images": sum(self.listing(split).sizes())}
            else:
                out[split] = {"cached": True, "path": str(found.path), "bytes": found.path.stat().st_size,
                              "sha256": found.sha256, "classes": len(found.classes), "images": sum(found.sizes),
                              "min_per_class": min(found.sizes), "max_per_class": max(found.sizes)}
        return out


def read_split_file(path: Path, sha256: str) -> dict:
    """A committed class-split JSON file, checked against its recorded SHA-256 (of the file bytes).

    The file holds at least ``{"source": "...", "train": [...], "val": [...], "test": [...]}``.
    """
    raw = Path(path).read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise RuntimeError(f"split file {path} has SHA-256 {actual}, expected {sha256}: it was edited; "
                           "a changed split is a new task version")
    return json.loads(raw)
