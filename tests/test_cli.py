"""The command line: exit codes, one-line errors, nothing written on failure."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import metabench.plugins
from metabench import Learner, hookimpl
from metabench.cli import main

from conftest import error_line, host_with, tiny_plugin


class Crasher(Learner):
    @dataclass
    class Config:
        where: str = "train"

    budgets = {"smoke": {}, "quick": {}, "paper": {}}

    def meta_train(self, ctx):
        if self.config.where == "train":
            raise ZeroDivisionError("division by zero")

    def predict(self, sx, sy, qx):
        return qx.new_zeros(len(qx), 2)  # wrong: a 3-way task needs 3 logits


class CrashPlugin:
    @hookimpl
    def metabench_register_learners(self, register):
        register("crasher", Crasher)


@pytest.fixture(autouse=True)
def host(monkeypatch):
    host = host_with(("tiny", tiny_plugin()), ("crashy", CrashPlugin()))
    monkeypatch.setattr(metabench.plugins, "_HOST", host)
    return host


def cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_tiny(capsys, tmp_path, *extra):
    return cli(capsys, "run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke", "--out", str(tmp_path),
               *extra)


def test_run_writes_one_result_and_prints_the_table(capsys, tmp_path):
    code, out, err = run_tiny(capsys, tmp_path)
    assert code == 0, err
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["learner"]["name"] == "toy" and doc["budget"] == "smoke" and doc["seed"] == 0
    assert "tiny-3w2s" in out and "toy" in out and str(path) in out.replace("\n", "")
    assert "meta-train" in err and "evaluate" in err  # the progress bars


def test_same_seed_same_results_on_cpu(capsys, tmp_path):
    for _ in range(2):
        assert run_tiny(capsys, tmp_path, "--learner", "protonet", "--seed", "3")[0] == 0
    a, b = (json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json")))
    assert a["per_episode"] == b["per_episode"] and a["learner"]["config"] == b["learner"]["config"]


@pytest.mark.parametrize("argv,fragment", [
    (["--learner", "protonett"], "did you mean 'protonet'"),
    (["--task", "tiny-3w9s"], "unknown task 'tiny-3w9s'"),
    (["--backbone", "conv5"], "did you mean 'conv4'?"),
    (["--set", "stepz=3"], "has no setting 'stepz'; accepted: steps, scale"),
    (["--set", "steps=three"], "--set: steps: expected int, got 'three'"),
    (["--set", "steps"], "expected key=value"),
    (["--set", "backbone.depth=3"], "no option 'depth'; accepted: width"),
    (["--set", "backbone.width=wide"], "backbone.width: expected int"),
    (["--episodes", "0"], "must be a positive integer"),
    (["--device", "cuda"], "no CUDA device is available"),
    (["--device", "tpu"], "accepted: cpu, cuda, cuda:N"),
    (["--config", "/nonexistent/c.toml"], "no such file"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, fragment):
    out_dir = tmp_path / "out"
    if argv[0] == "--device" and argv[1] == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli(capsys, "run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "smoke",
                       "--out", str(out_dir), *argv)
    assert code == 2
    assert fragment in error_line(err)
    assert not out_dir.exists()


def test_argparse_errors_exit_2(capsys):
    assert main(["run", "--learner", "toy", "--budget", "huge"]) == 2
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("metabench ")


@pytest.mark.parametrize("toml,fragment", [
    ("[learner]\nsteps = 'many'\n", "steps: expected int"),
    ("[trainer]\nx = 1\n", "unknown entry 'trainer'"),
    ("[run]\nlearner_rate = 1\n", "unknown [run] key 'learner_rate'"),
    ("[learner\n", "invalid TOML"),
])
def test_bad_config_file(capsys, tmp_path, toml, fragment):
    config = tmp_path / "c.toml"
    config.write_text(toml)
    code, _, err = run_tiny(capsys, tmp_path / "out", "--config", str(config))
    assert code == 2 and fragment in error_line(err)


def test_config_file_then_set_override(capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[run]\nseed = 7\n[learner]\nsteps = 4\nscale = 2\n")
    code, _, err = run_tiny(capsys, tmp_path / "out", "--config", str(config), "--set", "scale=0.5")
    assert code == 0, err
    (path,) = (tmp_path / "out").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["seed"] == 7 and doc["learner"]["config"] == {"steps": 4, "scale": 0.5}


def test_existing_results_survive_a_failed_run(capsys, tmp_path):
    assert run_tiny(capsys, tmp_path)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, _, err = cli(capsys, "run", "--learner", "crasher", "--task", "tiny-3w2s", "--budget", "smoke",
                       "--out", str(tmp_path))
    assert code == 1
    assert "learner 'crasher' (plugin 'crashy') failed in meta_train: ZeroDivisionError" in error_line(err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_setting_the_learner_refuses_is_bad_input(capsys, tmp_path):
    # Learners raise ValueError for settings they do not accept: exit 2, one line, nothing written.
    code, _, err = cli(capsys, "run", "--learner", "protonet", "--task", "tiny-3w2s", "--budget", "smoke",
                       "--set", "lr=-1", "--out", str(tmp_path))
    assert code == 2
    assert ("learner 'protonet' (plugin 'protonet') refused its settings: "
            "protonet: lr must be a number > 0, got -1.0") in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    code, _, err = run_tiny(capsys, target)
    assert code == 2 and "is not a folder" in error_line(err)
    assert target.read_text() == "keep me"


def test_learner_returning_wrong_shape_names_its_plugin(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "--learner", "crasher", "--task", "tiny-3w2s", "--budget", "smoke",
                       "--set", "where=nowhere", "--out", str(tmp_path))
    assert code == 1
    assert "learner 'crasher' (plugin 'crashy'): predict returned (9, 2); expected logits of shape (9, 3)" \
        in error_line(err)
    # no result; the trained learner is kept (it trained fine: `metabench eval` can score it once the
    # plugin is fixed), and so is the run's evaluation progress (`--resume` continues it)
    assert not list(tmp_path.glob("*.json"))
    assert len(list(tmp_path.glob("*.learner.pt"))) == 1
    assert list((tmp_path / "checkpoints").iterdir())


def test_compare_pairs_results_and_refuses_different_episode_sets(capsys, tmp_path):
    assert run_tiny(capsys, tmp_path / "a")[0] == 0
    assert run_tiny(capsys, tmp_path / "b", "--learner", "protonet")[0] == 0
    assert run_tiny(capsys, tmp_path / "c", "--episodes", "7")[0] == 0
    (a,), (b,), (c,) = ((tmp_path / d).glob("*.json") for d in "abc")
    code, out, err = cli(capsys, "compare", str(a), str(b))
    assert code == 0, err
    assert "paired t-test" in out and "Wilcoxon signed-rank" in out and "20 paired episodes" in out
    code, _, err = cli(capsys, "compare", str(a), str(c))
    assert code == 2 and "different episode sets" in error_line(err)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[]")
    code, _, err = cli(capsys, "compare", str(a), str(garbage))
    assert code == 2 and "garbage.json: not a valid metabench result" in error_line(err)


def test_episodes_command_prints_the_hash_results_record(capsys, tmp_path):
    assert run_tiny(capsys, tmp_path)[0] == 0
    (path,) = tmp_path.glob("*.json")
    recorded = json.loads(path.read_text())["task"]["episodes_sha256"]
    code, out, _ = cli(capsys, "episodes", "--task", "tiny-3w2s", "--episodes", "20")
    assert code == 0 and out.split()[0] == recorded
    code, out, _ = cli(capsys, "episodes", "--task", "tiny-3w2s")
    assert code == 0 and out.split()[0] != recorded  # 25 episodes, not 20


def test_list_and_plugins(capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0 and all(w in out for w in ("toy", "crasher", "tiny-3w2s", "conv4"))
    code, out, _ = cli(capsys, "list", "tasks")
    assert code == 0 and "tiny-3w2s" in out and "crasher" not in out
    code, out, _ = cli(capsys, "plugins")
    row = next(line for line in out.splitlines() if "crashy" in line)
    assert code == 0 and "learners" in row and "tests" in row


def test_console_script_bad_input_has_no_traceback():
    beside = Path(sys.executable).with_name("metabench")
    exe = str(beside) if beside.exists() else shutil.which("metabench") or pytest.skip("console script not installed")
    proc = subprocess.run([exe, "run", "--learner", "nosuch", "--budget", "smoke"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("metabench: error: unknown learner 'nosuch'") and "Traceback" not in proc.stderr


def test_data_commands(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(metabench.plugins, "_HOST", None)  # the installed plugins
    monkeypatch.delenv("METABENCH_DATA", raising=False)
    code, _, err = cli(capsys, "data", "info", "miniimagenet-5w1s")
    assert code == 2 and "no data folder given; pass --data-root DIR" in error_line(err)
    code, _, err = cli(capsys, "data", "prepare", "omniglot-5w1s", "--data-root", str(tmp_path))
    assert code == 2 and f"not found under {tmp_path}" in error_line(err) and "images_background" in err
    code, _, err = cli(capsys, "run", "--learner", "protonet", "--task", "cub-5w1s", "--budget", "smoke",
                       "--data-root", f"cub={tmp_path / 'nope'}", "--out", str(tmp_path / "out"))
    assert code == 2 and "does not exist" in error_line(err) and not (tmp_path / "out").exists()
    code, out, err = cli(capsys, "data", "info", "kanji-5w1s")
    assert code == 0 and "1500" in out and "600" in out


def test_paper_budget_applies_the_learners_paper_config(capsys, tmp_path, host, monkeypatch):
    from conftest import ToyLearner

    config = tmp_path / "toy.toml"
    config.write_text('["tiny-3w2s"]\nsteps = 5\n[ "tiny-3w2s".backbone ]\nwidth = 8\n["other-5w1s"]\nsteps = 99\n')
    monkeypatch.setattr(ToyLearner, "paper_config", config)
    code, _, err = cli(capsys, "run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "paper",
                       "--episodes", "3", "--out", str(tmp_path / "out"))
    assert code == 0, err
    (path,) = (tmp_path / "out").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["learner"]["config"]["steps"] == 5 and doc["backbone"]["options"] == {"width": 8}
    code, _, err = cli(capsys, "run", "--learner", "toy", "--task", "tiny-3w2s", "--budget", "paper",
                       "--set", "steps=6", "--episodes", "3", "--out", str(tmp_path / "out2"))
    (path,) = (tmp_path / "out2").glob("*.json")
    assert json.loads(path.read_text())["learner"]["config"]["steps"] == 6  # --set wins over the paper config


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["run", "--help"], ["run", "--learner", "x", "--budget", "huge"]])
def test_version_help_and_argument_errors_answer_without_importing_torch(argv):
    code = ("import sys\nfrom metabench.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n" % argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_list_learners_is_readable_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    from metabench import cli as cli_module
    from rich.console import Console

    monkeypatch.setattr(cli_module, "out", Console(width=80, highlight=False))
    code, out, _ = cli(capsys, "list", "learners")
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    maml = next(i for i, line in enumerate(lines) if "│ maml " in line)
    assert "Finn et al." in lines[maml] and "2017" in lines[maml + 1]  # short references, whole words
    assert not any("classifica" in line and "classification" not in line for line in lines)
    code, out, _ = cli(capsys, "list", "learners", "--long")
    assert "Abbeel" in out  # the full reference names every author
