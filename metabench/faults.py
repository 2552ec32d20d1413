"""Failure points for tests: make a run die, diverge or pause at a chosen place, repeatably.

``METABENCH_FAULT`` holds comma-separated ``ACTION@WHERE`` entries (unset in normal use: every
call below is then a dictionary lookup that finds nothing):

- ``kill@meta-train:5``   SIGKILL this process inside training step 5 of phase ``meta-train``,
  after the step's gradients are computed and before the optimiser steps
- ``kill@evaluate:7``     SIGKILL it after test episode 7 (0-based) is scored, before it is recorded
- ``kill@checkpoint:2``   SIGKILL it while writing its 2nd checkpoint, after the temporary file is
  complete and before it is renamed into place
- ``nan@meta-train:5``    make the training loss of step 5 of ``meta-train`` NaN
- ``pause@meta-train:2``  hold this process inside training step 2 of ``meta-train`` (wherever
  ``kill@`` could act) until the file named by ``METABENCH_FAULT_RELEASE`` exists (at most
  :data:`PAUSE_LIMIT_S` seconds), then go on: a run kept in mid-flight while a test acts beside it.
  Once held, it creates ``<that name>.paused`` to say so.
"""
from __future__ import annotations

import os
import signal
import time
from functools import lru_cache

_ENV = "METABENCH_FAULT"
_RELEASE = "METABENCH_FAULT_RELEASE"
PAUSE_LIMIT_S = 600.0


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
    """SIGKILL this process if ``kill@<where>`` is armed; hold it if ``pause@<where>`` is."""
    if _armed("kill", where):
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed("pause", where):
        release = os.environ.get(_RELEASE)
        if not release:
            return
        with open(release + ".paused", "w"):
            pass
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)


def loss_value(where: str, value: float) -> float:
    """NaN if ``nan@<where>`` is armed, else ``value``."""
    return float("nan") if _armed("nan", where) else value
