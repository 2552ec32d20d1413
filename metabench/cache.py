"""Where metabench keeps rendered and decoded data sets."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: $METABENCH_CACHE, else $XDG_CACHE_HOME/metabench, else ~/.cache/metabench (created)."""
    root = os.environ.get("METABENCH_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metabench"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
