"""Built-in plugin ``training_curve``: the training curve of a run, as JSON lines beside its result.

Every progress report becomes one line ``{"phase", "step", "total", "seconds", <metrics>...}``
(``seconds`` since the run started; a metric that is not a finite number is written as null, so
each line stays valid JSON). While the run trains, lines stream to the hidden file
``<out>/.<run_id>.curve.jsonl.partial`` (each line handed to the OS as it is written, so a killed
process loses none: a resumed run needs them up to its checkpoint); once the result
``X.json`` is written, the partial file is renamed to ``X.curve.jsonl`` beside it (atomically).
``metabench plot X.json`` draws it. A run that fails leaves its partial file (hidden) behind; a
run resumed with ``--resume`` keeps its run id, so it continues that file (dropping the lines of
the steps after its checkpoint, which run again).

Runs without an output folder (``RunInfo.out_dir`` None: ``execute`` called as a library)
write nothing. State is kept per run, by ``run.run_id``.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

from metabench import RunInfo, hookimpl
from metabench.curves import FIXED_KEYS, curve_path_for



def partial_path(run: RunInfo) -> Path:
    """The hidden file the curve of ``run`` (one with an ``out_dir``) streams to while it trains."""
    return run.out_dir / f".{run.run_id}.curve.jsonl.partial"


def finite_or_none(value: Any) -> float | int | None:
    """``value`` as a JSON number, or None when it is not a finite number (NaN, inf, not numeric)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        number = float(value)  # floats, and scalar tensors / numpy numbers
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def lines_before(path: Path, phase: str, step: int) -> list[str]:
    """The lines of a resumed run's partial curve that come before its first report in this process
    (``phase``, ``step``): the steps after its last checkpoint, which run again, are dropped."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the process was killed mid-line
            break
        if record.get("phase") == phase and isinstance(record.get("step"), int) and record["step"] >= step:
            break
        kept.append(line + "\n")
    return kept


class CurveWriter:
    """The open partial curve file of one run (a resumed run's continues the file it started)."""

    def __init__(self, run: RunInfo, phase: str, step: int):
        self.run = run
        self.path = partial_path(run)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        earlier = lines_before(self.path, phase, step) if self.path.exists() else []
        self.file: TextIO = open(self.path, "w", encoding="utf-8", buffering=1)  # line buffered
        self.file.writelines(earlier)

    def write(self, phase: str, step: int, total: int, metrics: dict[str, Any]) -> None:
        record: dict[str, Any] = {"phase": str(phase), "step": int(step), "total": int(total),
                                  "seconds": round(time.time() - self.run.started, 3)}
        for name, value in metrics.items():
            if str(name) not in FIXED_KEYS:
                record[str(name)] = finite_or_none(value)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")

    def finish(self, target: Path) -> Path:
        """Flush, sync and close the partial file, then rename it to ``target``."""
        with self.file:
            self.file.flush()
            os.fsync(self.file.fileno())
        os.replace(self.path, target)
        return target


#: The open curve of each run still training, by run_id.
_WRITERS: dict[str, CurveWriter] = {}


@hookimpl
def metabench_on_progress(run: RunInfo, phase: str, step: int, total: int, metrics: dict) -> None:
    if run.out_dir is None:
        return
    writer = _WRITERS.get(run.run_id)
    if writer is None:
        writer = _WRITERS[run.run_id] = CurveWriter(run, phase, step)
    writer.write(phase, step, total, metrics)


@hookimpl
def metabench_on_result(run: RunInfo, result: dict, path: Path) -> None:
    writer = _WRITERS.pop(run.run_id, None)
    if writer is not None:
        writer.finish(curve_path_for(path))
    elif run.out_dir is not None and partial_path(run).exists():  # resumed after training: nothing new to add
        os.replace(partial_path(run), curve_path_for(path))
