"""Your own data set as a task file: a folder of class folders and a small TOML file, no code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import error_line, run_cli
from PIL import Image


SIZES = {"train": (6, 5), "val": (5, 4), "test": (5, 4)}  # classes, images per class


def make_folder(root: Path, layout: str = "splits") -> None:
    rng = np.random.default_rng(0)
    for split, (classes, images) in SIZES.items():
        for c in range(classes):
            name = f"{split}_c{c}"
            folder = root / (f"{split}/{name}" if layout == "splits" else name)
            folder.mkdir(parents=True)
            for i in range(images):
                pixels = np.clip(c * 40 + rng.integers(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    if layout == "classes":
        (root / "split.json").write_text(json.dumps(
            {s: [f"{s}_c{c}" for c in range(n)] for s, (n, _) in SIZES.items()}))


def task_file(tmp_path: Path, extra: str = "", layout: str = "splits") -> Path:
    lines = ['folder = "data"', 'channels = 3', 'image_size = 16', 'ways = 3', 'shots = 1', 'queries = 2',
             'episodes = 5', f'layout = "{layout}"']
    if layout == "classes":
        lines.append('split_file = "data/split.json"')
    path = tmp_path / "mine.toml"
    path.write_text("[task]\n" + "\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "data")
    return tmp_path


cli = run_cli


def run(capsys, path: Path, out: Path, *extra: str) -> tuple[int, str]:
    code, _, err = cli(capsys, "run", "--learner", "protonet", "--task", str(path), "--budget", "smoke",
                       "--set", "train_ways=3", "--set", "train_queries=2", "--backbone", "conv4", "--out", str(out),
                       *extra)
    return code, err


def result(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("layout", ["splits", "classes"])
def test_a_folder_becomes_a_task_with_fixed_episodes(capsys, tmp_path, monkeypatch, layout):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "data", layout)
    path = task_file(tmp_path, layout=layout)
    code, err = run(capsys, path, tmp_path / "a")
    assert code == 0, err
    doc = result(tmp_path / "a")
    assert doc["task"]["name"] == "mine-3w1s" and doc["task"]["episodes"] == 5
    assert len(doc["task"]["data_sha256"]) == 64
    code, err = run(capsys, path, tmp_path / "b")
    assert code == 0, err
    again = result(tmp_path / "b")
    assert again["task"]["episodes_sha256"] == doc["task"]["episodes_sha256"]
    assert again["per_episode"] == doc["per_episode"]


def test_a_changed_folder_is_another_data_set(capsys, data):
    path = task_file(data)
    assert run(capsys, path, data / "a")[0] == 0
    (data / "data" / "test" / "test_c0" / "img0.png").rename(data / "data" / "test" / "test_c0" / "new.png")
    assert run(capsys, path, data / "b")[0] == 0
    assert result(data / "a")["task"]["data_sha256"] != result(data / "b")["task"]["data_sha256"]


def breakers():
    def rm_split(root):
        shutil.rmtree(root / "val")

    def empty_class(root):
        for f in (root / "test" / "test_c1").iterdir():
            f.unlink()

    def short_class(root):
        for f in sorted((root / "test" / "test_c1").iterdir())[:2]:
            f.unlink()

    def few_classes(root):
        for c in (2, 3, 4):
            shutil.rmtree(root / "test" / f"test_c{c}")

    def bad_image(root):
        (root / "train" / "train_c0" / "img0.png").write_bytes(b"not a png")

    return [
        (rm_split, "no split folder", "val"),
        (empty_class, "holds no images", "test_c1"),
        (short_class, "has 2 images; 1 shots + 2 queries need 3", "test_c1"),
        (few_classes, "split 'test' has 2 classes; 3-way episodes need 3", "mine.toml"),
        (bad_image, "cannot read image", "img0.png"),
    ]


@pytest.mark.parametrize("breaker,fragment,path_part", breakers(), ids=lambda x: getattr(x, "__name__", None))
def test_bad_layouts_are_refused_in_one_line(capsys, data, breaker, fragment, path_part):
    breaker(data / "data")
    code, err = run(capsys, task_file(data), data / "out")
    line = error_line(err)
    assert code == 2 and fragment in line and path_part in line, line
    assert not (data / "out").exists() or not list((data / "out").glob("*.json"))


@pytest.mark.parametrize("extra,fragment", [
    ("colour = 3\n", "unknown [task] key(s) colour"),
    ("", None),
])
def test_bad_task_files_are_refused_in_one_line(capsys, data, extra, fragment):
    if fragment is None:
        path = data / "broken.toml"
        path.write_text("[task]\nfolder = \"data\"\nways = 0\nshots = 1\nqueries = 2\n")
        fragment = "ways must be an integer >= 1, got 0"
    else:
        path = task_file(data, extra)
    code, err = run(capsys, path, data / "out")
    assert code == 2 and fragment in error_line(err)
    code, err = run(capsys, data / "nothere.toml", data / "out")
    assert code == 2 and "no such task file" in error_line(err)


def test_publish_takes_a_task_files_result_and_refuses_it_once_the_folder_changed(capsys, data):
    path = task_file(data)
    assert run(capsys, path, data / "a")[0] == 0
    (result_path,) = (data / "a").glob("*.json")
    assert json.loads(result_path.read_text())["task"]["task_file"] == str(path)
    board = data / "board"
    code, out, err = cli(capsys, "publish", str(result_path), "--to", str(board))
    assert code == 0, err
    assert len(list(board.glob("mine-3w1s/protonet/*.json"))) == 1
    (data / "data" / "test" / "test_c0" / "img0.png").rename(data / "data" / "test" / "test_c0" / "other.png")
    assert run(capsys, path, data / "b")[0] == 0
    (stale,) = [p for p in (data / "a").glob("*.json")]
    shutil.rmtree(board)
    code, _, err = cli(capsys, "publish", str(stale), "--to", str(board))
    assert code == 2 and "made from another copy of the data of mine-3w1s" in error_line(err)
    assert not board.exists() or not list(board.rglob("*.json"))


def write_groups(root: Path, mapping: dict) -> None:
    (root / "groups.json").write_text(json.dumps(mapping))


def three_and_three() -> dict:
    """Per split, classes c0-c2 in group "a" and c3-c5 in "b" (val and test have c0-c4: "b" has 2)."""
    return {f"{s}_c{c}": ("a" if c < 3 else "b") for s, (n, _) in SIZES.items() for c in range(n)}


def test_a_groups_file_makes_fine_grained_episodes(data):
    from metabench.episodes import TrainSampler, episodes_sha256, eval_draws
    from metabench.task_file import load_task_file

    write_groups(data, three_and_three())
    protocol, source = load_task_file(task_file(data, 'groups = "groups.json"'))
    plain_protocol, plain_source = load_task_file(task_file(data))
    assert protocol.data_sha256 != plain_protocol.data_sha256  # the groups are part of the data's identity
    draws = eval_draws(protocol, source, "test", 5)
    names = source.listing("test").classes
    assert all(sorted(names[c] for c in d.classes) == ["test_c0", "test_c1", "test_c2"] for d in draws)
    assert episodes_sha256(draws) != episodes_sha256(eval_draws(plain_protocol, plain_source, "test", 5))
    sampler = TrainSampler(protocol, source, 0)
    groups = source.class_groups("train")
    assert all(len({groups[c] for c in sampler.draw().classes}) == 1 for _ in range(10))


@pytest.mark.parametrize("mapping, fragment", [
    ({"nope": "a"}, "names 1 class(es) that no split has, e.g. 'nope'"),
    ({"train_c0": "a"}, "no group of split 'train' has 3 classes"),
    ({"train_c0": 3}, "must map class folder names to group names"),
    ([], "must map class folder names to group names"),
])
def test_bad_groups_files_are_refused_in_one_line(capsys, data, mapping, fragment):
    write_groups(data, mapping)
    code, err = run(capsys, task_file(data, 'groups = "groups.json"'), data / "out")
    assert code == 2 and fragment in error_line(err), err
    assert not (data / "out").exists()


def test_a_run_on_a_grouped_task_file_records_the_groups(capsys, data):
    write_groups(data, three_and_three())
    code, err = run(capsys, task_file(data, 'groups = "groups.json"'), data / "out")
    assert code == 0, err
    assert result(data / "out")["task"]["data_sha256"]
