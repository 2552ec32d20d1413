"""The folder data sets (omniglot, miniimagenet, tieredimagenet, cub): committed splits, every accepted layout,
the cache, Omniglot's rotation classes, and one-line errors.

Each test writes a small copy of a data set into tmp_path in the layout under test: the class names
come from the committed split file (a few classes per split, given to the source as ``splits=``),
with 20 tiny images per class (the most an episode of these protocols needs).
"""
from __future__ import annotations

import hashlib
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import metabench
import metabench.data
from metabench import MetabenchError
from metabench.data import DataRoots, decode_image, read_split_file
from metabench.episodes import TrainSampler, episodes_sha256, eval_draws
from metabench.grouped import GroupedEpisodes
from metabench.rng import SplitMix64
from metabench_plugins.datasets import cub, miniimagenet, omniglot, tieredimagenet
from metabench_plugins.datasets.cub import CUBSource
from metabench_plugins.datasets.miniimagenet import SPLITS_DIR, MiniImageNetSource
from metabench_plugins.datasets.omniglot import OmniglotSource
from metabench_plugins.datasets.tieredimagenet import TieredImageNetSource

from conftest import host_with

PER_CLASS = 20
SPLITS = ("train", "val", "test")
COUNTS = {
    OmniglotSource: {"train": 1100, "val": 100, "test": 423},
    MiniImageNetSource: {"train": 64, "val": 16, "test": 20},
    TieredImageNetSource: {"train": 351, "val": 97, "test": 160},
    CUBSource: {"train": 100, "val": 50, "test": 50},
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METABENCH_DATA", raising=False)


def committed(cls) -> dict:
    return read_split_file(cls.split_file, cls.split_sha256)


def few(cls, n: int = 5) -> dict[str, list[str]]:
    """The first ``n`` classes of each committed split (spread out a little for the long lists)."""
    doc = committed(cls)
    return {s: doc[s][:: max(1, len(doc[s]) // n)][:n] for s in SPLITS}


def seed(*parts) -> int:
    """A stable 32-bit seed from any parts (hash() of strings changes between processes)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def pixels(seed: int, size: int = 8, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_image(path, seed: int, channels: int = 3, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(seed, channels=channels)).save(path, format=fmt)


def png_bytes(seed: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels(seed)).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- fake data set writers
def write_omniglot(root, splits, torchvision: bool = False):
    """Lake's layout (or torchvision's omniglot-py/): <folder>/<alphabet>/characterNN/NNNN_KK.png."""
    doc = committed(OmniglotSource)
    home = {a: f for f in ("images_background", "images_evaluation") for a in doc[f]}
    base = root / "omniglot-py" if torchvision else root
    for folder in ("images_background", "images_evaluation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    n = 0
    for split in SPLITS:
        for name in splits[split]:
            alphabet, character = name.split("/")
            n += 1
            for k in range(1, PER_CLASS + 1):
                write_image(base / home[alphabet] / alphabet / character / f"{n:04d}_{k:02d}.png", n * 100 + k, 1)
    return root


def write_mini_csv(root, splits):
    """Ravi & Larochelle: images/<wnid><8 digits>.jpg and <split>.csv rows filename,label."""
    for split in SPLITS:
        rows = ["filename,label"]
        for c, wnid in enumerate(splits[split]):
            for k in range(PER_CLASS):
                name = f"{wnid}{k + 1:08d}.jpg"
                write_image(root / "images" / name, seed(split, c, k))
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def write_class_folders(root, splits, suffix=".jpg"):
    """<split>/<class>/*.jpg (mini-ImageNet and tieredImageNet folders)."""
    for split in SPLITS:
        for c, wnid in enumerate(splits[split]):
            for k in range(PER_CLASS):
                write_image(root / split / wnid / f"{wnid}_{k:04d}{suffix}", seed(split, c, k, suffix))
    return root


def write_tiered_pickles(root, splits, words: bool = True):
    """Ren et al.: <split>_images_png.pkl (PNG arrays) + <split>_labels.pkl; classes named by words
    (mapped through synsets.txt / class_names.txt) and numbered in another order than the split file."""
    root.mkdir(parents=True, exist_ok=True)
    every = [w for s in SPLITS for w in splits[s]]
    (root / "synsets.txt").write_text("".join(f"{w}\n" for w in ["n99999999"] + every))
    (root / "class_names.txt").write_text("".join(f"bird number {i}, a thing\n" for i in range(len(every) + 1)))
    name_of = {w: f"bird number {i + 1}, a thing" for i, w in enumerate(every)}
    for split in SPLITS:
        classes = list(reversed(splits[split]))  # pickle class order differs from the split file's
        images, labels = [], []
        for k in range(PER_CLASS):  # images interleaved across classes, as in a shuffled pickle
            for c, wnid in enumerate(classes):
                images.append(png_bytes(seed(split, wnid, k)))
                labels.append(c)
        with open(root / f"{split}_images_png.pkl", "wb") as fh:
            pickle.dump(images, fh, protocol=2)
        data = {"label_specific": np.array(labels, dtype=np.int32),
                "label_general": np.zeros(len(labels), dtype=np.int32),
                "label_specific_str": [name_of[w] if words else w for w in classes],
                "label_general_str": ["everything"]}
        with open(root / f"{split}_labels.pkl", "wb") as fh:
            pickle.dump(data, fh, protocol=2)
    return root


def write_cub(root, splits, with_classes_txt: bool = True):
    """CUB_200_2011/: images/<class>/*.jpg, images.txt, image_class_labels.txt, classes.txt."""
    images, labels, names = [], [], []
    image_id = 0
    for split in SPLITS:
        for name in splits[split]:
            class_id = int(name.split(".")[0])
            names.append(f"{class_id} {name}")
            for k in range(PER_CLASS):
                image_id += 1
                relative = f"{name}/{name.split('.', 1)[1]}_{k:04d}_{image_id}.jpg"
                write_image(root / "images" / relative, image_id)
                images.append(f"{image_id} {relative}")
                labels.append(f"{image_id} {class_id}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    if with_classes_txt:
        (root / "classes.txt").write_text("\n".join(sorted(names, key=lambda l: int(l.split()[0]))) + "\n")
    return root


LAYOUTS = {  # name: (source class, writer, extra writer options)
    "omniglot-lake": (OmniglotSource, write_omniglot, {}),
    "omniglot-torchvision": (OmniglotSource, write_omniglot, {"torchvision": True}),
    "mini-csv": (MiniImageNetSource, write_mini_csv, {}),
    "mini-folders": (MiniImageNetSource, write_class_folders, {}),
    "tiered-folders": (TieredImageNetSource, write_class_folders, {"suffix": ".png"}),
    "tiered-pickles": (TieredImageNetSource, write_tiered_pickles, {}),
    "tiered-pickles-wnids": (TieredImageNetSource, write_tiered_pickles, {"words": False}),
    "cub": (CUBSource, write_cub, {}),
    "cub-no-classes-txt": (CUBSource, write_cub, {"with_classes_txt": False}),
}


def make(layout, tmp_path, n: int = 5):
    """(source reading a freshly written fake data set, its class lists, its folder)."""
    cls, writer, options = LAYOUTS[layout]
    splits = few(cls, 2 if cls is OmniglotSource else n)  # 2 characters = 8 rotation classes
    folder = writer(tmp_path / "data" / layout, splits, **options)
    source = cls(splits=splits)
    source.set_roots(DataRoots(per_dataset={cls.dataset: folder}))
    return source, splits, folder


def new_source(source, splits, folder):
    other = type(source)(splits=splits)
    other.set_roots(DataRoots(per_dataset={source.dataset: folder}))
    return other


# ----------------------------------------------------------------------------- committed split files
@pytest.mark.parametrize("cls", list(COUNTS), ids=lambda c: c.dataset)
def test_split_file_counts_digest_and_no_overlap(cls):
    raw = cls.split_file.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == cls.split_sha256
    doc = committed(cls)
    assert {s: len(doc[s]) for s in SPLITS} == COUNTS[cls]
    every = [c for s in SPLITS for c in doc[s]]
    assert len(set(every)) == len(every)
    assert doc["source"]
    assert cls.split_file.name in (SPLITS_DIR / "README.md").read_text()


def test_split_file_edit_is_refused(tmp_path):
    copy = tmp_path / "cub.json"
    copy.write_bytes(CUBSource.split_file.read_bytes().replace(b"001.", b"000."))
    with pytest.raises(RuntimeError, match="SHA-256"):
        read_split_file(copy, CUBSource.split_sha256)


def test_omniglot_split_is_vinyals_test_plus_a_stated_cut():
    doc = committed(OmniglotSource)
    assert len(doc["images_background"]) == 30 and len(doc["images_evaluation"]) == 20
    alphabets = {c.split("/")[0] for s in SPLITS for c in doc[s]}
    assert alphabets == set(doc["images_background"]) | set(doc["images_evaluation"])
    gurmukhi = [c for c in doc["test"] if c.startswith("Gurmukhi/")]
    assert gurmukhi == [f"Gurmukhi/character{i}" for i in range(42, 46)]
    assert {c.split("/")[0] for c in doc["test"]} <= set(doc["images_evaluation"])
    assert doc["val"][:22] == [f"Hebrew/character{i:02d}" for i in range(1, 23)]
    assert {c.split("/")[0] for c in doc["val"]} == {"Hebrew", "Mkhedruli_(Georgian)", "Armenian"}


def test_cub_split_follows_the_id_rule():
    doc = committed(CUBSource)
    ordered = sorted(c for s in SPLITS for c in doc[s])
    assert [int(c[:3]) for c in ordered] == list(range(1, 201))
    assert doc["train"] == ordered[0::2] and doc["val"] == ordered[1::4] and doc["test"] == ordered[3::4]


@pytest.mark.parametrize("cls", [MiniImageNetSource, TieredImageNetSource], ids=lambda c: c.dataset)
def test_imagenet_splits_are_wordnet_ids(cls):
    doc = committed(cls)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for s in SPLITS for w in doc[s])


# ----------------------------------------------------------------------------- loading each layout
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_lists_decodes_and_draws(layout, tmp_path):
    source, splits, folder = make(layout, tmp_path)
    rotations = 4 if isinstance(source, OmniglotSource) else 1
    for split in SPLITS:
        listing = source.listing(split)
        assert listing.classes == tuple(splits[split])
        assert listing.sizes() == [PER_CLASS] * len(splits[split])
        assert source.class_sizes(split) == [PER_CLASS] * len(splits[split]) * rotations
    protocol = {"omniglot": omniglot, "miniimagenet": miniimagenet, "tieredimagenet": tieredimagenet,
                "cub": cub}[source.dataset].protocols()[1]  # 5-way 5-shot, 15 queries
    source.prepare("test")
    draw = eval_draws(protocol, source, "test", 1)[0]
    episode = source.materialize(draw, "test")
    size, channels = protocol.image_size, protocol.channels
    assert episode.support_x.shape == (25, channels, size, size) and episode.query_x.shape == (75, channels, size, size)
    assert episode.support_x.dtype == torch.float32 and 0 <= episode.support_x.min() <= episode.support_x.max() <= 1
    assert episode.support_y.tolist() == [c for c in range(5) for _ in range(5)]
    images, labels = source.pooled("train")
    assert images.shape[0] == labels.shape[0] == PER_CLASS * len(splits["train"]) * rotations


@pytest.mark.parametrize("layout", ["mini-csv", "mini-folders", "tiered-folders", "cub"])
def test_cached_rows_are_the_decoded_files_in_split_order(layout, tmp_path):
    source, splits, _ = make(layout, tmp_path, n=3)
    listing = source.listing("val")
    images = source.images("val")
    for c in range(len(listing.classes)):
        for k in (0, PER_CLASS - 1):
            expected = decode_image(listing.files[c][k], 84, 3)
            assert torch.equal(images[c * PER_CLASS + k], torch.from_numpy(expected))


def test_tiered_pickle_rows_follow_the_split_file_order(tmp_path):
    source, splits, folder = make("tiered-pickles", tmp_path, n=3)
    images = source.images("val")
    for c, wnid in enumerate(splits["val"]):
        for k in (0, 7):
            blob = png_bytes(seed("val", wnid, k))
            expected = decode_image(io.BytesIO(blob.tobytes()), 84, 3)
            assert torch.equal(images[c * PER_CLASS + k], torch.from_numpy(expected))


def test_full_committed_split_lists_without_override(tmp_path):
    """The default source (committed lists, no splits=) reads a complete mini-ImageNet folder copy."""
    doc = committed(MiniImageNetSource)
    folder = tmp_path / "miniimagenet"
    for split in SPLITS:
        for wnid in doc[split]:
            (folder / split / wnid).mkdir(parents=True)
            for k in range(PER_CLASS):
                (folder / split / wnid / f"{k:02d}.jpg").touch()  # listed only, never decoded here
    source = MiniImageNetSource()
    source.set_roots(DataRoots(root=tmp_path))
    assert {s: len(source.class_sizes(s)) for s in SPLITS} == COUNTS[MiniImageNetSource]
    assert source.listing("test").classes == tuple(doc["test"])


# ----------------------------------------------------------------------------- Omniglot specifics
@pytest.mark.parametrize("layout", ["omniglot-lake", "omniglot-torchvision"])
def test_omniglot_rotations_really_rotate_and_ink_is_bright(layout, tmp_path):
    source, splits, _ = make(layout, tmp_path)
    listing = source.listing("train")
    images, labels = source.pooled("train")
    assert images.shape == (2 * 4 * PER_CLASS, 1, 28, 28) and labels.tolist() == [c for c in range(8) for _ in range(PER_CLASS)]
    for char in range(2):
        for j in (0, 5, PER_CLASS - 1):
            base = images[(4 * char) * PER_CLASS + j]
            on_disk = 255 - torch.from_numpy(decode_image(listing.files[char][j], 28, 1))
            assert torch.equal(base, on_disk)  # inverted: Omniglot's black ink becomes bright
            for r in range(1, 4):
                rotated = images[(4 * char + r) * PER_CLASS + j]
                assert torch.equal(rotated, torch.from_numpy(np.rot90(base.numpy(), r, axes=(1, 2)).copy()))
                assert not torch.equal(rotated, base)


def test_omniglot_episode_images_match_their_rotation_class(tmp_path):
    source, _, _ = make("omniglot-lake", tmp_path)
    protocol = omniglot.protocols()[0]
    draw = eval_draws(protocol, source, "test", 1)[0]
    episode = source.materialize(draw, "test")
    pooled, _ = source.pooled("test")
    assert torch.equal(episode.support_x, pooled[list(draw.support)].float() / 255)
    assert torch.equal(episode.query_x, pooled[list(draw.query)].float() / 255)


def test_omniglot_20_way(tmp_path):
    source, splits, folder = make("omniglot-lake", tmp_path)
    protocol = omniglot.protocols()[3]  # 20-way 5-shot: 8 rotation classes are too few
    with pytest.raises(MetabenchError, match="20-way"):
        eval_draws(protocol, source, "test", 1)
    more = few(OmniglotSource, 5)
    folder = write_omniglot(tmp_path / "more", more)
    source = OmniglotSource(splits=more)
    source.set_roots(DataRoots(per_dataset={"omniglot": folder}))
    episode = source.materialize(eval_draws(protocol, source, "test", 1)[0], "test")
    assert episode.support_x.shape == (100, 1, 28, 28) and episode.query_x.shape == (100, 1, 28, 28)


# ----------------------------------------------------------------------------- cache and determinism
@pytest.mark.parametrize("layout", ["omniglot-lake", "mini-csv", "tiered-pickles", "cub"])
def test_second_load_indexes_the_cache_without_decoding(layout, tmp_path, monkeypatch):
    source, splits, folder = make(layout, tmp_path, n=3)
    first = source.images("test").clone()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(metabench.data, "decode_image", no_decoding)
    monkeypatch.setattr(tieredimagenet, "decode_image", no_decoding)
    again = new_source(source, splits, folder)
    assert torch.equal(again.images("test"), first)
    cached = again.info()["test"]
    assert cached["cached"] and cached["images"] == sum(again.class_sizes("test"))


@pytest.mark.parametrize("layout", ["omniglot-lake", "mini-folders", "tiered-pickles", "cub"])
def test_episode_draws_are_deterministic(layout, tmp_path):
    source, splits, folder = make(layout, tmp_path)
    protocol = {"omniglot": omniglot, "miniimagenet": miniimagenet, "tieredimagenet": tieredimagenet,
                "cub": cub}[source.dataset].protocols()[0]
    draws = eval_draws(protocol, source, "test", 6)
    other = new_source(source, splits, folder)
    again = eval_draws(protocol, other, "test", 6)
    assert draws == again and episodes_sha256(draws) == episodes_sha256(again)
    a, b = source.materialize(draws[3], "test"), other.materialize(again[3], "test")
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


# ----------------------------------------------------------------------------- errors
def one_line_error(call) -> str:
    with pytest.raises(MetabenchError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("cls", list(COUNTS), ids=lambda c: c.dataset)
def test_missing_folder(cls, tmp_path):
    source = cls()
    source.set_roots(DataRoots(root=tmp_path / "nowhere"))
    message = one_line_error(lambda: source.class_sizes("train"))
    assert str(tmp_path / "nowhere") in message and cls.layout in message
    source.set_roots(DataRoots(per_dataset={cls.dataset: tmp_path / "gone"}))
    assert str(tmp_path / "gone") in one_line_error(lambda: source.class_sizes("train"))


@pytest.mark.parametrize("cls", list(COUNTS), ids=lambda c: c.dataset)
def test_wrong_layout(cls, tmp_path):
    folder = tmp_path / "stuff"
    (folder / "pictures").mkdir(parents=True)
    source = cls()
    source.set_roots(DataRoots(per_dataset={cls.dataset: folder}))
    message = one_line_error(lambda: source.class_sizes("train"))
    assert str(folder) in message and cls.layout in message


def omniglot_folder(folder, name):
    doc = committed(OmniglotSource)
    alphabet, character = name.split("/")
    home = "images_background" if alphabet in doc["images_background"] else "images_evaluation"
    return folder / home / alphabet / character


def _remove_class(layout, folder, splits):
    if layout.startswith("omniglot"):
        victim = omniglot_folder(folder, splits["val"][1])
        for f in victim.iterdir():
            f.unlink()
        victim.rmdir()
        return victim
    if layout == "mini-csv":
        table = folder / "val.csv"
        table.write_text("".join(l + "\n" for l in table.read_text().splitlines() if splits["val"][1] not in l))
        return table
    if layout == "tiered-pickles":
        return folder / "val_labels.pkl"  # written again below without the class
    if layout == "cub":
        table = folder / "images.txt"
        table.write_text("".join(l + "\n" for l in table.read_text().splitlines() if splits["val"][1] not in l))
        return table
    victim = folder / "val" / splits["val"][1]
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()
    return victim


@pytest.mark.parametrize("layout", ["omniglot-lake", "mini-csv", "mini-folders", "tiered-folders", "tiered-pickles", "cub"])
def test_missing_class(layout, tmp_path):
    source, splits, folder = make(layout, tmp_path)
    if layout == "tiered-pickles":
        less = dict(splits, val=[w for w in splits["val"] if w != splits["val"][1]])
        write_tiered_pickles(folder, less)
    where = _remove_class(layout, folder, splits)
    message = one_line_error(lambda: source.class_sizes("val"))
    assert str(where) in message and splits["val"][1] in message and "missing" in message


@pytest.mark.parametrize("layout", ["mini-folders", "tiered-pickles"])
def test_class_of_another_split_is_refused(layout, tmp_path):
    source, splits, folder = make(layout, tmp_path)
    narrower = type(source)(splits=dict(splits, val=splits["val"][1:]))
    narrower.set_roots(source.roots)
    message = one_line_error(lambda: narrower.class_sizes("val"))
    assert splits["val"][0] in message and "not in the committed val split" in message


def _shorten_class(layout, folder, splits):
    if layout == "tiered-pickles":
        labels = pickle.loads((folder / "val_labels.pkl").read_bytes())
        names = labels["label_specific_str"]
        first = next(i for i, n in enumerate(labels["label_specific"]) if n == 0)
        labels["label_specific"][first] = len(names) - 1
        (folder / "val_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))
        return folder / "val_labels.pkl", splits["val"][-1]
    if layout == "mini-csv":
        table = folder / "val.csv"
        lines = table.read_text().splitlines()
        drop = next(l for l in lines if l.endswith(splits["val"][0]))
        table.write_text("".join(l + "\n" for l in lines if l != drop))
        return table, splits["val"][0]
    if layout == "cub":
        table = folder / "images.txt"
        lines = table.read_text().splitlines()
        drop = next(l for l in lines if splits["val"][0] in l)
        table.write_text("".join(l + "\n" for l in lines if l != drop))
        return folder / "images" / splits["val"][0], splits["val"][0]
    name = splits["val"][0]
    if layout.startswith("omniglot"):
        victim = omniglot_folder(folder, name)
    else:
        victim = folder / "val" / name
    sorted(victim.iterdir())[0].unlink()
    return victim, name


@pytest.mark.parametrize("layout", ["omniglot-lake", "mini-csv", "mini-folders", "tiered-folders", "tiered-pickles", "cub"])
def test_short_class(layout, tmp_path):
    source, splits, folder = make(layout, tmp_path)
    where, name = _shorten_class(layout, folder, splits)
    message = one_line_error(lambda: source.class_sizes("val"))
    assert str(where) in message and name in message and f"{PER_CLASS - 1} images" in message
    assert f"at least {PER_CLASS}" in message


@pytest.mark.parametrize("layout", ["omniglot-torchvision", "mini-csv", "tiered-folders", "tiered-pickles", "cub"])
def test_unreadable_image(layout, tmp_path):
    source, splits, folder = make(layout, tmp_path)
    if layout == "tiered-pickles":
        blobs = pickle.loads((folder / "val_images_png.pkl").read_bytes())
        blobs[4] = np.frombuffer(b"\x89PNG not really", dtype=np.uint8)
        (folder / "val_images_png.pkl").write_bytes(pickle.dumps(blobs, protocol=2))
        where = f"#4 of {folder / 'val_images_png.pkl'}"
    else:
        bad = source.listing("val").files[1][3]
        bad.write_bytes(b"not an image at all")
        where = str(bad)
    message = one_line_error(lambda: source.prepare("val"))
    assert where in message and "cannot read image" in message and source.layout in message
    cache = tmp_path / "cache"
    assert not (list(cache.iterdir()) if cache.is_dir() else [])  # no cache, no temporary or lock file left


def test_mini_csv_naming_a_missing_file(tmp_path):
    source, splits, folder = make("mini-csv", tmp_path)
    gone = folder / "images" / f"{splits['val'][2]}{7:08d}.jpg"
    gone.unlink()
    message = one_line_error(lambda: source.class_sizes("val"))
    assert str(gone) in message and "val.csv" in message


def test_tiered_pickle_that_is_not_a_dict_of_arrays(tmp_path):
    source, splits, folder = make("tiered-pickles", tmp_path)
    (folder / "train_labels.pkl").write_bytes(pickle.dumps({"something": [1, 2]}))
    assert str(folder / "train_labels.pkl") in one_line_error(lambda: source.class_sizes("train"))

    class Sneaky:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "train_labels.pkl").write_bytes(pickle.dumps({"label_specific": Sneaky()}))
    message = one_line_error(lambda: source.class_sizes("train"))
    assert "refusing to load builtins.print" in message


# ----------------------------------------------------------------------------- registration
@pytest.mark.parametrize("module,names", [
    (omniglot, ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s"]),
    (miniimagenet, ["miniimagenet-5w1s", "miniimagenet-5w5s"]),
    (tieredimagenet, ["tieredimagenet-5w1s", "tieredimagenet-5w5s"]),
    (cub, ["cub-5w1s", "cub-5w5s"]),
], ids=lambda v: getattr(v, "__name__", "").rpartition(".")[2] or None)
def test_plugin_registers_its_protocols_with_one_source(module, names):
    host = host_with((module.__name__.rpartition(".")[2], module), builtins=False)
    tasks = [host.task(name) for name in names]
    assert len({id(source) for _, source, _ in tasks}) == 1
    for protocol, source, _ in tasks:
        assert protocol.episodes == 600 and protocol.queries == (15 if protocol.ways == 5 else 5)
        assert source.min_images >= protocol.shots + protocol.queries
        assert protocol.image_size == source.image_size and protocol.channels == source.channels


@pytest.mark.parametrize("layout,task", [("omniglot-torchvision", "omniglot-5w1s"), ("mini-csv", "miniimagenet-5w1s")])
def test_a_run_end_to_end_on_a_small_copy(layout, task, tmp_path):
    """The runner drives the source: roots from the request, train and test splits, fixed episodes."""
    from conftest import tiny_plugin
    from metabench.runner import RunRequest, execute

    cls, writer, options = LAYOUTS[layout]
    module = omniglot if cls is OmniglotSource else miniimagenet
    splits = few(cls, 2 if cls is OmniglotSource else 5)
    folder = writer(tmp_path / "data", splits, **options)
    source = cls(splits=splits)

    class Small:
        @metabench.hookimpl
        def metabench_register_tasks(self, register):
            for protocol in module.protocols():
                register(protocol, source)

    from metabench_plugins.backbones import conv4

    # builtins=False: the installed omniglot / miniimagenet plugins would register the same task names
    host = host_with(("tiny", tiny_plugin()), ("conv4", conv4), ("small", Small()), builtins=False)
    assert not host.errors
    request = RunRequest(learner="toy", task=task, budget="smoke", episodes=4,
                         data_roots=DataRoots(per_dataset={cls.dataset: folder}))
    result = execute(request, host)
    assert len(result["per_episode"]) == 4
    assert source.roots.per_dataset == {cls.dataset: folder}


def test_a_data_folder_of_no_such_user_is_one_line(monkeypatch):
    """``~name`` of a user that does not exist: from --data-root refused at once, from
    $METABENCH_DATA kept as written so the data set's lookup names it (never a traceback)."""
    with pytest.raises(MetabenchError, match="--data-root: data folder '~nosuchuser_mb/x'"):
        DataRoots.from_settings("~nosuchuser_mb/x")
    monkeypatch.setenv("METABENCH_DATA", "~nosuchuser_mb/x")
    roots = DataRoots.from_settings()
    assert str(roots.root) == "~nosuchuser_mb/x"
    with pytest.raises(MetabenchError, match="not found under ~nosuchuser_mb/x"):
        roots.locate("miniimagenet", ["miniimagenet"], "images/")


# ----------------------------------------------------------------------------- fine-grained episodes
def grouped_copy(name, tmp_path):
    """(plain source, grouped source) on one small folder whose splits hold two groups (alphabets,
    categories) of 5 classes each, and in the test split a group too small for a 5-way episode
    (Omniglot: Gurmukhi's 4 test characters; tieredImageNet: 3 classes of a third category)."""
    if name == "omniglot":
        doc, plain_cls, grouped_cls, writer, options = (committed(OmniglotSource), OmniglotSource,
                                                         omniglot.OmniglotAlphabetSource, write_omniglot, {})
        group_of = {c: c.partition("/")[0] for s in SPLITS for c in doc[s]}
    else:
        doc, plain_cls, grouped_cls, writer, options = (
            committed(TieredImageNetSource), TieredImageNetSource, tieredimagenet.TieredImageNetCategorySource,
            write_class_folders, {"suffix": ".png"})
        group_of = doc["category"]
    splits = {}
    for split in SPLITS:
        members: dict[str, list[str]] = {}
        for c in doc[split]:
            members.setdefault(group_of[c], []).append(c)
        big = [g for g in members if len(members[g]) >= 5][:2]
        splits[split] = [c for g in big for c in members[g][:5]]
        if split == "test":
            small = [g for g in members if g not in big][0]
            splits[split] += members[small][:4 if name == "omniglot" else 3]
    folder = writer(tmp_path / "data" / name, splits, **options)
    roots = DataRoots(per_dataset={name if name == "omniglot" else "tieredimagenet": folder})
    plain, grouped = plain_cls(splits=splits), grouped_cls(splits=splits)
    plain.set_roots(roots)
    grouped.set_roots(roots)
    return plain, grouped


GROUPED = {"omniglot": (omniglot, "omniglot_alphabet"), "tieredimagenet": (tieredimagenet, "tieredimagenet_category")}


def grouped_protocol(name, ways, shots):
    module, dataset = GROUPED[name]
    maker = module.alphabet_protocols if name == "omniglot" else module.category_protocols
    (protocol,) = [p for p in maker() if p.name == f"{dataset}-{ways}w{shots}s"]
    return protocol


@pytest.mark.parametrize("name", list(GROUPED))
def test_fine_grained_episodes_stay_within_one_group(name, tmp_path):
    plain, source = grouped_copy(name, tmp_path)
    for shots in (1, 5):
        protocol = grouped_protocol(name, 5, shots)
        for split in ("test", "val"):
            groups = source.class_groups(split)
            draws = eval_draws(protocol, source, split, 40)
            used = [{groups[c] for c in d.classes} for d in draws]
            assert all(len(u) == 1 and None not in u for u in used)
            assert all(len(set(d.classes)) == 5 and len(d.support) == 5 * shots for d in draws)
            assert len({next(iter(u)) for u in used}) == (8 if name == "omniglot" else 2)  # every eligible group
        # training episodes too, at the protocol's and at other shapes
        sampler = TrainSampler(protocol, source, seed=0)
        groups = source.class_groups("train")
        for ways in (5, 3, 5):
            for _ in range(10):
                assert len({groups[c] for c in sampler.draw(ways=ways).classes}) == 1
    # the test split's small groups (Gurmukhi's 4 characters, at each rotation; 3 tieredImageNet
    # classes of a third category) give no episode
    groups = source.class_groups("test")
    small = {g for g in groups if groups.count(g) < 5}
    assert len(small) == (4 if name == "omniglot" else 1)
    assert not {groups[c] for d in eval_draws(protocol, source, "test", 40) for c in d.classes} & small
    # a grouped episode's images are the plain source's, from the same cache
    assert source.cache_key("test") == plain.cache_key("test")
    draw = eval_draws(protocol, source, "test", 1)[0]
    episode, same = source.materialize(draw, "test"), plain.materialize(draw, "test")
    assert torch.equal(episode.support_x, same.support_x) and torch.equal(episode.query_x, same.query_x)


def test_omniglot_groups_are_alphabets_at_one_rotation(tmp_path):
    _, source = grouped_copy("omniglot", tmp_path)
    draws = eval_draws(grouped_protocol("omniglot", 5, 1), source, "test", 40)
    for d in draws:  # one alphabet, one rotation: class 4 c + r is character c turned r times
        assert len({c % 4 for c in d.classes}) == 1
        assert len({source.split_classes("test")[c // 4].partition("/")[0] for c in d.classes}) == 1
    assert {c % 4 for d in draws for c in d.classes} == {0, 1, 2, 3}
    assert source.class_groups("test")[:4] == [f"Kannada@{a}" for a in (0, 90, 180, 270)]


@pytest.mark.parametrize("name", list(GROUPED))
def test_fine_grained_episode_hash_differs_from_the_plain_task(name, tmp_path):
    plain, source = grouped_copy(name, tmp_path)
    protocol = grouped_protocol(name, 5, 1)
    (plain_protocol,) = [p for p in GROUPED[name][0].protocols() if p.name == f"{name}-5w1s"]
    a = episodes_sha256(eval_draws(protocol, source, "test", 30))
    fresh = type(source)(splits={s: source.split_classes(s) for s in SPLITS})
    fresh.set_roots(source.roots)
    b = episodes_sha256(eval_draws(protocol, fresh, "test", 30))
    assert a == b != episodes_sha256(eval_draws(plain_protocol, plain, "test", 30))


@pytest.mark.parametrize("name,ways", [("omniglot", 20), ("tieredimagenet", 6)])
def test_a_way_count_no_group_gives_is_refused_in_one_line(name, ways, tmp_path):
    _, source = grouped_copy(name, tmp_path)
    if name == "omniglot":  # the real 20-way protocol on a copy whose alphabets have 5 characters
        message = one_line_error(lambda: eval_draws(grouped_protocol(name, ways, 1), source, "test", 1))
    else:
        message = one_line_error(lambda: source.draw(SplitMix64(0), "train", ways, 1, 15))
    split = "test" if name == "omniglot" else "train"
    assert f"no group of split {split!r} has {ways} classes" in message


def test_committed_omniglot_alphabets_give_the_documented_groups():
    """The groups come from the committed names (<alphabet>/characterNN, checked by the split file's
    SHA-256): 12 test alphabets x 4 rotations of at least 20 characters, Gurmukhi's 4 left out."""
    source = omniglot.OmniglotAlphabetSource()
    sizes = {}
    for split in SPLITS:
        groups = source.class_groups(split)
        assert len(groups) == 4 * COUNTS[OmniglotSource][split] and None not in groups
        sizes[split] = {g: groups.count(g) for g in groups}
    assert len(sizes["test"]) == 13 * 4 and min(n for g, n in sizes["test"].items() if "Gurmukhi" not in g) == 23
    assert sizes["test"]["Gurmukhi@90"] == 4
    assert sum(n >= 20 for n in sizes["train"].values()) == 31 * 4
    assert sorted(set(sizes["val"].values())) == [22, 37, 41]


def test_committed_tiered_categories_cover_every_class_and_no_two_splits():
    doc = committed(TieredImageNetSource)
    assert set(doc["category"]) == {c for s in SPLITS for c in doc[s]}
    source = tieredimagenet.TieredImageNetCategorySource()
    per_split = {s: set(source.class_groups(s)) for s in SPLITS}
    assert {s: len(g) for s, g in per_split.items()} == {"train": 20, "val": 6, "test": 8}
    assert not (per_split["train"] & per_split["val"] or per_split["train"] & per_split["test"]
                or per_split["val"] & per_split["test"])
    test = source.class_groups("test")
    assert min(test.count(g) for g in per_split["test"]) == 10  # every test category gives 5-way episodes


@pytest.mark.parametrize("name", list(GROUPED))
def test_fine_grained_tasks_register_with_their_own_shared_source(name):
    module, dataset = GROUPED[name]
    host = host_with((name, module), builtins=False)
    settings = module.SETTINGS
    tasks = [host.task(f"{dataset}-{w}w{s}s") for w, s, _ in settings]
    (plain_source,) = {id(host.task(f"{name}-{w}w{s}s")[1]) for w, s, _ in settings}
    assert len({id(source) for _, source, _ in tasks}) == 1 and id(tasks[0][1]) != plain_source
    for protocol, source, _ in tasks:
        assert isinstance(source, GroupedEpisodes) and source.dataset == name  # same folder and cache
        assert protocol.dataset == dataset and protocol.version == 1 and "fine-grained" in protocol.description
