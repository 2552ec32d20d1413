"""Bad input, as a table: every row is refused with exit status 2 and one line
``metabench: error: ...`` naming what was wrong and what is accepted, no traceback, and nothing
written or changed (the ``--out`` folders, the cache folder, the working folder and every input file
are compared before and after: paths, sizes, modification times, bytes).

Rows run ``metabench.cli.main`` in this process on a host with the installed plugins, the tiny task
of ``conftest.py`` and :class:`BadInputPlugin`; a few run the console command in a real process to
show that no traceback reaches stderr there either. The inputs to corrupt (result files, a learner
file, a run's checkpoint folder, an image folder) are made once per session by real runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import metabench.plugins
from metabench import Protocol, hookimpl
from metabench.cli import main

from _doubles import ZeroLogits
from conftest import TinySource, host_with, tiny_plugin


# ----------------------------------------------------------------------------- the test plugin

class WrongShape(ZeroLogits):
    """Trains (nothing), then predicts logits of the wrong shape: its run fails in evaluation and
    keeps what ``--resume`` continues from (run.pt, evaluation.pt)."""


class BadInputPlugin:
    """The wrong-shape learner and two tasks the tiny data cannot serve: more ways than a split has
    classes (20 of 12), more shots + queries than a class has images (8 + 5 of 10)."""

    @hookimpl
    def metabench_register_learners(self, register):
        register("wrongshape", WrongShape)

    @hookimpl
    def metabench_register_tasks(self, register):
        source = TinySource()
        register(Protocol(name="tiny-20w1s", version=1, dataset="tiny", ways=20, shots=1, queries=1, episodes=5,
                          image_size=16), source)
        register(Protocol(name="tiny-3w8s", version=1, dataset="tiny", ways=3, shots=8, queries=5, episodes=5,
                          image_size=16), source)


# ----------------------------------------------------------------------------- the session's inputs

@dataclass(frozen=True)
class World:
    """Inputs made once: ``res/{a,b,c,one}.json`` (a: toy on 6 tiny episodes, with its curve and
    learner file; b: another seed; c: 4 episodes, another episode set; one: 1 episode), ``ck/``
    (the out folder of a run that failed in evaluation: its checkpoints), ``data/`` (an image folder
    for task files: 6/5/5 classes of 5/4/4 images)."""

    base: Path
    host: object


SIZES = {"train": (6, 5), "val": (5, 4), "test": (5, 4)}  # classes, images per class


def make_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, (classes, images) in SIZES.items():
        for c in range(classes):
            folder = root / split / f"{split}_c{c}"
            folder.mkdir(parents=True)
            for i in range(images):
                pixels = np.clip(c * 40 + rng.integers(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")


def _cli(*argv: str) -> tuple[int, str]:
    """``metabench ARGV`` in this process, stdout and stderr swallowed: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("bad-input-world")
    host = host_with(("tiny", tiny_plugin()), ("badinput", BadInputPlugin()))
    assert host.errors == []
    runs = {"a": ["--episodes", "6"], "b": ["--episodes", "6", "--seed", "1", "--no-save"],
            "c": ["--episodes", "4", "--no-save"], "one": ["--episodes", "1", "--no-save"]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metabench.plugins, "_HOST", host)
        mp.setenv("METABENCH_CACHE", str(base / "cache"))
        (base / "res").mkdir()
        for name, extra in runs.items():
            code, err = _cli("run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke",
                             "--out", str(base / "runs" / name), *extra)
            assert code == 0, err
            (made,) = (base / "runs" / name).glob("*.json")
            for path in (base / "runs" / name).iterdir():
                shutil.copy(path, base / "res" / (name + path.name[len(made.stem):]))
        code, err = _cli("run", "--learner", "wrongshape", "--task", "tiny-3w2s", "--budget", "smoke",
                         "--episodes", "3", "--out", str(base / "ck"))
        assert code == 1 and "predict returned" in err, err
    shutil.rmtree(base / "runs")
    make_image_folder(base / "data")
    return World(base, host)


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` (``@T``: this case's folder, ``@W``: the session's inputs), the
    fragments its error line must hold (what was wrong, what is accepted), and ``setup(tmp, world)``
    making its input files."""

    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    setup: Callable[[Path, Path], None] | None = None
    skip: str | None = None


def case(id: str, argv, *expect: str, setup=None, skip=None) -> Case:
    return Case(id, tuple(argv), expect, setup, skip)


def fill(text: str, tmp: Path, base: Path) -> str:
    return text.replace("@T", str(tmp)).replace("@W", str(base))


def files(**texts: str):
    """Write each file ``tmp/name`` with ``@T``/``@W`` filled in."""
    def setup(tmp: Path, base: Path) -> None:
        for name, text in texts.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(fill(text, tmp, base))
    return setup


def raw(name: str, make: Callable[[Path], bytes]):
    """Write ``tmp/name`` with the bytes ``make(world base)`` gives."""
    def setup(tmp: Path, base: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make(base))
    return setup


def edited(name: str, change: Callable[[dict], None], source: str = "a"):
    """``tmp/name``: the session's result ``source`` edited by hand (``change(doc)``)."""
    def make(base: Path) -> bytes:
        doc = json.loads((base / "res" / f"{source}.json").read_text())
        change(doc)
        return json.dumps(doc, indent=1).encode()
    return raw(name, make)


def copied(name: str, source: str):
    """``tmp/name``: a copy of the session's ``source`` (a file or a folder)."""
    def setup(tmp: Path, base: Path) -> None:
        src, dst = base / source, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return setup


def chain(*setups):
    """The setups one after the other."""
    def setup(tmp: Path, base: Path) -> None:
        for s in setups:
            s(tmp, base)
    return setup


def halved(source: str) -> Callable[[Path], bytes]:
    return lambda base: (base / source).read_bytes()[: (base / source).stat().st_size // 2]


def torch_bytes(obj) -> Callable[[Path], bytes]:
    def make(base: Path) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()
    return make


def learner_file_with(change: Callable[[dict], None]) -> Callable[[Path], bytes]:
    def make(base: Path) -> bytes:
        doc = torch.load(base / "res" / "a.learner.pt", weights_only=True)
        change(doc)
        return torch_bytes(doc)(base)
    return make


def set_path(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[key]
    doc[last] = value


def with_(**changes):
    """A result edit setting dotted keys (``summary__mean`` is ``summary.mean``)."""
    return lambda doc: [set_path(doc, k.replace("__", "."), v) for k, v in changes.items()]


def in_checkpoints(name: str, make: Callable[[Path], bytes]):
    """Write ``name`` into the run folder of ``tmp/ck`` (a copy of the session's failed run)."""
    def setup(tmp: Path, base: Path) -> None:
        (folder,) = (tmp / "ck" / "checkpoints").iterdir()
        (folder / name).write_bytes(make(base / "ck" / "checkpoints" / folder.name))
    return setup


RUN = ("run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke", "--episodes", "3", "--out", "@T/out")
CONFIG = RUN + ("--config", "@T/c.toml")
TASK = ("run", "--learner", "protonet", "--task", "@T/mine.toml", "--budget", "smoke", "--episodes", "2",
        "--set", "train_ways=3", "--set", "train_queries=2", "--out", "@T/out")
TASK_LINES = 'channels = 3\nimage_size = 16\nways = 3\nshots = 1\nqueries = 2\nepisodes = 5\n'
RESUME = ("run", "--learner", "wrongshape", "--task", "tiny-3w2s", "--budget", "smoke", "--episodes", "3",
          "--out", "@T/ck", "--resume")
EVAL = ("eval", "--out", "@T/out")
PUBLISH = ("publish", "--to", "@T/board")
BUILD = ("leaderboard", "build", "--out", "@T/lb", "--results", "@T/res")
PLOT = ("plot", "@T/r.json")
SWEEP = ("sweep", "@T/grid.toml", "--out", "@T/sw")
GRID = 'learners = ["toy"]\ntasks = ["tiny-3w2s"]\nbudgets = ["smoke"]\n'
CUDA = "this machine has CUDA" if torch.cuda.is_available() else None


def task_file(body: str, folder: str = "@W/data"):
    return files(**{"mine.toml": f'[task]\nfolder = "{folder}"\n{body}'})


def broken_data(breaker: Callable[[Path], None], body: str = TASK_LINES):
    """A copy of the session's image folder, broken by ``breaker(folder)``, and a task file naming it."""
    def setup(tmp: Path, base: Path) -> None:
        shutil.copytree(base / "data", tmp / "data")
        breaker(tmp / "data")
    return chain(setup, task_file(body, "data"))


def garbage_image(data: Path) -> None:
    (data / "train" / "train_c0" / "img0.png").write_bytes(b"not a png")


def truncated_image(data: Path) -> None:
    path = data / "train" / "train_c2" / "img1.png"
    path.write_bytes(path.read_bytes()[:40])


def empty_class(data: Path) -> None:
    for f in (data / "test" / "test_c1").iterdir():
        f.unlink()


def no_val(data: Path) -> None:
    shutil.rmtree(data / "val")


def one_sha(doc: dict) -> None:
    doc["task"]["episodes_sha256"] = hashlib.sha256(b"another episode set").hexdigest()


def _same_sha(path: Path, like: Path) -> None:
    """Give the result at ``path`` the episode hash of ``like`` (a hand edit: two lengths, one hash)."""
    doc = json.loads(path.read_text())
    doc["task"]["episodes_sha256"] = json.loads(like.read_text())["task"]["episodes_sha256"]
    path.write_text(json.dumps(doc, indent=1))


CASES = [
    # names: unknown learner / task / backbone / launcher, with a suggestion
    case("unknown-learner", RUN + ("--learner", "protonett"), "unknown learner 'protonett'", "did you mean 'protonet'"),
    case("unknown-task", RUN + ("--task", "tiny-3w9s"), "unknown task 'tiny-3w9s'; did you mean", "'tiny-3w2s'"),
    case("unknown-backbone", RUN + ("--backbone", "conv5"), "unknown backbone 'conv5'", "did you mean 'conv4'"),
    case("unknown-launcher", ("sweep", "--learners", "toy", "--tasks", "tiny-3w2s", "--launcher", "locl", "--out",
                              "@T/sw"), "unknown launcher 'locl'", "did you mean 'local'"),
    case("unknown-command", ("runn",), "invalid choice: 'runn'", "'run'"),
    case("missing-learner-option", ("run", "--task", "tiny-3w2s", "--out", "@T/out"),
         "the following arguments are required: --learner", "metabench run --help"),
    # --set
    case("set-unknown-key", RUN + ("--set", "stepz=3"), "has no setting 'stepz'", "accepted: steps, scale"),
    case("set-wrong-type", RUN + ("--set", "steps=three"), "steps: expected int, got 'three'"),
    case("set-no-equals", RUN + ("--set", "steps"), "--set 'steps'", "expected key=value"),
    case("set-empty-key", RUN + ("--set", "=3"), "--set '=3'", "expected key=value"),
    case("set-backbone-unknown", RUN + ("--set", "backbone.depth=3"), "no option 'depth'", "accepted: width"),
    case("set-backbone-type", RUN + ("--set", "backbone.width=wide"), "backbone.width: expected int, got 'wide'"),
    case("set-out-of-bounds", RUN + ("--learner", "protonet", "--set", "lr=-1"), "lr must be a number > 0, got -1.0"),
    case("set-more-ways-than-classes", RUN + ("--learner", "protonet", "--set", "train_ways=13"),
         "13-way episodes need 13 classes", "split 'train' has 12"),
    case("set-shots-above-class-size", RUN + ("--learner", "protonet", "--set", "train_shots=10"),
         "has 10 examples", "10 shots + 2 queries need 12"),
    # counts, seeds, budgets, devices, checkpoints
    case("episodes-zero", RUN + ("--episodes", "0"), "--episodes 0", "must be a positive integer"),
    case("episodes-negative", RUN + ("--episodes", "-4"), "--episodes -4", "must be a positive integer"),
    case("episodes-not-a-number", RUN + ("--episodes", "many"), "--episodes", "invalid int value: 'many'"),
    case("seed-not-a-number", RUN + ("--seed", "abc"), "--seed", "invalid int value: 'abc'"),
    case("seed-negative", RUN + ("--seed", "-1"), "--seed -1", "accepted: an integer from 0 to"),
    case("seed-too-large", RUN + ("--seed", str(2**70)), f"--seed {2**70}", "accepted: an integer from 0 to"),
    case("budget-unknown", RUN + ("--budget", "huge"), "invalid choice: 'huge'", "'smoke', 'quick', 'paper'"),
    case("device-cuda-without-cuda", RUN + ("--device", "cuda"), "no CUDA device is available", "--device cpu",
         skip=CUDA),
    case("device-unknown", RUN + ("--device", "tpu"), "--device 'tpu'", "accepted: cpu, cuda, cuda:N"),
    case("device-malformed-cuda", RUN + ("--device", "cuda:x"), "--device 'cuda:x'", "accepted: cpu, cuda, cuda:N"),
    case("checkpoint-every-zero", RUN + ("--checkpoint-every", "0"), "--checkpoint-every '0'",
         "accepted: a number of steps (100), a duration (30s, 10m, 2h) or off"),
    case("checkpoint-every-negative", RUN + ("--checkpoint-every", "-5"), "--checkpoint-every '-5'", "or off"),
    case("checkpoint-every-unit", RUN + ("--checkpoint-every", "10x"), "--checkpoint-every '10x'", "or off"),
    case("validate-every-negative", RUN + ("--validate-every", "-1"), "validation every", "non-negative integer"),
    case("validation-episodes-zero", RUN + ("--validate-every", "1", "--validation-episodes", "0"),
         "validation episodes", "at least 1"),
    case("out-is-a-file", RUN + ("--out", "@T/taken"), "--out @T/taken: exists and is not a folder",
         setup=files(taken="keep me")),
    # tasks that the data cannot serve
    case("task-more-ways-than-classes", RUN + ("--task", "tiny-20w1s"), "20-way", "has 12"),
    case("task-shots-queries-above-class-size", RUN + ("--task", "tiny-3w8s"), "8 shots + 5 queries need 13",
         "has 10"),
    # data folders of registered data sets
    case("data-root-missing", ("run", "--learner", "protonet", "--task", "cub-5w1s", "--budget", "smoke",
                               "--data-root", "cub=@T/nope", "--out", "@T/out"), "@T/nope does not exist",
         "expected"),
    case("data-root-empty", ("run", "--learner", "protonet", "--task", "omniglot-5w1s", "--budget", "smoke",
                             "--data-root", "@T/empty", "--out", "@T/out"), "not found under @T/empty",
         "images_background", setup=lambda tmp, base: (tmp / "empty").mkdir()),
    # --config
    case("config-missing", CONFIG, "--config @T/c.toml: no such file"),
    case("config-invalid-toml", CONFIG, "invalid TOML", setup=files(**{"c.toml": "[learner\n"})),
    case("config-unknown-table", CONFIG, "unknown entry 'trainer'", "accepted tables: [run], [learner]",
         setup=files(**{"c.toml": "[trainer]\nx = 1\n"})),
    case("config-not-a-table", CONFIG, "'run' must be a table", setup=files(**{"c.toml": "run = 3\n"})),
    case("config-unknown-run-key", CONFIG, "unknown [run] key 'learner_rate'", "accepted: task, backbone, seed",
         setup=files(**{"c.toml": "[run]\nlearner_rate = 1\n"})),
    case("config-run-seed-type", CONFIG, "[run] seed must be an integer, got 'zero'",
         setup=files(**{"c.toml": "[run]\nseed = 'zero'\n"})),
    case("config-run-episodes-type", CONFIG, "[run] episodes must be an integer, got '5'",
         setup=files(**{"c.toml": "[run]\nepisodes = '5'\n"})),
    case("config-run-episodes-zero", ("run", "--learner", "toy", "--task", "tiny-3w2s", "--out", "@T/out",
                                      "--config", "@T/c.toml"), "--episodes 0", "must be a positive integer",
         setup=files(**{"c.toml": "[run]\nepisodes = 0\n"})),
    case("config-run-budget", ("run", "--learner", "toy", "--task", "tiny-3w2s", "--out", "@T/out", "--config",
                               "@T/c.toml"), "--budget 'huge'", "accepted: smoke, quick, paper",
         setup=files(**{"c.toml": "[run]\nbudget = 'huge'\n"})),
    case("config-learner-type", CONFIG, "[learner]: steps: expected int, got 'many'",
         setup=files(**{"c.toml": "[learner]\nsteps = 'many'\n"})),
    case("config-learner-unknown-key", CONFIG, "has no setting 'stepz'", "accepted: steps, scale",
         setup=files(**{"c.toml": "[learner]\nstepz = 1\n"})),
    case("config-backbone-type", CONFIG, "backbone.width: expected int, got 'wide'",
         setup=files(**{"c.toml": "[backbone]\nwidth = 'wide'\n"})),
    case("config-data-type", CONFIG, "[data] cub: expected a folder path",
         setup=files(**{"c.toml": "[data]\ncub = 3\n"})),
    case("config-validation-type", CONFIG, "validation every must be a non-negative integer, got 'often'",
         setup=files(**{"c.toml": "[validation]\nevery = 'often'\n"})),
    # task files
    case("taskfile-missing", TASK, "@T/mine.toml: no such task file"),
    case("taskfile-is-a-folder", TASK, "is a folder; expected a task file",
         setup=lambda tmp, base: (tmp / "mine.toml").mkdir()),
    case("taskfile-invalid-toml", TASK, "invalid TOML", setup=files(**{"mine.toml": "[task\n"})),
    case("taskfile-not-utf8", TASK, "@T/mine.toml: cannot read", setup=raw("mine.toml", lambda b: b"\xff\xfe[task]")),
    case("taskfile-unknown-table", TASK, "a task file holds one [task] table; found 'tasks'",
         setup=files(**{"mine.toml": "[tasks]\nways = 3\n"})),
    case("taskfile-unknown-key", TASK, "unknown [task] key(s) colour", "accepted: channels, dataset",
         setup=task_file(TASK_LINES + "colour = 3\n")),
    case("taskfile-no-folder", TASK, 'needs folder = "<path to the images>"',
         setup=files(**{"mine.toml": "[task]\n" + TASK_LINES})),
    case("taskfile-ways-zero", TASK, "ways must be an integer >= 1, got 0",
         setup=task_file(TASK_LINES.replace("ways = 3", "ways = 0"))),
    case("taskfile-ways-text", TASK, "ways must be an integer >= 1, got '3'",
         setup=task_file(TASK_LINES.replace("ways = 3", "ways = '3'"))),
    case("taskfile-shots-negative", TASK, "shots must be an integer >= 1, got -1",
         setup=task_file(TASK_LINES.replace("shots = 1", "shots = -1"))),
    case("taskfile-queries-zero", TASK, "queries must be an integer >= 1, got 0",
         setup=task_file(TASK_LINES.replace("queries = 2", "queries = 0"))),
    case("taskfile-episodes-zero", TASK, "episodes must be an integer >= 1, got 0",
         setup=task_file(TASK_LINES.replace("episodes = 5", "episodes = 0"))),
    case("taskfile-episodes-negative", TASK, "episodes must be an integer >= 1, got -5",
         setup=task_file(TASK_LINES.replace("episodes = 5", "episodes = -5"))),
    case("taskfile-image-size", TASK, "image_size must be an integer >= 8, got 4",
         setup=task_file(TASK_LINES.replace("image_size = 16", "image_size = 4"))),
    case("taskfile-channels", TASK, "channels must be 1 or 3, got 2",
         setup=task_file(TASK_LINES.replace("channels = 3", "channels = 2"))),
    case("taskfile-layout", TASK, "layout 'flat'", "accepted: splits, classes",
         setup=task_file(TASK_LINES + 'layout = "flat"\n')),
    case("taskfile-dataset-path", TASK, "dataset must be a plain lowercase name", "'../evil'",
         setup=task_file(TASK_LINES + 'dataset = "../evil"\n')),
    case("taskfile-more-ways-than-classes", TASK, "split 'val' has 5 classes", "6-way episodes need 6",
         setup=task_file(TASK_LINES.replace("ways = 3", "ways = 6"))),
    case("taskfile-shots-queries-above-class-size", TASK, "has 4 images", "3 shots + 2 queries need 5",
         setup=task_file(TASK_LINES.replace("shots = 1", "shots = 3"))),
    case("taskfile-folder-missing", TASK, "data folder @T/nope does not exist", "expected folder/{train,val,test}",
         setup=task_file(TASK_LINES, "@T/nope")),
    case("taskfile-folder-is-a-file", TASK, "data folder @T/file is not a folder", "expected folder/{train,val,test}",
         setup=chain(files(file="x"), task_file(TASK_LINES, "@T/file"))),
    case("taskfile-folder-empty", TASK, "no split folder @T/empty/train",
         setup=chain(lambda tmp, base: (tmp / "empty").mkdir(), task_file(TASK_LINES, "@T/empty"))),
    case("taskfile-no-val-split", TASK, "no split folder @T/data/val", setup=broken_data(no_val)),
    case("taskfile-empty-class", TASK, "test_c1 holds no images", "(.jpg, .jpeg, .png)",
         setup=broken_data(empty_class)),
    case("taskfile-unreadable-image", TASK, "cannot read image", "img0.png", setup=broken_data(garbage_image)),
    case("taskfile-truncated-image", TASK, "cannot read image", "img1.png", setup=broken_data(truncated_image)),
    case("taskfile-split-file-missing", TASK, "split file @T/split.json does not exist",
         setup=task_file(TASK_LINES + 'layout = "classes"\nsplit_file = "split.json"\n', "@W/data/train")),
    case("taskfile-split-file-invalid", TASK, "split file @T/split.json is not valid JSON",
         setup=chain(files(**{"split.json": "{"}),
                     task_file(TASK_LINES + 'layout = "classes"\nsplit_file = "split.json"\n', "@W/data/train"))),
    case("taskfile-split-file-repeats", TASK, "a class is listed twice",
         setup=chain(files(**{"split.json": json.dumps({"train": ["train_c0", "train_c1"], "val": ["train_c1"],
                                                        "test": ["train_c2"]})}),
                     task_file(TASK_LINES + 'layout = "classes"\nsplit_file = "split.json"\n', "@W/data/train"))),
    # --resume and checkpoints
    case("resume-nothing", RUN + ("--resume",), "--resume: no checkpoint to continue in @T/out/checkpoints"),
    case("resume-another-run", RESUME + ("--seed", "1"), "no checkpoint of this run", "differs: seed 0",
         setup=copied("ck", "ck")),
    case("resume-truncated-checkpoint", RESUME, "checkpoint-000001.pt: not a readable metabench checkpoint",
         "corrupt or truncated",
         setup=chain(copied("ck", "ck"),
                     in_checkpoints("checkpoint-000001.pt", lambda f: (f / "run.pt").read_bytes()[:99]))),
    case("resume-garbage-checkpoint", RESUME, "checkpoint-000002.pt: not a readable metabench checkpoint",
         setup=chain(copied("ck", "ck"), in_checkpoints("checkpoint-000002.pt", lambda f: b"\0" * 64))),
    case("resume-foreign-checkpoint", RESUME, "checkpoint-000001.pt: not a metabench checkpoint",
         setup=chain(copied("ck", "ck"), in_checkpoints("checkpoint-000001.pt", lambda f: torch_bytes({"x": 1})(f)))),
    case("resume-truncated-run-file", RESUME, "run.pt: not a readable metabench run file",
         setup=chain(copied("ck", "ck"), in_checkpoints("run.pt", lambda f: (f / "run.pt").read_bytes()[:200]))),
    case("resume-truncated-evaluation", RESUME, "evaluation.pt: not a readable metabench evaluation progress file",
         setup=chain(copied("ck", "ck"),
                     in_checkpoints("evaluation.pt", lambda f: (f / "evaluation.pt").read_bytes()[:300]))),
    case("fresh-run-over-checkpoints", RESUME[:-1], "holds checkpoints of this run", "add --resume to continue it",
         setup=copied("ck", "ck")),
    # learner files (metabench eval)
    case("eval-missing", EVAL + ("@T/x.learner.pt",), "@T/x.learner.pt: no such saved learner file"),
    case("eval-folder", EVAL + ("@T",), "is a folder; expected a saved learner file (*.learner.pt)"),
    case("eval-truncated", EVAL + ("@T/x.learner.pt",), "not a readable saved learner file (corrupt or truncated",
         setup=raw("x.learner.pt", halved("res/a.learner.pt"))),
    case("eval-garbage", EVAL + ("@T/x.learner.pt",), "not a readable saved learner file",
         setup=raw("x.learner.pt", lambda b: b"PK\x03\x04 not really a zip")),
    case("eval-not-a-learner", EVAL + ("@T/x.learner.pt",), "not a saved metabench learner (no format",
         setup=raw("x.learner.pt", torch_bytes({"format": "something else"}))),
    case("eval-newer-format", EVAL + ("@T/x.learner.pt",), "learner file format 99", "reads (1)",
         setup=raw("x.learner.pt", learner_file_with(lambda d: d.update(format_version=99)))),
    case("eval-damaged", EVAL + ("@T/x.learner.pt",), "damaged learner file (missing state)",
         setup=raw("x.learner.pt", learner_file_with(lambda d: d.pop("state")))),
    case("eval-learner-not-installed", EVAL + ("@T/x.learner.pt",), "learner 'nosuch'", "is not installed here",
         setup=raw("x.learner.pt", learner_file_with(lambda d: d["learner"].update(name="nosuch")))),
    case("eval-unknown-task", EVAL + ("@W/res/a.learner.pt", "--task", "tiny-3w3s"), "unknown task 'tiny-3w3s'",
         "did you mean"),
    case("eval-other-problem", EVAL + ("@W/res/a.learner.pt", "--task", "sinusoid-5s"),
         "was trained on classification task 'tiny-3w2s'", "'sinusoid-5s' is regression"),
    case("eval-episodes-zero", EVAL + ("@W/res/a.learner.pt", "--episodes", "0"), "--episodes 0",
         "must be a positive integer"),
    case("eval-device", EVAL + ("@W/res/a.learner.pt", "--device", "tpu"), "accepted: cpu, cuda, cuda:N"),
    # result files (metabench compare)
    case("compare-missing", ("compare", "@W/res/a.json", "@T/r.json"), "@T/r.json: no such result file"),
    case("compare-invalid-json", ("compare", "@W/res/a.json", "@T/r.json"), "not a metabench result (invalid JSON",
         setup=files(**{"r.json": "{oops"})),
    case("compare-truncated", ("compare", "@W/res/a.json", "@T/r.json"), "@T/r.json: not a metabench result",
         setup=raw("r.json", halved("res/a.json"))),
    case("compare-not-utf8", ("compare", "@W/res/a.json", "@T/r.json"), "@T/r.json: cannot read",
         setup=raw("r.json", lambda b: b"\xff\xfe{}")),
    case("compare-nested-too-deep", ("compare", "@W/res/a.json", "@T/r.json"), "JSON nested too deeply",
         setup=raw("r.json", lambda b: b"[" * 100000 + b"]" * 100000)),
    case("compare-not-an-object", ("compare", "@W/res/a.json", "@T/r.json"), "result must be an object",
         setup=files(**{"r.json": "[]"})),
    case("compare-edited-summary", ("compare", "@W/res/a.json", "@T/r.json"),
         "summary.mean 0.99 is not the mean of per_episode", setup=edited("r.json", with_(summary__mean=0.99))),
    case("compare-edited-episode", ("compare", "@W/res/a.json", "@T/r.json"), "is not the mean of per_episode",
         setup=edited("r.json", lambda d: d["per_episode"].__setitem__(0, d["per_episode"][0] / 2 + 0.01))),
    case("compare-edited-std", ("compare", "@W/res/a.json", "@T/r.json"), "summary.std 0.5 is not the std",
         setup=edited("r.json", with_(summary__std=0.5))),
    case("compare-edited-count", ("compare", "@W/res/a.json", "@T/r.json"), "per_episode has 6 values",
         "summary.n is 7", setup=edited("r.json", with_(summary__n=7))),
    case("compare-episode-not-a-number", ("compare", "@W/res/a.json", "@T/r.json"),
         "per_episode must hold finite numbers",
         setup=edited("r.json", lambda d: d["per_episode"].__setitem__(2, "0.5"))),
    case("compare-episode-huge", ("compare", "@W/res/a.json", "@T/r.json"), "per_episode must hold finite numbers",
         setup=edited("r.json", lambda d: d["per_episode"].__setitem__(2, 10**400))),
    case("compare-episode-nan", ("compare", "@W/res/a.json", "@T/r.json"), "per_episode must hold finite numbers",
         setup=edited("r.json", lambda d: d["per_episode"].__setitem__(2, float("nan")))),
    case("compare-wrong-type", ("compare", "@W/res/a.json", "@T/r.json"), "task.episodes should be int, got str",
         setup=edited("r.json", with_(task__episodes="6"))),
    case("compare-bad-hash", ("compare", "@W/res/a.json", "@T/r.json"), "task.episodes_sha256 'abc'",
         "64 lowercase hex digits", setup=edited("r.json", with_(task__episodes_sha256="abc"))),
    case("compare-path-in-name", ("compare", "@W/res/a.json", "@T/r.json"), "task.name '../../evil-3w2s'",
         "a task name like 'kanji-5w1s'", setup=edited("r.json", with_(task__name="../../evil-3w2s"))),
    case("compare-schema-version", ("compare", "@W/res/a.json", "@T/r.json"), "schema_version 99 is not supported",
         setup=edited("r.json", with_(schema_version=99))),
    case("compare-different-episode-sets", ("compare", "@W/res/a.json", "@W/res/c.json"),
         "cannot pair results on different episode sets", "6 episodes", "4 episodes"),
    case("compare-different-tasks", ("compare", "@W/res/a.json", "@T/r.json"),
         "cannot pair results of different tasks: tiny-3w2s v1 vs tiny-3w3s v1",
         setup=edited("r.json", with_(task__name="tiny-3w3s"))),
    case("compare-one-episode", ("compare", "@W/res/one.json", "@W/res/one.json"), "results of 1 episode",
         "need at least 2 episodes"),
    # publish
    case("publish-edited-summary", PUBLISH + ("@T/r.json",), "summary.mean 0.5 is not the mean",
         setup=edited("r.json", with_(summary__mean=0.5))),
    case("publish-other-episode-set", PUBLISH + ("@T/r.json",), "refused: episodes_sha256",
         "is not the hash of the first 6 test episodes of tiny-3w2s v1", setup=edited("r.json", one_sha)),
    case("publish-unknown-task", PUBLISH + ("@T/r.json",), "refused: unknown task 'nosuch-3w2s'",
         setup=edited("r.json", with_(task__name="nosuch-3w2s"))),
    case("publish-same-run-twice", PUBLISH + ("@W/res/a.json", "@T/r.json"), "refused: the same run as",
         setup=edited("r.json", with_(timing__eval_s=99.0))),
    case("publish-missing", PUBLISH + ("@W/res/a.json", "@T/r.json"), "@T/r.json: refused: no such result file"),
    # leaderboard build
    case("leaderboard-no-results-folder", BUILD, "results folder @T/res does not exist"),
    case("leaderboard-edited-summary", BUILD, "summary.ci95 0.001 is not the ci95 of per_episode",
         setup=chain(copied("res/a.json", "res/a.json"), edited("res/r.json", with_(summary__ci95=0.001), "b"))),
    case("leaderboard-corrupt-result", BUILD, "@T/res/r.json: not a metabench result (invalid JSON",
         setup=chain(copied("res/a.json", "res/a.json"), raw("res/r.json", halved("res/b.json")))),
    case("leaderboard-path-in-task-name", BUILD, "task.name '../escape-3w2s' is not a task name",
         setup=edited("res/r.json", with_(task__name="../escape-3w2s"))),
    case("leaderboard-same-seed-twice", BUILD, "for seed 0 on the same episodes", "keep one",
         setup=chain(copied("res/a.json", "res/a.json"), copied("res/r.json", "res/a.json"))),
    case("leaderboard-episode-sets-differ", BUILD, "results of one episode set differ in length",
         setup=chain(copied("res/a.json", "res/a.json"),
                     edited("res/r.json", lambda d: d.update(seed=1), "c"),
                     lambda tmp, base: _same_sha(tmp / "res" / "r.json", base / "res" / "a.json"))),
    case("leaderboard-published-missing", BUILD + ("--published", "@T/p.toml"), "--published @T/p.toml: no such file",
         setup=copied("res/a.json", "res/a.json")),
    case("leaderboard-published-malformed", BUILD + ("--published", "@T/p.toml"), "[[result]] #1: missing source",
         setup=chain(copied("res/a.json", "res/a.json"),
                     files(**{"p.toml": '[[result]]\nlearner = "toy"\ntask = "tiny-3w2s"\nvalue = 50\n'}))),
    # plot
    case("plot-missing", PLOT, "@T/r.json: no such result file"),
    case("plot-edited", PLOT, "summary.mean 0.5 is not the mean",
         setup=chain(edited("r.json", with_(summary__mean=0.5)), copied("r.curve.jsonl", "res/a.curve.jsonl"))),
    case("plot-no-curve", PLOT, "no training curve beside it", "expected @T/r.curve.jsonl",
         setup=copied("r.json", "res/a.json")),
    case("plot-corrupt-curve", PLOT, "@T/r.curve.jsonl line 1: not valid JSON",
         setup=chain(copied("r.json", "res/a.json"), files(**{"r.curve.jsonl": "{\n"}))),
    case("plot-suffix", PLOT + ("--out", "@T/p.gif"), "unknown suffix '.gif'", "accepted: .png, .svg",
         setup=copied("r.json", "res/a.json")),
    case("plot-out-folder-missing", PLOT + ("--out", "@T/nope/p.png"), "folder @T/nope does not exist",
         setup=chain(copied("r.json", "res/a.json"), copied("r.curve.jsonl", "res/a.curve.jsonl"))),
    # sweeps
    case("sweep-missing", SWEEP, "@T/grid.toml: no such grid file"),
    case("sweep-invalid-toml", SWEEP, "invalid TOML", setup=files(**{"grid.toml": "[grid\n"})),
    case("sweep-unknown-table", SWEEP, "a grid file has a [grid] table", "found 'grids'",
         setup=files(**{"grid.toml": "[grids]\n" + GRID})),
    case("sweep-unknown-key", SWEEP, "unknown [grid] key(s) seed", "accepted: budgets, episodes",
         setup=files(**{"grid.toml": "[grid]\n" + GRID + "seed = [1]\n"})),
    case("sweep-learners-type", SWEEP, "learners must be a non-empty list of strs, got 'toy'",
         setup=files(**{"grid.toml": "[grid]\n" + GRID.replace('["toy"]', '"toy"')})),
    case("sweep-episodes-zero", SWEEP, "episodes must be a positive integer, got 0",
         setup=files(**{"grid.toml": "[grid]\n" + GRID + "episodes = 0\n"})),
    case("sweep-episodes-negative", SWEEP, "episodes must be a positive integer, got -2",
         setup=files(**{"grid.toml": "[grid]\n" + GRID + "episodes = -2\n"})),
    case("sweep-seeds-type", SWEEP, "seeds must be a non-empty list of ints",
         setup=files(**{"grid.toml": "[grid]\n" + GRID + 'seeds = ["a"]\n'})),
    case("sweep-seed-negative", SWEEP, "--seed -1", "accepted: an integer from 0 to",
         setup=files(**{"grid.toml": "[grid]\n" + GRID + "seeds = [-1]\n"})),
    case("sweep-unknown-learner", SWEEP, "unknown learner 'toyy'", "did you mean 'toy'",
         setup=files(**{"grid.toml": "[grid]\n" + GRID.replace('"toy"', '"toyy"')})),
    case("sweep-unknown-task", SWEEP, "unknown task 'tiny-3w1s'", "did you mean",
         setup=files(**{"grid.toml": "[grid]\n" + GRID.replace("tiny-3w2s", "tiny-3w1s")})),
    case("sweep-unknown-budget", SWEEP, "grid budget 'huge'", "accepted: smoke, quick, paper",
         setup=files(**{"grid.toml": "[grid]\n" + GRID.replace('"smoke"', '"huge"')})),
    case("sweep-variants", SWEEP, "each [[grid.variants]] needs name",
         setup=files(**{"grid.toml": "[grid]\n" + GRID + "variants = [{ set = { steps = 2 } }]\n"})),
    case("sweep-launcher-name-type", SWEEP, "[launcher] name must be a launcher's name", "got 3",
         setup=files(**{"grid.toml": "[grid]\n" + GRID + "[launcher]\nname = 3\n"})),
    case("sweep-launcher-not-a-table", SWEEP, "[launcher] must be a table",
         setup=files(**{"grid.toml": "launcher = 3\n[grid]\n" + GRID})),
    case("sweep-option-bad-value", SWEEP + ("--option", "workers=0"), "launcher option workers",
         "expected an integer >= 1, got 0", setup=files(**{"grid.toml": "[grid]\n" + GRID})),
    case("sweep-option-unknown", SWEEP + ("--option", "bogus=1"), "launcher option(s) bogus unknown",
         "accepted: live, workers", setup=files(**{"grid.toml": "[grid]\n" + GRID})),
    case("sweep-option-malformed", SWEEP + ("--option", "=3"), "--option '=3'", "expected KEY=VALUE",
         setup=files(**{"grid.toml": "[grid]\n" + GRID})),
    case("sweep-nothing-to-run", ("sweep", "--out", "@T/sw"), "needs a grid file (GRID.toml) or --learners"),
    case("sweep-grid-and-learners", SWEEP + ("--learners", "toy"), "give a grid file or --learners, not both",
         setup=files(**{"grid.toml": "[grid]\n" + GRID})),
    case("sweep-seeds-not-numbers", ("sweep", "--learners", "toy", "--tasks", "tiny-3w2s", "--seeds", "a,b", "--out",
                                     "@T/sw"), "expected comma-separated ints, got 'a,b'"),
    case("sweep-episodes-zero-option", ("sweep", "--learners", "toy", "--tasks", "tiny-3w2s", "--episodes", "0",
                                        "--out", "@T/sw"), "episodes must be a positive integer, got 0"),
    # episodes, data, list
    case("episodes-unknown-task", ("episodes", "--task", "tiny-3w3s"), "unknown task 'tiny-3w3s'", "did you mean"),
    case("episodes-count-zero", ("episodes", "--task", "tiny-3w2s", "--episodes", "0"), "--episodes 0",
         "must be a positive integer"),
    case("episodes-unknown-split", ("episodes", "--task", "tiny-3w2s", "--split", "bogus"), "unknown split 'bogus'",
         "accepted: train, val, test"),
    case("data-unknown-task", ("data", "prepare", "kanji-5w9s"), "unknown task 'kanji-5w9s'", "did you mean"),
    case("data-config-missing", ("data", "info", "tiny-3w2s", "--config", "@T/c.toml"), "no such file"),
    case("list-unknown-kind", ("list", "learner"), "invalid choice: 'learner'", "'learners'"),
]


# ----------------------------------------------------------------------------- checking

def snapshot(*roots: Path) -> dict[str, object]:
    """Every file and folder under ``roots``: a folder by its path, a file by (size, mtime, bytes)."""
    state: dict[str, object] = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                state[str(path)] = (st.st_size, st.st_mtime_ns, path.read_bytes())
            else:
                state[str(path)] = "folder" if path.is_dir() else "other"
    return state


def one_line(err: str) -> str:
    """stderr as its one line ``metabench: error: ...`` (asserting that is all there is)."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("metabench: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def case_dir(tmp_path, monkeypatch, world):
    """This case's folder (also the working folder and $METABENCH_CACHE's parent) on the session host."""
    monkeypatch.setattr(metabench.plugins, "_HOST", world.host)
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_table_has_at_least_60_rows_with_unique_names():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_result_files_accept_the_task_names_protocols_accept():
    from metabench.results import TASK_NAME
    from metabench.task import _NAME_RE

    assert TASK_NAME.pattern == _NAME_RE.pattern


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(row, case_dir, world, capsys):
    if row.skip:
        pytest.skip(row.skip)
    if row.setup:
        row.setup(case_dir, world.base)
    before = snapshot(case_dir, world.base)
    argv = [fill(a, case_dir, world.base) for a in row.argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    err = capsys.readouterr().err
    line = one_line(err)
    assert code == 2, err
    for fragment in row.expect:
        assert fill(fragment, case_dir, world.base) in line, line
    assert snapshot(case_dir, world.base) == before


# ----------------------------------------------------------------------------- real processes

SUBPROCESS_ROWS = [
    # (argv, setup, fragment): the installed plugins only
    (["run", "--learner", "protonett", "--budget", "smoke", "--out", "@T/out"], None, "did you mean 'protonet'"),
    (["run", "--learner", "protonet", "--seed", "abc", "--out", "@T/out"], None, "invalid int value: 'abc'"),
    (["compare", "@W/res/a.json", "@T/r.json"], edited("r.json", with_(summary__mean=0.5)), "is not the mean"),
    (["eval", "@T/x.learner.pt", "--out", "@T/out"], raw("x.learner.pt", halved("res/a.learner.pt")),
     "corrupt or truncated"),
]


def test_no_traceback_reaches_stderr_of_the_command(world, tmp_path):
    """The rows above in real processes, started together: exit status 2, one line, nothing written."""
    procs = []
    for i, (argv, setup, fragment) in enumerate(SUBPROCESS_ROWS):
        folder = tmp_path / str(i)
        (folder / "cache").mkdir(parents=True)
        if setup:
            setup(folder, world.base)
        env = dict(os.environ, METABENCH_CACHE=str(folder / "cache"), OMP_NUM_THREADS="1")
        env.pop("METABENCH_DEBUG", None)
        before = snapshot(folder, world.base)
        proc = subprocess.Popen([sys.executable, "-m", "metabench", *[fill(a, folder, world.base) for a in argv]],
                                cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((proc, folder, before, fragment))
    for proc, folder, before, fragment in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        assert fragment in one_line(err)
        assert snapshot(folder, world.base) == before


# ----------------------------------------------------------------------------- names that are paths

class PathNamesPlugin:
    """Registers a learner, backbone, launcher and tasks whose names are paths (``../x``, absolute):
    each is refused at registration, so none can name a file."""

    @hookimpl
    def metabench_register_learners(self, register):
        from conftest import ToyLearner

        for name in ("../x", "/tmp/metabench-escape", "a/../../b"):
            register(name, ToyLearner)

    @hookimpl
    def metabench_register_backbones(self, register):
        register("../x", lambda in_channels, image_size: None)

    @hookimpl
    def metabench_register_launchers(self, register):
        from metabench.sweep import Launcher

        class Nowhere(Launcher):
            def run(self, cells, out, report):
                raise AssertionError("never runs")

        register("/tmp/metabench-escape", Nowhere)

    @hookimpl
    def metabench_register_tasks(self, register):
        sneaky = Protocol(name="sneaky-3w2s", version=1, dataset="sneaky", ways=3, shots=2, queries=3, episodes=5,
                          image_size=16)
        object.__setattr__(sneaky, "name", "../../sneaky-3w2s")  # past Protocol's own check
        register(sneaky, TinySource())

        class Outside(TinySource):
            dataset = "../../outside"  # what a folder data set's cache key starts with

        register(Protocol(name="outside-3w2s", version=1, dataset="outside", ways=3, shots=2, queries=3, episodes=5,
                          image_size=16), Outside())


def test_plugin_names_that_are_paths_are_refused_and_reach_no_file(tmp_path, monkeypatch, capsys):
    host = host_with(("tiny", tiny_plugin()), ("paths", PathNamesPlugin()))
    refused = "\n".join(host.errors)
    for name in ("'../x'", "'/tmp/metabench-escape'", "'a/../../b'", "'../../sneaky-3w2s'", "'../../outside'"):
        assert name in refused, refused
    assert not any("/" in n for registry in (host.learners, host.backbones, host.launchers, host.tasks)
                   for n in registry.names())
    assert "outside-3w2s" not in host.tasks
    sandbox = tmp_path / "a" / "b"
    (sandbox / "cache").mkdir(parents=True)
    monkeypatch.setattr(metabench.plugins, "_HOST", host)
    monkeypatch.setenv("METABENCH_CACHE", str(sandbox / "cache"))
    monkeypatch.chdir(sandbox)
    before = snapshot(tmp_path)
    for argv in (["run", "--learner", "../x", "--task", "tiny-3w2s", "--budget", "smoke", "--out", "out"],
                 ["run", "--learner", "toy", "--task", "../../sneaky-3w2s", "--budget", "smoke", "--out", "out"],
                 ["run", "--learner", "toy", "--task", "outside-3w2s", "--budget", "smoke", "--out", "out"],
                 ["run", "--learner", "toy", "--backbone", "../x", "--budget", "smoke", "--out", "out"],
                 ["sweep", "--learners", "toy", "--tasks", "tiny-3w2s", "--launcher", "/tmp/metabench-escape",
                  "--out", "out"]):
        code = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("metabench: error: ")]
        assert code == 2 and len(lines) == 1 and "unknown" in lines[0] and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
    assert not Path("/tmp/metabench-escape").exists()


def test_a_sweep_cell_of_a_task_file_stays_inside_the_out_folder(tmp_path):
    from metabench.sweep import Cell

    out = tmp_path / "out"
    for task in ("/elsewhere/flowers.toml", "../../flowers.toml", "...toml", "kanji-5w1s"):
        argv = Cell("protonet", task, 0, "smoke").argv(out, resume=False)
        target = Path(argv[argv.index("--out") + 1])
        assert target.parent == out and target.name not in ("..", "."), target
    assert Cell("protonet", "kanji-5w1s", 0, "smoke").folder == "kanji-5w1s"
