"""Built-in learner plugins. Each learner's published hyper-parameters (``--budget paper``) are the
TOML file of the same name beside it (``maml.toml`` for ``maml.py``; ``baseline++.toml``)."""
from pathlib import Path


def paper_config(name: str) -> Path:
    """The paper config file ``name`` (e.g. ``"maml.toml"``) installed beside the learners."""
    return Path(__file__).with_name(name)
