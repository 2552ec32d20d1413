"""``metabench sweep``: grids through the local, slurm (submitit's local executor) and ray launchers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import error_line, run_cli

from metabench.sweep import Cell, grid_from_table, read_grid

ROOT = Path(__file__).resolve().parents[1]


cli = run_cli


def write_grid(tmp_path: Path, grid: str, launcher: str = 'name = "local"\nworkers = 2\nlive = false') -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(f"[grid]\n{grid}\n[launcher]\n{launcher}\n")
    return path


SMALL = 'learners = ["protonet"]\ntasks = ["kanji-5w1s"]\nseeds = [0, 1]\nbudgets = ["smoke"]\nepisodes = 2'


def results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/*.json")) if p.parent.name != ".sweep"]


def test_a_grid_is_the_product_of_its_lists_and_each_cell_has_a_stable_key():
    grid = grid_from_table({"learners": ["protonet", "maml"], "tasks": ["kanji-5w1s"], "seeds": [0, 1, 2],
                            "variants": [{"name": "a", "set": {"lr": 0.1}}, {"name": "b", "set": {"lr": 0.2}}]},
                           {}, "t")
    assert len(grid.cells) == 2 * 3 * 2
    assert len({c.key for c in grid.cells}) == 12
    assert Cell("maml", "kanji-5w1s", 0, "quick").key == Cell("maml", "kanji-5w1s", 0, "quick").key
    assert Cell("maml", "kanji-5w1s", 0, "quick").key != Cell("maml", "kanji-5w1s", 1, "quick").key
    cell = next(c for c in grid.cells if c.variant == "b")
    assert ["--set", "lr=0.2"] == cell.argv(Path("o"), resume=False)[-2:]


@pytest.mark.parametrize("text,fragment", [
    ('learners = "protonet"\ntasks = ["kanji-5w1s"]', "learners must be a non-empty list of strs"),
    ('learners = ["protonet"]', "[grid] needs tasks"),
    ('learners = ["protonet"]\ntasks = ["kanji-5w1s"]\nseed = [1]', "unknown [grid] key(s) seed"),
    ('learners = ["protonet"]\ntasks = ["kanji-5w1s"]\nthreads = 0', "threads must be a positive integer"),
    ('learners = ["protonett"]\ntasks = ["kanji-5w1s"]', "did you mean 'protonet'"),
    ('learners = ["protonet"]\ntasks = ["kanji-5w1s"]\nbudgets = ["huge"]', "grid budget 'huge'"),
])
def test_bad_grids_are_refused_in_one_line(capsys, tmp_path, text, fragment):
    code, _, err = cli(capsys, "sweep", str(write_grid(tmp_path, text)), "--out", str(tmp_path / "out"))
    assert code == 2 and fragment in error_line(err)
    assert not (tmp_path / "out").exists()


def test_unknown_launchers_and_options_are_refused(capsys, tmp_path):
    grid = write_grid(tmp_path, SMALL)
    code, _, err = cli(capsys, "sweep", str(grid), "--launcher", "kubernetes", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown launcher 'kubernetes'" in error_line(err)
    code, _, err = cli(capsys, "sweep", str(grid), "--option", "wrokers=2", "--out", str(tmp_path / "o"))
    assert code == 2 and "launcher option(s) wrokers unknown; accepted: live, workers" in error_line(err)


def test_local_sweep_runs_skips_finished_cells_and_lists_failures(capsys, tmp_path):
    grid = write_grid(tmp_path, SMALL + '\n[[grid.variants]]\nname = "plain"\nset = {}\n'
                                        '[[grid.variants]]\nname = "broken"\nset = { lr = -1 }')
    out = tmp_path / "out"
    code, stdout, _ = cli(capsys, "sweep", str(grid), "--out", str(out))
    assert code == 1  # the broken variant's cells failed
    assert "2 ran, 0 skipped (finished before), 2 failed" in stdout
    assert stdout.count("failed: kanji-5w1s protonet [broken]") == 2 and "lr must be a number > 0" in stdout
    docs = results(out)
    assert sorted(d["seed"] for d in docs) == [0, 1] and all(d["budget"] == "smoke" for d in docs)
    code, stdout, _ = cli(capsys, "sweep", str(grid), "--out", str(out))
    assert "0 ran, 2 skipped (finished before), 2 failed" in stdout
    assert len(results(out)) == 2  # nothing ran twice


def test_an_interrupted_cell_resumes_from_its_checkpoint(capsys, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", METABENCH_FAULT="kill@meta-train:4")
    killed = subprocess.run([sys.executable, "-m", "metabench", "run", "--learner", "protonet", "--budget", "smoke",
                             "--episodes", "2", "--checkpoint-every", "2", "--task", "kanji-5w1s", "--out", str(out / "kanji-5w1s")],
                            env=env, capture_output=True, timeout=300)
    assert killed.returncode < 0
    grid = write_grid(tmp_path, 'learners = ["protonet"]\ntasks = ["kanji-5w1s"]\nbudgets = ["smoke"]\nepisodes = 2')
    code, stdout, _ = cli(capsys, "sweep", str(grid), "--out", str(out))
    assert code == 0 and "1 ran" in stdout
    (doc,) = results(out)
    assert doc["resumed"] == ["meta-train step 2"]


def test_flags_make_a_grid_without_a_file(capsys, tmp_path):
    code, stdout, _ = cli(capsys, "sweep", "--learners", "protonet", "--seeds", "3", "--budgets", "smoke",
                          "--episodes", "2", "--option", "live=false", "--out", str(tmp_path))
    assert code == 0 and "1 ran" in stdout
    assert [d["seed"] for d in results(tmp_path)] == [3]


def test_slurm_launcher_runs_a_job_array_through_submitit(capsys, tmp_path):
    pytest.importorskip("submitit")
    grid = write_grid(tmp_path, SMALL, 'name = "slurm"\ncluster = "local"\ntimeout_min = 10')
    code, stdout, err = cli(capsys, "sweep", str(grid), "--out", str(tmp_path / "out"))
    assert code == 0, stdout + err
    assert "2 ran" in stdout and sorted(d["seed"] for d in results(tmp_path / "out")) == [0, 1]
    assert list((tmp_path / "out" / ".sweep" / "submitit").iterdir())  # submitit's job folders


def test_ray_launcher_runs_each_cell_as_a_ray_task(capsys, tmp_path):
    pytest.importorskip("ray")
    grid = write_grid(tmp_path, SMALL, 'name = "ray"\nlocal_cpus = 2')
    code, stdout, err = cli(capsys, "sweep", str(grid), "--out", str(tmp_path / "out"))
    assert code == 0, stdout + err
    assert "2 ran" in stdout and sorted(d["seed"] for d in results(tmp_path / "out")) == [0, 1]


def test_the_committed_quick_grid_is_a_sweep_file():
    grid = read_grid(ROOT / "leaderboards" / "grid-quick.toml")
    assert len(grid.cells) == len({c.key for c in grid.cells}) == 36 + 36 + 12 + 8
    assert {c.budget for c in grid.cells} == {"quick"} and {c.threads for c in grid.cells} == {1}
    committed = {(p.parent.parent.name, p.parent.name) for p in (ROOT / "leaderboards" / "results").glob("*/*/*quick*.json")}
    assert {(c.task, c.learner) for c in grid.cells} == committed
