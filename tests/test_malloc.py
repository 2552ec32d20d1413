"""glibc malloc tuning of `metabench run`: applied on glibc, skipped when the user opts out."""
from __future__ import annotations

import platform

import pytest

from metabench.malloc import tune_glibc_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("METABENCH_MALLOC", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert tune_glibc_malloc() is True
    assert tune_glibc_malloc() is True  # idempotent


def test_opt_outs(monkeypatch):
    monkeypatch.setenv("METABENCH_MALLOC", "default")
    assert tune_glibc_malloc() is False
    monkeypatch.delenv("METABENCH_MALLOC")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert tune_glibc_malloc() is False
