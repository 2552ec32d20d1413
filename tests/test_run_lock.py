"""Two identical runs into one --out at the same time: the second is refused at once, the first goes on.

A run holds ``<out>/checkpoints/<run>/run.lock`` (flock, exclusive) while it runs (metabench/resume.py,
RunFolder.lock). The first run here is a real process held in mid-training by the ``pause@`` fault
(metabench/faults.py) until the test releases it; the second runs in this process. A lock dies with
its process: the lock file a SIGKILLed run leaves behind blocks neither ``--resume`` nor a check.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import error_line, run_cli

from metabench.errors import MetabenchError
from metabench.resume import LOCK_FILE, RunFolder

ROOT = Path(__file__).resolve().parents[1]
BUSY = "another process is running this run"


def args(out: Path, *extra: str) -> list[str]:
    return ["run", "--learner", "protonet", "--task", "kanji-5w1s", "--budget", "smoke", "--episodes", "2",
            "--set", "meta_steps=3", "--checkpoint-every", "1", "--out", str(out), *extra]


def start(argv: list[str], fault: str, release: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), METABENCH_FAULT=fault)
    if release is not None:
        env["METABENCH_FAULT_RELEASE"] = str(release)
    return subprocess.Popen([sys.executable, "-m", "metabench.cli", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_identical_run_is_refused_at_once_and_the_first_finishes(capsys, tmp_path):
    out, release = tmp_path / "out", tmp_path / "release"
    first = start(args(out), "pause@meta-train:2", release)
    try:
        deadline = time.monotonic() + 240
        while not Path(f"{release}.paused").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(f"{release}.paused").exists(), first.communicate(timeout=60)[1][-2000:]
        (folder,) = (out / "checkpoints").iterdir()
        assert (folder / LOCK_FILE).exists() and (folder / "checkpoint-000001.pt").exists()
        before = snapshot(out)
        for extra in ((), ("--resume",)):  # a fresh run and a resume alike
            code, _, err = run_cli(capsys, *args(out, *extra))
            line = error_line(err)
            assert code == 2 and str(folder) in line and BUSY in line, line
            assert len(err.strip().splitlines()) == 1
            assert first.poll() is None  # refused while the first is still held: it did not wait for it
            assert snapshot(out) == before  # nothing of the first run's touched
    finally:
        release.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert len(list(out.glob("*.json"))) == 1 and not (out / "checkpoints").exists()


def test_the_lock_file_of_a_killed_run_blocks_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    killed = start(args(out), "kill@meta-train:2")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    (folder,) = (out / "checkpoints").iterdir()
    assert (folder / LOCK_FILE).exists()  # left behind, but no process holds its lock
    before = snapshot(out)
    code, _, err = run_cli(capsys, *args(out))  # a fresh run is refused for the checkpoints, not the lock
    line = error_line(err)
    assert code == 2 and "add --resume to continue it" in line and BUSY not in line
    assert snapshot(out) == before
    code, _, err = run_cli(capsys, *args(out, "--resume"))
    assert code == 0, err
    assert len(list(out.glob("*.json"))) == 1 and not (out / "checkpoints").exists()


def test_one_lock_per_run_folder_released_and_removed_at_the_end(tmp_path):
    a, b = RunFolder(tmp_path, "run"), RunFolder(tmp_path, "run")
    a.lock()
    assert a.locked and (tmp_path / "checkpoints" / "run" / LOCK_FILE).exists()
    with pytest.raises(MetabenchError, match=f"^{tmp_path / 'checkpoints' / 'run'}: {BUSY}"):
        b.lock()  # another open file of the same lock: refused like another process
    assert not b.locked
    a.lock()  # idempotent
    a.unlock()
    assert not (tmp_path / "checkpoints").exists()  # the lock file and the folders it needed: gone
    b.lock()
    (b.path / "checkpoint-000001.pt").write_bytes(b"x")
    b.unlock()
    assert sorted(p.name for p in b.path.iterdir()) == ["checkpoint-000001.pt"]  # progress kept, lock gone
    c = RunFolder(tmp_path, "run")
    c.lock()
    c.unlock()
    assert (b.path / "checkpoint-000001.pt").exists()  # its folder, not empty, stays
