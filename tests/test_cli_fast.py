"""The plugin index (metabench/plugin_index.py): with a fresh index, ``metabench list`` and a
misspelled name answer without importing torch, with what a full load prints; the index goes stale
when a plugin's files, its distribution or $METABENCH_PLUGINS change; a corrupt index is ignored and
written again; a refused command writes none; a host already loaded (a test's) wins over it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import metabench.plugins
from metabench import plugin_index
from metabench.plugin_index import (INDEX_NAME, _dependencies, _stat, check_names, describe, fingerprint,
                                    fresh_index, read_index)

import _doubles
from conftest import host_with, run_cli, tiny_plugin

#: metabench.cli.main in a fresh process; stderr's last line says whether torch was imported
SNIPPET = textwrap.dedent("""\
    import sys
    from metabench.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    sys.stderr.write("torch imported: %s\\n" % ("torch" in sys.modules))
    sys.exit(code)
""")


def command(tmp: Path, *argv: str, plugins: str | None = None, path: Path | None = None):
    """``metabench ARGV`` in a fresh process with $METABENCH_CACHE = tmp/cache, run in the empty
    folder tmp/cwd: (exit status, stdout, stderr without the torch line, whether torch was imported)."""
    (tmp / "cwd").mkdir(exist_ok=True)
    env = dict(os.environ, METABENCH_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", COLUMNS="120")
    env.pop("METABENCH_PLUGINS", None)
    if plugins is not None:
        env["METABENCH_PLUGINS"] = plugins
    env.pop("PYTHONPATH", None)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    proc = subprocess.run([sys.executable, "-c", SNIPPET, *argv], cwd=tmp / "cwd", env=env, capture_output=True,
                          text=True, timeout=300)
    *err, last = proc.stderr.splitlines()
    assert last.startswith("torch imported: "), proc.stderr
    return proc.returncode, proc.stdout, "\n".join(err), last.endswith("True")


#: fastplug/plugin.py: the source of tests/_doubles.py (an installed plugin cannot import the tests),
#: then one learner per name of fastplug/names.py
PLUGIN = Path(_doubles.__file__).read_text() + '''

from metabench import hookimpl
from fastplug.names import NAMES


def learner(name):
    class Toy(ZeroLogits):
        reference = "Doe & Roe. A learner named " + name + ". 2031."

    return Toy


@hookimpl
def metabench_register_learners(register):
    for name in NAMES:
        register(name, learner(name))
'''


def write_plugin(root: Path, names: list[str], version: str = "1.0") -> Path:
    """An installed-looking distribution ``fastplug``: package fastplug (plugin.py registers the
    learners fastplug/names.py lists), files dated a minute ago (an index is not written from files
    changed just before a load)."""
    package = root / "fastplug"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(PLUGIN)
    info = root / "fastplug-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fastplug\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[metabench]\nfastplug = fastplug.plugin\n")
    set_names(root, names, age=60)
    for path in [package / "__init__.py", package / "plugin.py", info / "METADATA", info / "entry_points.txt"]:
        backdate(path, 60)
    return root


def set_names(root: Path, names: list[str], age: float) -> None:
    path = root / "fastplug" / "names.py"
    path.write_text(f"NAMES = {names!r}\n")
    backdate(path, age)


def backdate(path: Path, age: float) -> None:
    t = time.time() - age
    os.utime(path, (t, t))


@pytest.fixture
def fastplug(tmp_path, monkeypatch):
    """The fastplug distribution on this process's path (its modules forgotten afterwards)."""
    root = write_plugin(tmp_path / "site", ["alpha"])
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [n for n in sys.modules if n == "fastplug" or n.startswith("fastplug.")]:
        del sys.modules[name]


@pytest.fixture
def no_host(monkeypatch, tmp_path):
    """No host loaded in this process (the installed plugins load on use), a cache of our own."""
    monkeypatch.setattr(metabench.plugins, "_HOST", None)
    monkeypatch.setattr(plugin_index, "_pending", None)
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METABENCH_PLUGINS", raising=False)
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- real processes

def test_list_and_a_misspelled_name_answer_from_the_index_without_torch(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    code, _, refused, torch = command(tmp_path, "run", "--learner", "protonett", "--out", str(tmp_path / "out"))
    assert code == 2 and torch and "did you mean 'protonet'" in refused
    assert list(cache.iterdir()) == []  # a refused command writes nothing, not even the index
    code, full, warnings, torch = command(tmp_path, "list")
    assert code == 0 and torch and (cache / INDEX_NAME).is_file()
    code, fast, fast_warnings, torch = command(tmp_path, "list")
    assert code == 0 and not torch
    assert (fast, fast_warnings) == (full, warnings)
    code, _, err, torch = command(tmp_path, "list", "tasks")
    assert code == 0 and not torch and err == warnings
    code, _, fast_refused, torch = command(tmp_path, "run", "--learner", "protonett", "--out", str(tmp_path / "out"))
    assert code == 2 and not torch
    assert fast_refused == refused
    out = str(tmp_path / "out")
    for argv, expected in ((["run", "--learner", "protonet", "--task", "kanji-5w1x", "--out", out], "task 'kanji-5w1x'"),
                           (["run", "--learner", "protonet", "--backbone", "conv5", "--out", out], "backbone 'conv5'"),
                           (["sweep", "--learners", "protonet", "--launcher", "lcal", "--out", out], "launcher 'lcal'"),
                           (["episodes", "--task", "omniglot-5w1x"], "task 'omniglot-5w1x'")):
        code, _, err, torch = command(tmp_path, *argv)
        assert code == 2 and not torch and f"unknown {expected}; did you mean" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two fresh plugin loads in real processes; the in-process tests cover the key
def test_the_index_follows_the_plugins_files_and_the_allow_list(tmp_path):
    site = write_plugin(tmp_path / "site", ["alpha"])
    code, out, err, torch = command(tmp_path, "list", "learners", plugins="fastplug", path=site)
    assert code == 0 and torch and "alpha" in out, err
    code, _, err, torch = command(tmp_path, "run", "--learner", "alpa", plugins="fastplug", path=site)
    assert code == 2 and not torch and "unknown learner 'alpa'; did you mean 'alpha'?" in err, err

    set_names(site, ["alpha", "beta"], age=30)  # a module the plugin imports (not its entry point) changed
    code, out, err, torch = command(tmp_path, "list", "learners", plugins="fastplug", path=site)
    assert code == 0 and torch and "beta" in out, err
    code, again, _, torch = command(tmp_path, "list", "learners", plugins="fastplug", path=site)
    assert not torch and again == out

    code, out, err, torch = command(tmp_path, "list", "launchers", plugins="fastplug,local", path=site)
    assert code == 0 and torch and "local" in out, err  # another allow-list: loaded again
    code, again, _, torch = command(tmp_path, "list", "launchers", plugins="fastplug,local", path=site)
    assert not torch and again == out
    code, _, err, torch = command(tmp_path, "run", "--learner", "alpha", plugins="fastplug,local", path=site)
    assert code == 2 and not torch and "unknown task '" in err and "no tasks are registered" in err, err


# ----------------------------------------------------------------------------- the fingerprint and the file

def test_the_key_changes_with_an_entry_points_module_its_distribution_and_the_allow_list(fastplug, monkeypatch):
    monkeypatch.delenv("METABENCH_PLUGINS", raising=False)
    key, stats = fingerprint()
    module = fastplug / "fastplug" / "plugin.py"
    assert [str(module), module.stat().st_size, module.stat().st_mtime_ns] in stats
    assert "fastplug.plugin" not in sys.modules  # found, not imported
    assert fingerprint()[0] == key
    backdate(module, 10)  # only its modification time
    touched = fingerprint()[0]
    assert touched != key
    (fastplug / "fastplug-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fastplug\nVersion: 1.1\n")
    upgraded = fingerprint()[0]
    assert upgraded != touched
    monkeypatch.setenv("METABENCH_PLUGINS", "fastplug")
    allowed = fingerprint()[0]
    assert allowed != upgraded
    monkeypatch.setenv("METABENCH_PLUGINS", " fastplug, ")  # the same allow-list
    assert fingerprint()[0] == allowed
    monkeypatch.delenv("METABENCH_PLUGINS")
    assert fingerprint()[0] == upgraded


def test_one_key_for_every_working_folder_and_way_of_starting(monkeypatch):
    key = fingerprint()[0]
    monkeypatch.setattr(sys, "path", ["/another/working/folder", *sys.path[1:]])  # python -m metabench there
    assert fingerprint()[0] == key
    monkeypatch.setattr(sys, "path", ["/venv/bin", *sys.path[1:]])  # the console script `metabench`
    assert fingerprint()[0] == key


def test_an_index_depends_on_the_modules_the_plugins_imported(fastplug, no_host):
    import importlib

    importlib.import_module("fastplug.plugin")
    plugin, names = fastplug / "fastplug" / "plugin.py", fastplug / "fastplug" / "names.py"
    depends = _dependencies(["fastplug.plugin"], known={str(plugin)})
    assert [d[0] for d in depends] == [str(fastplug / "fastplug" / "__init__.py"), str(names)]
    key, _ = fingerprint()
    doc = {"format": 1, "key": key, "depends": depends, "warnings": [],
           "listing": {kind: [] for kind in plugin_index.KINDS}}
    no_host.mkdir()
    (no_host / INDEX_NAME).write_text(json.dumps(doc))
    assert read_index(key) is not None and read_index("another key") is None
    set_names(fastplug, ["alpha", "gamma"], age=5)
    assert read_index(key) is None


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe not json", b"[]", b'{"format": 1}',
                                     b"[" * 100000, "duplicate"], ids=["empty", "truncated", "bytes", "list",
                                                                       "no key", "deep", "duplicate"])
def test_a_corrupt_index_is_ignored(content, no_host):
    key, _ = fingerprint()
    if content == "duplicate":
        row = {"name": "local", "plugin": "local", "options": ""}
        content = json.dumps({"format": 1, "key": key, "depends": [], "warnings": [],
                              "listing": {"learners": [], "tasks": [], "backbones": [],
                                          "launchers": [row, row]}}).encode()
    no_host.mkdir()
    (no_host / INDEX_NAME).write_bytes(content)
    assert read_index(key) is None and fresh_index() is None


def test_a_corrupt_index_is_written_again_by_the_next_command_that_loads_the_plugins(no_host, capsys):
    no_host.mkdir()
    (no_host / INDEX_NAME).write_bytes(b'{"format": 1, "key": "truncated')
    code, out, _ = run_cli(capsys, "list", "launchers")
    assert code == 0 and "local" in out
    host = metabench.plugins.get_host()
    metabench.plugins._HOST = None  # as a new process: no host loaded
    index = fresh_index()
    assert index is not None
    assert index.listing == json.loads(json.dumps(describe(host)))  # what `list` prints, either way
    assert index.warnings == host.errors
    assert not [p for p in no_host.iterdir() if p.name != INDEX_NAME]  # no temp file left


def test_a_loaded_host_wins_over_the_index(no_host, monkeypatch, capsys):
    no_host.mkdir()
    code, _, _ = run_cli(capsys, "list", "launchers")  # loads the installed plugins and writes the index
    monkeypatch.setattr(metabench.plugins, "_HOST", None)
    assert fresh_index() is not None
    monkeypatch.setattr(metabench.plugins, "_HOST", host_with(("tiny", tiny_plugin())))
    assert fresh_index() is None
    check_names([("learner", "toy")], print)  # registered by the loaded host only
    code, out, _ = run_cli(capsys, "list", "learners")
    assert code == 0 and "toy" in out


def test_task_files_are_never_looked_up_in_the_index(no_host):
    from metabench.task_file import is_task_file

    for name in ("x.toml", "tasks/my-task.toml", "kanji-5w1s", "x.toml.bak", ".toml"):
        assert plugin_index.is_task_file(name) == is_task_file(name)
    check_names([("task", "missing/nowhere.toml"), ("backbone", None)], print)  # left to the command
    assert plugin_index.loaded_host() is None and not no_host.exists()


def test_an_unknown_name_with_a_fresh_index_gives_the_hosts_message(no_host, monkeypatch):
    host = plugin_index.load_host()
    plugin_index._pending.started_ns = time.time_ns() + 10**12  # files edited just now by others are no matter here
    plugin_index.write_pending()
    monkeypatch.setattr(metabench.plugins, "_HOST", None)
    index = fresh_index()
    for kind, registry, name in (("learner", host.learners, "mamll"), ("task", host.tasks, "cub-5w2s"),
                                 ("backbone", host.backbones, "resnet13"), ("launcher", host.launchers, "rey")):
        with pytest.raises(metabench.MetabenchError) as caught:
            index.get(kind, name)
        assert str(caught.value) == registry.unknown_message(name)
    assert index.get("backbone", "torchvision:resnet18").name == "torchvision:*"  # a family's member
    assert _stat(no_host / INDEX_NAME)[1] > 0
