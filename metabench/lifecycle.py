"""What lifecycle hooks are told about the run they observe: :class:`RunInfo`.

``metabench_on_progress(run, ...)`` and ``metabench_on_result(run, ...)`` get the same ``RunInfo``
for one run; a plugin that keeps state per run keys it by ``run.run_id``.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_RUNS_IN_THIS_PROCESS = itertools.count(1)


@dataclass(frozen=True)
class RunInfo:
    """One run, as lifecycle hooks see it.

    learner, task, backbone, seed, budget: what is run (backbone: the resolved name).
    out_dir:  the folder the result file will be written to, or None when the caller writes no
              result (``metabench.runner.execute`` called as a library): write nothing then.
    run_id:   unique among runs (task, learner, backbone, budget, seed, UTC time, process id and a
              per-process count), and safe as part of a file name; a resumed run keeps its first id.
    started:  when the run started, in seconds since the epoch (``time.time()``).
    """

    learner: str
    task: str
    backbone: str
    seed: int
    budget: str
    out_dir: Path | None
    run_id: str
    started: float

    @classmethod
    def start(cls, learner: str, task: str, backbone: str, seed: int, budget: str,
              out_dir: str | Path | None = None, run_id: str | None = None, elapsed: float = 0.0) -> "RunInfo":
        """A RunInfo for a run starting now, with a fresh ``run_id``; a resumed run passes the id
        it started with and the seconds it had already run (``started`` is moved back by them)."""
        if run_id is not None:
            return cls(learner, task, backbone, seed, budget, None if out_dir is None else Path(out_dir), run_id,
                       time.time() - elapsed)
        started = time.time()
        stamp = _dt.datetime.fromtimestamp(started, _dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        parts = [task, learner, backbone, budget, f"seed{seed}", stamp, f"p{os.getpid()}-{next(_RUNS_IN_THIS_PROCESS)}"]
        run_id = "__".join(_UNSAFE.sub("_", str(p)) for p in parts)
        return cls(learner, task, backbone, seed, budget, None if out_dir is None else Path(out_dir), run_id, started)
