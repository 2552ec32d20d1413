"""``metabench sweep``: a grid of runs (learners x tasks x seeds x budgets x setting variants),
carried out by a launcher plugin on an existing engine (local worker processes, Slurm through
submitit, Ray), never a scheduler of metabench's own.

A grid file::

    [grid]
    learners = ["protonet", "maml"]
    tasks = ["kanji-5w1s"]
    seeds = [0, 1, 2]
    budgets = ["quick"]              # default ["quick"]
    episodes = 600                   # optional: the first N fixed episodes
    out = "metabench-results/grid"   # optional; --out wins
    threads = 1                      # torch threads per cell (OMP_NUM_THREADS), default 1

    [[grid.variants]]                # optional: named setting variations, each cell runs every one
    name = "first-order"
    set = { first_order = true }     # --set KEY=VALUE of `metabench run`

    [launcher]                       # optional; --launcher NAME wins (one per file)
    name = "local"                   # local | slurm | ray | a third-party launcher plugin
    workers = 2                      # other keys: the launcher's options

A file may hold several grids as ``[[grid]]`` tables (each a product; their cells together).
Each cell is one ``metabench run`` in its own process, its result an ordinary result file in
``<out>/<task>/``. A cell is keyed by the SHA-256 of its whole configuration; a finished cell
(``<out>/.sweep/<key>.json`` naming its result, which still exists) is skipped, an interrupted one
continues from its checkpoint (``--resume``), and a failed one does not stop the others: it is
listed at the end with its one-line error.

A launcher plugin registers ``register(name, launcher_class)`` in ``metabench_register_launchers``;
the class subclasses :class:`Launcher`.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from .errors import MetabenchError
from .files import write_bytes_atomic

MARKERS = ".sweep"
_GRID_KEYS = {"learners", "tasks", "seeds", "budgets", "episodes", "out", "threads", "variants"}
_RESULT_LINE = re.compile(r"^result: (.+\.json)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Cell:
    """One run of a grid. ``settings``: the variant's ``--set`` pairs, sorted."""

    learner: str
    task: str
    seed: int
    budget: str
    variant: str = ""
    settings: tuple[tuple[str, str], ...] = ()
    episodes: int | None = None
    threads: int = 1

    @property
    def key(self) -> str:
        """SHA-256 of everything that defines the cell (threads included: they change float results)."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def folder(self) -> str:
        """The cell's folder under the sweep's out folder: the task's name, or for a task file (a path)
        ``task-file-<file name>-<hash of the path>``, so that no task can lead outside the out folder."""
        if not self.task.endswith(".toml") and re.fullmatch(r"[a-z0-9][a-z0-9_+.-]*", self.task):
            return self.task
        stem = re.sub(r"[^A-Za-z0-9_+-]", "_", Path(self.task).stem)
        return f"task-file-{stem}-{hashlib.sha256(self.task.encode()).hexdigest()[:8]}"

    @property
    def label(self) -> str:
        variant = f" [{self.variant}]" if self.variant else ""
        return f"{self.task} {self.learner}{variant} seed {self.seed} {self.budget}"

    def argv(self, out: Path, resume: bool) -> list[str]:
        args = ["run", "--learner", self.learner, "--task", self.task, "--seed", str(self.seed), "--budget",
                self.budget, "--out", str(out / self.folder)]
        if self.episodes is not None:
            args += ["--episodes", str(self.episodes)]
        for key, value in self.settings:
            args += ["--set", f"{key}={value}"]
        return args + (["--resume"] if resume else [])


@dataclass
class Outcome:
    """What became of a cell: status "done", "skipped" (finished before) or "failed"."""

    cell: Cell
    status: str
    result: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Grid:
    cells: list[Cell]
    out: Path | None
    launcher: dict[str, Any] = field(default_factory=dict)


def _as_list(doc: dict, key: str, kind: type, where: str, default=None) -> list:
    value = doc.get(key, default)
    if value is None:
        raise MetabenchError(f"{where}: [grid] needs {key} = [...]")
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                             for v in value):
        raise MetabenchError(f"{where}: [grid] {key} must be a non-empty list of {kind.__name__}s, got {value!r}")
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def grid_from_table(doc: dict, launcher: dict | None, where: str) -> Grid:
    """A Grid from a ``[grid]`` table (and a ``[launcher]`` table); MetabenchError naming ``where``."""
    unknown = sorted(set(doc) - _GRID_KEYS)
    if unknown:
        raise MetabenchError(f"{where}: unknown [grid] key(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(_GRID_KEYS))}")
    learners = _as_list(doc, "learners", str, where)
    tasks = _as_list(doc, "tasks", str, where)
    seeds = _as_list(doc, "seeds", int, where, [0])
    budgets = _as_list(doc, "budgets", str, where, ["quick"])
    episodes, threads = doc.get("episodes"), doc.get("threads", 1)
    for key, value in (("episodes", episodes), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MetabenchError(f"{where}: [grid] {key} must be a positive integer, got {value!r}")
    variants = [("", ())]
    if "variants" in doc:
        raw = doc["variants"]
        if not isinstance(raw, list) or not all(isinstance(v, dict) for v in raw):
            raise MetabenchError(f"{where}: [[grid.variants]] must be tables with name and set")
        variants = []
        for v in raw:
            name, sets = v.get("name"), v.get("set", {})
            if not isinstance(name, str) or not name or not isinstance(sets, dict) or set(v) - {"name", "set"}:
                raise MetabenchError(f"{where}: each [[grid.variants]] needs name = \"...\" and set = {{...}}, "
                                     f"got {v!r}")
            variants.append((name, tuple(sorted((k, _text(x)) for k, x in sets.items()))))
        names = [n for n, _ in variants]
        if len(set(names)) != len(names):
            raise MetabenchError(f"{where}: variant names repeat: {names}")
    cells = [Cell(learner, task, seed, budget, name, sets, episodes, threads)
             for task, learner, (name, sets), budget, seed in product(tasks, learners, variants, budgets, seeds)]
    out = Path(doc["out"]) if isinstance(doc.get("out"), str) else None
    return Grid(cells, out, dict(launcher or {}))


def read_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetabenchError(f"{path}: no such grid file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetabenchError(f"{path}: cannot read: {exc}") from None
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, a number of over 4300 digits, nested too deeply
        raise MetabenchError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"grid", "launcher"})
    tables = doc.get("grid")
    tables = [tables] if isinstance(tables, dict) else tables
    if unknown or not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise MetabenchError(f"{path}: a grid file has a [grid] table or [[grid]] tables (and optionally "
                             f"[launcher]); found {', '.join(map(repr, doc)) or 'nothing'}")
    launcher = doc.get("launcher", {})
    if not isinstance(launcher, dict):
        raise MetabenchError(f"{path}: [launcher] must be a table")
    grids = [grid_from_table(t, launcher, f"{path} [grid] {i + 1}" if len(tables) > 1 else str(path))
             for i, t in enumerate(tables)]
    cells = list({c.key: c for g in grids for c in g.cells}.values())  # a cell two grids share runs once
    outs = {g.out for g in grids if g.out is not None}
    if len(outs) > 1:
        raise MetabenchError(f"{path}: the [[grid]] tables name different out folders: {sorted(map(str, outs))}")
    return Grid(cells, outs.pop() if outs else None, dict(launcher))


def check_cells(cells: Iterable[Cell], host) -> None:
    """Every learner, task and budget of the grid exists (one line naming the first that does not)."""
    from .settings import BUDGETS

    from .runner import check_seed

    for cell in cells:
        host.learners.get(cell.learner)
        host.task(cell.task)
        if cell.budget not in BUDGETS:
            raise MetabenchError(f"grid budget {cell.budget!r}: accepted: {', '.join(BUDGETS)}")
        check_seed(cell.seed)


# ------------------------------------------------------------------------------ one cell

def marker(out: Path, cell: Cell) -> Path:
    return out / MARKERS / f"{cell.key}.json"


def finished(out: Path, cell: Cell) -> str | None:
    """The result of a cell that finished before (its marker names an existing result), else None."""
    path = marker(out, cell)
    try:
        result = json.loads(path.read_text(encoding="utf-8")).get("result")
    except (OSError, ValueError):
        return None
    return result if isinstance(result, str) and Path(result).exists() else None


def has_checkpoint(out: Path, cell: Cell) -> bool:
    from .resume import RunFolder

    task = cell.task if cell.folder == cell.task else "*"  # a task file's runs are named by its protocol
    folders = (out / cell.folder / "checkpoints").glob(f"{task}__{cell.learner}__*__{cell.budget}__seed{cell.seed}")
    return any(RunFolder(f.parent.parent, f.name).has_progress() for f in folders)


def run_cell(cell: Cell, out: str | Path) -> Outcome:
    """Run one cell as ``metabench run`` in a child process (module-level: launchers pickle it)."""
    out = Path(out)
    started = time.time()
    done = finished(out, cell)
    if done:
        return Outcome(cell, "skipped", done)
    env = dict(os.environ, OMP_NUM_THREADS=str(cell.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a cell is one process of its own, whatever launched the sweep
    argv = cell.argv(out, resume=has_checkpoint(out, cell))
    log_dir = out / MARKERS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "metabench", *argv], env=env, capture_output=True, text=True)
    (log_dir / f"{cell.key}.log").write_text(f"$ metabench {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}",
                                             encoding="utf-8")
    seconds = time.time() - started
    match = _RESULT_LINE.search(proc.stdout)
    if proc.returncode == 0 and match:
        result = match.group(1).strip()
        write_bytes_atomic(marker(out, cell), json.dumps({"cell": asdict(cell), "result": result}).encode("utf-8"))
        return Outcome(cell, "done", result, seconds=seconds)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metabench: ")]
    error = errors[0] if errors else f"exit status {proc.returncode} (log: {log_dir / (cell.key + '.log')})"
    return Outcome(cell, "failed", error=error, seconds=seconds)


# ------------------------------------------------------------------------------ launchers

class Launcher(abc.ABC):
    """Carries out the cells of a sweep on some engine.

    ``options``: the ``[launcher]`` table (name removed) and command-line overrides; check them in
    ``__init__`` (``MetabenchError`` naming the option and what is accepted). :meth:`run` calls
    ``run_cell(cell, out)`` for every cell somewhere (it is picklable) and ``report(outcome)``
    in this process as each finishes.
    """

    #: options a user may set, with a one-line description each (``metabench sweep --help-launcher``)
    options: ClassVar[dict[str, str]] = {}

    def __init__(self, options: dict[str, Any]):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise MetabenchError(f"launcher option(s) {', '.join(unknown)} unknown; accepted: "
                                 f"{', '.join(sorted(self.options)) or 'none'}")
        self.settings = dict(options)

    def int_option(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.settings.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise MetabenchError(f"launcher option {name}: expected an integer >= {minimum}, got {value!r}")
        return value

    @abc.abstractmethod
    def run(self, cells: list[Cell], out: Path, report: Callable[[Outcome], None]) -> None:
        """Run every cell; call ``report`` with each outcome as it arrives."""


def summary_lines(outcomes: list[Outcome]) -> list[str]:
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    lines = [f"{done} ran, {skipped} skipped (finished before), {len(failed)} failed"]
    lines += [f"failed: {o.cell.label}: {o.error}" for o in failed]
    return lines
