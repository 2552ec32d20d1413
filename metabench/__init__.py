"""metabench: a benchmark suite for meta-learning with fixed episodes and learners as plugins.

What a plugin needs is importable from here::

    from metabench import hookimpl, Learner, Backbone, Protocol, ClassImageSource, setting, AttributeState
"""
from importlib.metadata import PackageNotFoundError, version as _version

from .backbone import Backbone
from .checkpoint import AttributeState
from .errors import MetabenchError, PluginError
from .hookspecs import hookimpl
from .learner import BUDGETS, Learner, TrainContext
from .lifecycle import RunInfo
from .settings import check_settings, setting
from .task import ClassImageSource, DataSource, Episode, EpisodeDraw, Protocol

try:
    __version__ = _version("metabench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AttributeState", "BUDGETS", "Backbone", "ClassImageSource", "DataSource", "Episode", "EpisodeDraw", "Learner",
    "MetabenchError", "PluginError", "Protocol", "RunInfo", "TrainContext", "check_settings", "hookimpl", "setting",
    "__version__",
]
