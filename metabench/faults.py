"""Failure points for tests: make a run die or diverge at a chosen place, repeatably.

``METABENCH_FAULT`` holds comma-separated ``ACTION@WHERE`` entries (unset in normal use: every
call below is then a dictionary lookup that finds nothing):

- ``kill@meta-train:5``   SIGKILL this process inside training step 5 of phase ``meta-train``,
  after the step's gradients are computed and before the optimiser steps
- ``kill@evaluate:7``     SIGKILL it after test episode 7 (0-based) is scored, before it is recorded
- ``kill@checkpoint:2``   SIGKILL it while writing its 2nd checkpoint, after the temporary file is
  complete and before it is renamed into place
- ``nan@meta-train:5``    make the training loss of step 5 of ``meta-train`` NaN
"""
from __future__ import annotations

import os
import signal
from functools import lru_cache

_ENV = "METABENCH_FAULT"


@lru_cache(maxsize=8)
def _parse(text: str) -> dict[tuple[str, str], str]:
    faults = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        action, _, where = entry.partition("@")
        faults[(action, where)] = entry
    return faults


def _armed(action: str, where: str) -> bool:
    text = os.environ.get(_ENV)
    return bool(text) and (action, where) in _parse(text)


def kill_point(where: str) -> None:
    """SIGKILL this process if ``kill@<where>`` is armed."""
    if _armed("kill", where):
        os.kill(os.getpid(), signal.SIGKILL)


def loss_value(where: str, value: float) -> float:
    """NaN if ``nan@<where>`` is armed, else ``value``."""
    return float("nan") if _armed("nan", where) else value
