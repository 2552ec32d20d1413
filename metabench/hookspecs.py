"""The hooks a metabench plugin may implement.

Registration hooks have the shape ``metabench_register_things(register)``: the plugin calls
``register(...)`` once per thing it provides and never touches the host's state. The host
checks each registration and names the plugin when one is wrong.

Lifecycle hooks (``metabench_on_<event>``) observe a run; ``run`` is a
:class:`metabench.RunInfo`. The host calls each plugin's implementation in turn, and one that
raises stops the command with an error naming the plugin and the hook.
"""
import pluggy

hookspec = pluggy.HookspecMarker("metabench")
hookimpl = pluggy.HookimplMarker("metabench")


@hookspec
def metabench_register_learners(register):
    """Register learners: ``register(name: str, learner_class: type[metabench.Learner])``."""


@hookspec
def metabench_register_backbones(register):
    """Register backbones: ``register(name: str, factory)``, ``factory(in_channels, image_size, **options) -> metabench.Backbone``."""


@hookspec
def metabench_register_tasks(register):
    """Register tasks: ``register(protocol: metabench.Protocol, source: metabench.DataSource)``."""


@hookspec
def metabench_register_launchers(register):
    """Register sweep launchers: ``register(name: str, launcher_class: type[metabench.sweep.Launcher])``."""


@hookspec
def metabench_on_progress(run, phase, step, total, metrics):
    """Every training progress report: ``step`` of ``total`` in ``phase`` ("meta-train", ...), ``metrics`` {"loss": ...}."""


@hookspec
def metabench_on_result(run, result, path):
    """The run's result dict was written to ``path`` (a pathlib.Path)."""
