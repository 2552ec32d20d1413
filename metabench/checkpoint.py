"""Checkpoint files: a run's training state, written atomically and read without running code.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, text, lists, tuples and
dicts, so it is read with ``torch.load(weights_only=True)``: opening one cannot run code. It is
written to a temporary file in the same folder, flushed and fsynced, then renamed over its name
(and the folder fsynced), so a reader finds either the old file or the new one, never half of
one. A folder keeps the :data:`KEEP` newest checkpoints of a run: when the newest is damaged
(a disk that lied about fsync, a copy cut short) the one before it is still there.

This module knows the file format; :mod:`metabench.resume` decides when a run writes one and
how a resumed run uses it.
"""
from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MetabenchError
from .files import write_atomic

FORMAT = "metabench-checkpoint"
FORMAT_VERSION = 1
#: how many checkpoints a run's folder keeps (the newest and the ones before it)
KEEP = 2
_NAME = re.compile(r"^checkpoint-(\d{6,})\.pt$")


# ----------------------------------------------------------------------------- random states

def rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), Python and NumPy global random states, in types
    ``weights_only`` loading accepts (NumPy's key array as a tensor, Python's as tuples)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the global random states :func:`rng_state` took."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- tracked objects

class AttributeState:
    """Checkpoint plain attributes of an object (numbers, text, lists, dicts, tensors):
    ``ctx.track("failures", AttributeState(self, "failure_pool", "last_failures"))``."""

    def __init__(self, owner: Any, *names: str):
        missing = [n for n in names if not hasattr(owner, n)]
        if missing:
            raise AttributeError(f"AttributeState: {type(owner).__name__} has no attribute(s) {', '.join(missing)}")
        self.owner, self.names = owner, names

    def state_dict(self) -> dict[str, Any]:
        return {n: copy.deepcopy(getattr(self.owner, n)) for n in self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n in self.names:
            setattr(self.owner, n, copy.deepcopy(state[n]))


def check_trackable(name: str, obj: Any) -> None:
    """TypeError unless a checkpoint can keep ``obj`` (a tensor, or an object with state_dict() and
    load_state_dict())."""
    if not isinstance(obj, torch.Tensor) and not (callable(getattr(obj, "state_dict", None))
                                                  and callable(getattr(obj, "load_state_dict", None))):
        raise TypeError(f"ctx.track({name!r}): a {type(obj).__name__} has no state_dict()/load_state_dict(); "
                        "track modules, optimisers, schedulers, tensors, or wrap plain attributes in "
                        "metabench.AttributeState")


def object_state(name: str, obj: Any) -> Any:
    """What a checkpoint keeps of one tracked object: a tensor's values, else its ``state_dict()``."""
    check_trackable(name, obj)
    return obj.detach().clone() if isinstance(obj, torch.Tensor) else obj.state_dict()


def load_object_state(name: str, obj: Any, state: Any) -> None:
    """Put ``state`` (from :func:`object_state`) back into ``obj``."""
    if isinstance(obj, torch.Tensor):
        if not isinstance(state, torch.Tensor) or state.shape != obj.shape:
            raise ValueError(f"tracked tensor {name!r}: the checkpoint holds "
                             f"{tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}, "
                             f"the run has shape {tuple(obj.shape)}")
        with torch.no_grad():
            obj.copy_(state)
    else:
        obj.load_state_dict(state)


# ----------------------------------------------------------------------------- files

def atomic_save(obj: Any, path: Path, before_rename=None) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file, fsync and rename
    (:func:`metabench.files.write_atomic`: a failed write is one line naming the path and leaves
    the previous file intact). ``before_rename()`` runs between the two (tests inject a crash there)."""
    return write_atomic(path, lambda fh: torch.save(obj, fh), before_rename=before_rename)


def load_file(path: Path, what: str) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU; a damaged file is a MetabenchError
    naming it."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MetabenchError(f"{path}: no such {what}") from None
    except Exception as exc:  # truncated zip, bytes that are not a torch file, a forbidden type
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetabenchError(f"{path}: not a readable {what} (corrupt or truncated: {reason[:160]})") from None
    if not isinstance(doc, dict):
        raise MetabenchError(f"{path}: not a {what} (holds a {type(doc).__name__})")
    return doc


class CheckpointFolder:
    """The checkpoints of one run: ``checkpoint-000001.pt``, ``checkpoint-000002.pt``, ...
    (a number that grows with every write; the :data:`KEEP` newest are kept)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def files(self) -> list[Path]:
        """The checkpoint files, oldest first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        files = self.files()
        return files[-1] if files else None

    def write(self, state: dict, before_rename=None) -> Path:
        """Write ``state`` as the next checkpoint; drop all but the :data:`KEEP` newest."""
        files = self.files()  # (atomic_save makes the folder; a failure is one line naming the file)
        number = int(_NAME.match(files[-1].name).group(1)) + 1 if files else 1
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
        path = atomic_save(doc, self.path / f"checkpoint-{number:06d}.pt", before_rename)
        for old in files[:-(KEEP - 1)] if KEEP > 1 else files:
            old.unlink(missing_ok=True)
        return path

    def read(self, path: Path) -> dict:
        """A checkpoint's contents; MetabenchError naming the file if damaged or not a checkpoint."""
        doc = load_file(path, "metabench checkpoint")
        if doc.get("format") != FORMAT:
            raise MetabenchError(f"{path}: not a metabench checkpoint")
        if doc.get("format_version") != FORMAT_VERSION:
            raise MetabenchError(f"{path}: checkpoint format {doc.get('format_version')!r} is not one this "
                                 f"metabench reads ({FORMAT_VERSION})")
        missing = [k for k in ("identity", "done", "phase", "tracked", "rng", "generator", "sampler") if k not in doc]
        if missing:
            raise MetabenchError(f"{path}: damaged metabench checkpoint (missing {', '.join(missing)})")
        return doc


def identity_difference(saved: dict, current: dict) -> str | None:
    """The first way the run ``current`` differs from the checkpoint's ``saved`` identity, in words;
    None when they are the same run."""
    labels = {"learner": "learner", "task": "task", "seed": "seed", "backbone": "backbone",
              "backbone_options": "backbone options", "budget": "budget", "episodes": "episodes",
              "metabench_version": "metabench version", "precision": "precision", "validation": "validation"}
    defaults = {"precision": "fp32"}  # a checkpoint written before runs had a precision trained in fp32
    for key, label in labels.items():
        a, b = saved.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if a != b:
            return f"{label} {a!r} in the checkpoint, {b!r} now"
    a, b = saved.get("config", {}), current.get("config", {})
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            return f"setting {key}={a.get(key)!r} in the checkpoint, {b.get(key)!r} now"
    return None
