"""metabench's built-in plugins, installed as the package ``metabench_plugins``, laid out by kind.

- ``learners/``: the algorithms, each with its paper config beside it (``maml.py``, ``maml.toml``);
- ``datasets/``: the tasks (protocols and data sources) and their committed class splits;
- ``backbones/``: the feature extractors;
- ``loggers/``: plugins that observe runs through the lifecycle hooks.

Each module is one plugin, listed in the ``metabench`` entry-point group of pyproject.toml,
exactly as a third-party package lists its own; the core never imports them.
"""
