"""Where metabench keeps rendered and decoded data sets."""
import os
from pathlib import Path

from .errors import MetabenchError


def cache_root() -> Path:
    """The cache folder's path, not created: $METABENCH_CACHE, else $XDG_CACHE_HOME/metabench, else
    ~/.cache/metabench."""
    root = os.environ.get("METABENCH_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metabench"
    return Path(root)


def cache_dir() -> Path:
    """The cache folder: $METABENCH_CACHE, else $XDG_CACHE_HOME/metabench, else ~/.cache/metabench
    (created; a folder that cannot be created is a one-line MetabenchError naming it)."""
    path = cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MetabenchError(f"cannot create the cache folder {path}: {exc.strerror or exc} "
                             f"(set $METABENCH_CACHE to a writable folder)") from None
    return path
