"""The kanji data set: committed class split, bit-identical rendering, and the render cache.

One full render (46,800 images, about 10 s) happens once per module into a temporary cache.
"""
from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from metabench_plugins.datasets import kanji_data as K

N_CLASSES = {"train": 1500, "val": 240, "test": 600}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Render everything once into a fresh cache; yields (full array copy, progress calls)."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METABENCH_CACHE", str(tmp_path_factory.mktemp("kanji-cache")))
        full = np.array(K.load_all(progress=lambda done, total: calls.append((done, total))))
        yield full, calls


@pytest.fixture
def no_render(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rendered again although the cache is valid")

    monkeypatch.setattr(K, "render_all", fail)


# ----------------------------------------------------------------------------- class split
def test_split_file_counts_disjoint_and_digest():
    doc = json.loads(K.SPLITS_FILE.read_text(encoding="utf-8"))
    assert doc["kanjivg_version"] == K.KANJIVG_VERSION and doc["max_strokes"] == K.MAX_STROKES
    assert {s: len(doc[s]) for s in K.SPLITS} == N_CLASSES
    every = [c for s in K.SPLITS for c in doc[s]]
    assert len(set(every)) == len(every) == 2340
    assert K.splits_digest(doc) == K.SPLITS_SHA256
    assert all(K.class_names(s) == doc[s] for s in K.SPLITS)


def test_split_classes_are_eligible_kanjivg_characters():
    folder = K.kanjivg_dir()
    for split in K.SPLITS:
        for ch in K.class_names(split):
            cp = ord(ch)
            assert 0x4E00 <= cp <= 0x9FFF
            assert 1 <= len(K.stroke_paths(cp, folder)) <= K.MAX_STROKES, ch


def test_split_procedure_reproduces_committed_file():
    assert K.make_splits() == {s: K.class_names(s) for s in K.SPLITS}


def test_class_sizes_and_unknown_split():
    for split, n in N_CLASSES.items():
        assert K.class_sizes(split) == [K.INSTANCES_PER_CLASS] * n
    with pytest.raises(ValueError, match="train, val, test"):
        K.class_names("validation")
    with pytest.raises(ValueError, match="accepted"):
        K.load_split("dev")


def test_tampered_split_file_is_rejected(tmp_path):
    doc = json.loads(K.SPLITS_FILE.read_text(encoding="utf-8"))
    doc["val"][0], doc["test"][0] = doc["test"][0], doc["val"][0]
    path = tmp_path / "kanji_splits.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(RuntimeError, match="kanji_splits.json"):
        K.read_splits(path)


def test_missing_kanjivg_names_the_pip_line(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    K.kanjivg_dir.cache_clear()
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    try:
        with pytest.raises(RuntimeError, match=r"pip install kanjivg==20260714"):
            K.kanjivg_dir()
    finally:
        monkeypatch.undo()
        K.kanjivg_dir.cache_clear()


# ----------------------------------------------------------------------------- building blocks
def test_splitmix64_reference_values():
    rng = K.SplitMix64(0)
    assert [rng.next_u64() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert all(-1.0 <= K.SplitMix64(s).uniform(-1.0, 1.0) < 1.0 for s in range(100))


def test_parse_path_relative_absolute_and_smooth():
    cubics = K.parse_path("M10,20c1,2,3,4,5,6s7,8,9,10C1-1 2,2,3,3")
    assert cubics.shape == (3, 4, 2)
    np.testing.assert_array_equal(cubics[0], [[10, 20], [11, 22], [13, 24], [15, 26]])
    # s: first control point mirrors (13, 24) about (15, 26); the rest are relative to (15, 26)
    np.testing.assert_array_equal(cubics[1], [[15, 26], [17, 28], [22, 34], [24, 36]])
    np.testing.assert_array_equal(cubics[2], [[24, 36], [1, -1], [2, 2], [3, 3]])
    with pytest.raises(ValueError):
        K.parse_path("M1,1L5,5")


def test_render_character_is_deterministic_and_jittered():
    cp = ord(K.class_names("train")[0])
    a = K.render_character(cp, K.character_strokes(cp))
    b = K.render_character(cp, K.character_strokes(cp))
    assert a.shape == (K.INSTANCES_PER_CLASS, 1, K.IMAGE_SIZE, K.IMAGE_SIZE) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert len({im.tobytes() for im in a}) == K.INSTANCES_PER_CLASS


def test_draw_by_hand_moves_ends_and_bows_across_the_chord():
    px = np.array([[0.0, 5.0, 10.0]])  # one instance, a horizontal stroke of three points
    py = np.zeros((1, 3))
    still = K._draw_by_hand(px, py, np.zeros((1, 5)))
    np.testing.assert_array_equal(still[0], px)
    np.testing.assert_array_equal(still[1], py)
    qx, qy = K._draw_by_hand(px, py, np.array([[1.0, 2.0, -3.0, 4.0, 0.0]]))
    np.testing.assert_allclose([qx[0, 0], qy[0, 0], qx[0, -1], qy[0, -1]], [1.0, 2.0, 7.0, 4.0])  # ends moved
    bx, by = K._draw_by_hand(px, py, np.array([[0.0, 0.0, 0.0, 0.0, 2.0]]))
    np.testing.assert_allclose(bx[0], px[0])  # bowed across the chord only, by the bend at the middle
    np.testing.assert_allclose(by[0], [0.0, 2.0, 0.0])


def test_hand_style_keeps_kanji_draws_and_varies_each_stroke():
    cp = ord(K.class_names("train")[0])
    strokes = K.character_strokes(cp)
    *_, hand = K._instance_params(cp, len(strokes), style=K.KANJI)
    assert hand is None  # the kanji style draws exactly what its version 2 drew
    affine, shift, half, offsets, hand = K._instance_params(cp, len(strokes), style=K.KANJI_HAND)
    assert hand.shape == (K.INSTANCES_PER_CLASS, len(strokes), 5)
    assert np.abs(hand[..., :4]).max() <= K.KANJI_HAND.endpoint_units
    assert np.abs(hand[..., 4]).max() <= K.KANJI_HAND.bend_units
    assert np.abs(affine).max() <= max(K.KANJI_HAND.affine_diag, K.KANJI_HAND.affine_shear)
    a = K.render_character(cp, strokes, style=K.KANJI_HAND)
    np.testing.assert_array_equal(a, K.render_character(cp, strokes, style=K.KANJI_HAND))
    assert len({im.tobytes() for im in a}) == K.INSTANCES_PER_CLASS
    assert not np.array_equal(a, K.render_character(cp, strokes))
    assert a.max() == 255 and (a == 0).mean() > 0.5  # ink on black


def test_each_style_has_its_own_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path))
    assert K.cache_path(K.KANJI).name == f"kanji-v{K.KANJI.version}-28px.npy"
    assert K.cache_path(K.KANJI_HAND).name == f"kanji_hand-v{K.KANJI_HAND.version}-28px.npy"
    assert set(K.STYLES) == {"kanji", "kanji_hand"}


def test_kanji_hand_render_digest_is_the_recorded_one():
    """The whole kanji_hand array (46,800 images) hashes to the committed SHA-256: load_all renders it
    into the session's cache when missing (about 30 s) and refuses bytes that differ."""
    full = K.load_all(style=K.KANJI_HAND)
    assert full.shape == (2340 * 20, 1, 28, 28)
    assert K._digest(full) == K.KANJI_HAND.sha256


# ----------------------------------------------------------------------------- full render + cache
def test_render_digest_is_the_recorded_one(rendered):
    full, calls = rendered
    assert full.shape == (2340 * 20, 1, 28, 28) and full.dtype == np.uint8
    assert K._digest(full) == K.RENDER_SHA256  # cross-machine bit-identity check
    assert calls[-1] == (2340, 2340) and len(calls) == 2340


def test_images_look_like_ink_on_black(rendered):
    full, _ = rendered
    per_image_max = full.reshape(len(full), -1).max(axis=1)
    assert per_image_max.min() >= 200  # every image has solid ink
    assert np.median(full) == 0  # mostly black background
    assert full.max() == 255


def test_instances_of_every_class_differ(rendered):
    full, _ = rendered
    by_class = full.reshape(2340, 20, -1)
    for c in range(2340):
        assert len({im.tobytes() for im in by_class[c]}) == 20, c


def test_load_split_slices_in_class_order(rendered, no_render):
    full, _ = rendered
    start = 0
    for split in K.SPLITS:
        x = K.load_split(split)
        n = N_CLASSES[split] * 20
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8
        assert tuple(x.shape) == (n, 1, 28, 28)
        np.testing.assert_array_equal(x.numpy(), full[start:start + n])
        start += n
    x[0] = 0  # a private, writable copy: the cache is untouched
    assert K._digest(K.load_all()) == K.RENDER_SHA256


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_cache_is_detected_and_rerendered(rendered, monkeypatch, damage):
    full, _ = rendered
    path = K.cache_path()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-1000] ^= 0x01
    elif damage == "garbage":
        data = bytearray(b"not a numpy file" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))

    renders = []

    def fake_render(progress=None, workers=1, style=K.KANJI):
        renders.append(1)
        return full.copy()

    monkeypatch.setattr(K, "render_all", fake_render)
    with pytest.warns(UserWarning, match="corrupt"):
        x = K.load_split("val")
    assert renders == [1]
    np.testing.assert_array_equal(x.numpy(), full[1500 * 20:1740 * 20])
    assert K._open_cached(path) is not None  # repaired on disk
    K.load_split("test")
    assert renders == [1]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_render_mismatch_is_an_error_and_not_cached(rendered, tmp_path, monkeypatch):
    full, _ = rendered
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path))
    bad = full.copy()
    bad[0, 0, 0, 0] ^= 1
    monkeypatch.setattr(K, "render_all", lambda progress=None, workers=1, style=K.KANJI: bad)
    with pytest.raises(RuntimeError, match="bit-identical"):
        K.load_split("train")
    assert list(tmp_path.iterdir()) == []


def test_cache_file_name_and_location(rendered, tmp_path, monkeypatch):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path))
    assert K.cache_path() == tmp_path / f"kanji-v{K.DATA_VERSION}-{K.IMAGE_SIZE}px.npy"
