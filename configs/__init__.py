"""Published hyper-parameters of the built-in learners, one TOML file each (``--budget paper``).

Installed as the package ``metabench_plugins.configs`` so the files travel with ``pip install``;
:func:`path` finds one.
"""
from importlib.resources import files


def path(name: str):
    """The installed config file ``name`` (e.g. ``"maml.toml"``)."""
    return files(__name__) / name
