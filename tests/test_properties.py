"""Generated input never ends in a traceback (issue 18): property-based tests (hypothesis).

* command lines built from the real subcommands and options mixed with random text and numbers:
  ``metabench.cli.main`` returns 0, 1 or 2, and an exit status 2 prints exactly one line
  ``metabench: error: ...``;
* ``--set`` pairs and ``[learner]`` / ``[backbone]`` values through ``parse_set``, ``build_config``
  and ``check_settings`` (``runner.prepare``): only MetabenchError escapes;
* TOML documents (generated tables written by :func:`to_toml`, random text, random bytes) through the
  config reader (and then ``metabench run --config``), the sweep-file reader and the task-file
  reader and loader: only MetabenchError escapes;
* mutated copies of a valid result file (keys dropped, types changed, nan/inf/huge numbers, bytes
  truncated or random) through ``load_result`` and the commands that read results (compare, publish,
  leaderboard): only MetabenchError escapes, and a result that loads has the summary its
  ``per_episode`` gives;
* training-curve lines through ``parse_curve_line`` and ``render_curve``.

Examples are derandomized (the same on every run); every input that once ended in a traceback is
kept as an ``@example``. Runs never leave the tiny task of ``conftest.py`` and stay a few steps
long: the strategies below keep counts small (no generated token is an integer above 50), outputs
inside each example's own folder (no absolute paths, no ``..``), sweep cells are not started
(``run_cell`` is replaced) and ``$METABENCH_DATA`` is unset, so no real data set is ever read.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import metabench.plugins
from metabench.cli import main
from metabench.config import parse_set, read_toml
from metabench.curves import parse_curve_line, render_curve
from metabench.errors import MetabenchError
from metabench.results import load_result
from metabench.settings import BUDGETS, check_settings
from metabench.stats import summarize
from metabench.sweep import Outcome, check_cells, read_grid
from metabench.task_file import load_task_file, read_task_file

from test_bad_input import GRID, TASK_LINES, world  # noqa: F401  (world: the session's inputs, a fixture)


def props(n: int):
    """Hypothesis settings: ``n`` derandomized examples, no deadline, no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- the module's inputs

#: placeholders in generated command lines and files, filled with this module's input paths
PLACES = {"@GRID": "in/grid.toml", "@BADTOML": "in/bad.toml", "@CFG": "in/config.toml", "@TF": "in/task.toml",
          "@RES": "res", "@DATA": "in/data", "@ONE": "in/one.json", "@PUB": "in/published.toml",
          "@A": "in/a.json", "@C": "in/c.json", "@L": "in/a.learner.pt", "@G": "in/garbage.bin",
          "@E": "in/empty.json", "@D": "in/folder"}
_PLACE = re.compile("|".join(sorted(PLACES, key=len, reverse=True)))


class Env:
    def __init__(self, root: Path, host):
        self.root, self.host = root, host

    def fill(self, text: str) -> str:
        return _PLACE.sub(lambda m: str(self.root / PLACES[m.group(0)]), text)

    @contextlib.contextmanager
    def example_dir(self):
        """A fresh folder for one example, the working folder while it runs."""
        folder = Path(tempfile.mkdtemp(dir=self.root / "ex"))
        (folder / "file.txt").write_text("a file where a folder is expected\n")
        try:
            with contextlib.chdir(folder):
                yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _no_run(cell, out):
    """Stands in for ``sweep.run_cell``: a sweep's cells are not started here."""
    return Outcome(cell, "failed", error="metabench: error: not started by this test")


@pytest.fixture(scope="module")
def env(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("properties")
    src = world.base / "res"
    (root / "in").mkdir()
    (root / "ex").mkdir()
    (root / "res").mkdir()
    for name in ("a.json", "a.curve.jsonl", "a.learner.pt", "c.json", "one.json"):
        shutil.copy(src / name, root / "in" / name)
    shutil.copy(src / "a.json", root / "res" / "a.json")
    shutil.copytree(world.base / "data", root / "in" / "data")
    (root / "in" / "folder").mkdir()
    (root / "in" / "garbage.bin").write_bytes(bytes(range(256)) * 3)
    (root / "in" / "empty.json").write_text("")
    (root / "in" / "bad.toml").write_text("[task\n")
    (root / "in" / "task.toml").write_text('[task]\nfolder = "data"\n' + TASK_LINES)
    (root / "in" / "grid.toml").write_text("[grid]\n" + GRID)
    (root / "in" / "config.toml").write_text("[learner]\nsteps = 2\n[backbone]\nwidth = 8\n")
    (root / "in" / "published.toml").write_text('[[result]]\nlearner = "toy"\ntask = "tiny-3w2s"\n')
    classes = {s: [f"train_c{i}" for i in range(2 * k, 2 * k + 2)] for k, s in enumerate(("train", "val", "test"))}
    (root / "in" / "split.json").write_text(json.dumps(classes))
    (root / "in" / "split.toml").write_text("".join(f"{s} = {json.dumps(c)}\n" for s, c in classes.items()))
    groups = {f"{s}_c{i}": "g" if i % 2 else "h" for s in ("train", "val", "test") for i in range(6)}
    (root / "in" / "groups.json").write_text(json.dumps({k: v for k, v in groups.items() if not k.endswith("5")}))
    (root / "in" / "groups.toml").write_text('train_c0 = "g"\ntrain_c1 = "g"\n')
    (root / "in" / "bad.json").write_text("[" * 5000)
    from metabench_plugins.launchers import local

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metabench.plugins, "_HOST", world.host)
        mp.setattr(local, "run_cell", _no_run)
        mp.setenv("METABENCH_CACHE", str(root / "cache"))
        mp.delenv("METABENCH_DATA", raising=False)
        yield Env(root, world.host)


# ----------------------------------------------------------------------------- generated text

def _harmless(token: str) -> bool:
    """A token that keeps an example small and inside its folder: no NUL (no argv holds one), no
    absolute or home path, no ``..``, no integer above 50 (alone, after ``=`` or in a list)."""
    if "\x00" in token or token.lstrip().startswith(("/", "~")) or ".." in token:
        return False
    for part in (token, token.partition("=")[2], *token.split(",")):
        try:
            if abs(int(part)) > 50:
                return False
        except ValueError:
            pass
    return True


TEXT = st.text(max_size=10).filter(_harmless)
#: numbers as a user might mistype them (all refused, or small)
ODD = st.sampled_from(["", " ", "-0", "+1", "1_0", "0x1", "1e3", "1.5", "nan", "inf", "-inf", "²", "٣", "١٠",
                       "9" * 5000])
COUNTS = st.one_of(st.integers(-3, 8).map(str), ODD, TEXT)
FLOATS = st.one_of(st.floats().map(repr), st.sampled_from(["1e400", "-1e400", "NaN", "1e-400"]))
SEEDS = st.one_of(st.integers().map(str), st.sampled_from(["-1", str(2**63), str(2**70)]), ODD, TEXT)
LEARNERS = st.one_of(st.sampled_from(["toy", "toy", "wrongshape", "toyy", "protonett", ""]), TEXT)
TASKS = st.one_of(st.sampled_from(["tiny-3w2s", "tiny-3w2s", "tiny-20w1s", "tiny-3w8s", "tiny-3w9s", "@TF",
                                   "@BADTOML", "@G", "@D", "nope.toml", "x-5w1s", ""]), TEXT)
BACKBONES = st.one_of(st.sampled_from(["conv4", "mlp", "resnet12", "conv5", "torchvision:nosuch", ""]), TEXT)
DEVICES = st.one_of(st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:x", "cuda:²", "tpu", "CPU", ""]), TEXT)
CONFIGS = st.one_of(st.sampled_from(["@CFG", "@G", "@E", "@D", "@BADTOML", "nope.toml"]), TEXT)
OUTS = st.one_of(st.sampled_from(["out", "out/sub", "file.txt", "file.txt/x", ".", ""]), TEXT)
CHECKPOINTS = st.one_of(st.sampled_from(["off", "OFF", "10", "0", "-5", "10x", "1s", "0s", "2h", "1.5m", "²", "٣",
                                         "9" * 5000, "9" * 400 + "s"]), TEXT)
DATA_ROOTS = st.one_of(st.sampled_from(["@D", "tiny=@D", "=", "x=", "nope", "~nosuchuser/x", "tiny=~nosuchuser"]),
                       TEXT)
RESULTS = st.one_of(st.sampled_from(["@A", "@C", "@ONE", "@G", "@E", "@D", "@L", "nope.json"]), TEXT)
SET_KEYS = st.one_of(st.sampled_from(["steps", "scale", "backbone.width", "backbone.depth", "backbone.", "lr", "",
                                      " steps "]), TEXT)
SET_VALUES = st.one_of(COUNTS, FLOATS, st.sampled_from(["true", "no", "[1]", "{}"]), TEXT)
SETS = st.one_of(st.tuples(SET_KEYS, st.sampled_from(["=", "=", " = ", ":"]), SET_VALUES).map("".join), TEXT)
ANYWHERE = st.one_of(st.sampled_from(["--help", "-h", "--version", "--", "-", "--bogus", "-x", "a\nb"]), TEXT)

RUN_OPTIONS = {"--learner": LEARNERS, "--task": TASKS, "--backbone": BACKBONES, "--seed": SEEDS,
               "--budget": st.one_of(st.sampled_from(BUDGETS + ("huge",)), TEXT), "--episodes": COUNTS,
               "--device": DEVICES, "--config": CONFIGS, "--set": SETS, "--out": OUTS, "--resume": None,
               "--checkpoint-every": CHECKPOINTS, "--no-save": None, "--validate-every": COUNTS,
               "--validation-episodes": COUNTS, "--data-root": DATA_ROOTS}
COMMANDS = {
    "run": ([st.one_of(LEARNERS.map(lambda v: ["--learner", v]), st.just([])), TASKS.map(lambda v: ["--task", v]),
             st.just(["--budget", "smoke", "--episodes", "1"])], RUN_OPTIONS),
    "eval": ([st.one_of(st.sampled_from(["@L", "@G", "@E", "@D", "@A", "nope.learner.pt"]), TEXT).map(lambda v: [v])],
             {"--task": TASKS, "--episodes": COUNTS, "--device": DEVICES, "--out": OUTS, "--data-root": DATA_ROOTS}),
    "sweep": ([st.one_of(st.sampled_from(["@GRID", "@G", "@BADTOML", "@D", "nope.toml"]), TEXT).map(lambda v: [v]),
               st.just([])],
              {"--learners": st.one_of(st.sampled_from(["toy", "toy,wrongshape", "toyy", ",", ""]), TEXT),
               "--tasks": st.one_of(st.sampled_from(["tiny-3w2s", "tiny-3w2s,@TF", "tiny-3w9s"]), TEXT),
               "--seeds": st.one_of(st.sampled_from(["0", "0,1", "a,b", "-1", str(2**70), ",,"]), TEXT),
               "--budgets": st.one_of(st.sampled_from(["smoke", "quick,paper", "huge"]), TEXT),
               "--episodes": COUNTS, "--launcher": st.one_of(st.sampled_from(["local", "locl"]), TEXT),
               "--option": st.one_of(st.sampled_from(["workers=1", "workers=0", "workers=2", "live=false", "live=1",
                                                      "bogus=1", "=3", "workers", "workers=[1"]), TEXT),
               "--out": OUTS}),
    "list": ([st.one_of(st.sampled_from(["learners", "tasks", "backbones", "launchers", "learner"]), TEXT)
              .map(lambda v: [v]), st.just([])], {"--long": None}),
    "plugins": ([], {}),
    "episodes": ([st.one_of(TASKS.map(lambda v: ["--task", v]), st.just([]))],
                 {"--split": st.one_of(st.sampled_from(["train", "val", "test", "bogus"]), TEXT), "--episodes": COUNTS,
                  "--data-root": DATA_ROOTS}),
    "data": ([st.one_of(st.sampled_from(["prepare", "info", "clean"]), TEXT).map(lambda v: [v]),
              TASKS.map(lambda v: [v])], {"--config": CONFIGS, "--data-root": DATA_ROOTS}),
    "compare": ([RESULTS.map(lambda v: [v]), RESULTS.map(lambda v: [v])], {}),
    "plot": ([RESULTS.map(lambda v: [v])],
             {"--out": st.one_of(st.sampled_from(["p.png", "p.svg", "p.gif", "nope/p.png", "p"]), TEXT)}),
    "leaderboard": ([st.one_of(st.sampled_from(["build", "check", "show"]), TEXT).map(lambda v: [v])],
                    {"--results": st.one_of(st.sampled_from(["@RES", "@D", "nope"]), TEXT),
                     "--out": st.one_of(st.sampled_from(["lb", "file.txt"]), TEXT),
                     "--published": st.sampled_from(["@G", "@E", "nope.toml", "@BADTOML", "@PUB"]),
                     "--skip-plots": None}),
    "publish": ([st.lists(RESULTS, min_size=0, max_size=2)],
                {"--to": st.one_of(st.sampled_from(["board", "file.txt"]), TEXT), "--data-root": DATA_ROOTS}),
}


def _items(options: dict):
    """A few option items: an option with a value (``--opt v`` or ``--opt=v``), a bare option, or a stray token."""
    names = sorted(options)
    with_value = [st.just([o]) if options[o] is None else
                  st.one_of(options[o].map(lambda v, o=o: [o, v]), options[o].map(lambda v, o=o: [f"{o}={v}"]))
                  for o in names]
    one = st.one_of(*with_value, st.sampled_from(names).map(lambda o: [o]), ANYWHERE.map(lambda t: [t])) if names \
        else ANYWHERE.map(lambda t: [t])
    return st.lists(one, max_size=4).map(lambda parts: [t for p in parts for t in p])


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(["run"] * 4 + ["eval", "sweep"] * 2 + sorted(COMMANDS)))  # run mostly
    fixed, options = COMMANDS[command]
    argv = [command] + [token for part in fixed for token in draw(part)]
    if command != "run":  # a run always names a tiny task (the default task would prepare a real data set)
        argv = draw(st.sampled_from([argv, argv, [command]]))
    return argv + draw(_items(options))


# ----------------------------------------------------------------------------- the command line

def run_cli(argv: list[str]) -> tuple[int, str]:
    """``metabench ARGV`` in this process: (exit status, stderr); an exception is the test's failure."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def assert_clean_exit(code, err: str) -> None:
    """Exit status 0, 1 or 2, no traceback; status 2 is exactly one line ``metabench: error: ...``."""
    assert type(code) is int and code in (0, 1, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert err.startswith("metabench: error: ") and err.count("\n") == 1 and err.endswith("\n"), err


@props(300)
@given(argv=command_lines())
@example(argv=["run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke", "--episodes", "1",
               "--checkpoint-every", "9" * 5000])
@example(argv=["run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke", "--episodes", "1",
               "--checkpoint-every", "²"])
@example(argv=["sweep", "@GRID", "--option", "workers=" + "[" * 5000])
@example(argv=["run", "--learner", "toy", "--task", "tiny-3w2s", "a\nb"])
@example(argv=["compare", "@A", "nope\n.json"])
@example(argv=["episodes", "--task", "tiny-3w2s", "--data-root", "~nosuchuser/x"])
@example(argv=["run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke", "--episodes", "1", "--set",
               "scale=nan"])
@example(argv=["plot", ""])
def test_command_lines_end_in_an_exit_status(env, argv):
    with env.example_dir():
        code, err = run_cli([env.fill(a) for a in argv])
    event(f"{argv[0]}: exit {code}")
    assert_clean_exit(code, err)


# ----------------------------------------------------------------------------- --set and settings

#: values as TOML gives them: any int (huge too), any float (nan, inf), text, bools, lists, tables, dates
SCALARS = st.one_of(st.integers(), st.sampled_from([10**400, -(10**400), 2**63, 2**64]), st.floats(), st.booleans(),
                    st.text(max_size=8), st.dates())
TOML_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=5), inner, max_size=2)),
                           max_leaves=4)
#: a setting: an index into the learner's fields (resolved in the test), or a name of its own
FIELD = st.one_of(st.integers(0, 99), st.integers(0, 99), TEXT)
LEARNER_NAMES = ("amtl", "anil", "baseline", "baseline++", "maml", "matchingnet", "metasgd", "mtl", "protonet",
                 "relationnet", "reptile", "tamtl", "toy")
SET_TEXT = st.one_of(COUNTS, FLOATS, st.integers().map(str), st.sampled_from(["true", "off", "adam", "sgd", ""]), TEXT)


@props(150)
@given(learner=st.sampled_from(LEARNER_NAMES), budget=st.sampled_from(BUDGETS),
       task=st.sampled_from(["tiny-3w2s", "omniglot-5w1s", "miniimagenet-5w5s", "sinusoid-5s", "cub-5w1s"]),
       pairs=st.lists(st.one_of(st.tuples(FIELD, SET_TEXT), TEXT), max_size=3),
       layer=st.lists(st.tuples(FIELD, TOML_VALUES), max_size=3),
       backbone=st.dictionaries(st.one_of(st.sampled_from(["width", "hidden", "layers", "pool", "dropout",
                                                           "width_scale"]), TEXT), TOML_VALUES, max_size=2))
@example(learner="maml", budget="smoke", task="tiny-3w2s", pairs=[], layer=[("inner_lr", 10**400)], backbone={})
@example(learner="toy", budget="smoke", task="tiny-3w2s", pairs=[], layer=[],
         backbone={"dropout": 10**400})
@example(learner="protonet", budget="quick", task="tiny-3w2s", pairs=[("weight_decay", "nan")], layer=[],
         backbone={})
@example(learner="reptile", budget="quick", task="tiny-3w2s", pairs=[], layer=[("inner_lr", math.inf)], backbone={})
@example(learner="protonet", budget="smoke", task="tiny-3w2s", pairs=[("lr", "9" * 5000), ("lr", "1e400")],
         layer=[], backbone={})
def test_set_and_learner_settings_refuse_cleanly(env, learner, budget, task, pairs, layer, backbone):
    import dataclasses

    from metabench.runner import RunRequest, prepare

    cls = env.host.learners.get(learner).obj
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    name = lambda key: fields[key % len(fields)] if isinstance(key, int) else key  # noqa: E731
    texts = [p if isinstance(p, str) else f"{name(p[0])}={p[1]}" for p in pairs]
    try:
        set_learner, set_backbone = parse_set(texts)
    except MetabenchError:
        return
    want_learner, want_backbone = {}, {}
    for text in texts:  # every pair is key=value: the last value of a key, stripped, under its stripped key
        key, _, value = text.partition("=")
        key = key.strip()
        if key.startswith("backbone."):
            want_backbone[key.removeprefix("backbone.")] = value.strip()
        else:
            want_learner[key] = value.strip()
    assert (set_learner, set_backbone) == (want_learner, want_backbone)
    toml_layer = {name(k): v for k, v in layer}
    request = RunRequest(learner=learner, task=task, budget=budget, seed=0,
                         learner_layers=[("--config c.toml [learner]", toml_layer), ("--set", set_learner)],
                         backbone_options={**backbone, **set_backbone})
    try:
        plan = prepare(request, env.host)
    except MetabenchError:
        event("refused")
        return
    event("accepted")
    check_settings(learner, plan.config)  # what prepare accepted, the learner's own check accepts
    json.dumps(dataclasses.asdict(plan.config), allow_nan=False)  # and a result file can record


@props(120)
@given(values=st.lists(st.one_of(TOML_VALUES, st.text(max_size=4)), min_size=1, max_size=6))
def test_check_settings_raises_only_value_error(env, values):
    """Any value in any setting (as a plugin's code might set it): a ValueError at most."""
    import dataclasses

    for e in env.host.learners:
        cls = e.obj
        config = cls.Config()
        for i, f in enumerate(dataclasses.fields(config)):
            setattr(config, f.name, values[i % len(values)])
        with contextlib.suppress(ValueError):
            check_settings(e.name, config)


# ----------------------------------------------------------------------------- TOML files

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(key: str) -> str:
    return key if _BARE.match(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value) -> str:
    """``value`` as TOML (a TOML writer for what the strategies make: numbers, text, dates, lists, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()


def to_toml(doc: dict) -> str:
    """A TOML document: top-level values first, then one ``[table]`` per dict value."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_key(key)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def tables(known: dict, extra=SCALARS):
    """A table with some of the ``known`` keys (each with its strategy) and now and then a key of its own."""
    return st.tuples(st.fixed_dictionaries({}, optional=known),
                     st.dictionaries(TEXT, extra, max_size=1) | st.just({})).map(lambda t: {**t[1], **t[0]})


_DROP = object()


def corrupted(valid, keys: list[str], values=TOML_VALUES, changes: int = 2, anything=TOML_VALUES):
    """Tables from ``valid``, some as they are, the others with up to ``changes`` keys (of ``keys``, or
    of their own) dropped or set to one of ``values`` or to ``anything``."""
    change = st.tuples(st.one_of(st.sampled_from(keys), TEXT), st.one_of(st.just(_DROP), values, anything))

    def apply(drawn):
        table, edits = drawn
        table = dict(table)
        for key, value in edits:
            if value is _DROP:
                table.pop(key, None)
            else:
                table[key] = value
        return table

    return st.tuples(valid, st.lists(change, max_size=changes)).map(apply)


def any_of(strategy):
    """``strategy`` mostly, any TOML value now and then."""
    return st.one_of(strategy, strategy, TOML_VALUES)


SMALL = st.integers(-2, 5)
FILES_TEXT = st.one_of(st.sampled_from(["out", "file.txt", "", "x\x00y", "~nosuchuser/x"]), TEXT)
CONFIG_DOCS = tables({
    "run": any_of(tables({"task": any_of(st.one_of(st.sampled_from(["tiny-3w2s", "tiny-3w8s", "nope", "@TF",
                                                                    "x\x00.toml", "~nosuchuser.toml"]), TEXT)),
                          "backbone": any_of(BACKBONES), "seed": any_of(st.integers()),
                          "budget": any_of(st.sampled_from(BUDGETS + ("huge",))), "episodes": any_of(SMALL),
                          "device": any_of(DEVICES), "out": any_of(FILES_TEXT), "data_root": any_of(FILES_TEXT),
                          "checkpoint_every": any_of(st.one_of(st.integers(), CHECKPOINTS))})),
    "learner": any_of(tables({"steps": any_of(SMALL), "scale": any_of(st.floats())})),
    "backbone": any_of(tables({"width": any_of(st.integers(-1, 8))})),
    "data": any_of(tables({"root": any_of(FILES_TEXT), "tiny": any_of(FILES_TEXT)}, FILES_TEXT)),
    "validation": any_of(tables({"every": any_of(SMALL), "episodes": any_of(SMALL), "phase": any_of(TEXT)})),
})
RAW = st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1")))


def _small_run(toml: dict, host) -> bool:
    """Whether ``metabench run --config`` of this (read) config stays a few steps long, on a tiny or an
    unknown task, in the example's folder."""
    run, validation = toml.get("run", {}), toml.get("validation", {})
    counts = [toml.get("learner", {}).get("steps"), toml.get("backbone", {}).get("width"),
              validation.get("episodes"), run.get("episodes")]
    task = run.get("task", "tiny-3w2s")
    registered = {e.name for e in host.tasks}
    out = run.get("out", "out")  # a NUL in it is fine here: nothing can be written there
    return (all(not isinstance(n, int) or n <= 50 for n in counts) and _harmless(out.replace("\x00", ""))
            and (task.startswith("tiny-") or task not in registered))


@props(120)
@given(doc=CONFIG_DOCS, raw=st.one_of(st.none(), st.none(), RAW))
@example(doc={"learner": {"scale": 10**400}}, raw=None)
@example(doc={"learner": {"scale": math.inf}}, raw=None)
@example(doc={}, raw="[learner]\nx = " + "[" * 5000)
@example(doc={}, raw="[run]\nseed = " + "9" * 5000)
@example(doc={"run": {"task": "x\x00.toml"}}, raw=None)
@example(doc={"run": {"out": "x\x00y"}}, raw=None)
def test_config_files_refuse_cleanly(env, doc, raw):
    with env.example_dir() as folder:
        path = folder / "c.toml"
        path.write_text(env.fill(to_toml(doc) if raw is None else raw), encoding="utf-8")
        try:
            toml = read_toml(path)
        except MetabenchError:
            toml = None
        event("refused" if toml is None else "read")
        if toml is not None and _small_run(toml, env.host):
            task = [] if "task" in toml.get("run", {}) else ["--task", "tiny-3w2s"]
            code, err = run_cli(["run", "--learner", "toy", *task, "--config", str(path)])
            event(f"run: exit {code}")
            assert_clean_exit(code, err)


GRID_VALID = st.fixed_dictionaries(
    {"learners": st.lists(st.sampled_from(["toy", "wrongshape"]), min_size=1, max_size=2),
     "tasks": st.lists(st.sampled_from(["tiny-3w2s", "tiny-3w8s", "@TF"]), min_size=1, max_size=2)},
    optional={"seeds": st.lists(st.integers(0, 3), min_size=1, max_size=3),
              "budgets": st.lists(st.sampled_from(BUDGETS), min_size=1, max_size=2), "episodes": st.integers(1, 5),
              "out": st.sampled_from(["out", "grid/out"]), "threads": st.integers(1, 2),
              "variants": st.lists(st.fixed_dictionaries(
                  {"name": st.sampled_from(["a", "b", "first-order"]),
                   "set": st.dictionaries(st.sampled_from(["steps", "scale"]), st.one_of(SMALL, st.floats(),
                                                                                         st.booleans()), max_size=2)}),
                  max_size=2)})
GRID_TABLE = corrupted(GRID_VALID, ["learners", "tasks", "seeds", "budgets", "episodes", "out", "threads", "variants"],
                       st.one_of(st.lists(st.one_of(TEXT, st.integers(), st.sampled_from(
                           ["toyy", "huge", "x\x00.toml", "nope.toml", "~nosuchuser.toml"])), max_size=2), SMALL))
GRID_DOCS = corrupted(st.fixed_dictionaries(
    {"grid": st.one_of(GRID_TABLE, GRID_TABLE, st.lists(GRID_TABLE, min_size=1, max_size=2))},
    optional={"launcher": corrupted(st.fixed_dictionaries({}, optional={"name": st.just("local"),
                                                                       "workers": st.integers(1, 3)}),
                                    ["name", "workers", "live"], st.sampled_from(["locl", 0, -1, "x"]))}),
    ["grid", "launcher"], changes=1)


@props(100)
@given(doc=GRID_DOCS, raw=st.one_of(st.none(), st.none(), RAW))
@example(doc={}, raw="[grid]\nx = " + "{a=" * 5000)
@example(doc={"grid": {"learners": ["toy"], "tasks": ["x\x00.toml"]}}, raw=None)
def test_grid_files_refuse_cleanly(env, doc, raw):
    with env.example_dir() as folder:
        path = folder / "grid.toml"
        text = to_toml(doc) if raw is None else raw
        path.write_text(env.fill(text), encoding="utf-8")
        try:
            grid = read_grid(path)
            check_cells(grid.cells, env.host)
        except MetabenchError:
            event("refused")
            return
        event("accepted")
        for cell in grid.cells:  # what a launcher does with a cell
            assert cell.key and cell.label and cell.argv(Path("out"), resume=False)
            assert "/" not in cell.folder and cell.folder not in (".", "..")


_TASK_OPTIONS = {"dataset": st.sampled_from(["mine", "flowers"]), "channels": st.sampled_from([1, 3]),
                 "image_size": st.sampled_from([8, 12]), "episodes": st.integers(1, 10),
                 "groups": st.sampled_from(["groups.json", "groups.toml"])}
TASK_VALID = st.one_of(
    st.fixed_dictionaries({"folder": st.sampled_from(["data", "@DATA"]), "ways": st.integers(1, 4),
                           "shots": st.integers(1, 3), "queries": st.integers(1, 2)},
                          optional={"layout": st.just("splits"), **_TASK_OPTIONS}),
    st.fixed_dictionaries({"folder": st.just("data/train"), "layout": st.just("classes"),
                           "split_file": st.sampled_from(["split.json", "split.toml"]), "ways": st.integers(1, 2),
                           "shots": st.integers(1, 2), "queries": st.integers(1, 3)}, optional=_TASK_OPTIONS))
TASK_TABLE = corrupted(TASK_VALID, ["dataset", "folder", "layout", "split_file", "channels", "image_size", "ways",
                                    "shots", "queries", "episodes", "groups"],
                       st.one_of(st.sampled_from(["data", "nope", "~", "~nosuchuser/x", "", "a\x00b", "bad.json",
                                                  "nope.json", "split.json", "flat", "classes", "Bad", "../evil", 0,
                                                  2, 4]), st.integers(-1, 7)))
TASK_DOCS = corrupted(st.fixed_dictionaries({"task": TASK_TABLE}), ["task"], changes=1)


@props(120)
@given(doc=TASK_DOCS, raw=st.one_of(st.none(), st.none(), st.none(), RAW))
@example(doc={"task": {"folder": "~nosuchuser/x", "ways": 1, "shots": 1, "queries": 1}}, raw=None)
@example(doc={"task": {"folder": "data", "layout": ["splits"], "ways": 1, "shots": 1, "queries": 1}}, raw=None)
@example(doc={}, raw="[task]\nfolder = " + "[" * 5000)
@example(doc={"task": {"folder": "data/train", "layout": "classes", "split_file": "bad.json", "ways": 2, "shots": 1,
                       "queries": 1}}, raw=None)
def test_task_files_refuse_cleanly(env, doc, raw):
    path = env.root / "in" / "mine.toml"  # beside the image folder, the split and the groups files
    text = to_toml(doc) if raw is None else raw
    path.write_text(env.fill(text), encoding="utf-8")
    try:
        spec = read_task_file(path)
    except MetabenchError:
        event("refused when read")
        return
    try:
        protocol, source = load_task_file(path)
    except MetabenchError:
        event("refused when loaded")
        return
    event("loaded")
    assert (protocol.ways, protocol.shots, protocol.queries, protocol.episodes) == (spec.ways, spec.shots,
                                                                                     spec.queries, spec.episodes)


# ----------------------------------------------------------------------------- result files

#: where a mutation may act in a result document (dotted; a number indexes a list)
RESULT_PATHS = ["", "schema_version", "metabench_version", "task", "task.name", "task.version", "task.ways",
                "task.shots", "task.queries", "task.episodes", "task.episodes_sha256", "task.metric",
                "task.higher_is_better", "task.task_file", "task.data_sha256", "learner", "learner.name",
                "learner.plugin", "learner.version", "learner.config", "learner.config.steps", "backbone",
                "backbone.name", "backbone.options", "seed", "budget", "per_episode", "per_episode.0",
                "per_episode.5", "summary", "summary.mean", "summary.std", "summary.n", "summary.ci95",
                "summary.ci_method", "timing", "timing.meta_train_s", "environment", "environment.git_commit",
                "per_step", "per_step.1", "per_step.²", "trained_on", "trained_on.task", "created_utc", "resized"]
NUMBERS = st.one_of(st.integers(), st.floats(), st.sampled_from([10**400, -(10**400), 2**63, 1e308, -1e308, 5e-324]))
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=7),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=8)
MUTATIONS = st.lists(st.tuples(st.sampled_from(RESULT_PATHS), st.sampled_from(["set", "drop"]), JSON_VALUES),
                     max_size=3)


def mutate(doc, path: str, op: str, value) -> None:
    """Set (or drop) the entry at dotted ``path``; a path whose parent is missing is left alone."""
    *parents, last = path.split(".") if path else [""]
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) and key.isdecimal() else node.get(key) \
            if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, list) and last.isdecimal() and int(last) < len(node):
        if op == "drop":
            del node[int(last)]
        else:
            node[int(last)] = value
    elif isinstance(node, dict) and last:
        if op == "drop":
            node.pop(last, None)
        else:
            node[last] = value


def summarized(doc) -> None:
    """Make the summary (and task.episodes) what ``per_episode`` gives, where it holds finite numbers."""
    per = doc.get("per_episode") if isinstance(doc, dict) else None
    if not isinstance(per, list) or not per or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e150 for v in per):
        return
    s = summarize(per)
    if isinstance(doc.get("summary"), dict):
        doc["summary"].update(mean=s.mean, std=s.std, n=s.n, ci95=s.ci95)
    if isinstance(doc.get("task"), dict):
        doc["task"]["episodes"] = len(per)


def assert_summary_matches(doc: dict) -> None:
    per, summary = doc["per_episode"], doc["summary"]
    fresh = summarize(per)
    assert summary["n"] == len(per) == doc["task"]["episodes"]
    assert math.isclose(summary["mean"], fresh.mean, rel_tol=1e-9, abs_tol=1e-12)
    for key in ("std", "ci95"):
        assert (summary[key] is None) == (getattr(fresh, key) is None)
        if summary[key] is not None:
            assert math.isclose(summary[key], getattr(fresh, key), rel_tol=1e-6, abs_tol=1e-12)


@props(150)
@given(mutations=MUTATIONS, resummarize=st.booleans(),
       cut=st.one_of(st.none(), st.none(), st.none(), st.floats(0, 1)), garbage=st.one_of(st.none(), st.none(),
                                                                                        st.none(), st.binary()))
@example(mutations=[("created_utc", "set", 5)], resummarize=False, cut=None, garbage=None)
@example(mutations=[], resummarize=False, cut=None, garbage=b'{"seed": ' + b"9" * 5000 + b"}")
@example(mutations=[("per_step", "set", {"²": [0.5] * 6})], resummarize=False, cut=None, garbage=None)
@example(mutations=[("per_episode", "set", [1e308, 1e308, -1e308, 0.5, 0.5, 0.5])], resummarize=True, cut=None,
         garbage=None)
@example(mutations=[("trained_on", "set", {"task": 5})], resummarize=False, cut=None, garbage=None)
@example(mutations=[("per_episode.0", "drop", None)], resummarize=True, cut=None, garbage=None)
@example(mutations=[("task.task_file", "set", "x\x00.toml")], resummarize=False, cut=None, garbage=None)
def test_result_files_load_or_refuse_cleanly(env, mutations, resummarize, cut, garbage):
    doc = json.loads((env.root / "in" / "a.json").read_text())
    for path, op, value in mutations:
        mutate(doc, path, op, value)
    if resummarize:
        summarized(doc)
    data = json.dumps(doc, indent=1).encode() if garbage is None else garbage
    if cut is not None:
        data = data[: int(len(data) * cut)]
    with env.example_dir() as folder:
        path = folder / "res" / "r.json"
        path.parent.mkdir()
        path.write_bytes(data)
        try:
            loaded = load_result(path)
        except MetabenchError:
            loaded = None
        event("refused" if loaded is None else "loaded")
        if loaded is not None:
            assert_summary_matches(loaded)
        # the commands that read results: one line and exit 2 for a bad one, never a traceback
        for argv in (["compare", str(env.root / "in" / "a.json"), str(path)], ["publish", str(path), "--to", "board"],
                     ["leaderboard", "check", "--skip-plots", "--results", str(folder / "res"), "--out", "lb"]):
            code, err = run_cli(argv)
            event(f"{argv[0]}: exit {code}")
            assert_clean_exit(code, err)
            if loaded is None:
                assert code == 2, (argv, err)


# ----------------------------------------------------------------------------- training curves

CURVE_VALUES = st.one_of(NUMBERS, st.none(), st.booleans(), st.text(max_size=3))


@props(150)
@given(line=st.one_of(
    corrupted(st.fixed_dictionaries({"phase": st.sampled_from(["meta-train", "pretrain"]), "step": st.integers(0, 99),
                                     "total": st.integers(0, 99), "seconds": st.floats(0, 1e4)},
                                    optional={"loss": st.one_of(st.none(), st.floats(allow_nan=False,
                                                                                     allow_infinity=False)),
                                              "acc": st.floats(0, 1)}),
              ["phase", "step", "total", "seconds", "loss", "acc"], CURVE_VALUES, anything=JSON_VALUES).map(json.dumps),
    JSON_VALUES.map(json.dumps), st.text(max_size=20)))
@example(line='{"phase": "meta-train", "step": 1, "total": 2, "seconds": 0.5, "loss": %d}' % 10**400)
@example(line='{"phase": "meta-train", "step": 1, "total": 2, "seconds": %d, "loss": 1}' % 10**400)
@example(line='{"phase": "meta-train", "step": %d, "total": 2, "seconds": 1, "loss": 1}' % 10**400)
@example(line="[" * 5000)
@example(line='{"phase": "meta-train", "step": 1, "total": 2, "seconds": 0.5, "loss": ' + "9" * 5000 + "}")
def test_curve_lines_parse_or_refuse_cleanly(line):
    try:
        point = parse_curve_line(line, "c.curve.jsonl line 1")
    except MetabenchError:
        event("refused")
        return
    event("read")
    for value in (point.step, point.total, point.seconds, *point.metrics.values()):
        assert value is None or math.isfinite(float(value))  # what a plot draws is a float


@props(12)
@given(values=st.lists(st.tuples(st.integers(0, 2**62), st.one_of(st.none(), st.floats(allow_nan=False,
                                                                                    allow_infinity=False))),
                       min_size=1, max_size=3))
@example(values=[(1, 1e308), (2, -1e308)])
@example(values=[(0, 1e308)])
@example(values=[(1, 1.0), (2**62, 2.0)])
def test_curves_draw_or_refuse_cleanly(values):
    lines = [json.dumps({"phase": "meta-train", "step": s, "total": 3, "seconds": 0.5, "loss": v}) for s, v in values]
    points = [parse_curve_line(line, "c.curve.jsonl") for line in lines]
    try:
        assert render_curve(points, "png", "t").startswith(b"\x89PNG")
    except MetabenchError:
        pass
    except ValueError as exc:  # the one refusal render_curve documents: nothing to draw
        assert "no metric values" in str(exc)
