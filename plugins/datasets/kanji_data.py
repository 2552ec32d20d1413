"""The built-in few-shot data set ``kanji``: Omniglot-like classes rendered from KanjiVG strokes.

Source: the KanjiVG stroke data (Ulrich Apel, CC BY-SA 3.0, https://kanjivg.tagaini.net), as
shipped by the PyPI wheel ``kanjivg==20260714`` (a top-level data folder ``kanji/`` of SVG files).

Classes: CJK Unified Ideographs U+4E00..U+9FFF with a non-variant SVG (no ``-`` in the file
name) and at most ``MAX_STROKES`` = 10 strokes: 2,340 characters. They were sorted by code point,
shuffled by a Fisher-Yates shuffle driven by splitmix64 seeded with ``SPLIT_SEED``, and cut into

    train 1,500 classes | val 240 classes | test 600 classes

committed in ``kanji_splits.json`` (verified against ``SPLITS_SHA256`` when read).

Instances: ``INSTANCES_PER_CLASS`` = 20 renders per class, like Omniglot's 20 drawers, in one
of two :class:`RenderStyle` s, each its own data set with its own cache file and SHA-256:

- ``kanji`` (:data:`KANJI`): instance j of character cp gets its own splitmix64 stream seeded from
  (style, cp, j): a random affine map ``[[1+a, b], [c, 1+d]]`` about the glyph centre plus a
  translation, a random offset and stretch per stroke, and a random pen width.
- ``kanji_hand`` (:data:`KANJI_HAND`): the same with larger jitter, and every stroke's two ends
  moved independently and the stroke bowed sideways, drawn anew per instance, so the 20
  instances differ as different hands do rather than as one glyph jittered.

Each style renders every instance from its strokes the same way. Each cubic Bézier is flattened into ``SEGMENTS_PER_CUBIC``
line segments and each pixel's ink is ``clip(halfwidth + 0.5 - distance to nearest segment, 0, 1)``.
Only numpy float64 + - * / sqrt, min/max and clip are used (no libm, no BLAS, no sums whose order
could vary), so the bytes are identical on every machine; each style's ``sha256`` checks that.

Images: uint8 ``[n_classes * 20, 1, 28, 28]``, ink 255 on black 0, classes contiguous.
All 2,340 classes (train, val, test order) are rendered once per style into the cache folder as
``{dataset}-v{version}-{IMAGE_SIZE}px.npy`` (46,800 images, about 37 MB).

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
import re
import sys
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from metabench.cache import cache_dir
from metabench.files import write_atomic
from metabench.rng import SplitMix64  # the same generator the episodes use

IMAGE_SIZE = 28
INSTANCES_PER_CLASS = 20
MAX_STROKES = 10
SPLITS = ("train", "val", "test")
SPLIT_COUNTS = {"train": 1500, "val": 240, "test": 600}

KANJIVG_VERSION = "20260714"
CODE_POINT_RANGE = (0x4E00, 0x9FFF)  # CJK Unified Ideographs, inclusive
SPLIT_SEED = 0x6B616E6A69  # "kanji"

SPLITS_FILE = Path(__file__).with_name("kanji_splits.json")
RADICALS_FILE = Path(__file__).with_name("kanji_radicals.json")
SPLITS_SHA256 = "47572a306131e6a326bcd2c707d1db524502390a02304724cd8c520093719120"
RADICALS_SHA256 = "f202a3775828e023b629bb72dcbecc6d04fbe78297dab25f76037e0c60feca5b"

# Rendering parameters (any change to a style changes its bytes: bump its version).
GLYPH_UNITS = 109.0  # KanjiVG viewBox is 0..109 in both axes
MARGIN_PX = 1.0  # canvas margin around the 109-unit box, in pixels
SEGMENTS_PER_CUBIC = 6


@dataclass(frozen=True)
class RenderStyle:
    """How the 20 instances of a character vary; one style, one data set, one cache file.

    Per instance: an affine map ``[[1+a, b], [c, 1+d]]`` about the glyph centre (``|a|, |d| <=
    affine_diag``, ``|b|, |c| <= affine_shear``), a translation (``<= shift_units`` per axis) and a pen
    half width in ``halfwidth_px``. Per stroke: an offset (``<= stroke_shift_units``) and a stretch
    about its box centre (``1 +- stroke_stretch`` per axis). ``endpoint_units`` > 0 moves each
    stroke's start and end independently (blended linearly along the stroke: a stroke drawn
    longer, shorter or at another angle) and ``bend_units`` > 0 bows it sideways by up to that
    much at its middle (a parabola ``4 t (1 - t)``), as different hands draw the same stroke.
    """

    dataset: str
    version: int
    seed: int
    sha256: str  # of the rendered uint8 array, all splits
    affine_diag: float
    affine_shear: float
    shift_units: float
    stroke_shift_units: float
    stroke_stretch: float
    halfwidth_px: tuple[float, float]
    endpoint_units: float = 0.0
    bend_units: float = 0.0

    @property
    def hand_drawn(self) -> bool:
        return self.endpoint_units > 0.0 or self.bend_units > 0.0


#: ``kanji``: jitter only (v1 was milder and saturated)
KANJI = RenderStyle(
    dataset="kanji", version=2, seed=0x4D42_4B41_4E4A_4931,  # "MBKANJI1"
    sha256="918a6302db817c95da9f3dd7b92996f1520045b4835b4522d3daf36c23d037cf",
    affine_diag=0.20, affine_shear=0.18, shift_units=9.0, stroke_shift_units=6.0, stroke_stretch=0.25,
    halfwidth_px=(0.50, 1.25))

#: ``kanji_hand``: the same characters with larger jitter and every stroke's ends and curvature
#: drawn anew per instance, closer to how Omniglot's 20 drawers differ
KANJI_HAND = RenderStyle(
    dataset="kanji_hand", version=1, seed=0x4D42_4B48_414E_4431,  # "MBKHAND1"
    sha256="34506ec75c630058bfe902c3e991a10fd5fd64ba05eccee584cd60923ce9b521",
    affine_diag=0.25, affine_shear=0.25, shift_units=9.0, stroke_shift_units=8.0, stroke_stretch=0.35,
    halfwidth_px=(0.50, 1.25), endpoint_units=9.0, bend_units=14.0)

STYLES = {style.dataset: style for style in (KANJI, KANJI_HAND)}

# The kanji style's names, kept for callers of the first data set
DATA_VERSION = KANJI.version
RENDER_SEED = KANJI.seed
RENDER_SHA256 = KANJI.sha256

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


def _canonical_sha256(doc) -> str:
    """SHA-256 of the canonical JSON of ``doc``: sorted keys, no spaces, UTF-8."""
    canonical = json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def splits_digest(splits: dict[str, list[str]]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the three split lists."""
    return _canonical_sha256({s: list(splits[s]) for s in SPLITS})


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
    """SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the class -> radical map."""
    return _canonical_sha256(radicals)


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
def _instance_params(code_point: int, n_strokes: int, n: int = INSTANCES_PER_CLASS, style: RenderStyle = KANJI):
    """Per-instance variation: affine ``[n, 4]`` (a,b,c,d), shift ``[n, 2]``, half width ``[n]``,
    per-stroke (offset x, offset y, stretch x, stretch y) ``[n, n_strokes, 4]`` and, for a
    hand-drawn style, per-stroke (start x, start y, end x, end y, bend) ``[n, n_strokes, 5]``
    (all float64, from SplitMix64 seeded by (style, cp, j); the draws of the ``kanji`` style are
    exactly those of its version 2)."""
    affine, shift, half, offsets, hand = [], [], [], [], []
    diag, shear, move = style.affine_diag, style.affine_shear, style.shift_units
    for j in range(n):
        rng = SplitMix64(style.seed ^ ((code_point << 8) | j))
        affine.append([rng.uniform(-diag, diag), rng.uniform(-shear, shear),
                       rng.uniform(-shear, shear), rng.uniform(-diag, diag)])
        shift.append([rng.uniform(-move, move), rng.uniform(-move, move)])
        half.append(rng.uniform(*style.halfwidth_px))
        offsets.append([[rng.uniform(-style.stroke_shift_units, style.stroke_shift_units),
                         rng.uniform(-style.stroke_shift_units, style.stroke_shift_units),
                         rng.uniform(-style.stroke_stretch, style.stroke_stretch),
                         rng.uniform(-style.stroke_stretch, style.stroke_stretch)] for _ in range(n_strokes)])
        if style.hand_drawn:
            ends, bend = style.endpoint_units, style.bend_units
            hand.append([[rng.uniform(-ends, ends), rng.uniform(-ends, ends), rng.uniform(-ends, ends),
                          rng.uniform(-ends, ends), rng.uniform(-bend, bend)] for _ in range(n_strokes)])
    hand_array = np.array(hand, dtype=np.float64).reshape(n, n_strokes, 5) if style.hand_drawn else None
    return (np.array(affine), np.array(shift), np.array(half),
            np.array(offsets, dtype=np.float64).reshape(n, n_strokes, 4), hand_array)


def _draw_by_hand(px: np.ndarray, py: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One stroke's points ``[n, P]`` (109-units) with their ends moved and the stroke bowed:
    ``hand`` ``[n, 5]`` = start offset x, y, end offset x, y, bend. Point i of P sits at
    ``t = i / (P - 1)``; it moves by ``(1 - t) * start + t * end`` and then by ``4 t (1 - t) * bend``
    across the moved stroke's chord (no move across a zero-length chord)."""
    t = np.arange(px.shape[1], dtype=np.float64) / float(max(px.shape[1] - 1, 1))  # [P]
    s = 1.0 - t
    px = px + s * hand[:, 0:1] + t * hand[:, 2:3]
    py = py + s * hand[:, 1:2] + t * hand[:, 3:4]
    cx = px[:, -1:] - px[:, :1]  # [n, 1] chord
    cy = py[:, -1:] - py[:, :1]
    length = np.sqrt(cx * cx + cy * cy)
    inv = np.where(length > 0.0, 1.0 / np.where(length > 0.0, length, 1.0), 0.0)
    bow = (4.0 * t * s) * hand[:, 4:5]  # [n, P]
    return px - bow * (cy * inv), py + bow * (cx * inv)


def render_character(code_point: int, strokes: list[np.ndarray],
                     n: int = INSTANCES_PER_CLASS, style: RenderStyle = KANJI) -> np.ndarray:
    """``n`` renders of one character from its flattened strokes in ``style``: uint8 ``[n, 1, 28, 28]``."""
    size = IMAGE_SIZE
    affine, shift, half, offsets, hand = _instance_params(code_point, len(strokes), n, style)
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
        px = px + px * offsets[:, s, 2:3] + mid_x + offsets[:, s, 0:1]
        py = py + py * offsets[:, s, 3:4] + mid_y + offsets[:, s, 1:2]
        if hand is not None:
            px, py = _draw_by_hand(px, py, hand[:, s])
        px = px - centre
        py = py - centre
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


def _render_one(job: tuple[int, str]) -> np.ndarray:
    code_point, dataset = job
    return render_character(code_point, character_strokes(code_point), style=STYLES[dataset])


def render_all(progress: Callable[[int, int], None] | None = None, workers: int = 1,
               style: RenderStyle = KANJI) -> np.ndarray:
    """Render every class (train, val, test order) in ``style``: uint8 ``[2340 * 20, 1, 28, 28]``.

    ``workers`` > 1 uses a process pool; the result does not depend on it.
    """
    kanjivg_dir()  # RuntimeError with the pip line when kanjivg is missing
    _check_kanjivg_version()
    names = [ch for split in SPLITS for ch in class_names(split)]
    jobs = [(ord(ch), style.dataset) for ch in names]
    out = np.empty((len(jobs) * INSTANCES_PER_CLASS, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)

    def store(i: int, images: np.ndarray) -> None:
        out[i * INSTANCES_PER_CLASS:(i + 1) * INSTANCES_PER_CLASS] = images
        if progress is not None:
            progress(i + 1, len(jobs))

    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for i, images in enumerate(pool.imap(_render_one, jobs, chunksize=16)):
                store(i, images)
    else:
        for i, job in enumerate(jobs):
            store(i, _render_one(job))
    return out


# ----------------------------------------------------------------------------- cache
def cache_path(style: RenderStyle = KANJI) -> Path:
    """Where a style's rendered array lives: ``cache_dir() / {dataset}-v{version}-{IMAGE_SIZE}px.npy``."""
    return cache_dir() / f"{style.dataset}-v{style.version}-{IMAGE_SIZE}px.npy"


def _expected_shape() -> tuple[int, int, int, int]:
    n = sum(SPLIT_COUNTS.values()) * INSTANCES_PER_CLASS
    return (n, 1, IMAGE_SIZE, IMAGE_SIZE)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _open_cached(path: Path, style: RenderStyle = KANJI) -> np.ndarray | None:
    """The cached array if it is complete and its bytes hash to the style's SHA-256 (~20 ms), else None."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.uint8 or array.shape != _expected_shape() or _digest(array) != style.sha256:
        return None
    return array


def load_all(progress: Callable[[int, int], None] | None = None, style: RenderStyle = KANJI) -> np.ndarray:
    """All classes (train, val, test) in ``style``, verified, read-only memory map: uint8
    ``[46800, 1, 28, 28]``.

    Renders into the cache on first use, or when the cached file is missing or corrupt (two
    processes rendering at once each write a temporary file and rename it: the same bytes).
    """
    path = cache_path(style)
    if path.exists():
        array = _open_cached(path, style)
        if array is not None:
            return array
        warnings.warn(f"{style.dataset} cache file {path} is corrupt or stale; rendering it again", stacklevel=2)
    array = render_all(progress, style=style)
    digest = _digest(array)
    if digest != style.sha256:
        raise RuntimeError(
            f"rendered {style.dataset} data has SHA-256 {digest}, expected {style.sha256}: rendering is not "
            f"bit-identical on this machine (kanjivg {KANJIVG_VERSION} required, {style.dataset} version "
            f"{style.version})")
    # temp file, fsync, rename: a full disk or read-only cache folder is one line
    write_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False))
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_split(split: str, progress: Callable[[int, int], None] | None = None,
               style: RenderStyle = KANJI) -> torch.Tensor:
    """Images of one split: uint8 ``[n_classes * 20, 1, 28, 28]``, instance j of class c at row
    ``c * 20 + j``, classes in ``class_names(split)`` order; ink 255 on black 0.

    ``progress(done, total)`` is called per class while the cache is being rendered.
    """
    _check_split(split)
    start = 0
    for name in SPLITS[:SPLITS.index(split)]:
        start += len(class_names(name)) * INSTANCES_PER_CLASS
    stop = start + len(class_names(split)) * INSTANCES_PER_CLASS
    return torch.from_numpy(np.array(load_all(progress, style)[start:stop]))


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
        for style in STYLES.values():
            start = time.perf_counter()
            array = render_all(lambda done, total: print(f"\r{done}/{total}", end="", file=sys.stderr), style=style)
            print(f"\nrendered {style.dataset} {array.shape} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            print(f"{style.dataset} v{style.version} sha256 = {_digest(array)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
