"""The plugin index: every registered name and what ``metabench list`` prints, kept in the cache
folder, so that a misspelled name is refused, and ``metabench list`` answers, without loading the
plugins (they import torch, seconds on a small machine).

``<cache>/plugin-index.json`` holds, for every registered learner, task, backbone and launcher, its
name, the plugin that registered it and the columns ``metabench list`` prints, and the warnings the
host gave while loading. It stands for the plugin set it was built from, by a fingerprint computed
without importing any plugin module:

- the interpreter (prefix, version, ``sys.path``) and each ``sys.path`` folder's modification
  time (installing or removing a package changes it), leaving out ``sys.path[0]``, the working
  folder (``python -m metabench``) or the script's (``metabench``), so that one index serves every
  folder and both ways of starting (a plugin module or distribution found there still changes the
  key: the entry points and their modules' paths below are looked up through the whole path);
- metabench's version and its own source files (the checks made at registration and the listing's
  columns are defined there);
- ``$METABENCH_PLUGINS`` (which plugins load);
- every entry point of group ``metabench`` (name, value, distribution and its version), and the path,
  size and modification time of its module's source file, found with ``importlib.util.find_spec``
  (which imports the module's parent packages only: keep those free of heavy imports);
- the path, size and modification time of every other module of the plugins' own packages that
  loading them imported (``kanji_data.py`` beside ``kanji.py``).

A missing, unreadable, corrupt or stale index is ignored: the plugins are loaded as before, and the
index is written again (:func:`metabench.files.write_bytes_atomic`) once a command that loaded them succeeds. A
command refused as bad input writes nothing, not even the index. A process that has loaded a host
(a test's own plugins) always uses that host. The index assumes a plugin registers the same names
given the same files and installed packages; after changing anything else a plugin reads while
registering, delete the file. Task files (``--task x.toml``) are never in the index.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import MetabenchError
from .files import write_bytes_atomic
from .registry import Entry, Registry

ENTRY_POINT_GROUP = "metabench"
ALLOW_ENV = "METABENCH_PLUGINS"
INDEX_NAME = "plugin-index.json"
FORMAT = 1
#: the registries, as ``metabench list`` names them -> the kind their errors name
KINDS = {"learners": "learner", "tasks": "task", "backbones": "backbone", "launchers": "launcher"}
#: the columns of each kind's rows besides name and plugin
COLUMNS = {"learners": ("problems", "transductive", "backbone", "reference"),
           "tasks": ("version", "episode", "episodes", "input", "metric"),
           "backbones": ("description",), "launchers": ("options",)}
#: a file changed this close to (or after) the start of a load may have changed during it: no index then
RACY_NS = 2_000_000_000


def allow_list_from_env() -> list[str] | None:
    """Names in $METABENCH_PLUGINS (comma-separated), or None when unset or blank."""
    raw = os.environ.get(ALLOW_ENV, "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    return names or None


def is_task_file(name: str) -> bool:
    """Whether ``--task name`` names a task file (as :func:`metabench.task_file.is_task_file`, which
    imports torch: a test checks that the two agree)."""
    return name.endswith(".toml")


def index_path() -> Path:
    from .cache import cache_root

    return cache_root() / INDEX_NAME


# ----------------------------------------------------------------------------- the fingerprint

def _stat(path: str | os.PathLike) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _metabench_files() -> list[list]:
    folder = Path(__file__).resolve().parent
    return [_stat(folder / name) for name in sorted(os.listdir(folder)) if name.endswith(".py")]


def fingerprint() -> tuple[str, list[list]]:
    """(key, stats): the key of the installed plugin set, and the [path, size, mtime_ns] of the files
    it was taken from. Imports no plugin module, only their parent packages; raises where a parent
    package fails to import (no index is used or written then)."""
    from . import __version__

    dists: dict[Any, tuple[str, str]] = {}
    points, stats = [], []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        if dist is not None and id(dist) not in dists:
            dists[id(dist)] = (dist.metadata["Name"], dist.version)
        spec = importlib.util.find_spec(ep.module)  # None: not installed (the plugin fails to load, as recorded)
        origin = spec.origin if spec is not None and spec.has_location else None
        stat = _stat(origin) if origin else [None, None, None]
        stats.append(stat)
        points.append([ep.name, ep.value, *(dists[id(dist)] if dist is not None else ("-", "-")), stat])
    if len({p[0] for p in points}) == len(points):  # the order entry points come in differs between runs
        points.sort(key=json.dumps)  # (with one name twice, it decides which loads: kept then)
    own = _metabench_files()
    stats += own
    search = sys.path[1:]  # not the first entry: the working folder (-m, -c) or the script's (console script)
    key = {"format": FORMAT, "python": [sys.prefix, sys.version, search],
           "path_folders": [_stat(p or ".") for p in search], "metabench": [__version__, own],
           "allow": allow_list_from_env(), "entry_points": points}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return digest, stats


def _dependencies(modules: Iterable[str], known: set[str]) -> list[list]:
    """[path, size, mtime_ns] of the imported modules of the entry points' top-level packages
    (metabench itself and the entry points' own files excepted: the key covers them)."""
    tops = {name.partition(".")[0] for name in modules} - {"metabench"}
    files = set()
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in tops:
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and path not in known:
                files.add(path)
    return [_stat(path) for path in sorted(files)]


# ----------------------------------------------------------------------------- what `list` shows

def describe(host) -> dict[str, list[dict[str, str]]]:
    """The rows of ``metabench list`` for a loaded host: per kind, one dict per registered name
    (name, plugin and :data:`COLUMNS`, as text; a learner's reference in full)."""
    rows: dict[str, list[dict[str, str]]] = {kind: [] for kind in KINDS}
    for e in host.learners:
        c = e.obj
        problems = ", ".join({"classification": "class.", "regression": "regr."}.get(p, p)
                             for p in sorted(c.problem_types))
        rows["learners"].append({"name": e.name, "plugin": e.plugin, "problems": problems,
                                 "transductive": "yes" if c.transductive else "no", "backbone": c.default_backbone,
                                 "reference": c.reference})
    for e in host.tasks:
        p = e.obj
        shape = (f"{p.ways}w {p.shots}s {p.queries}q" if p.problem == "classification"
                 else f"{p.shots} shots, {p.queries} queries")
        size = f"{p.channels}x{p.image_size}px" if p.problem == "classification" else "-"
        rows["tasks"].append({"name": e.name, "plugin": e.plugin, "version": str(p.version), "episode": shape,
                              "episodes": str(p.episodes), "input": size,
                              "metric": p.metric + (" ↑" if p.higher_is_better else " ↓")})
    for e in host.backbones:
        doc = (e.obj.__doc__ or "").strip().splitlines()[0] if e.obj.__doc__ else ""
        rows["backbones"].append({"name": e.name, "plugin": e.plugin, "description": doc})
    for e in host.launchers:
        rows["launchers"].append({"name": e.name, "plugin": e.plugin, "options": ", ".join(sorted(e.obj.options))})
    return rows


# ----------------------------------------------------------------------------- the index

@dataclass(frozen=True)
class PluginIndex:
    """A fresh index: the registered names (as registries whose ``get`` raises the host's own
    message for an unknown name), the rows of ``metabench list`` and the host's warnings."""

    listing: dict[str, list[dict[str, str]]]
    warnings: list[str]
    registries: dict[str, Registry]

    def get(self, kind: str, name: str) -> Entry:
        """The entry of ``name`` (kind: learner, task, backbone, launcher); an unknown name raises
        MetabenchError with the registry's suggestions."""
        return self.registries[kind].get(name)


def _parse(doc: Any) -> tuple[str, list[list], PluginIndex]:
    """(key, dependencies, index) of an index file's document; ValueError if it is not one."""
    def text_list(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("not a list of text")
        return value

    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("key"), str):
        raise ValueError("not a plugin index")
    depends = doc.get("depends")
    if not isinstance(depends, list) or not all(isinstance(d, list) and len(d) == 3 and isinstance(d[0], str)
                                                for d in depends):
        raise ValueError("bad depends")
    listing = doc.get("listing")
    if not isinstance(listing, dict) or set(listing) != set(KINDS):
        raise ValueError("bad listing")
    registries = {}
    for kinds, kind in KINDS.items():
        rows = listing[kinds]
        if not isinstance(rows, list):
            raise ValueError("bad rows")
        registry: Registry = Registry(kind)
        for row in rows:
            if not isinstance(row, dict) or set(row) != {"name", "plugin", *COLUMNS[kinds]}:
                raise ValueError("bad row")
            text_list(list(row.values()))
            registry.add(Entry(row["name"], None, row["plugin"]))  # a name twice: PluginError
        registries[kind] = registry
    return doc["key"], depends, PluginIndex(listing, text_list(doc.get("warnings")), registries)


def read_index(key: str) -> PluginIndex | None:
    """The index file if it is readable, well formed, of ``key``, and no file it depends on has
    changed; else None."""
    try:
        doc = json.loads(index_path().read_bytes())
        found, depends, index = _parse(doc)
    except (OSError, ValueError, RecursionError, MetabenchError):  # MetabenchError: a name twice
        return None
    if found != key or any(_stat(d[0]) != d for d in depends):
        return None
    return index


def loaded_host():
    """The plugin host this process has loaded already, or None (never imports torch)."""
    plugins = sys.modules.get("metabench.plugins")
    return getattr(plugins, "_HOST", None) if plugins is not None else None


def fresh_index() -> PluginIndex | None:
    """The index, when this process has loaded no host and the index matches the plugins installed
    now; else None (then load the plugins)."""
    if loaded_host() is not None:
        return None
    try:
        key, _ = fingerprint()
    except Exception:  # noqa: BLE001  (a parent package that fails to import: load the plugins, which say why)
        return None
    return read_index(key)


@dataclass
class _Pending:
    host: Any
    key: str
    stats: list[list]
    depends: list[list]
    started_ns: int


_pending: _Pending | None = None


def load_host():
    """The process's plugin host (:func:`metabench.plugins.get_host`); when this call loads it, the
    index of what it loaded is kept to be written by :func:`write_pending`."""
    global _pending
    from .plugins import get_host

    if loaded_host() is not None:
        return get_host()
    started = time.time_ns()
    try:
        key, stats = fingerprint()
    except Exception:  # noqa: BLE001  (as in fresh_index: then no index is written)
        key, stats = None, []
    host = get_host()
    if key is not None:
        known = {s[0] for s in stats}
        modules = [ep.module for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
        _pending = _Pending(host, key, stats, _dependencies(modules, known), started)
    return host


def write_pending() -> None:
    """Write the index of the host :func:`load_host` loaded, unless it is fresh already, the host
    was replaced since, or a file it stands for changed during the load (then the next load writes
    it). Never raises: the index only saves time."""
    global _pending
    pending, _pending = _pending, None
    if pending is None or loaded_host() is not pending.host:
        return
    try:
        depends = [_stat(d[0]) for d in pending.depends]
        if depends != pending.depends or read_index(pending.key) is not None:
            return
        if any(s[2] is not None and s[2] >= pending.started_ns - RACY_NS for s in pending.stats + depends):
            return
        doc = {"format": FORMAT, "key": pending.key, "depends": depends, "warnings": list(pending.host.errors),
               "listing": describe(pending.host)}
        _parse(json.loads(json.dumps(doc)))  # what is written reads back
        write_bytes_atomic(index_path(), json.dumps(doc, indent=1, ensure_ascii=False).encode())
    except Exception:  # noqa: BLE001  (a plugin's odd attribute, a read-only cache: no index, no harm)
        return


# ----------------------------------------------------------------------------- names first

def check_names(lookups: Iterable[tuple[str, Any]], warn: Callable[[str], None]) -> None:
    """Refuse the first unknown name of ``lookups`` ((kind, name) pairs in the order the command
    uses them; names that are not text, and task files, are left to the command) with the host's
    one-line message: from a fresh index without loading the plugins, else from the loaded host.
    ``warn`` gets the host's warnings first, as the command would print them."""
    lookups = [(kind, name) for kind, name in lookups
               if isinstance(name, str) and not (kind == "task" and is_task_file(name))]
    if not lookups:
        return
    index = fresh_index()
    if index is not None:
        get, warnings = index.get, index.warnings
    else:
        host = load_host()
        registries = {"learner": host.learners, "task": host.tasks, "backbone": host.backbones,
                      "launcher": host.launchers}
        get, warnings = (lambda kind, name: registries[kind].get(name)), host.errors
    try:
        for kind, name in lookups:
            get(kind, name)
    except MetabenchError:
        for line in warnings:
            warn(line)
        raise
