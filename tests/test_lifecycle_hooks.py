"""Lifecycle hooks (on_progress, on_result), the training_curve plugin, and ``metabench plot``."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import metabench.cli
import metabench.plugins
from metabench import PluginError, RunInfo, hookimpl
from metabench.cli import main
from metabench.runner import RunRequest, execute
from metabench_plugins.loggers import training_curve

from conftest import ROOT, host_with, tiny_plugin


class Spy:
    """A throwaway plugin recording every lifecycle call it gets."""

    def __init__(self):
        self.progress: list[tuple] = []
        self.results: list[tuple] = []

    @hookimpl
    def metabench_on_progress(self, run, phase, step, total, metrics):
        self.progress.append((run, phase, step, total, metrics))

    @hookimpl
    def metabench_on_result(self, run, result, path):
        self.results.append((run, result, path))


class Grumpy:
    """A plugin whose lifecycle hook raises (``where``: "progress" or "result")."""

    def __init__(self, where: str):
        self.where = where

    @hookimpl
    def metabench_on_progress(self, run, phase, step):
        if self.where == "progress" and step == 2:
            raise ZeroDivisionError("no curve for you")

    @hookimpl
    def metabench_on_result(self, path):
        if self.where == "result":
            raise OSError("disk says no")


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity (Python's json accepts them; JSON does not)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, only: bool = False) -> str:
    """The one ``metabench: error:`` line of stderr (``only``: and nothing else there, no progress bars)."""
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("metabench: error: ")]
    assert len(errors) == 1 and "Traceback" not in err and (not only or lines == errors), err
    return errors[0]


def tiny_host(*plugins: tuple[str, object]):
    """A host with the tiny task, the toy learner, the conv4 backbone and ``plugins`` (nothing else)."""
    return host_with(("tiny", tiny_plugin()), *plugins, allow=["tiny", "conv4", *(name for name, _ in plugins)])


def run_tiny(capsys, monkeypatch, out: Path, *plugins: tuple[str, object]):
    """``metabench run`` of the toy learner (2 progress reports at budget smoke), in this process."""
    monkeypatch.setattr(metabench.plugins, "_HOST", tiny_host(*plugins))
    return cli(capsys, "run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke", "--out", out)


# -- the hooks ---------------------------------------------------------------------------------
def test_hooks_see_every_progress_report_then_the_written_result(capsys, monkeypatch, tmp_path):
    spy = Spy()
    code, out, err = run_tiny(capsys, monkeypatch, tmp_path / "out", ("spy", spy))
    assert code == 0, err
    (result_path,) = (tmp_path / "out").glob("*.json")
    assert [(phase, step, total) for _, phase, step, total, _ in spy.progress] == [("meta-train", 1, 2),
                                                                                   ("meta-train", 2, 2)]
    assert [m for *_, m in spy.progress] == [{"loss": 1.0}, {"loss": 0.5}]
    (run, result, path), = spy.results
    assert path == result_path and result == json.loads(result_path.read_text())
    assert all(r is run for r, *_ in spy.progress)  # one RunInfo for the whole run
    assert (run.learner, run.task, run.backbone, run.seed, run.budget) == ("toy", "tiny-3w2s", "conv4", 0, "smoke")
    assert run.out_dir == tmp_path / "out"


def test_execute_as_a_library_tells_hooks_a_run_without_output_folder(tmp_path):
    spy = Spy()
    host = tiny_host(("spy", spy))
    execute(RunRequest(learner="toy", task="tiny-3w2s", budget="smoke", episodes=3), host)
    runs = {id(r): r for r, *_ in spy.progress}
    (run,) = runs.values()
    assert run.out_dir is None and len(spy.progress) == 2 and spy.results == []
    given = RunInfo.start("toy", "tiny-3w2s", "conv4", 0, "smoke", tmp_path)
    execute(RunRequest(learner="toy", task="tiny-3w2s", budget="smoke", episodes=3), host, run=given)
    assert [r for r, *_ in spy.progress[2:]] == [given, given]


def test_run_ids_are_unique_and_safe_in_file_names():
    runs = [RunInfo.start("we/ird:name", "task", "conv4", 1, "smoke") for _ in range(3)]
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", i) and "we_ird_name" in i for i in ids), ids
    with pytest.raises(Exception):
        runs[0].seed = 2  # frozen


def test_a_raising_progress_hook_stops_the_run_naming_the_plugin_and_the_hook(capsys, monkeypatch, tmp_path):
    code, _, err = run_tiny(capsys, monkeypatch, tmp_path, ("grumpy", Grumpy("progress")))
    line = one_error_line(err)
    assert code == 1
    assert "plugin 'grumpy': raised in metabench_on_progress: ZeroDivisionError: no curve for you" in line
    assert "learner" not in line  # not blamed on the learner whose report it was
    assert list(tmp_path.glob("*.json")) == []


def test_a_raising_result_hook_is_named_and_says_the_result_was_written(capsys, monkeypatch, tmp_path):
    code, _, err = run_tiny(capsys, monkeypatch, tmp_path, ("grumpy", Grumpy("result")))
    line = one_error_line(err)
    (path,) = tmp_path.glob("*.json")
    assert code == 1
    assert "plugin 'grumpy': raised in metabench_on_result: OSError: disk says no" in line and str(path) in line


def test_host_methods_name_the_failing_plugin_and_call_the_others_first():
    spy = Spy()
    host = host_with(("grumpy", Grumpy("result")), ("spy", spy), builtins=False)
    run = RunInfo.start("toy", "tiny-3w2s", "conv4", 0, "smoke")
    host.on_progress(run, "meta-train", 1, 3, {"loss": 1.0})
    assert len(spy.progress) == 1
    with pytest.raises(PluginError, match=r"^plugin 'grumpy': raised in metabench_on_result: OSError"):
        host.on_result(run, {}, Path("x.json"))
    assert len(spy.results) == 1  # pluggy's order: the last registered is called first


def test_hook_wrappers_and_misspelled_lifecycle_hooks_are_refused():
    class Wrapper:
        @hookimpl(wrapper=True)
        def metabench_on_progress(self, run):
            return (yield)

    class Typo:
        @hookimpl
        def metabench_on_progres(self, run):
            pass

    host = host_with(("wrapper", Wrapper()), ("typo", Typo()), builtins=False)
    assert len(host.errors) == 2
    assert host.errors[0].startswith("plugin 'wrapper': invalid: metabench_on_progress is a hook wrapper")
    assert "unknown hook 'metabench_on_progres'" in host.errors[1] and "metabench_on_progress" in host.errors[1]
    assert host.pm.hook.metabench_on_progress.get_hookimpls() == []


def test_plugins_command_lists_lifecycle_hooks(capsys, monkeypatch):
    monkeypatch.setattr(metabench.plugins, "_HOST", host_with(("spy", Spy())))
    monkeypatch.setattr(metabench.cli, "out", Console(width=250, highlight=False))
    code, out, _ = cli(capsys, "plugins")
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert code == 0
    assert "on_progress, on_result" in rows["spy"] and "on_progress, on_result" in rows["training_curve"]
    assert "learners" in rows["maml"] and "on_" not in rows["maml"]


# -- the training_curve plugin -----------------------------------------------------------------
def test_curve_plugin_is_a_builtin_with_both_hooks():
    host = host_with()
    assert host.plugins["training_curve"].distribution == "metabench"
    assert host.plugins["training_curve"].hooks == ["metabench_on_progress", "metabench_on_result"]


def test_curve_streams_to_a_hidden_partial_file_then_moves_beside_the_result(tmp_path):
    out = tmp_path / "new" / "folder"  # created on the first report
    run = RunInfo.start("maml", "sinusoid-5s", "mlp", 0, "smoke", out)
    training_curve.metabench_on_progress(run, "meta-train", 1, 3, {"loss": 0.5, "acc": 0.25})
    partial = out / f".{run.run_id}.curve.jsonl.partial"
    assert partial.is_file()
    training_curve.metabench_on_progress(run, "meta-train", 2, 3,
                                         {"loss": float("nan"), "acc": float("inf"), "other": "text"})
    result = out / "r.json"
    result.write_text("{}")
    training_curve.metabench_on_result(run, {}, result)
    assert not partial.exists()
    lines = [strict_json(l) for l in (out / "r.curve.jsonl").read_text().splitlines()]
    assert [(l["step"], l["loss"], l["acc"]) for l in lines] == [(1, 0.5, 0.25), (2, None, None)]
    assert lines[1]["other"] is None and lines[0]["phase"] == "meta-train" and lines[0]["total"] == 3
    assert 0 <= lines[0]["seconds"] <= lines[1]["seconds"]


def test_curve_state_is_per_run(tmp_path):
    a, b = (RunInfo.start(n, "sinusoid-5s", "mlp", 0, "smoke", tmp_path) for n in ("maml", "anil"))
    for step in (1, 2, 3):
        training_curve.metabench_on_progress(a, "meta-train", step, 3, {"loss": float(step)})
        training_curve.metabench_on_progress(b, "pre-train", step, 3, {"loss": -float(step)})
    training_curve.metabench_on_result(b, {}, tmp_path / "b.json")
    training_curve.metabench_on_result(a, {}, tmp_path / "a.json")
    read = lambda name: [strict_json(l) for l in (tmp_path / name).read_text().splitlines()]
    assert [l["loss"] for l in read("a.curve.jsonl")] == [1.0, 2.0, 3.0]
    assert [(l["phase"], l["loss"]) for l in read("b.curve.jsonl")] == [("pre-train", -1.0), ("pre-train", -2.0),
                                                                        ("pre-train", -3.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.curve.jsonl", "b.curve.jsonl"]


def test_curve_plugin_writes_nothing_without_an_output_folder_or_progress(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    training_curve.metabench_on_progress(RunInfo.start("maml", "t", "mlp", 0, "smoke"), "meta-train", 1, 1,
                                         {"loss": 1.0})
    silent = RunInfo.start("maml", "t", "mlp", 0, "smoke", tmp_path)
    training_curve.metabench_on_result(silent, {}, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory) -> Path:
    """The result file of a real ``metabench run`` of MAML on sinusoid-5s at budget smoke (a subprocess)."""
    out = tmp_path_factory.mktemp("sine")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("METABENCH_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "metabench.cli", "run", "--learner", "maml", "--task", "sinusoid-5s",
                           "--budget", "smoke", "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (result,) = out.glob("*.json")
    return result


def test_cli_run_writes_the_curve_beside_the_result(sine_run):
    curve = sine_run.with_name(sine_run.stem + ".curve.jsonl")
    saved = json.loads(sine_run.read_text())["learner_file"]  # the trained learner, kept beside it
    assert sorted(p.name for p in sine_run.parent.iterdir()) == sorted([sine_run.name, curve.name, saved])  # no .partial
    lines = [strict_json(l) for l in curve.read_text().splitlines()]
    assert len(lines) == 3 and all(l["phase"] == "meta-train" and l["total"] == 3 for l in lines)  # maml smoke: 3 steps
    last: dict[str, int] = {}
    for l in lines:
        assert l["step"] > last.get(l["phase"], 0)
        last[l["phase"]] = l["step"]
        assert isinstance(l["loss"], float) and isinstance(l["seconds"], float)


# -- metabench plot ----------------------------------------------------------------------------
def with_curve(tmp_path: Path, sine_run: Path, lines: list[str] | None) -> Path:
    """A copy of the sine result in ``tmp_path`` with the given curve lines beside it (None: no curve)."""
    result = tmp_path / sine_run.name
    shutil.copy(sine_run, result)
    if lines is not None:
        result.with_name(result.stem + ".curve.jsonl").write_text("".join(l + "\n" for l in lines))
    return result


def test_plot_draws_png_by_default_and_svg_on_request(capsys, tmp_path, sine_run):
    result = with_curve(tmp_path, sine_run, sine_run.with_name(sine_run.stem + ".curve.jsonl").read_text().splitlines())
    code, out, err = cli(capsys, "plot", result)
    png = tmp_path / (result.stem + ".curve.png")
    assert code == 0, err
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and str(png) in out
    code, _, err = cli(capsys, "plot", result, "--out", tmp_path / "curve.svg")
    svg = (tmp_path / "curve.svg").read_text()
    assert code == 0, err
    assert svg.startswith("<?xml") and "<svg" in svg and "loss" in svg and "maml" in svg


def test_plot_draws_one_panel_per_metric_and_one_line_per_phase(capsys, tmp_path, sine_run):
    point = '{{"phase": "{}", "step": {}, "total": 3, "seconds": 0.1, "loss": {}, "acc": {}}}'
    lines = [point.format("pre-train", s, 1.0 / s, "null") for s in (1, 2, 3)]
    lines += [point.format("meta-train", s, 2.0 / s, 0.2 * s) for s in (1, 2, 3)]
    result = with_curve(tmp_path, sine_run, lines)
    code, _, err = cli(capsys, "plot", result, "--out", tmp_path / "c.svg")
    svg = (tmp_path / "c.svg").read_text()
    assert code == 0, err
    assert svg.count("<g id=\"axes_") == 2  # loss and acc
    assert "pre-train" in svg and "meta-train" in svg and ">acc</text>" in svg


@pytest.mark.parametrize("case,fragment", [
    ("no result", "no such result file"),
    ("no curve", "no training curve beside it (expected"),
    ("bad json", "line 2: not valid JSON"),
    ("bad line", "line 1: not a training-curve line: step must be an integer"),
    ("nan", "line 1: not a training-curve line: metric(s) loss must be numbers or null"),
    ("empty", "holds no progress reports"),
    ("jpg", "unknown suffix '.jpg'; accepted: .png, .svg"),
    ("no suffix", "unknown suffix '(none)'; accepted: .png, .svg"),
])
def test_plot_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, sine_run, case, fragment):
    good = '{"phase": "meta-train", "step": 1, "total": 2, "seconds": 0.5, "loss": 0.3}'
    curves = {"no curve": None, "bad json": [good, '{"phase": "meta-train", "step": 2'],
              "bad line": ['{"phase": "meta-train", "step": "1", "total": 2, "seconds": 0.5}'],
              "nan": ['{"phase": "meta-train", "step": 1, "total": 2, "seconds": 0.5, "loss": NaN}'], "empty": []}
    result = with_curve(tmp_path, sine_run, curves.get(case, [good]))
    if case == "no result":
        result = tmp_path / "missing.json"
    extra = {"jpg": ["--out", tmp_path / "c.jpg"], "no suffix": ["--out", tmp_path / "c"]}.get(case, [])
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli(capsys, "plot", result, *extra)
    assert code == 2 and out == ""
    assert fragment in one_error_line(err, only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_plot_bad_input_from_the_console_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "metabench.cli", "plot", str(tmp_path / "nope.json")],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"metabench: error: {tmp_path / 'nope.json'}: no such result file"
