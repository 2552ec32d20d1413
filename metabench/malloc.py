"""Keep freed tensor memory in the heap instead of returning it to the OS after every step.

glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with fresh
``mmap`` calls and unmaps them on free, and trims the heap top above its trim threshold. A test
episode's activations (conv4-64 on 100 images of 28 px: about 20 MB per layer) are allocated and
freed on every call, so each episode pays for new pages and their zeroing again. Raising both
thresholds, as ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``
would, made ProtoNet evaluation faster and far less erratic on a 2-core CPU
(``benchmarks/bench_eval.py --default-malloc`` measures evaluation without it).

Blocks above the largest threshold glibc accepts (32 MiB) still came from fresh mappings whenever
the heap had no free block that large: second-order MAML at 84 px (conv4-32, 75 query images:
68 MB per first-layer activation) took about 250,000-290,000 page faults per meta-training step
with the raised thresholds alone. So mmap is also switched off (``M_MMAP_MAX`` = 0): every block
comes from the heap and returns to it (time, page faults and peak memory under this setting and
glibc's defaults: benchmarks/RESULTS.md, section 3, allocator table). Numerics are unaffected; the
process's resident memory stays nearer its peak, and the peak is higher, as large free blocks in
the heap are not always reused whole.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold on 64-bit
TRIM_THRESHOLD = -1  # never trim the heap top (mallopt(3))
MMAP_MAX = 0  # no block from mmap


def tune_glibc_malloc() -> bool:
    """Raise glibc's mmap threshold, switch off trimming and mmap in this process; True if applied.

    Does nothing (False) off Linux/glibc, when ``METABENCH_MALLOC=default``, or when
    ``GLIBC_TUNABLES`` already sets malloc options (the user's choice wins).
    """
    if os.environ.get("METABENCH_MALLOC", "") == "default" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_MAX, MMAP_MAX)))
