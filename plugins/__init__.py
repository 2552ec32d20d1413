"""metabench's built-in plugins, installed as the package ``metabench_plugins``.

Each module is one plugin, listed in the ``metabench`` entry-point group of pyproject.toml,
exactly as a third-party package lists its own; the core never imports them.
"""
from pathlib import Path

#: Committed class-split files of the built-in data sets (each checked by SHA-256 when read).
SPLITS_DIR = Path(__file__).with_name("splits")
