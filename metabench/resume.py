"""Runs that last: when a run writes checkpoints, how a resumed run takes its state back, Ctrl-C.

:class:`TrainingState` is the harness's side of the training-step contract
(:class:`metabench.learner.TrainContext`): at every step boundary it may write a checkpoint (every
``--checkpoint-every`` steps or seconds, at the end of each phase, and when the run is
interrupted), and on ``--resume`` it loads each tracked object's state when the learner tracks it
and puts the random states and the training sampler's position back when the phase the checkpoint
was taken in reaches its first remaining step. Evaluation keeps the episodes it has scored in
``evaluation.pt`` beside the checkpoints, so an interrupted evaluation continues.

Everything of one run lives in ``<out>/checkpoints/<run name>/``: ``run.pt`` (what defines the run,
to refuse a resume of another), ``checkpoint-NNNNNN.pt`` (the newest two), ``evaluation.pt``, and
``run.lock``, which the process running it holds (``flock``, exclusive) from the moment it opens the
folder until it ends: a second process given the same run and ``--out`` at the same time is refused
at once, touching nothing (:meth:`RunFolder.lock`). The lock dies with its process, so the file a
killed run leaves behind blocks nothing. The folder is removed once the result is written.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import faults
from .checkpoint import (CheckpointFolder, atomic_save, check_trackable, identity_difference, load_file,
                         load_object_state, object_state, rng_state, set_rng_state)
from .errors import MetabenchError, PluginError
from .learner import StepHooks, TrainContext

RUN_FILE = "run.pt"
EVAL_FILE = "evaluation.pt"
LOCK_FILE = "run.lock"
#: a checkpoint is never written sooner than this many times its last write's duration after it:
#: writing then costs at most 1 / COST_FACTOR = 2% of the run
COST_FACTOR = 50
DEFAULT_INTERVAL = "5m"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached a step boundary; the message says what was saved."""


@dataclass(frozen=True)
class CheckpointInterval:
    """When a checkpoint is written between phase ends: every ``steps`` steps, or every
    ``seconds`` seconds (each at least :data:`COST_FACTOR` times the last write's duration), or
    never (``off``: only at phase ends and interrupts). Evaluation progress uses the same rule,
    counting test episodes."""

    steps: int | None = None
    seconds: float | None = None
    text: str = DEFAULT_INTERVAL

    @classmethod
    def parse(cls, text: str | int) -> "CheckpointInterval":
        raw = str(text).strip().lower()
        if raw == "off":
            return cls(None, None, "off")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh])", raw)
        if m:
            seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
            if seconds > 0:
                return cls(None, seconds, raw)
        elif re.fullmatch(r"[0-9]{1,18}", raw) and int(raw) > 0:  # not "²" (a digit int() refuses) nor 5000 digits
            return cls(int(raw), None, raw)
        raise MetabenchError(f"--checkpoint-every {text!r}: accepted: a number of steps (100), a duration "
                             f"(30s, 10m, 2h) or off")


def run_folder_name(task: str, learner: str, backbone: str, budget: str, seed: int) -> str:
    parts = [task, learner, backbone, budget, f"seed{seed}"]
    return "__".join(re.sub(r"[^A-Za-z0-9._+-]", "_", str(p)) for p in parts)


def describe_position(doc: dict) -> str:
    if doc.get("phase") is None:
        return "before training"
    return f"{doc['phase']} step {doc['done'].get(doc['phase'], 0)}"


class RunFolder:
    """``<out>/checkpoints/<run name>/``: one run's checkpoints and evaluation progress."""

    def __init__(self, out_dir: Path, name: str):
        self.root = Path(out_dir) / "checkpoints"
        self.path = self.root / name
        self.checkpoints = CheckpointFolder(self.path)
        self.started_as: str | None = None  # the run id in run.pt, once load_latest has read it
        self._lock = None  # the open lock file while this process holds it (closing it releases the lock)
        self._lock_created = False  # whether this process made the lock file (then it removes it)

    @property
    def locked(self) -> bool:
        return self._lock is not None

    def lock(self) -> None:
        """Hold ``run.lock`` in the run's folder (made if need be) for as long as this process runs
        the run; MetabenchError at once, touching nothing, when another process holds it.

        The lock is ``flock(LOCK_EX | LOCK_NB)`` on the open file: the system drops it when the
        process ends, however it ends, so a lock file left by a killed run does not block. After
        locking, the file must still be the one at the path (a holder that finishes removes its
        folder); otherwise the new file is locked instead. On a file system without ``flock`` the
        run goes on unlocked."""
        if self._lock is not None:
            return
        path = self.path / LOCK_FILE
        for _ in range(100):  # each turn: another holder finished between our open and lock
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    created = True
                except FileExistsError:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                    created = False
            except FileNotFoundError:
                continue  # the folder or the file was removed meanwhile (a holder that finished): again
            except OSError as exc:
                self._remove_if_empty()
                raise MetabenchError(f"cannot write {path}: {exc.strerror or exc}") from None
            fh = os.fdopen(fd, "r+b")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise MetabenchError(f"{self.path}: another process is running this run (it holds {LOCK_FILE}); "
                                     "wait for it to end, or give this one another --out") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    fh.close()
                    raise MetabenchError(f"cannot lock {path}: {exc.strerror or exc}") from None
                # a file system without flock: run unlocked, as before there were locks
            try:
                mine = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
            except FileNotFoundError:
                mine = False
            if mine:
                self._lock, self._lock_created = fh, created
                return
            fh.close()  # locked a file its holder had just removed: lock the one at the path now
        raise MetabenchError(f"cannot lock {path}: it keeps being removed (another process is starting and ending "
                             "this run)")

    def unlock(self) -> None:
        """Release the lock (removing the lock file where this process made it) and remove the run's
        folder, and ``<out>/checkpoints``, where they are left empty. A no-op when not locked."""
        fh, self._lock = self._lock, None
        if fh is None:
            return
        if self._lock_created:  # still locked: no other process can be using the file
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        fh.close()
        self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        for folder in (self.path, self.root):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                return

    def exists(self) -> bool:
        return (self.path / RUN_FILE).exists()

    def read_run_file(self, folder: Path | None = None) -> dict:
        """``run.pt``: {"identity": what defines the run, "run_id": the id it started with}."""
        doc = load_file((folder or self.path) / RUN_FILE, "metabench run file")
        if not isinstance(doc.get("identity"), dict):
            raise MetabenchError(f"{(folder or self.path) / RUN_FILE}: damaged metabench run file")
        return doc

    def identity(self, folder: Path | None = None) -> dict:
        return self.read_run_file(folder)["identity"]

    def start(self, identity: dict, run_id: str) -> None:
        atomic_save({"identity": identity, "run_id": run_id}, self.path / RUN_FILE)  # makes the folder

    def has_progress(self) -> bool:
        """Whether there is anything to resume from (a checkpoint or evaluation progress)."""
        return bool(self.checkpoints.files()) or (self.path / EVAL_FILE).exists()

    def check_fresh(self) -> None:
        """A run without --resume must not overwrite the checkpoints of an unfinished one."""
        if self.has_progress():
            latest = self.checkpoints.latest()
            where = f" (newest: {latest.name})" if latest else ""
            raise MetabenchError(f"{self.path} holds checkpoints of this run{where}: add --resume to continue it, "
                                 f"or remove that folder to start over")

    def nearest_difference(self, identity: dict) -> str:
        """For a --resume that finds no folder of its own: how the nearest other run differs."""
        others = [p for p in self.root.iterdir() if (p / RUN_FILE).exists()] if self.root.is_dir() else []
        if not others:
            return f"--resume: no checkpoint to continue in {self.root}"
        best = None
        for folder in others:
            try:
                theirs = self.identity(folder)
            except MetabenchError:
                continue
            score = sum(theirs.get(k) != identity.get(k) for k in set(theirs) | set(identity))
            if best is None or score < best[0]:
                best = (score, folder, identity_difference(theirs, identity))
        if best is None:
            return f"--resume: no readable checkpoint in {self.root}"
        return f"--resume: no checkpoint of this run in {self.root}; the nearest, {best[1].name}, differs: {best[2]}"

    def load_latest(self, identity: dict) -> dict:
        """The newest checkpoint of this run, checked against ``identity``; MetabenchError if it is
        another run's or damaged (naming the file, and the older one that is kept)."""
        if not self.exists():
            raise MetabenchError(self.nearest_difference(identity))
        run_file = self.read_run_file()
        self.started_as = run_file.get("run_id") if isinstance(run_file.get("run_id"), str) else None
        difference = identity_difference(run_file["identity"], identity)
        if difference:
            raise MetabenchError(f"--resume: {self.path} is another run: {difference}")
        for stale in self.path.glob(".*.tmp"):  # a write the killed process never finished
            stale.unlink(missing_ok=True)
        files = self.checkpoints.files()
        if not files:
            return {}  # interrupted before its first checkpoint: start from the beginning
        try:
            doc = self.checkpoints.read(files[-1])
        except MetabenchError as exc:
            kept = f"; the older {files[-2].name} is kept: remove the damaged file to resume from it" \
                if len(files) > 1 else ""
            raise MetabenchError(f"{exc}{kept}") from None
        difference = identity_difference(doc["identity"], identity)
        if difference:
            raise MetabenchError(f"--resume: {files[-1]} is another run's checkpoint: {difference}")
        return doc

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.root.rmdir()  # only when empty
        except OSError:
            pass


class TrainingState(StepHooks):
    """The harness at the training steps of one run: checkpoints, resume, validation, interrupts.

    folder:    where checkpoints go (None: none are written, as for a library call of ``execute``)
    identity:  what defines the run (written into every checkpoint)
    interval:  :class:`CheckpointInterval`
    resume:    the checkpoint to continue from ({} or None: start from the beginning)
    validator: a :class:`metabench.validation.Validator`, or None
    """

    def __init__(self, folder: RunFolder | None, identity: dict, interval: CheckpointInterval,
                 resume: dict | None = None, validator=None):
        self.folder, self.identity, self.interval = folder, identity, interval
        self.resume = resume or None
        self.validator = validator
        self.ctx: TrainContext | None = None
        self.loaded: set[str] = set()
        self.restored = self.resume is None
        self.last_path: Path | None = None
        self.last_position: tuple | None = None
        self._since_steps = 0
        self._last_time = time.perf_counter()
        self._last_cost = 0.0
        self._stop: str | None = None
        self.writes = 0
        self.write_seconds = 0.0  # time spent writing checkpoints in this process
        self._handlers: dict[int, Any] = {}
        if self.resume and validator is not None and self.resume.get("validation") is not None:
            validator.load_state_dict(self.resume["validation"])

    # -------------------------------------------------------------- wiring

    def attach(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        ctx.hooks = self
        self.started = time.perf_counter()
        self.prior_seconds = float(self.resume.get("seconds", 0.0)) if self.resume else 0.0
        self.resumed: list[str] = list(self.resume.get("resumed", [])) if self.resume else []
        if self.resume:
            ctx.done.update({k: int(v) for k, v in self.resume["done"].items()})
            self.resumed.append(describe_position(self.resume))

    def training_seconds(self) -> float:
        """Training time of the steps this run keeps: earlier processes' (up to the checkpoint
        resumed from) plus this one's."""
        return self.prior_seconds + time.perf_counter() - self.started

    def catch_interrupts(self) -> None:
        """Ctrl-C and SIGTERM (a cluster's notice before it stops a job) finish the current step,
        write a checkpoint and stop the run; a second Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread() or self.folder is None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._handlers[sig] = signal.signal(sig, self._request_stop)

    def release_interrupts(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers.clear()

    def _request_stop(self, signum, frame) -> None:
        self._stop = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    @property
    def stop_requested(self) -> str | None:
        return self._stop

    # -------------------------------------------------------------- StepHooks

    def on_track(self, name: str, obj: Any) -> None:
        check_trackable(name, obj)  # a tracked object must be checkpointable: fail at track time
        if self.resume and name in self.resume["tracked"]:
            try:
                load_object_state(name, obj, self.resume["tracked"][name])
            except Exception as exc:
                raise PluginError(f"the checkpoint's state of {name!r} does not fit the learner's: "
                                  f"{type(exc).__name__}: {exc}") from None
            self.loaded.add(name)

    def on_phase_start(self, phase: str) -> None:
        if not self._handlers:
            self.catch_interrupts()  # a learner with its own loop never gets here: Ctrl-C stops it at once
        if not self.restored and phase == self.resume["phase"]:
            set_rng_state(self.resume["rng"])
            self.ctx.generator.set_state(self.resume["generator"])
            self.ctx.sampler.load_state_dict(self.resume["sampler"])
            self.restored = True

    def on_step_done(self, phase: str, step: int, total: int) -> None:
        if self.validator is not None:
            self.validator.after_step(phase, step, total)
        self._since_steps += 1
        if self._stop:
            path = self.save()
            raise RunInterrupted(self.interrupt_message(f"{phase} step {step}", path))
        if self.folder is None:
            return
        iv = self.interval
        due = (iv.steps is not None and self._since_steps >= iv.steps) or (
            iv.seconds is not None and time.perf_counter() - self._last_time >= max(iv.seconds, COST_FACTOR * self._last_cost))
        if due:
            self.save()

    def on_phase_end(self, phase: str, total: int) -> None:
        if self.folder is not None:
            self.save()

    # -------------------------------------------------------------- checkpoints

    def position(self) -> tuple:
        ctx = self.ctx
        return ctx.phase, tuple(sorted(ctx.done.items()))

    def save(self) -> Path | None:
        """Write a checkpoint of the state at this step boundary (skipped when nothing moved since
        the last one); returns its path."""
        if self.folder is None:
            return None
        if self.position() == self.last_position:
            return self.last_path
        started = time.perf_counter()
        ctx = self.ctx
        state = {
            "identity": self.identity,
            "phase": ctx.phase,
            "done": dict(ctx.done),
            "tracked": {name: object_state(name, obj) for name, obj in ctx.tracked.items()},
            "rng": rng_state(),
            "generator": ctx.generator.get_state(),
            "sampler": ctx.sampler.state_dict(),
            "validation": self.validator.state_dict() if self.validator is not None else None,
            "seconds": self.training_seconds(),
            "resumed": list(self.resumed),
        }
        self.writes += 1
        n = self.writes
        self.last_path = self.folder.checkpoints.write(state, before_rename=lambda: faults.kill_point(f"checkpoint:{n}"))
        self.last_position = self.position()
        self._since_steps = 0
        self._last_time = time.perf_counter()
        self._last_cost = self._last_time - started
        self.write_seconds += self._last_cost
        return self.last_path

    def interrupt_message(self, where: str, path: Path | None) -> str:
        saved = f"checkpoint {path}" if path else "no checkpoint (this run writes none)"
        return f"stopped by {self._stop} at {where}; {saved}; run the same command with --resume to continue"

    def finish_resume(self, who: str) -> None:
        """After ``meta_train``: a resumed run must have taken back everything it saved."""
        if not self.resume:
            return
        missing = sorted(set(self.resume["tracked"]) - self.loaded)
        if missing:
            raise PluginError(f"{who} did not track {', '.join(missing)} when resumed; the checkpoint holds them "
                              "(a learner must track the same objects on every run)")
        if not self.restored:
            raise PluginError(f"{who} never ran phase {self.resume['phase']!r} when resumed; the checkpoint was "
                              "taken in it")


class EvaluationProgress:
    """The test episodes scored so far, in ``evaluation.pt``: an interrupted evaluation continues
    after the last one recorded, with the random states it had there."""

    def __init__(self, folder: RunFolder | None, identity: dict, interval: CheckpointInterval):
        self.folder, self.identity, self.interval = folder, identity, interval
        self.writes, self.write_seconds = 0, 0.0
        self._since = 0
        self._last_time = time.perf_counter()
        self._last_cost = 0.0

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder.path / EVAL_FILE

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        doc = load_file(self.path, "metabench evaluation progress file")
        difference = identity_difference(doc.get("identity", {}), self.identity)
        if difference:
            raise MetabenchError(f"--resume: {self.path} is another run's: {difference}")
        return doc

    def save(self, record: dict) -> None:
        if self.folder is None:
            return
        started = time.perf_counter()
        atomic_save({"identity": self.identity, "rng": rng_state(), **copy.deepcopy(record)}, self.path)
        self._since = 0
        self._last_time = time.perf_counter()
        self._last_cost = self._last_time - started
        self.writes += 1
        self.write_seconds += self._last_cost

    def due(self) -> bool:
        self._since += 1
        iv = self.interval
        return self.folder is not None and (
            (iv.steps is not None and self._since >= iv.steps)
            or (iv.seconds is not None
                and time.perf_counter() - self._last_time >= max(iv.seconds, COST_FACTOR * self._last_cost)))

