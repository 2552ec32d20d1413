"""Publishing a result: validate it against the installed task, then copy it into the leaderboard.

A result is accepted when it is a valid result file (schema), its task is installed with the same
version and episode shape, its ``episodes_sha256`` is the hash of the first ``task.episodes``
evaluation episodes of the installed task, its summary mean matches its per-episode values, and the
leaderboard holds no other result for the same task, learner, backbone, budget, seed, episode set and
training task (the same result again is not copied twice: publishing is idempotent). A cross-task result (``trained_on.task`` names another task: a saved learner evaluated
by ``metabench eval``) is validated against the task it was tested on, like any other; its training
task must be a plain name, and is part of what tells it apart from the same-task run of that seed.
A result of a task file (``task.task_file``) is checked against that file and its folder as they are
now: a folder whose class or file names changed gives another ``data_sha256`` and is refused.
All files are validated before any is copied: one refusal copies nothing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .episodes import episodes_sha256, eval_draws
from .errors import MetabenchError
from .files import write_bytes_atomic
from .leaderboard import settings_sha, trained_on_problem, training_task
from .results import load_result, result_filename, trained_precision

DEFAULT_DEST = Path("leaderboards/results")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_+.-]*$")


@dataclass(frozen=True)
class Accepted:
    source: Path
    doc: dict
    target: Path
    existing: bool = False  # the same document is already in the leaderboard (target is that file)
    duplicate: bool = False  # the same document was given earlier in the same command


def run_key(doc: dict) -> tuple:
    """What makes two results the same run for the leaderboard (one row, one seed); the training task
    (None for same-task) keeps a cross-task result apart from the same-task run of its learner and seed,
    and the training precision a bf16 run apart from the fp32 one."""
    return (doc["task"]["name"], doc["learner"]["name"], doc["backbone"]["name"], settings_sha(doc), doc["budget"],
            doc["seed"], doc["task"]["episodes_sha256"], training_task(doc), trained_precision(doc))


def validate(path: Path, host, hash_cache: dict | None = None, roots=None) -> dict:
    """The result document at ``path`` if it may be published; otherwise MetabenchError with the reason.

    ``roots`` (a DataRoots) tells task sources that need their data to draw episodes where it is.
    """
    try:
        doc = load_result(path)
    except MetabenchError as exc:
        raise MetabenchError(f"{path}: refused: {str(exc).removeprefix(f'{path}: ')}") from None
    task = doc["task"]
    problem = trained_on_problem(doc)
    if problem:
        raise MetabenchError(f"{path}: refused: {problem}")
    names = [("learner", doc["learner"]["name"]), ("backbone", doc["backbone"]["name"]), ("budget", doc["budget"])]
    if training_task(doc) is not None:
        names.append(("training task", training_task(doc)))
    for what, name in names:
        if not _NAME.match(name):
            raise MetabenchError(f"{path}: refused: {what} name {name!r} is not a plain lowercase name")
    try:  # a task file's result is checked against the task file it names (its folder as it is now)
        protocol, source, _ = host.task(task["task_file"] if isinstance(task.get("task_file"), str) else task["name"])
    except MetabenchError as exc:
        raise MetabenchError(f"{path}: refused: {exc}") from None
    if protocol.name != task["name"]:
        raise MetabenchError(f"{path}: refused: its task file {task['task_file']} now defines task {protocol.name}, "
                             f"not {task['name']}")
    if task.get("data_sha256") != protocol.data_sha256:
        raise MetabenchError(f"{path}: refused: made from another copy of the data of {protocol.name} (data_sha256 "
                             f"{str(task.get('data_sha256'))[:12]}…; the folder now gives "
                             f"{str(protocol.data_sha256)[:12]}…): a changed folder is another data set")
    if task["version"] != protocol.version:
        age = "an older" if task["version"] < protocol.version else "a newer"
        raise MetabenchError(f"{path}: refused: made with {age} version of task {protocol.name} (v{task['version']}; "
                             f"installed: v{protocol.version}); rerun it with the installed task")
    shape = ("ways", "shots", "queries", "metric", "higher_is_better")
    differ = [f"{k} {task[k]!r} (installed: {getattr(protocol, k)!r})" for k in shape if task[k] != getattr(protocol, k)]
    if differ:
        raise MetabenchError(f"{path}: refused: task {protocol.name} v{protocol.version} differs: {', '.join(differ)}")
    n = task["episodes"]
    key = (protocol.name, protocol.version, n)
    cache = {} if hash_cache is None else hash_cache
    if key not in cache:
        if roots is not None:
            source.set_roots(roots)
        cache[key] = episodes_sha256(eval_draws(protocol, source, protocol.eval_split, n))
    if task["episodes_sha256"] != cache[key]:
        raise MetabenchError(f"{path}: refused: episodes_sha256 {task['episodes_sha256'][:12]}… is not the hash of the "
                             f"first {n} {protocol.eval_split} episodes of {protocol.name} v{protocol.version} "
                             f"({cache[key][:12]}…): a different episode set")
    mean = math.fsum(doc["per_episode"]) / len(doc["per_episode"])
    if not math.isclose(mean, doc["summary"]["mean"], rel_tol=1e-9, abs_tol=1e-12):
        raise MetabenchError(f"{path}: refused: summary.mean {doc['summary']['mean']!r} is not the mean of per_episode "
                             f"({mean!r})")
    return doc


def plan(paths: list[Path], host, dest: Path = DEFAULT_DEST, roots=None) -> list[Accepted]:
    """Validate every file and decide where each goes; raises on the first refusal (nothing copied).

    A result whose document is already in ``dest`` (the same run, the same values: a second publish
    of the same file) is accepted with ``existing`` set and is not copied again, so publishing is
    idempotent; another result of the same run is refused."""
    accepted: list[Accepted] = []
    cache: dict = {}
    for path in paths:
        doc = validate(path, host, cache, roots)
        folder = dest / doc["task"]["name"] / doc["learner"]["name"]
        existing = None
        for other in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                theirs = load_result(other)
            except MetabenchError:
                continue
            if run_key(doc) == run_key(theirs):
                if theirs == doc:
                    existing = other
                    break
                raise MetabenchError(f"{path}: refused: {other} already holds seed {doc['seed']} of this learner, "
                                     f"backbone, settings, budget and training task on these episodes, with other "
                                     f"values; remove it first to replace it")
        prior = next((a for a in accepted if run_key(doc) == run_key(a.doc)), None)
        if prior is not None and prior.doc != doc:
            raise MetabenchError(f"{path}: refused: the same run as {prior.source} (seed {doc['seed']}) "
                                 f"with other values")
        if prior is not None:  # the same file (or a copy) given twice: it goes where the first goes
            accepted.append(Accepted(path, doc, prior.target, prior.existing, duplicate=True))
        else:
            accepted.append(Accepted(path, doc, existing or folder / result_filename(doc), existing is not None))
    return accepted


def copy_new(source: Path, target: Path) -> Path:
    """Copy ``source``'s bytes to ``target`` atomically, never overwriting (a taken name gets a suffix,
    claimed atomically); a failed write is one line naming the file and leaves none behind."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise MetabenchError(f"{source}: cannot read: {exc.strerror or exc}") from None
    return write_bytes_atomic(target, data, exclusive=True, suffix=".json")


def publish_report(paths: list[Path], host, dest: Path = DEFAULT_DEST, roots=None) -> list[tuple[Path, bool]]:
    """Validate all of ``paths``, then copy each into ``dest/<task>/<learner>/``; returns, per path,
    (where it is in ``dest``, whether it was copied now: False when it was already published)."""
    accepted = plan(paths, host, dest, roots)
    out: list[tuple[Path, bool]] = []
    where: dict[tuple, Path] = {}  # run key -> where the first of its files went
    for a in accepted:
        if a.duplicate:
            out.append((where[run_key(a.doc)], False))
            continue
        path = a.target if a.existing else copy_new(a.source, a.target)
        where[run_key(a.doc)] = path
        out.append((path, not a.existing))
    return out


def publish(paths: list[Path], host, dest: Path = DEFAULT_DEST, roots=None) -> list[Path]:
    """Validate all of ``paths``, then copy each into ``dest/<task>/<learner>/``; returns their paths
    there (a result already published is not copied again: see :func:`plan`)."""
    return [path for path, _ in publish_report(paths, host, dest, roots)]
