"""Result files: one JSON document per run, written atomically, validated when read.

The schema (version :data:`SCHEMA_VERSION`) is :data:`_REQUIRED` below, the one definition of
the keys other tools may rely on, plus the optional ``per_step`` (:func:`per_step_problems`);
:func:`schema_problems` checks a document against both, that its names are plain names (they reach
file names), that its episode hash is a SHA-256 and that its summary is what ``per_episode`` gives
(recomputed); the runner's document must pass it before it is written, and every reader (compare,
plot, publish, leaderboard) reads through :func:`load_result`. Producers may add keys (the runner
records more: ``created_utc``, ``learner.transductive``, ``learner.resumable``,
``backbone.parameters``, ``precision``, ``evaluation``, ...; the last two are checked where present,
:func:`compute_problems`); readers must not require them.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import MetabenchError
from .files import write_bytes_atomic
from .settings import PRECISIONS

SCHEMA_VERSION = 1
#: Test-time step counts after which a regression result records the metric of every episode
#: (``per_step``): Finn et al. 2017 report sine regression after 1 and up to 10 gradient steps.
PER_STEP_COUNTS = (1, 5, 10)

_REQUIRED: dict[str, Any] = {
    "schema_version": int,
    "metabench_version": str,
    "task": {"name": str, "version": int, "ways": int, "shots": int, "queries": int, "episodes": int,
             "episodes_sha256": str, "metric": str, "higher_is_better": bool},
    "learner": {"name": str, "plugin": str, "version": str, "config": dict},
    "backbone": {"name": str, "options": dict},
    "seed": int,
    "budget": str,
    "per_episode": list,
    "summary": {"mean": float, "std": (float, type(None)), "n": int, "ci95": (float, type(None)), "ci_method": str},
    "timing": {"meta_train_s": float, "eval_s": float},
    "environment": {"python": str, "torch": str, "device": str, "git_commit": (str, type(None))},
}


#: a task name as :class:`metabench.task.Protocol` accepts it (the same pattern as ``task._NAME_RE``,
#: kept here so that reading results needs no torch); names reach file names (leaderboard tables)
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*-[0-9]+w[0-9]+s$|^[a-z0-9][a-z0-9_]*-[0-9]+s$|^[a-z0-9][a-z0-9_]*-md$")
#: a learner or budget name as the plugin host accepts it (``plugins._NAME``); a backbone may add ``:variant``
PLAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_+.-]*$")
BACKBONE_NAME = re.compile(r"^[a-z0-9][a-z0-9_+.-]*(:[A-Za-z0-9_+.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def schema_problems(doc: Any, spec: dict = _REQUIRED, where: str = "") -> list[str]:
    """Every way ``doc`` departs from the schema (empty when valid)."""
    if not isinstance(doc, dict):
        return [f"{where or 'result'} must be an object"]
    problems = []
    for key, kind in spec.items():
        path = f"{where}.{key}" if where else key
        if key not in doc:
            problems.append(f"missing {path}")
        elif isinstance(kind, dict):
            problems.extend(schema_problems(doc[key], kind, path))
        else:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            value = doc[key]
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                problems.append(f"{path} should be {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    if not problems and not where:
        per = doc["per_episode"]
        if not all(_finite(v) for v in per):
            problems.append("per_episode must hold finite numbers")
        if len(per) != doc["task"]["episodes"] or len(per) != doc["summary"]["n"]:
            problems.append(f"per_episode has {len(per)} values but task.episodes is {doc['task']['episodes']} "
                            f"and summary.n is {doc['summary']['n']}")
        problems.extend(per_step_problems(doc))
        problems.extend(compute_problems(doc))
        problems.extend(name_problems(doc))
        if not problems:
            problems.extend(summary_problems(doc))
        if doc["schema_version"] != SCHEMA_VERSION:
            problems.append(f"schema_version {doc['schema_version']} is not supported (this metabench reads {SCHEMA_VERSION})")
    return problems


def _finite(value: Any) -> bool:
    """A number (not a bool) that is finite as a float (an integer too large for a float is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def name_problems(doc: dict) -> list[str]:
    """Names that are not plain names (they reach file and folder names) and a malformed episode hash."""
    checks = [("task.name", doc["task"]["name"], TASK_NAME, "a task name like 'kanji-5w1s'"),
              ("learner.name", doc["learner"]["name"], PLAIN_NAME, "a plain lowercase name like 'maml'"),
              ("backbone.name", doc["backbone"]["name"], BACKBONE_NAME, "a plain lowercase name like 'conv4'"),
              ("budget", doc["budget"], PLAIN_NAME, "a plain lowercase name like 'quick'"),
              ("task.episodes_sha256", doc["task"]["episodes_sha256"], _SHA256, "64 lowercase hex digits")]
    return [f"{key} {value!r} is not {accepted}" for key, value, pattern, accepted in checks
            if not pattern.match(value)]


def summary_problems(doc: dict) -> list[str]:
    """Where ``summary`` is not what ``per_episode`` gives (mean, std, n, ci95 recomputed)."""
    from .stats import summarize

    per = doc["per_episode"]
    if not per:
        return ["per_episode is empty"]
    try:
        fresh = summarize(per)
    except OverflowError:
        return ["per_episode values are too large to summarize"]
    problems = []
    for key, tolerance in (("mean", 1e-9), ("std", 1e-6), ("ci95", 1e-6)):
        want, got = getattr(fresh, key), doc["summary"][key]
        if (want is None) != (got is None) or (want is not None and not (_finite(got) and math.isclose(
                got, want, rel_tol=tolerance, abs_tol=1e-12))):
            problems.append(f"summary.{key} {got!r} is not the {key} of per_episode ({want!r})")
    return problems


def per_step_problems(doc: dict) -> list[str]:
    """What is wrong with the optional ``per_step`` entry: {"<steps>": [metric per episode, or null]}."""
    if "per_step" not in doc:
        return []
    per_step = doc["per_step"]
    if not isinstance(per_step, dict) or not per_step:
        return ["per_step must be a non-empty object"]
    problems = []
    for key, values in per_step.items():
        if not key.isdigit():
            problems.append(f"per_step key {key!r} is not a step count")
        elif not isinstance(values, list) or len(values) != len(doc["per_episode"]):
            problems.append(f"per_step.{key} must list one value per episode ({len(doc['per_episode'])})")
        elif not all(v is None or _finite(v) for v in values):
            problems.append(f"per_step.{key} must hold finite numbers or null")
    return problems


def trained_precision(doc: dict) -> str:
    """The precision a result's learner was trained in (``precision``; a file from before runs had
    one, or a saved learner that does not say, trained in fp32)."""
    return doc.get("precision") or "fp32"


def compute_problems(doc: dict) -> list[str]:
    """What is wrong with the optional ``precision`` (the training precision, one of
    :data:`~metabench.settings.PRECISIONS`) and ``evaluation`` ({"batch": test episodes per predict call,
    "precision": what the predictions ran in}) entries."""
    problems = []
    if "precision" in doc and doc["precision"] not in PRECISIONS:
        problems.append(f"precision {doc['precision']!r} is not one of {', '.join(PRECISIONS)}")
    if "evaluation" in doc:
        ev = doc["evaluation"]
        if not isinstance(ev, dict):
            return problems + ["evaluation must be an object"]
        batch = ev.get("batch")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            problems.append(f"evaluation.batch must be a positive integer, got {batch!r}")
        if ev.get("precision") not in PRECISIONS:
            problems.append(f"evaluation.precision {ev.get('precision')!r} is not one of {', '.join(PRECISIONS)}")
    return problems


def load_result(path: str | Path) -> dict:
    """Read and validate a result file; any problem raises MetabenchError naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetabenchError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetabenchError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MetabenchError(f"{path}: not a metabench result (invalid JSON: {exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:  # a number of over 4300 digits
        raise MetabenchError(f"{path}: not a metabench result (invalid JSON: {exc})") from None
    except RecursionError:
        raise MetabenchError(f"{path}: not a metabench result (JSON nested too deeply)") from None
    problems = schema_problems(doc)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise MetabenchError(f"{path}: not a valid metabench result: {shown}")
    return doc


def result_filename(doc: dict) -> str:
    """``<task>__<learner>__<backbone>__<budget>__seed<seed>__<utc time>.json``; a cross-task result
    (``trained_on.task`` another task) has ``from-<training task>`` after the learner."""
    parts = [doc["task"]["name"], doc["learner"]["name"], doc["backbone"]["name"], doc["budget"], f"seed{doc['seed']}"]
    trained = (doc.get("trained_on") or {}).get("task")
    if trained and trained != doc["task"]["name"]:  # a saved learner tested on another task
        parts.insert(2, f"from-{trained}")
    created = doc.get("created_utc")  # optional: a file without it (or with another value) gets no time stamp
    stamp = created.replace(":", "").replace("-", "") if isinstance(created, str) else ""
    return "__".join(p.replace("/", "_").replace(":", "_") for p in parts + ([stamp] if stamp else [])) + ".json"


def write_result(doc: dict, out_dir: str | Path) -> Path:
    """Write ``doc`` into ``out_dir`` atomically (temp file + fsync + link); never overwrites.

    Returns the path written. A name already taken gets a numeric suffix, claimed atomically, so two
    runs finishing in the same second (the name's time stamp) both keep their file. A failed write
    (full disk, read-only folder) is one line naming the path, and leaves no file.
    """
    problems = schema_problems(doc)
    if problems:
        raise ValueError(f"refusing to write an invalid result: {'; '.join(problems)}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MetabenchError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not out.is_dir():
        raise MetabenchError(f"--out {out} is not a folder")
    text = json.dumps(doc, indent=1, sort_keys=False, allow_nan=False) + "\n"
    return write_bytes_atomic(out / result_filename(doc), text.encode("utf-8"), exclusive=True, suffix=".json")
