"""The plugin host: discovery through entry points, validation, allow-list, error isolation."""
from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import tomllib

import pytest
from torch import nn

from metabench import Backbone, Learner, MetabenchError, PluginError, hookimpl
from metabench import hookspecs
from metabench.plugins import PluginHost, PluginSource, discover

from conftest import ROOT, TINY, TinySource, ToyLearner, host_with, tiny_plugin, write_distribution

BUILTINS = {"conv4", "kanji", "maml", "protonet"}


def plugin(**hooks):
    """A plugin object whose hook implementations are the given functions of ``register``."""
    ns = {name: hookimpl(staticmethod(fn)) for name, fn in hooks.items()}
    return type("Plugin", (), ns)()


def test_builtins_are_found_through_the_entry_point_group():
    sources = {s.name: s for s in discover()}
    assert BUILTINS <= set(sources)
    assert {sources[n].distribution for n in BUILTINS} == {"metabench"}
    host = PluginHost()
    assert host.errors == []
    assert {"maml", "protonet"} <= set(host.learners.names())
    assert host.learners.get("maml").plugin == "maml"
    assert host.plugins["kanji"].hooks == ["metabench_register_tasks"]


def test_no_core_module_imports_a_builtin_plugin():
    for path in (ROOT / "metabench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("metabench_plugins") for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("metabench_plugins"), path


def test_every_hook_has_a_spec_with_a_docstring_and_no_body():
    specs = [n for n in dir(hookspecs) if n.startswith("metabench_")]
    assert set(specs) >= {"metabench_register_learners", "metabench_register_backbones", "metabench_register_tasks"}
    for name in specs:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and fn(**dict.fromkeys(inspect.signature(fn).parameters)) is None


def test_third_party_distribution_is_discovered_like_a_builtin(tmp_path, monkeypatch):
    write_distribution(tmp_path, "metabench-thirdparty", "1.2.3", "thirdparty_plugin", """
        from dataclasses import dataclass
        from metabench import Learner, hookimpl
        class Echo(Learner):
            @dataclass
            class Config:
                k: int = 1
            budgets = {"smoke": {}, "quick": {}, "paper": {}}
            def meta_train(self, ctx): pass
            def predict(self, sx, sy, qx): return qx.new_zeros(len(qx), int(sy.max()) + 1)
        @hookimpl
        def metabench_register_learners(register):
            register("echo", Echo)
    """, {"thirdparty": "thirdparty_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    assert host.errors == []
    info = host.plugins["thirdparty"]
    assert (info.distribution, info.version, info.hooks) == ("metabench-thirdparty", "1.2.3", ["metabench_register_learners"])
    assert host.learners.get("echo").plugin == "thirdparty"


def test_example_package_in_the_readme_runs_end_to_end(tmp_path):
    """The example third-party package: its pyproject's entry point, loaded in a fresh process, runs."""
    example = ROOT / "examples" / "metabench-pixel-centroid"
    meta = tomllib.loads((example / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["metabench"]
    info = tmp_path / "metabench_pixel_centroid-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['project']['name']}\nVersion: 1.0.0\n")
    (info / "entry_points.txt").write_text("[metabench]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=os.pathsep.join([str(tmp_path), str(example / "src")]))
    listed = subprocess.run([sys.executable, "-m", "metabench.cli", "plugins"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "pixel_centroid" in listed.stdout and "metabench-pixel-centroid" in listed.stdout
    ran = subprocess.run([sys.executable, "-m", "metabench.cli", "run", "--learner", "pixel_centroid", "--budget", "smoke",
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert len(list((tmp_path / "out").glob("*.json"))) == 1


def test_duplicate_name_names_both_plugins():
    a = plugin(metabench_register_learners=lambda register: register("toy", ToyLearner))
    b = plugin(metabench_register_learners=lambda register: register("toy", ToyLearner))
    host = host_with(("alpha", a), ("beta", b), builtins=False)
    assert host.learners.get("toy").plugin == "alpha"
    assert any("'beta'" in e and "'alpha'" in e and "'toy'" in e for e in host.errors), host.errors


@pytest.mark.parametrize("hook,args,expected", [
    ("metabench_register_learners", ("bad", object), "subclass of metabench.Learner"),
    ("metabench_register_learners", ("bad", nn.Linear), "subclass of metabench.Learner"),
    ("metabench_register_learners", ("Bad Name", ToyLearner), "learner name"),
    ("metabench_register_backbones", ("bad", nn.Linear), "factory function"),
    ("metabench_register_backbones", ("bad", 42), "factory function"),
    ("metabench_register_tasks", ("tiny-3w2s", TinySource()), "metabench.Protocol"),
    ("metabench_register_tasks", (TINY, object()), "metabench.DataSource"),
])
def test_wrong_kind_of_factory_is_refused_naming_the_plugin(hook, args, expected):
    host = host_with(("sloppy", plugin(**{hook: lambda register: register(*args)})), ("tiny", tiny_plugin()),
                     builtins=False)
    assert len(host.errors) == 1 and host.errors[0].startswith("plugin 'sloppy'") and expected in host.errors[0]
    assert "toy" in host.learners  # the other plugin is unaffected


def test_learner_with_missing_pieces_is_refused_with_each_problem():
    class Incomplete(Learner):
        Config = dict  # not a dataclass
        budgets = {"smoke": {}}

    host = host_with(("half", plugin(metabench_register_learners=lambda register: register("half", Incomplete))),
                     builtins=False)
    (line,) = host.errors
    assert "does not implement meta_train, predict" in line and "Config must be a dataclass" in line


def test_plugin_failing_to_import_is_one_line_and_others_still_load():
    def boom():
        raise ImportError("No module named 'nonexistent_dep'\n(more detail)")

    host = PluginHost([PluginSource("broken", boom, "metabench-broken", "0.1"),
                       PluginSource.from_object("tiny", tiny_plugin())])
    (line,) = host.errors
    assert line == "plugin 'broken': failed to load: ImportError: No module named 'nonexistent_dep' (more detail)"
    assert "toy" in host.learners and host.plugins["broken"].errors


def test_plugin_raising_while_registering_keeps_nothing_of_that_hook():
    def half_then_raise(register):
        register("first", ToyLearner)
        raise RuntimeError("oops")

    host = host_with(("flaky", plugin(metabench_register_learners=half_then_raise)), ("tiny", tiny_plugin()),
                     builtins=False)
    assert host.errors == ["plugin 'flaky': raised while registering (half_then_raise): RuntimeError: oops"]
    assert "first" not in host.learners and "toy" in host.learners


def test_misspelled_hook_is_an_error():
    host = host_with(("typo", plugin(metabench_register_lerners=lambda register: None)), builtins=False)
    assert len(host.errors) == 1 and "unknown hook 'metabench_register_lerners'" in host.errors[0]
    assert "typo" not in [h for h in host.pm.list_name_plugin()]


def test_unknown_name_suggests_and_lists(tiny_host):
    with pytest.raises(MetabenchError) as exc:
        tiny_host.learners.get("protonett")
    message = str(exc.value)
    assert "did you mean 'protonet'" in message
    assert "(registered: " + ", ".join(tiny_host.learners.names()) + ")" in message


def test_allow_list_loads_only_named_plugins(monkeypatch):
    monkeypatch.setenv("METABENCH_PLUGINS", "conv4, protonet")
    from metabench.plugins import allow_list_from_env

    host = PluginHost(allow=allow_list_from_env())
    assert set(host.plugins) == {"conv4", "protonet"}
    assert host.learners.names() == ["protonet"] and host.tasks.names() == []


def test_allow_list_naming_a_missing_plugin_says_so():
    host = PluginHost(allow=["protonet", "nosuch"])
    assert any("'nosuch'" in e and "not installed" in e for e in host.errors)


def test_backbone_returning_the_wrong_thing_names_the_plugin():
    host = host_with(("badbb", plugin(metabench_register_backbones=lambda register: register(
        "liar", lambda in_channels, image_size: nn.Linear(1, 1)))), builtins=False)
    with pytest.raises(PluginError, match="plugin 'badbb': backbone 'liar' returned"):
        host.build_backbone("liar", 1, 28)


def test_backbone_options_are_checked():
    host = PluginHost()
    assert host.build_backbone("conv4", 1, 28, width=32).out_features == 32
    with pytest.raises(MetabenchError, match="no option 'depth'; accepted: width"):
        host.build_backbone("conv4", 1, 28, depth=3)


def test_backbone_family_resolves_variants():
    seen = []

    def family(in_channels, image_size, variant, scale: int = 1):
        seen.append((variant, scale))
        return Backbone(nn.Flatten(), in_channels * image_size * image_size * scale)

    host = host_with(("fam", plugin(metabench_register_backbones=lambda register: register("zoo:*", family))),
                     builtins=False)
    assert host.errors == []
    assert host.build_backbone("zoo:big", 1, 4, scale=2).out_features == 32
    assert seen == [("big", 2)]
    with pytest.raises(MetabenchError, match="unknown backbone 'zo:big'"):
        host.build_backbone("zo:big", 1, 4)
    with pytest.raises(MetabenchError, match="no option 'depth'; accepted: scale"):
        host.build_backbone("zoo:big", 1, 4, depth=1)
