"""metabench: a benchmark suite for meta-learning with fixed episodes and learners as plugins.

What a plugin needs is importable from here::

    from metabench import hookimpl, Learner, Backbone, Protocol, ClassImageSource, setting, AttributeState

The names that need torch are imported on first use (PEP 562), so that ``metabench --version``,
``--help`` and argument errors answer without loading torch.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _version

from .errors import MetabenchError, PluginError
from .hookspecs import hookimpl
from .settings import BUDGETS, check_settings, setting

try:
    __version__ = _version("metabench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: name -> module of the names imported on first use
_LAZY = {"AttributeState": ".checkpoint", "Backbone": ".backbone", "Learner": ".learner", "TrainContext": ".learner",
         "RunInfo": ".lifecycle", "ClassImageSource": ".task", "DataSource": ".task", "Episode": ".task",
         "EpisodeDraw": ".task", "Protocol": ".task"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metabench' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AttributeState", "BUDGETS", "Backbone", "ClassImageSource", "DataSource", "Episode", "EpisodeDraw", "Learner",
    "MetabenchError", "PluginError", "Protocol", "RunInfo", "TrainContext", "check_settings", "hookimpl", "setting",
    "__version__",
]
