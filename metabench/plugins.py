"""The plugin host: discovers plugins through entry points, collects and validates registrations.

Built-in plugins (``metabench_plugins.*``) are found through the same entry-point group,
``metabench``, as any third-party package's, so each can be disabled or replaced. A plugin that
fails to import, implements an unknown hook, raises while registering, or registers something
malformed is reported in one line naming it; the other plugins still load. A lifecycle hook
that raises during a run (``host.on_progress``, ``host.on_result``) raises PluginError naming
the plugin and the hook.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pluggy
from torch import nn

from . import hookspecs
from .backbone import Backbone
from .errors import MetabenchError, PluginError
from .learner import Learner
from .settings import BUDGETS
from .lifecycle import RunInfo
from .plugin_index import ALLOW_ENV, ENTRY_POINT_GROUP, allow_list_from_env  # noqa: F401  (torch-free there)
from .registry import Entry, Registry
from .task import _NAME_RE as _TASK_NAME, PROBLEM_TYPES, DataSource, Protocol

_NAME = re.compile(r"^[a-z0-9][a-z0-9_+.-]*$")
_BACKBONE_NAME = re.compile(r"^[a-z0-9][a-z0-9_+.-]*(:\*)?$")  # "family:*" registers a family
_DATASET = re.compile(r"^[a-z0-9][a-z0-9_]*$")


@dataclass(frozen=True)
class PluginSource:
    """Something that can be loaded as a plugin: an entry point, or an object given directly."""

    name: str
    load: Callable[[], object]
    distribution: str = "-"
    version: str = "-"

    @classmethod
    def from_entry_point(cls, ep: metadata.EntryPoint) -> "PluginSource":
        dist = getattr(ep, "dist", None)
        return cls(ep.name, ep.load, dist.metadata["Name"] if dist else "-", dist.version if dist else "-")

    @classmethod
    def from_object(cls, name: str, plugin: object, distribution: str = "-", version: str = "-") -> "PluginSource":
        return cls(name, lambda: plugin, distribution, version)


@dataclass
class PluginInfo:
    """A plugin as ``metabench plugins`` shows it."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def discover(group: str = ENTRY_POINT_GROUP) -> list[PluginSource]:
    """Every installed plugin of ``group``, sorted by name."""
    return sorted((PluginSource.from_entry_point(ep) for ep in metadata.entry_points(group=group)), key=lambda s: s.name)


class PluginHost:
    """Loads plugins and holds what they registered: ``learners``, ``backbones``, ``tasks``."""

    def __init__(self, sources: list[PluginSource] | None = None, allow: list[str] | None = None):
        self.pm = pluggy.PluginManager("metabench")
        self.pm.add_hookspecs(hookspecs)
        self.learners: Registry[type[Learner]] = Registry("learner")
        self.backbones: Registry[Callable[..., Backbone]] = Registry("backbone")
        self.tasks: Registry[Protocol] = Registry("task")
        self.launchers: Registry[type] = Registry("launcher")
        self._task_files: dict[str, tuple] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.errors: list[str] = []
        sources = discover() if sources is None else sources
        self._load(sources, allow)
        self._collect()

    # -- loading -----------------------------------------------------------------------------
    def _error(self, plugin: str | None, message: str) -> None:
        line = f"plugin {plugin!r}: {message}" if plugin else message
        self.errors.append(line)
        if plugin in self.plugins:
            self.plugins[plugin].errors.append(message)

    def _load(self, sources: list[PluginSource], allow: list[str] | None) -> None:
        known = {s.name for s in sources}
        if allow is not None:
            missing = [n for n in allow if n not in known]
            if missing:
                self._error(None, f"{ALLOW_ENV} names {', '.join(map(repr, missing))}, which is not installed "
                                  f"(installed: {', '.join(sorted(known)) or 'none'})")
            sources = [s for s in sources if s.name in allow]
        for source in sources:
            if source.name in self.plugins:
                first = self.plugins[source.name].distribution
                self._error(source.name, f"name also provided by distribution {first!r}; "
                                         f"the one from {source.distribution!r} is ignored")
                continue
            self.plugins[source.name] = PluginInfo(source.name, source.distribution, source.version)
            try:
                plugin = source.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._error(source.name, f"failed to load: {type(exc).__name__}: {_one_line(exc)}")
                continue
            try:
                self.pm.register(plugin, name=source.name)
                self._check_hooks(source.name, plugin)
            except (pluggy.PluginValidationError, PluginError) as exc:
                if self.pm.get_plugin(source.name) is not None:
                    self.pm.unregister(name=source.name)
                self._error(source.name, f"invalid: {_one_line(exc)}")
                continue
            self.plugins[source.name].hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])

    def _check_hooks(self, name: str, plugin: object) -> None:
        """Refuse hook implementations whose name is not a metabench hook (a likely typo), and
        hook wrappers (the host calls each implementation itself, so a wrapper would never run)."""
        for hook in self.pm.get_hookcallers(plugin) or []:
            if not hook.has_spec():
                raise PluginError(f"implements unknown hook {hook.name!r}; known hooks: "
                                  + ", ".join(n for n in dir(hookspecs) if n.startswith("metabench_")))
            for impl in hook.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or getattr(impl, "wrapper", False)):
                    raise PluginError(f"{hook.name} is a hook wrapper; metabench hooks must be plain "
                                      "implementations (@metabench.hookimpl)")

    # -- registrations -----------------------------------------------------------------------
    def _collect(self) -> None:
        collectors = {
            "metabench_register_backbones": self._add_backbone,
            "metabench_register_tasks": self._add_task,
            "metabench_register_learners": self._add_learner,
            "metabench_register_launchers": self._add_launcher,
        }
        for hook_name, add in collectors.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                self._call_register_hook(impl, add)

    def _call_register_hook(self, impl, add: Callable[[str, tuple, dict], Entry]) -> None:
        plugin = impl.plugin_name
        staged: list[Entry] = []

        def register(*args, **kwargs) -> None:
            try:
                staged.append(add(plugin, args, kwargs))
            except PluginError as exc:
                self._error(plugin, _one_line(exc))

        try:
            impl.function(register=register)
        except Exception as exc:
            self._error(plugin, f"raised while registering ({impl.function.__name__}): "
                                f"{type(exc).__name__}: {_one_line(exc)}")
            return
        for entry in staged:
            registry = {"learner": self.learners, "backbone": self.backbones, "task": self.tasks,
                        "launcher": self.launchers}[entry.extra["kind"]]
            try:
                registry.add(entry)
            except PluginError as exc:
                self._error(plugin, _one_line(exc))

    @staticmethod
    def _bind(plugin: str, what: str, signature: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        try:
            return inspect.signature(signature).bind(*args, **kwargs)
        except TypeError as exc:
            raise PluginError(f"bad call {what}: {exc}") from None

    def _add_learner(self, plugin: str, args: tuple, kwargs: dict) -> Entry:
        bound = self._bind(plugin, "register(name, learner_class)", lambda name, learner_class: None, args, kwargs)
        name, cls = bound.arguments["name"], bound.arguments["learner_class"]
        _check_name(name, "learner")
        problems = _learner_problems(cls)
        if problems:
            raise PluginError(f"learner {name!r} is invalid: {'; '.join(problems)}")
        return Entry(name, cls, plugin, {"kind": "learner"})

    def _add_launcher(self, plugin: str, args: tuple, kwargs: dict) -> Entry:
        from .sweep import Launcher

        bound = self._bind(plugin, "register(name, launcher_class)", lambda name, launcher_class: None, args, kwargs)
        name, cls = bound.arguments["name"], bound.arguments["launcher_class"]
        _check_name(name, "launcher")
        if not (isinstance(cls, type) and issubclass(cls, Launcher)):
            raise PluginError(f"launcher {name!r} must be a subclass of metabench.sweep.Launcher, got {cls!r}")
        if not isinstance(getattr(cls, "options", None), dict):
            raise PluginError(f"launcher {name!r}: options must be a dict of option name -> description")
        return Entry(name, cls, plugin, {"kind": "launcher"})

    def _add_backbone(self, plugin: str, args: tuple, kwargs: dict) -> Entry:
        bound = self._bind(plugin, "register(name, factory)", lambda name, factory: None, args, kwargs)
        name, factory = bound.arguments["name"], bound.arguments["factory"]
        _check_name(name, "backbone", _BACKBONE_NAME)
        if not callable(factory) or isinstance(factory, type) and issubclass(factory, nn.Module):
            raise PluginError(f"backbone {name!r} must be a factory function returning metabench.Backbone, "
                              f"got {type(factory).__name__} {factory!r}")
        return Entry(name, factory, plugin, {"kind": "backbone"})

    def _add_task(self, plugin: str, args: tuple, kwargs: dict) -> Entry:
        bound = self._bind(plugin, "register(protocol, source)", lambda protocol, source: None, args, kwargs)
        protocol, source = bound.arguments["protocol"], bound.arguments["source"]
        if not isinstance(protocol, Protocol):
            raise PluginError(f"task must be a metabench.Protocol, got {type(protocol).__name__}")
        if not isinstance(source, DataSource):
            raise PluginError(f"task {protocol.name!r}: source must be a metabench.DataSource, "
                              f"got {type(source).__name__}")
        _check_task_names(protocol, source)
        return Entry(protocol.name, protocol, plugin, {"kind": "task", "source": source})

    # -- lifecycle ---------------------------------------------------------------------------
    def on_progress(self, run: RunInfo, phase: str, step: int, total: int, metrics: dict[str, Any]) -> None:
        """Tell every ``metabench_on_progress`` implementation about one training progress report."""
        self._notify("metabench_on_progress", run=run, phase=phase, step=step, total=total, metrics=metrics)

    def on_result(self, run: RunInfo, result: dict, path: Path) -> None:
        """Tell every ``metabench_on_result`` implementation that the result was written to ``path``."""
        self._notify("metabench_on_result", run=run, result=result, path=path)

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call each implementation of a lifecycle hook in pluggy's order; one that raises is named."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r}: raised in {hook_name}: "
                                  f"{type(exc).__name__}: {_one_line(exc)}") from exc

    # -- use ---------------------------------------------------------------------------------
    def task(self, name: str) -> tuple[Protocol, DataSource, str]:
        """(protocol, data source, plugin) of a registered task, or of a task file (a path ending in
        .toml: :mod:`metabench.task_file`; loaded once per host)."""
        from .task_file import is_task_file, load_task_file

        if is_task_file(name):
            if name not in self._task_files:
                protocol, source = load_task_file(name)
                self._task_files[name] = (protocol, source, f"task file {name}")
            return self._task_files[name]
        entry = self.tasks.get(name)
        return entry.obj, entry.extra["source"], entry.plugin

    def forget_task_files(self) -> None:
        """Read task files (and list their folders) again on next use."""
        self._task_files.clear()

    def build_backbone(self, name: str, in_channels: int, image_size: int, **options: Any) -> Backbone:
        """Call a backbone factory and check what it returns, naming the plugin if it is wrong.

        A family entry ``family:*`` gets the part after the colon as ``variant=``.
        """
        entry = self.backbones.get(name)
        if entry.name.endswith(":*"):
            options = {**options, "variant": name.partition(":")[2]}
        fixed = ("in_channels", "image_size", "variant")
        accepted = [p for p in inspect.signature(entry.obj).parameters if p not in fixed]
        unknown = [k for k in options if k not in accepted and k != "variant"]
        if unknown:
            raise MetabenchError(f"backbone {name!r} has no option {', '.join(map(repr, unknown))}; "
                                 f"accepted: {', '.join(accepted) or 'none'}")
        try:
            backbone = entry.obj(in_channels, image_size, **options)
        except (ValueError, TypeError) as exc:
            raise MetabenchError(f"backbone {name!r}: {_one_line(exc)}") from None
        if not isinstance(backbone, Backbone) or not isinstance(backbone.module, nn.Module) \
                or not isinstance(backbone.out_features, int) or backbone.out_features < 1:
            raise PluginError(f"plugin {entry.plugin!r}: backbone {name!r} returned {backbone!r}; "
                              "expected metabench.Backbone(module: nn.Module, out_features: positive int)")
        return backbone


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_name(name: Any, kind: str, pattern: re.Pattern = _NAME) -> None:
    if not isinstance(name, str) or not pattern.match(name):
        raise PluginError(f"{kind} name must be lowercase text like 'maml' or 'baseline++', got {name!r}")


def _check_task_names(protocol: Protocol, source: DataSource) -> None:
    """The names of a task that reach file names (its protocol's name and data set, the source's data
    set: result files, checkpoint folders, cache keys) are plain names, checked again here in case a
    Protocol was altered after it was built."""
    if not isinstance(protocol.name, str) or not _TASK_NAME.match(protocol.name):
        raise PluginError(f"task name must be like 'kanji-5w1s' (<dataset>-<ways>w<shots>s), got {protocol.name!r}")
    for what, name in (("dataset", protocol.dataset), ("source dataset", getattr(source, "dataset", None))):
        if name is not None and name != "" and not (isinstance(name, str) and _DATASET.match(name)):
            raise PluginError(f"task {protocol.name!r}: {what} must be a plain lowercase name like 'kanji', "
                              f"got {name!r}")


def _learner_problems(cls: Any) -> list[str]:
    """What is wrong with a learner class (empty when it is fine)."""
    if not (isinstance(cls, type) and issubclass(cls, Learner)):
        return [f"expected a subclass of metabench.Learner, got {type(cls).__name__} {cls!r}"]
    problems = []
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        problems.append(f"does not implement {missing}")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        problems.append("Config must be a dataclass of hyper-parameters")
    else:
        try:
            config()
        except TypeError:
            problems.append("every Config field needs a default")
        fields = {f.name for f in dataclasses.fields(config)}
        budgets = getattr(cls, "budgets", {})
        missing = [b for b in BUDGETS if b not in budgets]
        if missing:
            problems.append(f"budgets lacks {', '.join(missing)}")
        for budget, overrides in budgets.items():
            bad = [k for k in overrides if k not in fields]
            if bad:
                problems.append(f"budget {budget!r} sets unknown config field(s) {', '.join(bad)}")
    types = getattr(cls, "problem_types", None)
    if not types or not set(types) <= set(PROBLEM_TYPES):
        problems.append(f"problem_types must be a non-empty subset of {PROBLEM_TYPES}, got {types!r}")
    return problems


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, loading installed plugins (honouring $METABENCH_PLUGINS) on first use."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost(allow=allow_list_from_env())
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (tests use this after changing the environment)."""
    global _HOST
    _HOST = None
