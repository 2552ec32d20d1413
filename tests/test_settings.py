"""Settings checked from the Config dataclasses' field declarations (metabench.settings).

* check_settings on a throwaway Config: every kind of violation, bool is not int, float accepts
  int, a valid config passes, the message names learner, setting, value and what is accepted;
* Learner.__init__ checks a dataclass config (and leaves a plain third-party Config working);
* every registered learner: its default Config, its budgets and its paper config's tables pass,
  each field declared with a minimum refuses a value below it;
* through the CLI: a bad value is bad input (exit 2, one line, nothing written).
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from metabench import BUDGETS, Learner, check_settings, setting
from metabench.config import build_config
from metabench.plugins import get_host
from metabench.settings import _KEY

from conftest import ROOT, TINY


@dataclass
class Demo:
    steps: int = setting(3, min=0)
    ways: int = setting(5, min=1, max=20)
    lr: float = setting(0.1, min=0, min_exclusive=True)
    momentum: float = setting(0.9, min=0, max=1)
    optimizer: str = setting("adam", choices=("adam", "sgd"))
    mode: str = setting("", choices=("", "fast"))
    first_order: bool = False
    name: str = "demo"
    seed: int = 0  # no metadata: only the type is checked
    scale: float = 1.0


def refusal(**changes) -> str:
    with pytest.raises(ValueError) as info:
        check_settings("demo", dataclasses.replace(Demo(), **changes))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_valid_config_passes():
    check_settings("demo", Demo())
    check_settings("demo", Demo(steps=0, ways=20, lr=1e-9, momentum=0, optimizer="sgd", mode="fast",
                                first_order=True, seed=-5, scale=-2.0))


def test_the_message_names_learner_setting_value_and_what_is_accepted():
    assert refusal(steps=-1) == "demo: steps must be an integer >= 0, got -1"
    assert refusal(optimizer="rmsprop") == "demo: optimizer must be one of adam, sgd, got 'rmsprop'"
    assert refusal(mode="slow") == "demo: mode must be one of '', fast, got 'slow'"


@pytest.mark.parametrize("changes,accepted", [
    (dict(steps=-1), "an integer >= 0"),
    (dict(ways=0), "an integer >= 1 and <= 20"),
    (dict(ways=21), "an integer >= 1 and <= 20"),
    (dict(lr=0.0), "a number > 0"),
    (dict(lr=-0.5), "a number > 0"),
    (dict(lr=math.nan), "a number > 0"),
    (dict(momentum=1.5), "a number >= 0 and <= 1"),
    (dict(momentum=math.nan), "a number >= 0 and <= 1"),
    (dict(optimizer="ADAM"), "one of adam, sgd"),
    (dict(optimizer=1), "one of adam, sgd"),
    (dict(steps=2.0), "an integer >= 0"),  # a float is not an integer
    (dict(steps="3"), "an integer >= 0"),
    (dict(steps=True), "an integer >= 0"),  # bool is not int
    (dict(seed=False), "an integer"),
    (dict(seed=1.5), "an integer"),
    (dict(lr=True), "a number > 0"),
    (dict(scale="1"), "a number"),
    (dict(first_order=1), "true or false"),
    (dict(first_order="yes"), "true or false"),
    (dict(name=3), "a string"),
])
def test_each_kind_of_violation_is_refused(changes, accepted):
    (field, value), = changes.items()
    assert refusal(**changes) == f"demo: {field} must be {accepted}, got {value!r}"


def test_float_settings_accept_integers():
    check_settings("demo", Demo(lr=2, momentum=1, scale=3))


def test_settings_without_a_declaration_only_have_their_type_checked():
    @dataclass
    class Plain:
        steps: int = 3
        lr: float = 0.1
        tag: str = ""
        anything: object = None

    check_settings("plain", Plain(steps=-7, lr=-1.0, anything=[1]))
    with pytest.raises(ValueError, match=r"^plain: steps must be an integer, got 'x'$"):
        check_settings("plain", Plain(steps="x"))


def test_setting_is_a_dataclass_field_with_its_default():
    (f,) = [f for f in dataclasses.fields(Demo) if f.name == "optimizer"]
    assert f.default == "adam" and f.metadata[_KEY]["choices"] == ("adam", "sgd")
    assert Demo().ways == 5


# ----------------------------------------------------------------------------- through Learner


class Checked(Learner):
    reference = "test double"
    Config = Demo
    budgets = {"smoke": {}, "quick": {}, "paper": {}}

    def meta_train(self, ctx):
        pass

    def predict(self, support_x, support_y, query_x):
        return torch.zeros(len(query_x), 3)


def test_learner_init_checks_a_dataclass_config():
    Checked(Demo(), None, TINY, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^checked: lr must be a number > 0, got 0$"):
        Checked(Demo(lr=0), None, TINY, torch.device("cpu"))

    class Named(Checked):
        name = "named-learner"

    with pytest.raises(ValueError, match=r"^named-learner: steps must be"):
        Named(Demo(steps=-1), None, TINY, torch.device("cpu"))


def test_a_config_that_is_not_a_dataclass_is_left_alone():
    class Loose:
        steps = -1

    learner = Checked(Loose(), None, TINY, torch.device("cpu"))
    assert learner.config.steps == -1


# ----------------------------------------------------------------------------- every registered learner

HOST = get_host()
LEARNERS = HOST.learners.names()
BUILT_IN = ("maml", "anil", "metasgd", "reptile", "protonet", "matchingnet", "relationnet", "baseline", "baseline++",
            "mtl", "amtl", "tamtl")


def learner_class(name):
    return HOST.learners.get(name).obj


def label(cls) -> str:
    return cls.name or cls.__name__.lower()


def test_every_built_in_learner_is_registered_and_named_as_registered():
    assert set(BUILT_IN) <= set(LEARNERS)
    for name in BUILT_IN:
        assert label(learner_class(name)) == name


@pytest.mark.parametrize("name", LEARNERS)
def test_default_config_passes(name):
    cls = learner_class(name)
    check_settings(label(cls), cls.Config())


def minimum_fields(name):
    cls = learner_class(name)
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls.Config)
            if _KEY in f.metadata and f.metadata[_KEY]["min"] is not None]


@pytest.mark.parametrize("name", [n for n in LEARNERS if minimum_fields(n)])
def test_every_declared_minimum_is_enforced(name):
    cls = learner_class(name)
    for f, spec in minimum_fields(name):
        below = [spec["min"] - 1] + ([spec["min"]] if spec["min_exclusive"] else [])
        for value in below:
            config = dataclasses.replace(cls.Config(), **{f.name: value})
            with pytest.raises(ValueError) as info:
                check_settings(label(cls), config)
            message = str(info.value)
            assert message.startswith(f"{label(cls)}: {f.name} must be ") and message.endswith(f", got {value!r}")


@pytest.mark.parametrize("name", LEARNERS)
def test_every_budget_and_paper_table_passes(name):
    cls = learner_class(name)
    layers = [[(budget, cls.budgets[budget])] for budget in BUDGETS]
    if cls.paper_config is not None:
        tables = tomllib.loads(Path(str(cls.paper_config)).read_text(encoding="utf-8"))
        layers += [[("paper", cls.budgets["paper"]),
                    (task, {k: v for k, v in table.items() if k not in ("backbone", "validation")})]
                   for task, table in tables.items() if task != "validation"]  # [validation]: metabench.validation
    for layer in layers:
        check_settings(label(cls), build_config(cls.Config, layer, name))


def test_built_in_learners_declare_minimums():
    assert all(minimum_fields(name) for name in BUILT_IN)


# ----------------------------------------------------------------------------- end to end


def test_cli_reports_a_bad_setting_as_bad_input(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "metabench.cli", "run", "--learner", "maml", "--task", "sinusoid-5s",
                           "--budget", "smoke", "--set", "meta_steps=-1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("metabench: error:")
    assert "maml: meta_steps must be an integer >= 0, got -1" in lines[0]
    assert list(tmp_path.iterdir()) == []
