"""CIFAR-FS / FC100 (fake CIFAR-100 pickles), the sinusoid regression task and the mlp backbone.

The fake ``cifar-100-python/`` has the real file format and all 100 classes, but only 2 ``train``
+ 1 ``test`` image per class. Tests that load it set ``cifar.IMAGES_PER_CLASS`` to 3 (the real
data has 600 per class, which the plugin checks); everything else is as for the real data.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from metabench import MetabenchError
from metabench.data import DataRoots
from metabench.episodes import TrainSampler, episodes_sha256, eval_draws
from metabench.plugins import PluginHost, PluginSource, discover
from metabench.rng import SplitMix64
from metabench.runner import RunRequest, execute
from metabench_plugins.backbones import mlp
from metabench_plugins.datasets import cifar, sinusoid

from conftest import host_with

# CIFAR-100's published taxonomy (https://www.cs.toronto.edu/~kriz/cifar.html): superclass -> fine classes.
TAXONOMY = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
COARSE = sorted(TAXONOMY)  # CIFAR-100's label order is alphabetical for both levels
FINE = sorted(f for fs in TAXONOMY.values() for f in fs.split())
SUPER_OF = {f: c for c, fs in TAXONOMY.items() for f in fs.split()}
PER_FILE = {"train": 2, "test": 1}  # images per class in each fake pickle
SPLITS = ("train", "val", "test")


def pixel_pattern(fine: int, file_index: int, j: int) -> np.ndarray:
    """uint8 [3, 32, 32]: R = fine label, G = 10 * file (train 0, test 1) + j-th image of the class
    in that file, B[y, x] = (3y + x) % 256 (so a transposed or channel-swapped image is caught)."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([np.full((32, 32), fine), np.full((32, 32), 10 * file_index + j), (3 * y + x) % 256]).astype(np.uint8)


def write_fake_cifar(root, super_of=SUPER_OF, dumps=lambda doc: pickle.dumps(doc, protocol=3)):
    """Write ``root/cifar-100-python/{train,test,meta}`` in CIFAR-100's pickle format; return the folder."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for file_index, name in enumerate(("train", "test")):
        labels = [c for c in range(100) for _ in range(PER_FILE[name])]
        order = [(37 * i + 11 * file_index) % len(labels) for i in range(len(labels))]  # interleave the classes
        labels = [labels[i] for i in order]
        seen: dict[int, int] = {}
        rows = []
        for c in labels:
            rows.append(pixel_pattern(c, file_index, seen.get(c, 0)).reshape(-1))
            seen[c] = seen.get(c, 0) + 1
        doc = {b"batch_label": f"{name} batch".encode(), b"data": np.stack(rows), b"fine_labels": labels,
               b"coarse_labels": [COARSE.index(super_of[FINE[c]]) for c in labels],
               b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))]}
        (folder / name).write_bytes(dumps(doc))
    meta = {b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]}
    (folder / "meta").write_bytes(dumps(meta))
    return folder


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's cPickle (protocol 2) wrote the real files: byte strings as str opcodes,
    arrays via numpy.core.multiarray._reconstruct. Handles dict, bytes, int, list and uint8 arrays."""
    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def integer(i: int) -> bytes:
        return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)

    def emit(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(emit(k) + emit(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(emit(v) for v in o) + b"e"
        if isinstance(o, bytes):
            return short(o)
        if isinstance(o, int):
            return integer(o)
        assert isinstance(o, np.ndarray) and o.dtype == np.uint8
        dtype = (b"cnumpy\ndtype\n" + short(b"u1") + integer(0) + integer(1) + b"\x87R"
                 + b"(" + integer(3) + short(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
        shape = b"(" + b"".join(integer(n) for n in o.shape) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + b"\x85" + short(b"b")
                + b"\x87R" + b"(" + integer(1) + shape + dtype + b"\x89" + short(o.tobytes()) + b"tb")

    return b"\x80\x02" + emit(obj) + b"."


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cifar, "_POOLS", {})


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake CIFAR-100 under tmp_path/data; the per-class count check reduced to its 3 images."""
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", sum(PER_FILE.values()))
    write_fake_cifar(tmp_path / "data")
    return DataRoots(tmp_path / "data")


def source(dataset: str, roots: DataRoots):
    src = cifar.FC100Source("fc100") if dataset == "fc100" else cifar.CifarSource(dataset)
    src.set_roots(roots)
    return src


def protocol(name: str):
    return next(p for p, _ in cifar.protocols() if p.name == name)


def one_line_error(call, *fragments):
    with pytest.raises(MetabenchError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


# ----------------------------------------------------------------------------- committed splits
@pytest.mark.parametrize("dataset, counts", [("cifarfs", (64, 16, 20)), ("fc100", (60, 20, 20))])
def test_split_files_counts_digest_and_disjoint(dataset, counts):
    name, sha = cifar.SPLIT_FILES[dataset]
    raw = (cifar.SPLITS_DIR / name).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == sha
    doc = cifar.split_file(dataset)
    assert {"cifarfs": "Bertinetto", "fc100": "TADAM"}[dataset] in doc["source"]
    assert tuple(len(doc[s]) for s in SPLITS) == counts
    every = [c for s in SPLITS for c in doc[s]]
    assert len(set(every)) == len(every) == 100 and set(every) == set(FINE)


def test_fc100_is_split_by_superclass():
    doc = cifar.split_file("fc100")
    assert [len(doc["superclasses"][s]) for s in SPLITS] == [12, 4, 4]
    assert doc["superclass_indices"]["test"] == [0, 7, 12, 14]  # TADAM's class_split
    for split in SPLITS:
        assert [COARSE[i] for i in doc["superclass_indices"][split]] == doc["superclasses"][split]
        whole = sorted(f for s in doc["superclasses"][split] for f in TAXONOMY[s].split())
        assert doc[split] == whole  # every fine class of a superclass sits in that superclass's split


def test_edited_split_file_is_refused(tmp_path):
    name, sha = cifar.SPLIT_FILES["cifarfs"]
    doc = json.loads((cifar.SPLITS_DIR / name).read_text())
    doc["val"][0], doc["test"][0] = doc["test"][0], doc["val"][0]
    (tmp_path / name).write_text(json.dumps(doc, indent=1) + "\n")
    with pytest.raises(RuntimeError, match="edited"):
        cifar.read_split_file(tmp_path / name, sha)


def test_protocols_register_and_episodes_need_no_data():
    host = host_with(("cifar", cifar), ("sinusoid", sinusoid), ("mlp", mlp), builtins=False)
    assert not host.errors
    assert host.tasks.names() == ["cifarfs-5w1s", "cifarfs-5w5s", "fc100-5w1s", "fc100-5w5s", "sinusoid-10s",
                                  "sinusoid-20s", "sinusoid-5s"]
    assert host.backbones.names() == ["mlp"]
    p, src, _ = host.task("fc100-5w5s")
    assert (p.ways, p.shots, p.queries, p.episodes, p.image_size, p.channels) == (5, 5, 15, 600, 32, 3)
    assert host.task("fc100-5w1s")[1] is src and host.task("cifarfs-5w1s")[1] is not src
    src.set_roots(DataRoots(None))  # the fixed test episodes are a function of the split file alone
    draws = eval_draws(p, src, n=3)
    assert all(len(d.classes) == 5 and len(d.support) == 25 and len(d.query) == 75 for d in draws)
    assert max(max(d.query) for d in draws) < 20 * cifar.IMAGES_PER_CLASS


# ----------------------------------------------------------------------------- images
def test_images_land_in_the_right_rows_with_channels_in_order(fake):
    src = source("cifarfs", fake)
    names = cifar.split_file("cifarfs")["test"]
    images = src.images("test")
    assert images.dtype == torch.uint8 and tuple(images.shape) == (20 * 3, 3, 32, 32)
    y, x = np.mgrid[0:32, 0:32]
    for k, name in enumerate(names):
        block = images[3 * k: 3 * k + 3].numpy()
        assert (block[:, 0] == FINE.index(name)).all()  # red plane: this class
        assert [int(b[1, 0, 0]) for b in block] == [0, 1, 10]  # train images (file order), then test
        assert (block[:, 2] == (3 * y + x) % 256).all()  # blue plane, not transposed


@pytest.mark.parametrize("dumps", [py2_pickle, lambda doc: pickle.dumps(doc, protocol=2)], ids=["python2", "protocol2"])
def test_python2_and_protocol2_pickles_read_alike(tmp_path, monkeypatch, dumps):
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", 3)
    write_fake_cifar(tmp_path / "a")
    write_fake_cifar(tmp_path / "b", dumps=dumps)
    a, b = (source("cifarfs", DataRoots(tmp_path / d)).images("test") for d in "ab")
    assert torch.equal(a, b)


def test_episode_materializes_from_the_drawn_classes(fake):
    src = source("fc100", fake)
    draw = src.draw(SplitMix64(7), "test", 5, 1, 2)
    episode = src.materialize(draw, "test")
    names = cifar.split_file("fc100")["test"]
    assert tuple(episode.support_x.shape) == (5, 3, 32, 32) and episode.support_x.dtype == torch.float32
    red = (episode.support_x[:, 0, 0, 0] * 255).round().long().tolist()
    assert red == [FINE.index(names[c]) for c in draw.classes]
    assert episode.support_y.tolist() == [0, 1, 2, 3, 4] and episode.query_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_both_data_sets_share_one_cache_built_once(fake, monkeypatch):
    cifarfs = source("cifarfs", fake)
    cifarfs.prepare("train")
    assert len(list((fake.root.parent / "cache").glob("cifar100-pooled-*.npy"))) == 1
    monkeypatch.setattr(cifar, "_POOLS", {})

    def fail(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(cifar, "build_pool_cache", fail)
    fc100 = source("fc100", fake)
    fc100.prepare("val")
    assert tuple(fc100.images("val").shape) == (60, 3, 32, 32)
    info_a, info_b = cifarfs.info(), fc100.info()
    assert info_a["test"]["cached"] and info_a["test"]["sha256"] == info_b["test"]["sha256"]
    assert [info_b[s]["classes"] for s in SPLITS] == [60, 20, 20]
    pooled_x, pooled_y = cifarfs.pooled("train")
    assert pooled_x.shape[0] == pooled_y.shape[0] == 64 * 3


def test_nested_torchvision_style_folder_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", 3)
    write_fake_cifar(tmp_path / "tv")  # tv/cifar-100-python/, as torchvision's root=tv leaves it
    src = source("cifarfs", DataRoots(None, {"cifar100": tmp_path / "tv"}))
    assert tuple(src.images("val").shape) == (48, 3, 32, 32)


# ----------------------------------------------------------------------------- errors
def test_missing_data_folder(tmp_path):
    src = source("cifarfs", DataRoots(tmp_path))
    one_line_error(lambda: src.prepare("test"), tmp_path / "cifar-100-python", "pickles train, test and meta")
    src.set_roots(DataRoots(None, {"cifar100": tmp_path / "nowhere"}))
    one_line_error(lambda: src.prepare("test"), tmp_path / "nowhere", "cifar-100-python/")


def test_missing_pickle(fake):
    (fake.root / "cifar-100-python" / "test").unlink()
    one_line_error(lambda: source("cifarfs", fake).prepare("test"), fake.root / "cifar-100-python" / "test",
                   "cifar-100-python/ holding the pickles")


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", pickle.dumps([1, 2, 3]),
                                     pickle.dumps({b"data": np.zeros((2, 5), np.uint8)}, protocol=3)])
def test_corrupt_pickle(fake, content):
    path = fake.root / "cifar-100-python" / "train"
    path.write_bytes(content)
    one_line_error(lambda: source("fc100", fake).prepare("train"), path, "expected cifar-100-python/")


def test_pickle_with_code_is_refused_and_not_run(fake, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = fake.root / "cifar-100-python" / "meta"
    path.write_bytes(pickle.dumps(Payload()))
    one_line_error(lambda: source("cifarfs", fake).prepare("test"), path, "refusing global")
    assert not marker.exists()


def test_wrong_layouts(tmp_path):
    folder = tmp_path / "cifar-100-python"
    (folder / "train" / "apple").mkdir(parents=True)  # an image-folder copy, not the python version
    one_line_error(lambda: source("cifarfs", DataRoots(tmp_path)).prepare("test"), folder / "train", "is a folder")
    cifar10 = tmp_path / "c10"
    cifar10.mkdir()
    for name in ("data_batch_1", "batches.meta", "test_batch"):
        (cifar10 / name).write_bytes(b"x")
    one_line_error(lambda: source("cifarfs", DataRoots(None, {"cifar100": cifar10})).prepare("test"),
                   cifar10 / "train", "CIFAR-10")


def test_wrong_image_count_is_refused(tmp_path):
    write_fake_cifar(tmp_path)  # 3 images per class, but IMAGES_PER_CLASS stays 600
    one_line_error(lambda: source("cifarfs", DataRoots(tmp_path)).prepare("test"), tmp_path / "cifar-100-python",
                   "has 3", "600 per class")


def test_fc100_refuses_data_whose_superclasses_disagree(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", 3)
    swapped = dict(SUPER_OF, whale="fish", trout="aquatic_mammals")  # whale (test) <-> trout (train)
    write_fake_cifar(tmp_path, swapped)
    roots = DataRoots(tmp_path)
    one_line_error(lambda: source("fc100", roots).prepare("test"), tmp_path / "cifar-100-python", "FC100")
    source("cifarfs", roots).prepare("test")  # CIFAR-FS does not depend on superclasses


# ----------------------------------------------------------------------------- sinusoid
def sine_protocol(k: int):
    return next(p for p in sinusoid.protocols() if p.shots == k)


def test_sinusoid_protocols():
    for k, p in zip((5, 10, 20), sinusoid.protocols()):
        assert p.name == f"sinusoid-{k}s" and p.problem == "regression" and p.metric == "mse"
        assert not p.higher_is_better and (p.ways, p.queries, p.episodes, p.image_size, p.channels) == (1, 100, 600, 1, 1)


def test_sinusoid_draws_are_deterministic_and_fixed_per_test_episode():
    src, p = sinusoid.SinusoidSource(), sine_protocol(10)
    first, again = eval_draws(p, src, n=4), eval_draws(p, src, n=4)
    assert first == again and episodes_sha256(first) == episodes_sha256(again)
    assert episodes_sha256(first) != episodes_sha256(eval_draws(sine_protocol(5), src, n=4))
    assert first[2] == eval_draws(p, src, n=3)[2]  # episode i does not depend on how many are drawn
    a, b = src.materialize(first[2], "test"), src.materialize(first[2], "test")
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.query_y, b.query_y)
    assert len(set(first[0].extra[12:])) == 100  # the 100 query x of episode 0


def test_sinusoid_ranges_shapes_and_targets():
    src = sinusoid.SinusoidSource()
    rng = SplitMix64(123)
    for _ in range(200):
        draw = src.draw(rng, "train", 1, 5, 100)
        amplitude, phase, *xs = draw.extra
        assert 0.1 <= amplitude < 5.0 and 0.0 <= phase < math.pi
        assert len(xs) == 105 and all(-5.0 <= x < 5.0 for x in xs)
    episode = src.materialize(draw, "train")
    assert [tuple(t.shape) for t in (episode.support_x, episode.support_y, episode.query_x, episode.query_y)] == \
        [(5, 1), (5, 1), (100, 1), (100, 1)]
    assert all(t.dtype == torch.float32 for t in (episode.support_x, episode.support_y, episode.query_x, episode.query_y))
    for x, y in ((episode.support_x, episode.support_y), (episode.query_x, episode.query_y)):
        expected = amplitude * torch.sin(x.double() - phase)
        assert torch.allclose(y.double(), expected, atol=1e-5)
    assert episode.support_x.flatten().double().tolist() == pytest.approx(xs[:5], abs=1e-6)


def test_sinusoid_training_episodes_take_the_learners_sizes():
    p = sine_protocol(5)
    sampler = TrainSampler(p, sinusoid.SinusoidSource(), seed=3)
    episode = sampler.sample(shots=7, queries=9)
    assert tuple(episode.support_x.shape) == (7, 1) and tuple(episode.query_y.shape) == (9, 1)
    other = TrainSampler(p, sinusoid.SinusoidSource(), seed=3).sample(shots=7, queries=9)
    assert torch.equal(episode.query_y, other.query_y)
    with pytest.raises(MetabenchError, match="ways=1"):
        sampler.sample(ways=5)


def test_harness_refuses_a_classification_learner_on_sinusoid():
    builtin = [s for s in discover() if s.name == "protonet"]
    if not builtin:
        pytest.skip("protonet plugin not installed")
    host = PluginHost(builtin + [PluginSource.from_object("sinusoid-test", sinusoid, "tests", "0")])
    request = RunRequest(learner="protonet", task="sinusoid-5s", backbone="mlp", budget="smoke")
    with pytest.raises(MetabenchError, match="cannot run regression task"):
        execute(request, host)


# ----------------------------------------------------------------------------- mlp
def test_mlp_shapes_and_options():
    backbone = mlp.mlp(1, 1)
    linears = [m for m in backbone.module if isinstance(m, torch.nn.Linear)]
    assert backbone.out_features == 40 and [(l.in_features, l.out_features) for l in linears] == [(1, 40), (40, 40)]
    assert tuple(backbone.module(torch.zeros(8, 1)).shape) == (8, 40)
    wide = mlp.mlp(3, 32, hidden=16, layers=3)
    assert tuple(wide.module(torch.zeros(2, 3, 32, 32)).shape) == (2, 16) and wide.out_features == 16
    assert sum(isinstance(m, torch.nn.Linear) for m in wide.module) == 3
    with pytest.raises(ValueError, match="hidden"):
        mlp.mlp(1, 1, hidden=0)
    host = host_with(("mlp", mlp), builtins=False)
    assert host.build_backbone("mlp", 1, 1, layers=1).out_features == 40
    with pytest.raises(MetabenchError, match="accepted: hidden, layers"):
        host.build_backbone("mlp", 1, 1, width=3)
