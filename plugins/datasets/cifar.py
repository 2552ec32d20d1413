"""Task plugin: ``cifarfs`` and ``fc100``, two few-shot class splits of CIFAR-100 (32 x 32 px RGB).

CIFAR-FS (Bertinetto et al., ICLR 2019) splits the 100 fine classes at random into 64 train /
16 val / 20 test. FC100 (Oreshkin et al., TADAM, NeurIPS 2018) splits by superclass, 12 / 4 / 4
superclasses = 60 / 20 / 20 fine classes, so no test class shares a superclass with a training
class. Both class lists are committed under ``splits/`` (with their sources) and checked against
their SHA-256 when read.

Data: the user's copy of CIFAR-100's python version, a folder ``cifar-100-python/`` holding the
pickles ``train`` (50,000 images), ``test`` (10,000) and ``meta`` (class names). Both files are
pooled per class, so every class has 600 images. Each pickle is a dict with ``data`` uint8
[N, 3072] (per image 1024 red, then 1024 green, then 1024 blue bytes, rows top to bottom), and
``fine_labels`` / ``coarse_labels`` (N ints); ``meta`` holds ``fine_label_names`` (100) and
``coarse_label_names`` (20). Pickles are read with an unpickler that only builds numpy arrays.

Cache: the pooled data set is decoded once into one uint8 array [60000, 3, 32, 32] in the cache
folder (rows grouped by fine label 0..99; within a label, ``train`` rows then ``test`` rows in file
order), shared by both data sets. A split is the rows of its classes, in split-file order. The
cache is named by the pickles' SHA-256 (not their times: the same archive extracted again reuses
it), and written only once the data passed its checks (a refused copy leaves no cache).

Protocols: ``cifarfs-5w1s``, ``cifarfs-5w5s``, ``fc100-5w1s``, ``fc100-5w5s``: 5-way, 15 queries
per class, 600 test episodes.
"""
from __future__ import annotations

import codecs
import hashlib
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from metabench import ClassImageSource, MetabenchError, Protocol, hookimpl
from metabench.data import (DataRoots, ensure_image_cache, file_sha256, open_image_cache, read_split_file,
                            write_image_cache)

VERSION = 1
EPISODES = 600
QUERIES = 15
IMAGE_SIZE = 32
CHANNELS = 3
IMAGES_PER_CLASS = 600  # 500 in ``train`` + 100 in ``test``; checked when the data is loaded
N_FINE, N_COARSE = 100, 20

DATASET = "cifar100"  # the data folder both task data sets read (``[data] cifar100 = "/path"``)
FOLDER_NAMES = ("cifar-100-python", "cifar100", "CIFAR100")
PICKLES = ("train", "test", "meta")
LAYOUT = ("cifar-100-python/ holding the pickles train, test and meta of CIFAR-100's python version "
          "(cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted)")

from . import SPLITS_DIR
SPLIT_FILES = {
    "cifarfs": ("cifarfs.json", "88725083c52854abb9fc9a3a7a5687e6ded4e032550bc5a67fa7c8bb48b8af85"),
    "fc100": ("fc100.json", "66380e1c4dcab024154c4ae0b1d8e39157506c8fccd8fc047aa25ba90136a060"),
}


# ----------------------------------------------------------------------------- reading the pickles
@lru_cache(maxsize=1)
def _safe_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle needs: what numpy uses to rebuild an array."""
    reconstruct, scalar = np.empty(0).__reduce__()[0], np.float64(0).__reduce__()[0]
    out = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(module, "_reconstruct")] = reconstruct
        out[(module, "scalar")] = scalar
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    out[("_codecs", "encode")] = codecs.encode  # bytes in a protocol-2 pickle written by Python 3
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses any other global (no code runs)."""

    def find_class(self, module: str, name: str):
        found = _safe_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return found


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_pickle(path: Path) -> dict[str, object]:
    """One CIFAR pickle as a dict with str keys (Python 2 and 3 pickles alike)."""
    try:
        with open(path, "rb") as fh:
            doc = _ArrayUnpickler(fh, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise MetabenchError(f"{DATASET}: cannot read {path}: {_one_line(exc)} (expected {LAYOUT})") from None
    if not isinstance(doc, dict):
        raise MetabenchError(f"{DATASET}: {path} holds a {type(doc).__name__}, not a CIFAR dict (expected {LAYOUT})")
    return {_text(k): v for k, v in doc.items()}


def _field(doc: dict, path: Path, key: str):
    if key not in doc:
        raise MetabenchError(f"{DATASET}: {path} has no '{key}' entry (has {', '.join(sorted(doc)) or 'none'}; "
                             f"expected {LAYOUT})")
    return doc[key]


def read_images(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``train`` or ``test``: (images uint8 [N, 3, 32, 32], fine labels int64 [N], coarse labels int64 [N])."""
    doc = read_pickle(path)
    data = _field(doc, path, "data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != CHANNELS * IMAGE_SIZE * IMAGE_SIZE:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MetabenchError(f"{DATASET}: {path}: 'data' is {got}, expected uint8 [N, 3072] (expected {LAYOUT})")
    labels = []
    for key, n in (("fine_labels", N_FINE), ("coarse_labels", N_COARSE)):
        try:
            values = np.asarray(_field(doc, path, key), dtype=np.int64)
        except (TypeError, ValueError):
            values = np.empty(0, dtype=np.int64)
        if values.shape != (len(data),) or (len(values) and not 0 <= values.min() <= values.max() < n):
            raise MetabenchError(f"{DATASET}: {path}: '{key}' must be {len(data)} integers in [0, {n}) "
                                 f"(expected {LAYOUT})")
        labels.append(values)
    return data.reshape(-1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), labels[0], labels[1]


def read_names(path: Path) -> tuple[list[str], list[str]]:
    """``meta``: (100 fine class names, 20 superclass names), in label order."""
    doc = read_pickle(path)
    out = []
    for key, n in (("fine_label_names", N_FINE), ("coarse_label_names", N_COARSE)):
        names = _field(doc, path, key)
        if not isinstance(names, (list, tuple)) or len(names) != n:
            raise MetabenchError(f"{DATASET}: {path}: '{key}' must list {n} names (expected {LAYOUT})")
        out.append([_text(x) for x in names])
    return out[0], out[1]


def data_folder(roots: DataRoots) -> Path:
    """The folder holding the three pickles (``<folder>/cifar-100-python/`` is accepted too)."""
    root = roots.locate(DATASET, FOLDER_NAMES, LAYOUT)
    if not (root / "meta").exists() and (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    for name in PICKLES:
        path = root / name
        if not path.is_file():
            hint = ""
            if (root / "batches.meta").exists() or (root / "data_batch_1").exists():
                hint = "; this looks like CIFAR-10 (cifar-10-batches-py), not CIFAR-100"
            elif path.is_dir():
                hint = f"; {path} is a folder, but the python version has pickle files"
            raise MetabenchError(f"{DATASET}: no pickle file {path}{hint} (expected {LAYOUT})")
    return root


# ----------------------------------------------------------------------------- the pooled cache
@dataclass
class Pool:
    """CIFAR-100 train + test pooled: ``images`` uint8 [N, 3, 32, 32] (memory-mapped), rows grouped
    by fine label; ``names[c]``, ``superclass[c]``, ``sizes[c]``, ``offsets[c]`` per fine label c."""

    images: torch.Tensor
    names: list[str]
    superclass: list[str]
    sizes: list[int]
    offsets: list[int]
    sha256: str
    path: Path
    folder: Path

    def rows(self, classes: list[int]) -> torch.Tensor:
        """int64 row indices of ``classes``' images, class after class."""
        return torch.cat([torch.arange(self.offsets[c], self.offsets[c] + self.sizes[c]) for c in classes])


_KEYS: dict[tuple, str] = {}  # (folder, the pickles' stat) -> cache key, so a process hashes them once


def cache_key(folder: Path) -> str:
    """Names the cache entry: the SHA-256 of the three pickles' bytes (streamed; about 0.2 s for the
    180 MB of CIFAR-100). Extracting the same archive again gives the same key; other bytes, another.
    Within one process the key is reused while the files' device, inode, size and times stay the same."""
    try:
        stats = tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                      for st in ((folder / name).stat() for name in PICKLES))
    except OSError as exc:
        raise MetabenchError(f"{DATASET}: cannot read {folder}: {exc.strerror} (expected {LAYOUT})") from None
    memo = (str(folder), stats)
    if memo not in _KEYS:
        digest = hashlib.sha256()
        for name in PICKLES:
            digest.update(f"{name}\0{file_sha256(folder / name)}\1".encode())
        _KEYS[memo] = f"{DATASET}-pooled-{CHANNELS}x{IMAGE_SIZE}px-{digest.hexdigest()[:16]}"
    return _KEYS[memo]


def check_counts(folder: Path, names: list[str], sizes: list[int]) -> None:
    """Every fine class must have IMAGES_PER_CLASS images (train + test)."""
    short = [(n, s) for n, s in zip(names, sizes) if s != IMAGES_PER_CLASS]
    if short:
        listed = ", ".join(f"{n} has {s}" for n, s in short[:3]) + (", ..." if len(short) > 3 else "")
        raise MetabenchError(f"{DATASET}: {folder}: {listed} images; CIFAR-100 has {IMAGES_PER_CLASS} per class "
                             f"(train + test) (expected {LAYOUT})")


def build_pool_cache(folder: Path, key: str, progress=None) -> None:
    """Read the pickles, check them (every class's image count and superclass), group the images by
    fine label and write ``key``'s ``.npy`` + ``.json``. Data that is refused writes nothing."""
    fine_names, coarse_names = read_names(folder / "meta")
    parts = []
    for step, name in enumerate(("train", "test"), start=1):
        parts.append(read_images(folder / name))
        if progress:
            progress(step, 3)
    fine = np.concatenate([p[1] for p in parts])
    coarse = np.concatenate([p[2] for p in parts])
    sizes = np.bincount(fine, minlength=N_FINE)
    check_counts(folder, fine_names, sizes.tolist())
    superclass = []
    for c in range(N_FINE):
        found = np.unique(coarse[fine == c])
        if len(found) != 1:
            raise MetabenchError(f"{DATASET}: {folder}: fine class {c} ({fine_names[c]}) has superclass labels "
                                 f"{found.tolist()}; CIFAR-100 gives each class one superclass (expected {LAYOUT})")
        superclass.append(coarse_names[int(found[0])])
    order = np.argsort(fine, kind="stable")  # by fine label; train rows before test rows, file order kept
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts])[order])
    del parts
    write_image_cache(key, images, fine_names, sizes.tolist(), str(folder), {"superclasses": superclass})
    if progress:
        progress(3, 3)


_POOLS: dict[str, Pool] = {}  # cache key -> opened pool, shared by the cifarfs and fc100 sources


def load_pool(folder: Path, progress=None) -> Pool:
    """The pooled CIFAR-100 of ``folder``, building (and checking) its cache first if needed."""
    key = cache_key(folder)
    if key not in _POOLS:
        found = ensure_image_cache(key, lambda: build_pool_cache(folder, key, progress),
                                   lambda found: None if _superclasses(found) is not None
                                   else "records no superclasses (an older format)")
        check_counts(folder, found.classes, found.sizes)
        offsets = np.concatenate([[0], np.cumsum(found.sizes)[:-1]]).tolist()
        _POOLS[key] = Pool(found.images, found.classes, _superclasses(found), found.sizes, offsets, found.sha256,
                           found.path, folder)
    return _POOLS[key]


def _superclasses(found) -> list[str] | None:
    value = (found.extra or {}).get("superclasses")
    return value if isinstance(value, list) and len(value) == N_FINE else None


# ----------------------------------------------------------------------------- the two data sets
@lru_cache(maxsize=None)
def split_file(dataset: str) -> dict:
    """The committed class split of ``dataset`` ("cifarfs" or "fc100"), digest-checked."""
    name, sha = SPLIT_FILES[dataset]
    return read_split_file(SPLITS_DIR / name, sha)


class CifarSource(ClassImageSource):
    """One class split of pooled CIFAR-100; split ``s`` is uint8 [n_classes(s) * 600, 3, 32, 32]."""

    def __init__(self, dataset: str) -> None:
        super().__init__()
        self.dataset = dataset
        self.roots = DataRoots.from_settings()

    def set_roots(self, roots: DataRoots) -> None:
        """Where to look for the data; forgets what was loaded."""
        if roots != self.roots:
            self.roots = roots
            self._loaded.clear()
            self._offsets.clear()

    def class_names(self, split: str) -> list[str]:
        self.check_split(split)
        return list(split_file(self.dataset)[split])

    def class_sizes(self, split: str) -> list[int]:
        """Known without the data: loading checks that every class has exactly this many."""
        return [IMAGES_PER_CLASS] * len(self.class_names(split))

    def pool(self, progress=None) -> Pool:
        pool = load_pool(data_folder(self.roots), progress)
        self.check_pool(pool)
        return pool

    def check_pool(self, pool: Pool) -> None:
        """Every split class must be a CIFAR-100 class of the data."""
        missing = [n for s in self.splits for n in self.class_names(s) if n not in pool.names]
        if missing:
            raise MetabenchError(f"{self.dataset}: {pool.folder}/meta lacks the classes {', '.join(missing[:5])}; "
                                 f"is it CIFAR-100? (expected {LAYOUT})")

    def load_split(self, split: str, progress=None) -> torch.Tensor:
        pool = self.pool(progress)
        return pool.images[pool.rows([pool.names.index(n) for n in self.class_names(split)])]

    def info(self) -> dict:
        """Per split: classes and images; when cached, the shared pooled cache file and its SHA-256."""
        folder = data_folder(self.roots)
        found = open_image_cache(cache_key(folder))
        out = {}
        for split in self.splits:
            n = len(self.class_names(split))
            row = {"cached": found is not None, "classes": n, "images": n * IMAGES_PER_CLASS}
            if found is not None:
                row.update(path=str(found.path), bytes=found.path.stat().st_size,
                           sha256=f"{found.sha256} (all of CIFAR-100, shared by cifarfs and fc100)",
                           min_per_class=min(found.sizes), max_per_class=max(found.sizes))
            out[split] = row
        return out


class FC100Source(CifarSource):
    """FC100: also checks that each split holds exactly the fine classes of its superclasses."""

    def check_pool(self, pool: Pool) -> None:
        super().check_pool(pool)
        doc = split_file(self.dataset)
        for split in self.splits:
            wanted = set(doc["superclasses"][split])
            expected = sorted(n for n, s in zip(pool.names, pool.superclass) if s in wanted)
            if sorted(self.class_names(split)) != expected:
                raise MetabenchError(f"{self.dataset}: the superclasses in {pool.folder} do not match the FC100 "
                                     f"{split} split ({', '.join(sorted(wanted))}); is it CIFAR-100? (expected {LAYOUT})")


def protocols() -> list[tuple[Protocol, str]]:
    """(protocol, data set) for the four protocols."""
    titles = {"cifarfs": "CIFAR-FS (20 test classes of CIFAR-100)",
              "fc100": "FC100 (20 test classes from 4 held-out CIFAR-100 superclasses)"}
    out = []
    for dataset in ("cifarfs", "fc100"):
        for shots in (1, 5):
            out.append((Protocol(
                name=f"{dataset}-5w{shots}s", version=VERSION, dataset=dataset, ways=5, shots=shots, queries=QUERIES,
                episodes=EPISODES, image_size=IMAGE_SIZE, channels=CHANNELS,
                description=f"5-way {shots}-shot on {titles[dataset]}, 32 px RGB",
            ), dataset))
    return out


@hookimpl
def metabench_register_tasks(register):
    sources = {"cifarfs": CifarSource("cifarfs"), "fc100": FC100Source("fc100")}  # one per data set
    for protocol, dataset in protocols():
        register(protocol, sources[dataset])
