"""Data on disk: where users keep data sets, and the decoded uint8 cache episodes index into.

Roots: a data set ``name`` is looked for in, first to last,
  1. a per-data-set folder from the config file (``[data] name = "/path"``) or ``--data-root``'s
     ``name=/path`` form,
  2. ``<root>/<folder>`` for each of the data set's usual folder names, where ``<root>`` is
     ``--data-root DIR``, else ``$METABENCH_DATA``.

Cache: :func:`build_image_cache` decodes a list of image files once into one uint8 array
``[N, C, H, W]`` (a ``.npy`` file with a JSON sidecar holding its SHA-256, class names and class
sizes, both written atomically: temp file, fsync, rename); :func:`open_image_cache` memory-maps it
back after checking the array against that SHA-256. An episode is then an index operation whatever
the original file format was.

A folder data set's cache is named by the SHA-256 of its source files' bytes (with the class and
file names), so a cache stands for exactly the bytes it was built from: images replaced under the
same names give another cache. :func:`ensure_image_cache` builds a missing or damaged cache under a
lock file, so processes building the same cache at once build it once and share it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

import numpy as np
import torch

from .cache import cache_dir
from .errors import MetabenchError
from .files import cannot_write, write_atomic, write_bytes_atomic
from .task import ClassImageSource

DATA_ENV = "METABENCH_DATA"


def _folder(value: str, where: str) -> Path:
    """``value`` with ``~`` expanded; a ``~name`` of no such user is one line naming ``where``."""
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:  # Path.expanduser: no home folder for ~name
        raise MetabenchError(f"{where}: data folder {value!r}: {exc}; give an existing folder") from None


@dataclass
class DataRoots:
    """Where to find data sets: one general root and per-data-set folders."""

    root: Path | None = None
    per_dataset: dict[str, Path] | None = None

    @classmethod
    def from_settings(cls, root: str | None = None, per_dataset: dict[str, str] | None = None) -> "DataRoots":
        """Build from ``--data-root`` / config values, falling back to $METABENCH_DATA."""
        if root:
            chosen = _folder(root, "--data-root")
        else:  # read while plugins register: a ~name of no such user stays as written, and locate() names it
            env = os.environ.get(DATA_ENV) or None
            try:
                chosen = Path(env).expanduser() if env else None
            except RuntimeError:
                chosen = Path(env)
        return cls(chosen,
                   {k: _folder(v, f"[data] {k}") for k, v in (per_dataset or {}).items()})

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
        """SHA-256 of class names and file names (not contents): what the listing is."""
        digest = hashlib.sha256()
        for name, files in zip(self.classes, self.files):
            digest.update(name.encode() + b"\0" + b"\0".join(f.name.encode() for f in files) + b"\1")
        return digest.hexdigest()

    def content_sha256(self, files: Iterable[Path] | None = None) -> str:
        """SHA-256 of :meth:`fingerprint` and the bytes of ``files`` (default: every listed file),
        each file read once, streamed: what a cache built from this listing stands for."""
        digest = hashlib.sha256(self.fingerprint().encode())
        for path in (dict.fromkeys(f for fs in self.files for f in fs) if files is None else files):
            digest.update(Path(path).name.encode() + b"\0" + file_sha256(path).encode() + b"\1")
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


# ----------------------------------------------------------------------------- cache files
#: (path, device, inode, size, mtime_ns, recorded SHA-256) of cache files whose array this process has
#: hashed and found to match their sidecar: each is verified once per process (see open_image_cache)
_VERIFIED: set[tuple] = set()
_HASH_CHUNK = 1 << 24  # 16 MiB


def cache_paths(key: str) -> tuple[Path, Path]:
    """``<cache>/<key>.npy`` and ``.json``; a key that is not a plain file name is refused (it could
    name a file outside the cache folder)."""
    if not key or key.startswith(".") or "/" in key or "\\" in key or "\0" in key:
        raise MetabenchError(f"cache key {key!r} is not a plain file name")
    folder = cache_dir()
    return folder / f"{key}.npy", folder / f"{key}.json"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, streamed (a MetabenchError naming the file if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise MetabenchError(f"cannot read {path}: {exc.strerror or exc}") from None


def _warn(message: str) -> None:
    print(f"metabench: warning: {message}", file=sys.stderr, flush=True)


def _identity(path: Path, sha256: str) -> tuple:
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)


def _array_sha256(array: np.ndarray) -> str:
    """SHA-256 of a (memory-mapped) C-contiguous array's bytes, read in 16 MiB pieces."""
    flat = array.reshape(-1)
    digest = hashlib.sha256()
    for start in range(0, flat.shape[0], _HASH_CHUNK):
        digest.update(memoryview(np.ascontiguousarray(flat[start:start + _HASH_CHUNK])))
    return digest.hexdigest()


def inspect_image_cache(key: str) -> tuple[CachedImages | None, str | None]:
    """(the cached split ``key`` memory-mapped, None) when its files are there and verify;
    (None, None) when there is no cache; (None, what is wrong) for a damaged one.

    Verifying hashes the whole array: measured 1.7 GB/s on a busy 2-core machine with the file in
    the page cache, 0.15 s for a 254 MB array (mini-ImageNet's test split), so about 0.1 s for the
    184 MB CIFAR-100 cache and 6 s for tieredImageNet's 9.5 GB train split (more when the disk is
    the limit). It is therefore done once per process per file: a file this process already
    verified, with the same path, device, inode, size and modification time (a rebuilt cache is a
    new inode), is not hashed again.
    """
    npy, meta = cache_paths(key)
    if not npy.exists() and not meta.exists():
        return None, None
    if not npy.exists() or not meta.exists():
        return None, f"only one of {npy.name} and {meta.name} is there"
    try:
        description = json.loads(meta.read_text(encoding="utf-8"))
        array = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    if not isinstance(description, dict) or not isinstance(description.get("sha256"), str) \
            or not isinstance(description.get("classes"), list) or not isinstance(description.get("sizes"), list):
        return None, f"{meta.name} is not a cache description"
    if list(array.shape) != description.get("shape") or array.dtype != np.uint8 or array.ndim != 4 \
            or sum(description["sizes"]) != array.shape[0]:
        return None, f"holds {array.dtype} {list(array.shape)}, its description says {description.get('shape')}"
    try:
        identity = _identity(npy, description["sha256"])
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if identity not in _VERIFIED:
        actual = _array_sha256(array)
        if actual != description["sha256"]:
            return None, f"its SHA-256 is {actual[:12]}…, not the {description['sha256'][:12]}… recorded when it was built"
        _VERIFIED.add(identity)
    with warnings.catch_warnings():  # a read-only memory map: torch warns that it is not writable
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(array)
    return CachedImages(images, description["classes"], description["sizes"], description["sha256"], npy,
                        description.get("extra")), None


def open_image_cache(key: str, verify: bool = True) -> CachedImages | None:
    """The cached split ``key``, memory-mapped and verified against its recorded SHA-256 (see
    :func:`inspect_image_cache`), or None when absent, inconsistent or damaged.

    ``verify`` is kept for callers of earlier versions: a cache is always verified."""
    return inspect_image_cache(key)[0]


@contextmanager
def cache_lock(key: str):
    """Hold ``<cache>/<key>.lock`` exclusively (fcntl.flock): one process builds a cache, the others
    wait and then find it built. The lock file is removed when released (the holder unlinks it; a
    waiter that got the lock on a removed file takes the new one), so none is left behind.
    Where fcntl does not exist the build is not serialised, but still atomic (temp file + rename)."""
    path = cache_dir() / f"{key}.lock"
    if fcntl is None:
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # a read-only cache folder: name the cache that cannot be written
            raise cannot_write(cache_paths(key)[0], exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:  # the holder removed it before we got it: take the new one
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def ensure_image_cache(key: str, build: Callable[[], object],
                       check: Callable[[CachedImages], str | None] | None = None) -> CachedImages:
    """The verified cache ``key``, built by ``build()`` first when it is absent, damaged, or
    ``check(found)`` names a problem with it.

    A damaged cache (its array does not match its recorded SHA-256, a missing or foreign sidecar)
    is rebuilt with one warning line on stderr saying so; a cache that does not verify right after
    it was built is refused with one line (MetabenchError). Building holds :func:`cache_lock`, so
    processes building the same cache at once build it once and all open the same verified files.
    """
    def usable() -> tuple[CachedImages | None, str | None]:
        found, problem = inspect_image_cache(key)
        if found is not None and check is not None:
            problem = check(found)
            if problem:
                found = None
        return found, problem

    found, _ = usable()
    if found is not None:
        return found
    with cache_lock(key):
        found, problem = usable()  # another process may have built it while this one waited
        if found is not None:
            return found
        npy = cache_paths(key)[0]
        if problem:
            _warn(f"cache {npy}: {problem}; rebuilding it")
        build()
        found, problem = usable()
    if found is None:
        raise MetabenchError(f"cache {npy} does not verify right after it was built "
                             f"({problem or 'it is not there'}); refusing to use it")
    return found


def _npy_header(shape: Sequence[int]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def _write_cache(key: str, shape: Sequence[int], chunks: Callable[[], Iterable[np.ndarray]], classes, sizes,
                 source, extra) -> None:
    """Write ``key``'s ``.npy`` (uint8 ``shape``, from the C-contiguous uint8 pieces ``chunks()``
    yields in order) and its ``.json`` description, each through a temp file, fsync and rename;
    the SHA-256 is computed while writing. On any failure neither file is left behind."""
    npy, meta = cache_paths(key)
    digest = hashlib.sha256()
    meta_written = []

    def write_array(fh) -> None:
        fh.write(_npy_header(shape))
        rows = 0
        for piece in chunks():
            piece = np.ascontiguousarray(piece, dtype=np.uint8)
            rows += piece.shape[0]
            view = memoryview(piece).cast("B")
            digest.update(view)
            fh.write(view)
        if rows != shape[0]:
            raise RuntimeError(f"cache {npy}: wrote {rows} rows, expected {shape[0]}")

    def write_description() -> None:  # between the array's fsync and its rename: both files or neither
        description = {"classes": list(classes), "sizes": list(sizes), "sha256": digest.hexdigest(),
                       "shape": list(shape), "source": source, "extra": extra}
        write_bytes_atomic(meta, json.dumps(description, indent=1).encode())
        meta_written.append(meta)

    try:
        write_atomic(npy, write_array, before_rename=write_description)
    except BaseException:
        for path in meta_written:
            path.unlink(missing_ok=True)
        raise
    _VERIFIED.add(_identity(npy, digest.hexdigest()))  # hashed while written: no need to read it back


def _open_written(key: str) -> CachedImages:
    """The cache ``key`` just written by :func:`_write_cache`, opened (a MetabenchError if it does not verify)."""
    found, problem = inspect_image_cache(key)
    if found is None:
        raise MetabenchError(f"cache {cache_paths(key)[0]} does not verify right after it was built ({problem})")
    return found


def build_image_cache(key: str, listing: ImageList, size: int, channels: int,
                      progress: Callable[[int, int], None] | None = None,
                      read: Callable[[Path], np.ndarray] | None = None) -> CachedImages:
    """Decode every item of ``listing`` into ``cache_dir()/key.npy`` (+ ``.json``) and open it.

    Images land in listing order: class 0's files, then class 1's, ... ``progress(done, total)``
    is called per class. ``read(item) -> uint8 [channels, size, size]`` decodes one item
    (default: the image file at that path); a data set whose images live inside an archive
    passes its own. The array is streamed to a temporary file one class at a time (it never has to
    fit in RAM) and renamed into place with its description once complete: a failure (an
    unreadable image, a full disk) leaves no file behind. Callers normally go through
    :func:`ensure_image_cache`, which holds the build lock.
    """
    read = read or (lambda path: decode_image(path, size, channels))
    total = sum(listing.sizes())

    def chunks():
        for c, files in enumerate(listing.files):
            block = np.empty((len(files), channels, size, size), dtype=np.uint8)
            for i, f in enumerate(files):
                block[i] = read(f)
            yield block
            if progress:
                progress(c + 1, len(listing.files))

    _write_cache(key, (total, channels, size, size), chunks, list(listing.classes), listing.sizes(),
                 listing.fingerprint(), None)
    return _open_written(key)


def write_image_cache(key: str, images: np.ndarray, classes: Sequence[str], sizes: Sequence[int], source: str,
                      extra: dict | None = None) -> CachedImages:
    """Store images that already are an array (uint8 [N, C, H, W], classes contiguous) under ``key``
    (atomically, like :func:`build_image_cache`).

    ``extra`` (JSON-able) is kept in the sidecar and returned as ``CachedImages.extra``.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != sum(sizes):
        raise ValueError(f"write_image_cache: expected uint8 [{sum(sizes)}, C, H, W], got {images.dtype} {images.shape}")
    images = np.ascontiguousarray(images)
    step = max(1, _HASH_CHUNK // max(1, images[0].nbytes)) if len(images) else 1
    _write_cache(key, images.shape, lambda: (images[i:i + step] for i in range(0, len(images), step)),
                 classes, sizes, source, extra)
    return _open_written(key)


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
        self._keys: dict[str, str] = {}
        self._cached: dict[str, CachedImages] = {}

    def set_roots(self, roots: DataRoots) -> None:
        """Where to look for the data (the CLI's --data-root and config); forgets what was loaded."""
        if roots == self.roots:
            return
        self.roots = roots
        self._listings.clear()
        self._keys.clear()
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

    def source_files(self, split: str) -> list[Path] | None:
        """The files whose bytes make up ``split`` (None: every listed image file)."""
        return None

    def cache_key(self, split: str) -> str:
        """``<data set>-<split>-<C>x<size>px-<16 hex digits>``: the digits are the SHA-256 of the
        split's class and file names and of every source file's bytes, so images replaced under the
        same names give another key. Computed once per source object (per process); it reads every
        file: measured on a 2-core machine, page-cached, about 26 us per file plus 1.4 GB/s (2,000
        JPEGs of 20 MB: 52 ms against 0.7 ms for the names alone; a 12 GB tieredImageNet train
        pickle: about 9 s, more where the disk is the limit)."""
        if split not in self._keys:
            digest = self.listing(split).content_sha256(self.source_files(split))
            self._keys[split] = f"{self.dataset}-{split}-{self.channels}x{self.image_size}px-{digest[:16]}"
        return self._keys[split]

    def class_sizes(self, split: str) -> list[int]:
        return self.listing(split).sizes()

    def error(self, message: str) -> MetabenchError:
        """A one-line error naming the data set and the expected layout."""
        return MetabenchError(f"{self.dataset}: {message} (expected {self.layout})")

    def cached(self, split: str, progress=None) -> CachedImages:
        """The decoded split, building the cache first if needed (an unreadable image: one line
        naming it, from :meth:`error`)."""
        if split not in self._cached:
            listing = self.listing(split)

            def build() -> None:
                try:
                    self.build_cache(split, progress)
                except MetabenchError as exc:
                    if str(exc).startswith("cannot read image"):
                        raise self.error(str(exc)) from None
                    raise

            self._cached[split] = ensure_image_cache(self.cache_key(split), build,
                                                     lambda found: self._size_problem(found, listing))
        return self._cached[split]

    def build_cache(self, split: str, progress=None) -> None:
        """Decode ``split`` into its cache (called under the cache's build lock)."""
        build_image_cache(self.cache_key(split), self.listing(split), self.image_size, self.channels, progress)

    @staticmethod
    def _size_problem(found: CachedImages, listing: ImageList) -> str | None:
        if found.sizes != listing.sizes() or found.classes != list(listing.classes):
            return "describes other classes than the folder lists"
        return None

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
