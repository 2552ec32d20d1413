"""The hooks a metabench plugin may implement.

Every hook has the shape ``metabench_register_things(register)``: the plugin calls
``register(...)`` once per thing it provides and never touches the host's state. The host
checks each registration and names the plugin when one is wrong.
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
