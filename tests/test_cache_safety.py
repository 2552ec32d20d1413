"""Faults survived, nothing lost (issue 18): data caches stand for exactly the bytes they were built
from, are verified when opened, are built by one process at a time, and a refused data set leaves
nothing behind; every write (result, learner file, checkpoint, cache, publish) is atomic, and a full
disk or a read-only folder ends in one line naming the path with the previous file intact; two runs
writing into one ``--out`` never clobber each other; tieredImageNet pickles written again with
numpy 2 / protocol 5 load.

Read-only folders: ``chmod 0o555`` where the tests do not run as root; root ignores permissions, so
there the same refusals are simulated by making ``os.open`` / ``os.mkdir`` / renames into the folder
raise ``PermissionError``. A full disk: the write to the temporary file raises ``ENOSPC`` after a
given number of bytes, so part of the file was really written.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metabench.data
import metabench.files
import metabench.plugins
from metabench import MetabenchError, cli
from metabench.checkpoint import CheckpointFolder
from metabench.data import DataRoots, cache_paths, ensure_image_cache, inspect_image_cache
from metabench.learner_file import write_learner_file
from metabench.publish import publish_report
from metabench.results import load_result, write_result
from metabench.runner import RunRequest, execute
from metabench_plugins.datasets import cifar, tieredimagenet
from metabench_plugins.datasets.miniimagenet import MiniImageNetSource
from metabench_plugins.datasets.tieredimagenet import TieredImageNetSource

from conftest import ROOT, host_with, tiny_plugin
from test_datasets_cifar_sinusoid import write_fake_cifar
from test_datasets_folders import few, seed, write_tiered_pickles

PER_CLASS = 20
SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METABENCH_DATA", raising=False)
    monkeypatch.setattr(metabench.data, "_VERIFIED", set())  # each test is a fresh process for verification
    monkeypatch.setattr(cifar, "_POOLS", {})
    monkeypatch.setattr(cifar, "_KEYS", {})


def cache_files(tmp_path) -> list[str]:
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def one_line(call, *fragments) -> str:
    with pytest.raises(MetabenchError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


# ----------------------------------------------------------------------------- fakes
def png(path: Path, pixel_seed: int) -> None:
    """An 8 x 8 RGB PNG stored uncompressed: its size is the same whatever its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(pixel_seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, compress_level=0)


def write_mini(root: Path, splits: dict) -> Path:
    """mini-ImageNet's folder layout: <split>/<wnid>/<wnid>_NNNN.png, 20 images a class."""
    for split in SPLITS:
        for c, wnid in enumerate(splits[split]):
            for k in range(PER_CLASS):
                png(root / split / wnid / f"{wnid}_{k:04d}.png", seed(split, c, k))
    return root


def mini_source(folder: Path, splits: dict) -> MiniImageNetSource:
    source = MiniImageNetSource(splits=splits)
    source.set_roots(DataRoots(per_dataset={"miniimagenet": folder}))
    return source


@pytest.fixture
def mini(tmp_path):
    splits = few(MiniImageNetSource, 2)
    folder = write_mini(tmp_path / "data" / "mini", splits)
    return folder, splits


def forbid_decoding(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(metabench.data, "decode_image", no)


# ----------------------------------------------------------------------------- faults
@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(free, where)``: writes of files for which ``where(path)`` holds fail with ENOSPC once
    ``free`` bytes of that file are written (what was written before stays in the temporary file)."""

    def arm(free: int = 100, where=lambda path: True):
        original = metabench.files._Sink.write

        def write(self, data):
            if not where(self.path):
                return original(self, data)
            written = getattr(self, "_written", 0)
            room = max(0, free - written)
            if len(memoryview(data).cast("B")) > room:
                original(self, memoryview(data).cast("B")[:room])
                self._written = free
                error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.error = error
                raise error
            self._written = written + len(memoryview(data).cast("B"))
            return original(self, data)

        monkeypatch.setattr(metabench.files._Sink, "write", write)

    return arm


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: nothing can be created, renamed or linked in ``folder`` (chmod 0o555; as
    root, which ignores permissions, the calls that would do it raise PermissionError)."""
    chmodded: list[Path] = []
    folders: list[str] = []

    def denied(path) -> bool:
        full = os.path.abspath(os.fspath(path))
        return any(full == f or full.startswith(f + os.sep) for f in folders)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def patch_all():
        real_open, real_mkdir = os.open, os.mkdir
        real_replace, real_rename, real_link = os.replace, os.rename, os.link
        real_builtin_open = builtins.open

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
                refuse(path)
            return real_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if denied(os.path.dirname(os.path.abspath(os.fspath(path)))):
                refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def moved(real):
            def move(src, dst, *args, **kwargs):
                if denied(dst) or denied(src):
                    refuse(dst)
                return real(src, dst, *args, **kwargs)
            return move

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+") and denied(file):
                refuse(file)
            return real_builtin_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "replace", moved(real_replace))
        monkeypatch.setattr(os, "rename", moved(real_rename))
        monkeypatch.setattr(os, "link", moved(real_link))
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
            chmodded.append(folder)
        else:
            if not folders:
                patch_all()
            folders.append(os.path.abspath(folder))
        return folder

    yield make
    for folder in chmodded:
        folder.chmod(0o755)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. a cache stands for its bytes
def test_images_replaced_under_the_same_names_size_and_time_get_a_new_cache(mini, tmp_path):
    folder, splits = mini
    source = mini_source(folder, splits)
    before = source.images("test").clone()
    key_before = source.cache_key("test")
    victim = source.listing("test").files[1][5]
    st = victim.stat()
    png(victim, 999)  # other pixels, the same name and size; the time put back as it was
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    again = mini_source(folder, splits)
    assert again.cache_key("test") != key_before
    after = again.images("test")
    row = PER_CLASS + 5
    assert not torch.equal(after[row], before[row])
    assert torch.equal(torch.cat([after[:row], after[row + 1:]]), torch.cat([before[:row], before[row + 1:]]))


def test_the_same_bytes_copied_elsewhere_with_new_times_reuse_the_cache(mini, tmp_path, monkeypatch):
    folder, splits = mini
    first = mini_source(folder, splits).images("val").clone()
    copy = tmp_path / "elsewhere" / "mini"
    for path in folder.rglob("*.png"):  # a fresh copy: new inodes and modification times
        target = copy / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    forbid_decoding(monkeypatch)
    assert torch.equal(mini_source(copy, splits).images("val"), first)


def test_cifar_extracted_again_reuses_its_cache_and_other_bytes_do_not(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", 3)
    folder = write_fake_cifar(tmp_path / "a")
    roots = DataRoots(tmp_path / "a")
    src = cifar.CifarSource("cifarfs")
    src.set_roots(roots)
    images = src.images("test").clone()
    key = cifar.cache_key(folder)
    for name in cifar.PICKLES:  # the same archive extracted again: the same bytes, new times
        data = (folder / name).read_bytes()
        (folder / name).unlink()
        (folder / name).write_bytes(data)
        os.utime(folder / name, ns=(1, 10**18))
    monkeypatch.setattr(cifar, "_POOLS", {})
    monkeypatch.setattr(cifar, "build_pool_cache", lambda *a, **k: pytest.fail("built again for the same bytes"))
    assert cifar.cache_key(folder) == key
    again = cifar.CifarSource("cifarfs")
    again.set_roots(roots)
    assert torch.equal(again.images("test"), images)
    assert [n for n in cache_files(tmp_path) if n.endswith(".npy")] == [f"{key}.npy"]
    train = folder / "train"
    raw = bytearray(train.read_bytes())
    raw[-200] ^= 1  # one pixel changed
    train.write_bytes(bytes(raw))
    assert cifar.cache_key(folder) != key


# ----------------------------------------------------------------------------- 2. refused data leaves nothing
def test_cifar_refused_for_its_image_count_writes_no_cache(tmp_path):
    write_fake_cifar(tmp_path)  # 3 images per class; CIFAR-100 has 600
    src = cifar.CifarSource("cifarfs")
    src.set_roots(DataRoots(tmp_path))
    one_line(lambda: src.prepare("test"), "has 3", "600 per class")
    assert cache_files(tmp_path) == []


def test_an_unreadable_image_leaves_no_cache_file(mini, tmp_path):
    folder, splits = mini
    source = mini_source(folder, splits)
    source.listing("val").files[1][7].write_bytes(b"not an image")
    one_line(lambda: source.prepare("val"), "cannot read image")
    assert cache_files(tmp_path) == []


# ----------------------------------------------------------------------------- 3. damaged caches
def test_a_damaged_cache_is_rebuilt_with_one_line_saying_so(mini, tmp_path, monkeypatch, capsys):
    folder, splits = mini
    first = mini_source(folder, splits).images("test").clone()
    npy, _ = cache_paths(mini_source(folder, splits).cache_key("test"))
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF  # a flipped byte: same size, same name
    npy.write_bytes(bytes(raw))
    monkeypatch.setattr(metabench.data, "_VERIFIED", set())  # a new process
    assert inspect_image_cache(npy.stem)[0] is None
    again = mini_source(folder, splits)
    assert torch.equal(again.images("test"), first)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("metabench: warning: cache ") and str(npy) in lines[0] \
        and "SHA-256" in lines[0] and "rebuilding it" in lines[0], lines
    monkeypatch.setattr(metabench.data, "_VERIFIED", set())
    found, problem = inspect_image_cache(npy.stem)
    assert found is not None and problem is None


def test_a_cache_that_does_not_verify_after_its_build_is_refused(tmp_path):
    key = "broken-cache"

    def build_wrong():  # an array whose recorded SHA-256 is not its own (a disk that lies)
        npy, meta = cache_paths(key)
        np.save(npy, np.zeros((2, 1, 4, 4), np.uint8))
        meta.write_text(json.dumps({"classes": ["a"], "sizes": [2], "sha256": "0" * 64, "shape": [2, 1, 4, 4]}))

    one_line(lambda: ensure_image_cache(key, build_wrong), "does not verify right after it was built",
             "refusing to use it", cache_paths(key)[0])


def test_a_cache_key_that_is_not_a_file_name_is_refused():
    for key in ("../outside", "a/b", ".hidden", ""):
        one_line(lambda: ensure_image_cache(key, lambda: pytest.fail("built")), "is not a plain file name")


def test_verification_is_once_per_process_per_file(mini, monkeypatch):
    folder, splits = mini
    key = mini_source(folder, splits).cache_key("train")
    mini_source(folder, splits).prepare("train")
    monkeypatch.setattr(metabench.data, "_VERIFIED", set())
    calls = []
    real = metabench.data._array_sha256
    monkeypatch.setattr(metabench.data, "_array_sha256", lambda a: calls.append(1) or real(a))
    for _ in range(3):
        assert inspect_image_cache(key)[0] is not None
    assert len(calls) == 1


# ----------------------------------------------------------------------------- 4. two builders at once
CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import metabench.data
    from metabench.data import DataRoots
    from metabench_plugins.datasets.miniimagenet import MiniImageNetSource

    built = []
    real = metabench.data.build_image_cache

    def slow_build(*args, **kwargs):  # keep the lock long enough for the other process to wait on it
        built.append(1)
        time.sleep(1.0)
        return real(*args, **kwargs)

    metabench.data.build_image_cache = slow_build
    splits = json.loads({splits!r})
    source = MiniImageNetSource(splits=splits)
    source.set_roots(DataRoots(per_dataset={{"miniimagenet": Path({folder!r})}}))
    source.listing("test")
    Path(sys.argv[1] + ".ready").touch()
    deadline = time.time() + 120
    while not Path({go!r}).exists() and time.time() < deadline:
        time.sleep(0.01)
    found = source.cached("test")
    print(json.dumps({{"built": len(built), "sha256": found.sha256, "path": str(found.path),
                      "sum": int(found.images.sum())}}))
""")


def test_two_processes_building_one_cache_both_get_the_same_verified_cache(mini, tmp_path):
    folder, splits = mini
    go = tmp_path / "go"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests"), splits=json.dumps(splits), folder=str(folder),
                                   go=str(go)))
    env = dict(os.environ, METABENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"child{i}")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"child{i}.ready").exists() for i in range(2)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.02)
    go.touch()  # both start building at once
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    docs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(d["built"] for d in docs) == [0, 1]  # built once; the other waited and opened it
    assert docs[0]["sha256"] == docs[1]["sha256"] and docs[0]["path"] == docs[1]["path"]
    assert docs[0]["sum"] == docs[1]["sum"]
    key = Path(docs[0]["path"]).stem
    assert cache_files(tmp_path) == [f"{key}.json", f"{key}.npy"]  # no lock or temporary file left
    found, problem = inspect_image_cache(key)
    assert found is not None and problem is None and found.sha256 == docs[0]["sha256"]


# ----------------------------------------------------------------------------- 5. tieredImageNet under numpy 2
def test_tiered_pickles_written_again_with_protocol_5_load_the_same_arrays(tmp_path, monkeypatch):
    splits = few(TieredImageNetSource, 2)
    old = write_tiered_pickles(tmp_path / "protocol2", splits)
    new = tmp_path / "protocol5"
    new.mkdir()
    for path in old.iterdir():  # read back and written again as numpy 2 / Python 3.8+ would
        if path.suffix == ".pkl":
            with warnings_off():
                obj = pickle.loads(path.read_bytes(), encoding="latin1")
            (new / path.name).write_bytes(pickle.dumps(obj, protocol=5))
        else:
            (new / path.name).write_bytes(path.read_bytes())
    names = {arg for op, arg, _ in pickletools.genops((new / "test_labels.pkl").read_bytes())
             if op.name in ("SHORT_BINUNICODE", "BINUNICODE")}
    assert "_frombuffer" in names  # protocol 5 rebuilds arrays from their buffers
    if int(np.__version__.split(".")[0]) >= 2:
        assert "numpy._core.numeric" in names
    images = {}
    for folder in (old, new):
        source = TieredImageNetSource(splits=splits)
        source.set_roots(DataRoots(per_dataset={"tieredimagenet": folder}))
        images[folder] = source.images("test").clone()
    assert torch.equal(images[old], images[new])


def test_the_protocol_5_names_do_not_open_the_unpickler_to_code(tmp_path):
    allowed = tieredimagenet._ArraysOnly.ALLOWED
    assert ("numpy._core.numeric", "_frombuffer") in allowed and ("numpy.core.numeric", "_frombuffer") in allowed
    assert not [m for m, _ in allowed if not (m.startswith("numpy") or m in ("_codecs", "collections"))]

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo never",))

    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"label_specific": Payload()}, protocol=5))
    source = TieredImageNetSource()
    one_line(lambda: source.load_pickle(path), "refusing to load")


class warnings_off:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_the_readme_says_which_pickles_are_read():
    readme = (ROOT / "README.md").read_text()
    assert "Only CIFAR-100's and tieredImageNet's\ndocumented pickle formats are unpickled" in readme \
        or "Only CIFAR-100's and tieredImageNet's documented pickle formats are unpickled" in " ".join(readme.split())


# ----------------------------------------------------------------------------- 6. full disk, read-only folders
@pytest.fixture
def doc(tiny_host):
    return execute(RunRequest(learner="toy", task="tiny-3w2s", budget="smoke"), tiny_host)


def test_a_full_disk_during_a_result_write_keeps_the_previous_file(doc, tmp_path, full_disk):
    out = tmp_path / "out"
    previous = write_result(doc, out)
    before = snapshot(out)
    full_disk(free=300)
    message = one_line(lambda: write_result(doc, out), "cannot write", "No space left on device")
    assert str(out) in message and message.split(": ")[0].startswith("cannot write")
    assert snapshot(out) == before and load_result(previous)["per_episode"] == doc["per_episode"]


def test_a_full_disk_during_a_checkpoint_write_keeps_the_one_before(tmp_path, full_disk):
    folder = CheckpointFolder(tmp_path / "run")
    first = folder.write({"step": torch.arange(1000)})
    before = snapshot(tmp_path / "run")
    full_disk(free=2000)
    one_line(lambda: folder.write({"step": torch.arange(100000)}), f"cannot write {tmp_path / 'run'}",
             "checkpoint-000002.pt", "No space left on device")
    assert snapshot(tmp_path / "run") == before and folder.files() == [first]
    assert torch.equal(torch.load(first, weights_only=True)["step"], torch.arange(1000))


def test_a_full_disk_during_a_learner_file_write_leaves_nothing(tmp_path, full_disk):
    full_disk(free=500)
    one_line(lambda: write_learner_file({"state": torch.zeros(10000)}, tmp_path, "run"), "run.learner.pt",
             "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_cache_build_leaves_no_file_and_the_old_one_as_it_was(mini, tmp_path, full_disk):
    folder, splits = mini
    source = mini_source(folder, splits)
    source.prepare("test")
    npy, meta = cache_paths(source.cache_key("test"))
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 1
    npy.write_bytes(bytes(raw))  # damaged: the next load rebuilds it ...
    before = snapshot(tmp_path / "cache")
    metabench.data._VERIFIED.clear()
    full_disk(free=5000, where=lambda path: path.suffix == ".npy")  # ... onto a full disk
    one_line(lambda: mini_source(folder, splits).prepare("test"), f"cannot write {npy}", "No space left on device")
    assert snapshot(tmp_path / "cache") == before  # no partial file, no lock; the old files untouched


def test_a_full_disk_during_a_publish_copies_nothing(tiny_host, doc, tmp_path, full_disk):
    src = write_result(doc, tmp_path / "runs")
    full_disk(free=100)
    one_line(lambda: publish_report([src], tiny_host, tmp_path / "lb"), "cannot write", "No space left")
    assert not [p for p in (tmp_path / "lb").rglob("*") if p.is_file()]


def run_cli(capsys, monkeypatch, out: Path) -> tuple[int, str]:
    monkeypatch.setattr(metabench.plugins, "_HOST", host_with(("tiny", tiny_plugin())))
    code = cli.main(["run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke", "--out", str(out)])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("metabench: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_run_into_a_read_only_out_ends_in_one_line_and_writes_nothing(capsys, monkeypatch, tmp_path, read_only):
    out = read_only(tmp_path / "out")
    code, err = run_cli(capsys, monkeypatch, out)
    line = error_line(err)
    assert code == 2 and f"cannot write {out}" in line and "Permission denied" in line, line
    assert list(out.iterdir()) == []


def test_a_run_whose_result_meets_a_full_disk_ends_in_one_line_and_can_be_resumed(capsys, monkeypatch, tmp_path,
                                                                                     full_disk):
    out = tmp_path / "out"
    full_disk(free=50, where=lambda path: path.suffix == ".json" and path.parent == out)
    code, err = run_cli(capsys, monkeypatch, out)
    line = error_line(err)
    assert code == 2 and f"cannot write {out}" in line and ".json: No space left on device" in line, line
    assert not list(out.glob("*.json")) and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert list((out / "checkpoints").iterdir())  # nothing lost: the finished run's progress is kept


def test_a_read_only_cache_folder_serves_a_valid_cache_and_refuses_to_build_in_one_line(mini, tmp_path, read_only):
    folder, splits = mini
    first = mini_source(folder, splits).images("test").clone()
    cache = read_only(tmp_path / "cache")
    metabench.data._VERIFIED.clear()
    assert torch.equal(mini_source(folder, splits).images("test"), first)  # reading needs no write
    key = mini_source(folder, splits).cache_key("val")
    one_line(lambda: mini_source(folder, splits).prepare("val"), f"cannot write {cache / key}.npy",
             "Permission denied")
    assert not [n for n in cache_files(tmp_path) if key in n]


# ----------------------------------------------------------------------------- 7. one --out, several writers
def test_results_written_at_once_under_one_name_all_keep_their_file(doc, tmp_path):
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: write_result(doc, tmp_path), range(8)))
    assert len(set(paths)) == 8 and sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert all(load_result(p) == json.loads(json.dumps(doc)) for p in paths)


def test_learner_files_written_at_once_under_one_name_all_keep_their_file(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda i: write_learner_file({"state": torch.tensor([i])}, tmp_path, "run"), range(4)))
    assert sorted(p.name for p in paths) == ["run-2.learner.pt", "run-3.learner.pt", "run-4.learner.pt",
                                             "run.learner.pt"]
    assert sorted(int(torch.load(p, weights_only=True)["state"]) for p in paths) == [0, 1, 2, 3]


def test_without_hard_links_names_are_still_claimed_exclusively(doc, tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first, second = write_result(doc, tmp_path), write_result(doc, tmp_path)
    assert first != second and second.name.endswith("-2.json")
    assert load_result(first) == load_result(second)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_publishing_the_same_result_twice_is_idempotent(tiny_host, doc, tmp_path):
    src = write_result(doc, tmp_path / "runs")
    dest = tmp_path / "lb"
    ((target, copied),) = publish_report([src], tiny_host, dest)
    assert copied and target.read_bytes() == src.read_bytes()
    before = snapshot(dest)
    assert publish_report([src], tiny_host, dest) == [(target, False)]
    assert publish_report([src, src], tiny_host, dest) == [(target, False), (target, False)]
    assert snapshot(dest) == before
    fresh = tmp_path / "lb2"
    assert [c for _, c in publish_report([src, src], tiny_host, fresh)] == [True, False]
    assert len([p for p in fresh.rglob("*.json")]) == 1
