"""Shared helpers of the speed benchmarks: timing, interleaving, machine facts, peers, output.

Every figure is the median of ``reps`` repetitions; the variants of one comparison run
interleaved (A B C, A B C, ...), and each ratio is taken per repetition inside the same run
(then its median), so a slow patch of the machine affects every variant alike.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() where it is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "load_average": [round(x, 2) for x in load_average()],
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- peers
def peer(name: str):
    """The imported peer module, or None (with the reason in ``MISSING``) when it is not installed."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a peer broken by its own dependencies
        MISSING[name] = f"{type(exc).__name__}: {exc}"
        return None


MISSING: dict[str, str] = {}


def skipped(name: str) -> str:
    return (f"{name} is not installed here ({MISSING.get(name, 'not imported')}); its figures are skipped: "
            "see benchmarks/README.md (bash benchmarks/install_peers.sh VENV)")


# ----------------------------------------------------------------------------- timing
@dataclass
class Comparison:
    """Interleaved repetitions of several variants; ``times[name]`` is seconds per repetition."""

    times: dict[str, list[float]] = field(default_factory=dict)
    work: dict[str, float] = field(default_factory=dict)  # units of work per repetition

    def median_s(self, name: str) -> float:
        return statistics.median(self.times[name])

    def rate(self, name: str) -> float:
        """Median units per second."""
        return statistics.median(self.work[name] / t for t in self.times[name])

    def ratio(self, fast: str, slow: str) -> float:
        """Median over repetitions of rate(fast) / rate(slow), each pair from the same repetition."""
        rates = [(self.work[fast] / a) / (self.work[slow] / b)
                 for a, b in zip(self.times[fast], self.times[slow])]
        return statistics.median(rates)

    def spread(self, name: str) -> float:
        """(max - min) / median of the per-repetition rates: the noise of a figure."""
        rates = [self.work[name] / t for t in self.times[name]]
        return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else 0.0


def interleaved(variants: dict[str, tuple[Callable[[], object], float]], reps: int,
                warmup: int = 1) -> Comparison:
    """Run every variant ``reps`` times, round-robin, after ``warmup`` untimed rounds.

    variants: name -> (function doing one repetition, units of work it does).
    """
    result = Comparison(times={n: [] for n in variants}, work={n: w for n, (_, w) in variants.items()})
    for _ in range(warmup):
        for fn, _ in variants.values():
            fn()
    for r in range(reps):
        order = list(variants.items())
        if r % 2:  # alternate the order so that no variant always runs right after another
            order.reverse()
        for name, (fn, _) in order:
            start = time.perf_counter()
            fn()
            result.times[name].append(time.perf_counter() - start)
    return result


def matmul_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's measured float32 matmul FLOP/s (n x n @ n x n, all torch threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------- output
def fmt(x: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no exponent below 1e6."""
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def arg_parser(description: str, reps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1-2 repetitions: checks that it runs")
    p.add_argument("--reps", type=int, default=reps, help=f"interleaved repetitions (default {reps})")
    p.add_argument("--json", type=Path, help="also write {'markdown': ..., 'data': ...} here")
    return p


def parse(parser: argparse.ArgumentParser, argv=None):
    """Parse; ``--quick`` runs on one thread (tiny tensors gain nothing from two, and a busy
    machine makes OpenMP's thread hand-offs slow)."""
    args = parser.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)
    return args


def emit(args, title: str, markdown: str, data: dict) -> None:
    """Print the section and write it as JSON when asked (run_all collects these)."""
    section = f"## {title}\n\n{markdown.strip()}\n"
    print(section)
    if args.json:
        args.json.write_text(json.dumps({"title": title, "markdown": section, "data": data,
                                         "machine": machine()}, indent=1, default=str))


def ensure_importable() -> None:
    """Let ``python benchmarks/x.py`` import ``benchmarks.common`` and the project."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
