"""The built-in few-shot data set ``kanji``: Omniglot-like classes rendered from KanjiVG strokes.

Source: the KanjiVG stroke data (Ulrich Apel, CC BY-SA 3.0, https://kanjivg.tagaini.net), as
shipped by the PyPI wheel ``kanjivg==20260714`` (a top-level data folder ``kanji/`` of SVG files).

Classes: CJK Unified Ideographs U+4E00..U+9FFF with a non-variant SVG (no ``-`` in the file
name) and at most ``MAX_STROKES`` = 10 strokes: 2,340 characters. They were sorted by code point,
shuffled by a Fisher-Yates shuffle driven by splitmix64 seeded with ``SPLIT_SEED``, and cut into

    train 1,500 classes | val 240 classes | test 600 classes

committed in ``kanji_splits.json`` (verified against ``SPLITS_SHA256`` when read).

Instances: ``INSTANCES_PER_CLASS`` = 20 renders per class, like Omniglot's 20 drawers. Instance
j of character cp gets its own splitmix64 stream seeded from (cp, j): a random affine map
``[[1+a, b], [c, 1+d]]`` about the glyph centre plus a translation, a random offset and stretch
per stroke, and a random pen width. Each cubic Bézier is flattened into ``SEGMENTS_PER_CUBIC``
line segments and each pixel's ink is ``clip(halfwidth + 0.5 - distance to nearest segment, 0, 1)``.
Only numpy float64 + - * / sqrt, min/max and clip are used (no libm, no BLAS, no sums whose order
could vary), so the bytes are identical on every machine; ``RENDER_SHA256`` checks that.

Images: uint8 ``[n_classes * 20, 1, 28, 28]``, ink 255 on black 0, classes contiguous.
All 2,340 classes (train, val, test order) are rendered once into the cache folder as
``kanji-v{DATA_VERSION}-{IMAGE_SIZE}px.npy`` (46,800 images, about 37 MB).

Radical families: the general radical KanjiVG marks for each class (``kvg:radical="general"``),
committed in ``kanji_radicals.json`` (verified against ``RADICALS_SHA256``); the fine-grained
protocols draw every episode's classes from one family.

CLI: ``python -m metabench_plugins.datasets.kanji_data [--write-splits] [--write-radicals] [--render]``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from metabench.cache import cache_dir
from metabench.rng import SplitMix64  # the same generator the episodes use

IMAGE_SIZE = 28
INSTANCES_PER_CLASS = 20
MAX_STROKES = 10
DATA_VERSION = 2  # bump whenever rendering (and so RENDER_SHA256) changes (v1: milder jitter, saturated)
SPLITS = ("train", "val", "test")
SPLIT_COUNTS = {"train": 1500, "val": 240, "test": 600}

KANJIVG_VERSION = "20260714"
CODE_POINT_RANGE = (0x4E00, 0x9FFF)  # CJK Unified Ideographs, inclusive
SPLIT_SEED = 0x6B616E6A69  # "kanji"
RENDER_SEED = 0x4D42_4B41_4E4A_4931  # "MBKANJI1"

SPLITS_FILE = Path(__file__).with_name("kanji_splits.json")
RADICALS_FILE = Path(__file__).with_name("kanji_radicals.json")
SPLITS_SHA256 = "47572a306131e6a326bcd2c707d1db524502390a02304724cd8c520093719120"
RADICALS_SHA256 = "f202a3775828e023b629bb72dcbecc6d04fbe78297dab25f76037e0c60feca5b"
RENDER_SHA256 = "918a6302db817c95da9f3dd7b92996f1520045b4835b4522d3daf36c23d037cf"

# Rendering parameters (any change here changes the bytes: bump DATA_VERSION).
GLYPH_UNITS = 109.0  # KanjiVG viewBox is 0..109 in both axes
MARGIN_PX = 1.0  # canvas margin around the 109-unit box, in pixels
SEGMENTS_PER_CUBIC = 6
AFFINE_DIAG = 0.20  # |a|, |d| <= this
AFFINE_SHEAR = 0.18  # |b|, |c| <= this
SHIFT_UNITS = 9.0  # whole-glyph translation per axis, in 109-units
STROKE_SHIFT_UNITS = 6.0  # per-stroke offset per axis, in 109-units
STROKE_STRETCH = 0.25  # per-stroke scale about the stroke's box centre, per axis: 1 +- this
HALFWIDTH_PX = (0.50, 1.25)  # pen half width range, in pixels

_INSTALL_HINT = f"pip install kanjivg=={KANJIVG_VERSION}"


# ----------------------------------------------------------------------------- KanjiVG access
@lru_cache(maxsize=1)
def kanjivg_dir() -> Path:
    """The installed ``kanji/`` folder of SVG files (RuntimeError with the pip line if missing)."""
    try:
        dist = importlib.metadata.distribution("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"The kanji data set needs the KanjiVG stroke data: {_INSTALL_HINT}") from None
    candidates = []
    for file in dist.files or ():
        if file.parts[:1] == ("kanji",) and file.name.endswith(".svg"):
            candidates.append(Path(file.locate()).parent)
            break
    candidates.append(Path(dist.locate_file("kanji")))
    for folder in candidates:
        if (folder / "04e00.svg").is_file():
            return folder
    raise RuntimeError(
        f"kanjivg is installed but its kanji/ SVG folder was not found; reinstall: {_INSTALL_HINT}")


def _check_kanjivg_version() -> None:
    found = importlib.metadata.version("kanjivg")
    if found != KANJIVG_VERSION:
        raise RuntimeError(
            f"kanjivg {found} is installed but the kanji data set is defined on {KANJIVG_VERSION}: "
            f"{_INSTALL_HINT}")


_PATH_D = re.compile(r'<path\b[^>]*?\sd="([^"]*)"')
_TOKEN = re.compile(r"[MmCcSs]|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ARITY = {"M": 2, "m": 2, "C": 6, "c": 6, "S": 4, "s": 4}


def stroke_paths(code_point: int, folder: Path | None = None) -> list[str]:
    """The ``d`` attributes of the character's ``<path>`` elements, in stroke order."""
    folder = kanjivg_dir() if folder is None else folder
    text = (folder / f"{code_point:05x}.svg").read_text(encoding="utf-8")
    return _PATH_D.findall(text)


def parse_path(d: str) -> np.ndarray:
    """Cubic Béziers of one SVG path using M m C c S s: float64 ``[n_cubics, 4, 2]`` (109-units)."""
    tokens = _TOKEN.findall(d)
    if "".join(tokens) != re.sub(r"[\s,]", "", d):
        raise ValueError(f"unsupported SVG path data: {d!r}")
    cubics: list[tuple] = []
    x = y = 0.0
    prev_c2: tuple[float, float] | None = None
    command = ""
    i = 0
    while i < len(tokens):
        if tokens[i] in "MmCcSs":
            command = tokens[i]
            i += 1
        arity = _ARITY.get(command, 0)
        if not arity or i + arity > len(tokens):
            raise ValueError(f"malformed SVG path data: {d!r}")
        v = [float(t) for t in tokens[i:i + arity]]
        i += arity
        rel = command.islower()
        ox, oy = (x, y) if rel else (0.0, 0.0)
        if command in "Mm":
            x, y = ox + v[0], oy + v[1]
            prev_c2 = None
            command = "l" if rel else "L"  # implicit repeats after M are line-tos: unused by KanjiVG
            continue
        if command in "Cc":
            c1 = (ox + v[0], oy + v[1])
            c2, end = (ox + v[2], oy + v[3]), (ox + v[4], oy + v[5])
        else:  # S s: first control point mirrors the previous cubic's second one
            c1 = (x + x - prev_c2[0], y + y - prev_c2[1]) if prev_c2 is not None else (x, y)
            c2, end = (ox + v[0], oy + v[1]), (ox + v[2], oy + v[3])
        cubics.append(((x, y), c1, c2, end))
        prev_c2 = c2
        x, y = end
    if not cubics:
        raise ValueError(f"SVG path without curves: {d!r}")
    return np.array(cubics, dtype=np.float64)


@lru_cache(maxsize=1)
def _bezier_weights() -> np.ndarray:
    """Bernstein weights at t = i / SEGMENTS_PER_CUBIC for i = 1..K: float64 ``[K, 4]``."""
    rows = []
    for i in range(1, SEGMENTS_PER_CUBIC + 1):
        t = i / SEGMENTS_PER_CUBIC
        s = 1.0 - t
        rows.append((s * s * s, 3.0 * t * s * s, 3.0 * t * t * s, t * t * t))
    return np.array(rows, dtype=np.float64)


def flatten_stroke(cubics: np.ndarray) -> np.ndarray:
    """Polyline through a stroke's cubics ``[n, 4, 2]``: float64 ``[n * K + 1, 2]``."""
    w = _bezier_weights()[None, :, :, None]  # [1, K, 4, 1]
    c = cubics[:, None, :, :]  # [n, 1, 4, 2]
    pts = w[:, :, 0] * c[:, :, 0] + w[:, :, 1] * c[:, :, 1]
    pts = pts + w[:, :, 2] * c[:, :, 2]
    pts = pts + w[:, :, 3] * c[:, :, 3]  # [n, K, 2], left-to-right sums (no reductions)
    return np.concatenate([cubics[:1, 0], pts.reshape(-1, 2)], axis=0)


def character_strokes(code_point: int, folder: Path | None = None) -> list[np.ndarray]:
    """Flattened strokes of one character: a list of float64 ``[n_points, 2]`` in 109-units."""
    return [flatten_stroke(parse_path(d)) for d in stroke_paths(code_point, folder)]


# ----------------------------------------------------------------------------- class split
def eligible_code_points(folder: Path | None = None) -> list[int]:
    """Sorted code points in CODE_POINT_RANGE with a non-variant SVG of <= MAX_STROKES strokes."""
    folder = kanjivg_dir() if folder is None else folder
    found = []
    for path in folder.glob("*.svg"):
        stem = path.stem
        if "-" in stem or not re.fullmatch(r"[0-9a-f]{5}", stem):
            continue
        cp = int(stem, 16)
        if CODE_POINT_RANGE[0] <= cp <= CODE_POINT_RANGE[1]:
            if len(stroke_paths(cp, folder)) <= MAX_STROKES:
                found.append(cp)
    return sorted(found)


def make_splits(folder: Path | None = None) -> dict[str, list[str]]:
    """The class split from scratch: sort, Fisher-Yates with SplitMix64(SPLIT_SEED), cut."""
    cps = eligible_code_points(folder)
    if len(cps) != sum(SPLIT_COUNTS.values()):
        raise RuntimeError(f"expected {sum(SPLIT_COUNTS.values())} eligible characters in kanjivg "
                           f"{KANJIVG_VERSION}, found {len(cps)}")
    rng = SplitMix64(SPLIT_SEED)
    for i in range(len(cps) - 1, 0, -1):
        j = rng.next_u64() % (i + 1)
        cps[i], cps[j] = cps[j], cps[i]
    out, start = {}, 0
    for split in SPLITS:
        out[split] = [chr(cp) for cp in cps[start:start + SPLIT_COUNTS[split]]]
        start += SPLIT_COUNTS[split]
    return out


def splits_digest(splits: dict[str, list[str]]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the three split lists."""
    canonical = json.dumps({s: list(splits[s]) for s in SPLITS}, ensure_ascii=False,
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_splits(path: Path = SPLITS_FILE) -> str:
    """Regenerate the split file from the installed kanjivg; returns its digest."""
    kanjivg_dir()
    _check_kanjivg_version()
    splits = make_splits()
    doc = {
        "source": "KanjiVG (Ulrich Apel, CC BY-SA 3.0, https://kanjivg.tagaini.net) via PyPI "
                  f"kanjivg=={KANJIVG_VERSION}; CJK U+4E00..U+9FFF, non-variant SVGs, "
                  f"<= {MAX_STROKES} strokes; sorted by code point, Fisher-Yates shuffled with "
                  f"splitmix64 seed {SPLIT_SEED:#x}; cut 1500/240/600",
        "kanjivg_version": KANJIVG_VERSION,
        "max_strokes": MAX_STROKES,
        **splits,
    }
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return splits_digest(splits)


def read_splits(path: Path = SPLITS_FILE) -> dict[str, list[str]]:
    """The committed split lists, verified against SPLITS_SHA256 (RuntimeError on mismatch)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    splits = {s: doc.get(s, []) for s in SPLITS}
    digest = splits_digest(splits)
    if digest != SPLITS_SHA256:
        raise RuntimeError(f"class split file {path} does not match its recorded SHA-256 "
                           f"(found {digest}, expected {SPLITS_SHA256})")
    return splits


@lru_cache(maxsize=1)
def _committed_splits() -> dict[str, tuple[str, ...]]:
    return {s: tuple(v) for s, v in read_splits(SPLITS_FILE).items()}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown kanji split {split!r}; accepted: {', '.join(SPLITS)}")


def class_names(split: str) -> list[str]:
    """The characters of a split, in committed order."""
    _check_split(split)
    return list(_committed_splits()[split])


def class_sizes(split: str) -> list[int]:
    """Images per class of a split: ``[INSTANCES_PER_CLASS] * n_classes``."""
    return [INSTANCES_PER_CLASS] * len(class_names(split))


# ----------------------------------------------------------------------------- radical families
#: the radical KanjiVG marks as a character's general radical: the ``kvg:element`` of the group
#: that carries ``kvg:radical="general"`` (either attribute order)
_RADICAL = re.compile(r'<g\b[^>]*\bkvg:element="([^"]+)"[^>]*\bkvg:radical="general"'
                      r'|<g\b[^>]*\bkvg:radical="general"[^>]*\bkvg:element="([^"]+)"')


def radical_of(code_point: int, folder: Path | None = None) -> str | None:
    """The general radical KanjiVG marks for a character (None when it marks none)."""
    text = ((folder or kanjivg_dir()) / f"{code_point:05x}.svg").read_text(encoding="utf-8")
    match = _RADICAL.search(text)
    return (match.group(1) or match.group(2)) if match else None


def radicals_digest(radicals: dict[str, str | None]) -> str:
    canonical = json.dumps(radicals, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_radicals(path: Path = RADICALS_FILE) -> str:
    """Regenerate the radical file (every class's general radical) from the installed kanjivg."""
    kanjivg_dir()
    _check_kanjivg_version()
    radicals = {name: radical_of(ord(name)) for split in SPLITS for name in class_names(split)}
    doc = {"source": "KanjiVG (Ulrich Apel, CC BY-SA 3.0) via PyPI kanjivg==" + KANJIVG_VERSION
                     + ': the kvg:element of the group marked kvg:radical="general"; null where none is marked',
           "kanjivg_version": KANJIVG_VERSION, "radical": radicals}
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    return radicals_digest(radicals)


@lru_cache(maxsize=1)
def committed_radicals() -> dict[str, str | None]:
    """Every class's radical from the committed file, verified against RADICALS_SHA256."""
    radicals = json.loads(RADICALS_FILE.read_text(encoding="utf-8"))["radical"]
    digest = radicals_digest(radicals)
    if digest != RADICALS_SHA256:
        raise RuntimeError(f"radical file {RADICALS_FILE} does not match its recorded SHA-256 "
                           f"(found {digest}, expected {RADICALS_SHA256})")
    return radicals


def class_radicals(split: str) -> list[str | None]:
    """The radical family of each class of a split, in class order."""
    radicals = committed_radicals()
    return [radicals[name] for name in class_names(split)]


# ----------------------------------------------------------------------------- rendering
def _instance_params(code_point: int, n_strokes: int, n: int = INSTANCES_PER_CLASS):
    """Per-instance jitter: affine ``[n, 4]`` (a,b,c,d), shift ``[n, 2]``, half width ``[n]``,
    per-stroke (offset x, offset y, stretch x, stretch y) ``[n, n_strokes, 4]``
    (all float64, from SplitMix64 seeded by (cp, j))."""
    affine, shift, half, offsets = [], [], [], []
    for j in range(n):
        rng = SplitMix64(RENDER_SEED ^ ((code_point << 8) | j))
        affine.append([rng.uniform(-AFFINE_DIAG, AFFINE_DIAG), rng.uniform(-AFFINE_SHEAR, AFFINE_SHEAR),
                       rng.uniform(-AFFINE_SHEAR, AFFINE_SHEAR), rng.uniform(-AFFINE_DIAG, AFFINE_DIAG)])
        shift.append([rng.uniform(-SHIFT_UNITS, SHIFT_UNITS), rng.uniform(-SHIFT_UNITS, SHIFT_UNITS)])
        half.append(rng.uniform(*HALFWIDTH_PX))
        offsets.append([[rng.uniform(-STROKE_SHIFT_UNITS, STROKE_SHIFT_UNITS),
                         rng.uniform(-STROKE_SHIFT_UNITS, STROKE_SHIFT_UNITS),
                         rng.uniform(-STROKE_STRETCH, STROKE_STRETCH),
                         rng.uniform(-STROKE_STRETCH, STROKE_STRETCH)] for _ in range(n_strokes)])
    return (np.array(affine), np.array(shift), np.array(half),
            np.array(offsets, dtype=np.float64).reshape(n, n_strokes, 4))


def render_character(code_point: int, strokes: list[np.ndarray],
                     n: int = INSTANCES_PER_CLASS) -> np.ndarray:
    """``n`` jittered renders of one character from its flattened strokes: uint8 ``[n, 1, 28, 28]``."""
    size = IMAGE_SIZE
    affine, shift, half, offsets = _instance_params(code_point, len(strokes), n)
    scale = (size - 2.0 * MARGIN_PX) / GLYPH_UNITS
    centre = GLYPH_UNITS / 2.0
    grid = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    reach = float(half.max()) + 0.5  # beyond this distance a pixel gets no ink
    big = (size * 4.0) ** 2
    dist2 = np.full((n, size, size), big)  # squared distance to the nearest segment
    a, b, c, d = (affine[:, k:k + 1] for k in range(4))  # each [n, 1]
    for s, pts in enumerate(strokes):
        mid_x = (pts[:, 0].min() + pts[:, 0].max()) * 0.5  # stroke box centre
        mid_y = (pts[:, 1].min() + pts[:, 1].max()) * 0.5
        px = pts[None, :, 0] - mid_x  # [n, P]: stroke stretched about its centre, then shifted
        py = pts[None, :, 1] - mid_y
        px = px + px * offsets[:, s, 2:3] + mid_x + offsets[:, s, 0:1] - centre
        py = py + py * offsets[:, s, 3:4] + mid_y + offsets[:, s, 1:2] - centre
        qx = (px + a * px + b * py + centre + shift[:, 0:1]) * scale + MARGIN_PX
        qy = (c * px + py + d * py + centre + shift[:, 1:2]) * scale + MARGIN_PX
        c0 = max(0, int(math.floor(float(qx.min()) - reach - 0.5)))
        c1 = min(size, int(math.ceil(float(qx.max()) + reach - 0.5)) + 1)
        r0 = max(0, int(math.floor(float(qy.min()) - reach - 0.5)))
        r1 = min(size, int(math.ceil(float(qy.max()) + reach - 0.5)) + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        ax, ay = qx[:, :-1, None, None], qy[:, :-1, None, None]  # [n, G, 1, 1] segment starts
        dx, dy = qx[:, 1:, None, None] - ax, qy[:, 1:, None, None] - ay
        dd = dx * dx + dy * dy
        inv = np.where(dd > 0.0, 1.0 / np.where(dd > 0.0, dd, 1.0), 0.0)
        wx = grid[None, None, None, c0:c1] - ax  # [n, G, 1, w]
        wy = grid[None, None, r0:r1, None] - ay  # [n, G, h, 1]
        t = wx * dx + wy * dy  # [n, G, h, w]
        t *= inv
        np.clip(t, 0.0, 1.0, out=t)
        ex = wx - t * dx
        ey = wy - t * dy
        ex *= ex
        ey *= ey
        ex += ey
        np.minimum(dist2[:, r0:r1, c0:c1], ex.min(axis=1), out=dist2[:, r0:r1, c0:c1])
    ink = np.clip(half[:, None, None] + 0.5 - np.sqrt(dist2), 0.0, 1.0)
    return np.floor(ink * 255.0 + 0.5).astype(np.uint8)[:, None]


def _render_one(code_point: int) -> np.ndarray:
    return render_character(code_point, character_strokes(code_point))


def render_all(progress: Callable[[int, int], None] | None = None, workers: int = 1) -> np.ndarray:
    """Render every class (train, val, test order): uint8 ``[2340 * 20, 1, 28, 28]``.

    ``workers`` > 1 uses a process pool; the result does not depend on it.
    """
    kanjivg_dir()  # RuntimeError with the pip line when kanjivg is missing
    _check_kanjivg_version()
    names = [ch for split in SPLITS for ch in class_names(split)]
    cps = [ord(ch) for ch in names]
    out = np.empty((len(cps) * INSTANCES_PER_CLASS, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)

    def store(i: int, images: np.ndarray) -> None:
        out[i * INSTANCES_PER_CLASS:(i + 1) * INSTANCES_PER_CLASS] = images
        if progress is not None:
            progress(i + 1, len(cps))

    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for i, images in enumerate(pool.imap(_render_one, cps, chunksize=16)):
                store(i, images)
    else:
        for i, cp in enumerate(cps):
            store(i, _render_one(cp))
    return out


# ----------------------------------------------------------------------------- cache
def cache_path() -> Path:
    """Where the rendered array lives: ``cache_dir() / kanji-v{DATA_VERSION}-{IMAGE_SIZE}px.npy``."""
    return cache_dir() / f"kanji-v{DATA_VERSION}-{IMAGE_SIZE}px.npy"


def _expected_shape() -> tuple[int, int, int, int]:
    n = sum(SPLIT_COUNTS.values()) * INSTANCES_PER_CLASS
    return (n, 1, IMAGE_SIZE, IMAGE_SIZE)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _open_cached(path: Path) -> np.ndarray | None:
    """The cached array if it is complete and its bytes hash to RENDER_SHA256 (~20 ms), else None."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.uint8 or array.shape != _expected_shape() or _digest(array) != RENDER_SHA256:
        return None
    return array


def _write_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_all(progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """All classes (train, val, test), verified, read-only memory map: uint8 ``[46800, 1, 28, 28]``.

    Renders into the cache on first use, or when the cached file is missing or corrupt.
    """
    path = cache_path()
    if path.exists():
        array = _open_cached(path)
        if array is not None:
            return array
        warnings.warn(f"kanji cache file {path} is corrupt or stale; rendering it again", stacklevel=2)
    array = render_all(progress)
    digest = _digest(array)
    if digest != RENDER_SHA256:
        raise RuntimeError(
            f"rendered kanji data has SHA-256 {digest}, expected {RENDER_SHA256}: rendering is not "
            f"bit-identical on this machine (kanjivg {KANJIVG_VERSION} required, DATA_VERSION "
            f"{DATA_VERSION})")
    _write_atomic(path, array)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_split(split: str, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Images of one split: uint8 ``[n_classes * 20, 1, 28, 28]``, instance j of class c at row
    ``c * 20 + j``, classes in ``class_names(split)`` order; ink 255 on black 0.

    ``progress(done, total)`` is called per class while the cache is being rendered.
    """
    _check_split(split)
    start = 0
    for name in SPLITS[:SPLITS.index(split)]:
        start += len(class_names(name)) * INSTANCES_PER_CLASS
    stop = start + len(class_names(split)) * INSTANCES_PER_CLASS
    return torch.from_numpy(np.array(load_all(progress)[start:stop]))


def _main(argv: list[str]) -> int:
    if "--write-splits" in argv:
        print(f"wrote {SPLITS_FILE}\nSPLITS_SHA256 = {write_splits()!r}")
        _committed_splits.cache_clear()
        return 0
    if "--write-radicals" in argv:
        print(f"wrote {RADICALS_FILE}\nRADICALS_SHA256 = {write_radicals()!r}")
        return 0
    splits = read_splits()
    print(f"SPLITS_SHA256 = {splits_digest(splits)!r} "
          f"({', '.join(f'{s} {len(splits[s])}' for s in SPLITS)} classes)")
    if "--render" in argv:
        start = time.perf_counter()
        array = render_all(lambda done, total: print(f"\r{done}/{total}", end="", file=sys.stderr))
        print(f"\nrendered {array.shape} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        print(f"RENDER_SHA256 = {_digest(array)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
