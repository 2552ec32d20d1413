"""glibc malloc tuning of `metabench run`: applied on glibc, skipped when the user opts out."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

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


FAULTS_OF_A_REUSED_BLOCK = """
import ctypes, resource, sys
from metabench.malloc import tune_glibc_malloc
print(tune_glibc_malloc(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 64 << 20  # above the largest mmap threshold glibc accepts (32 MiB)
for round in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)  # of the last round
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("setting", ["metabench", "default"])
def test_a_freed_64_mib_block_is_reused_without_page_faults(setting):
    """With metabench's setting a 64 MiB block freed and allocated again reuses the same pages; with
    glibc's defaults it is a fresh mapping every time (16,384 pages of 4 KiB to fault in)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "METABENCH_MALLOC")}
    if setting == "default":
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        if thp.exists() and "[always]" in thp.read_text():
            pytest.skip("transparent huge pages: a fresh mapping faults in 2 MiB pages, too few to count")
        env["METABENCH_MALLOC"] = "default"
    proc = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    faults = int(proc.stdout)
    if setting == "metabench":
        assert faults < 200, faults
    else:
        assert faults > 8000, faults
