"""Experiment (not part of run_all.py, not used by metabench): a fused gather + uint8 -> float32 / 255
kernel compiled with numba, against ``ClassImageSource.materialize`` (torch: index_select, float,
div_), on the 5-way 5-shot 15-query episodes of bench_episodes.py at 28 px and 84 px.

It checks first that the kernel's images equal materialize's bit for bit, then reports episodes/s
of materialize alone (no draw), median of interleaved repetitions; also the same gather with the
uint8 -> float32 conversion but no scaling, which shows what the memory traffic alone allows. numba is not a metabench
dependency; install it into the environment that runs this (``pip install numba``), otherwise the
script says so and exits 0.

    python benchmarks/experiment_fused_gather.py [--reps 5]

The parallel kernels run on numba's default threading layer (``NUMBA_THREADING_LAYER`` picks
another). metabench does not use this kernel: see the stop-10 note on issue 6 for why.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_episodes import QUERIES, SHOTS, WAYS, ArraySource, kanji_images  # noqa: E402
from metabench.malloc import tune_glibc_malloc  # noqa: E402
from metabench.rng import SplitMix64  # noqa: E402


def kernels(numba):
    """Kernels: out[i, :] = float32(images[rows[i], :]) / float32(255), parallel and serial; and the
    parallel gather + conversion without the scaling (not a loader: its images are not in [0, 1])."""

    def body(images, rows, out):
        d = images.shape[1]
        scale = np.float32(255.0)
        for i in numba.prange(rows.shape[0]):
            r = rows[i]
            for j in range(d):
                out[i, j] = np.float32(images[r, j]) / scale

    def convert_only(images, rows, out):  # no scaling: what the memory traffic alone allows
        d = images.shape[1]
        for i in numba.prange(rows.shape[0]):
            r = rows[i]
            for j in range(d):
                out[i, j] = np.float32(images[r, j])

    return (numba.njit(parallel=True, nogil=True)(body), numba.njit(nogil=True)(body),
            numba.njit(parallel=True, nogil=True)(convert_only))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--episodes", type=int, default=400)
    args = p.parse_args(argv)
    try:
        import numba
    except ImportError as exc:
        print(f"numba is not installed here ({exc}); `pip install numba` to run this experiment")
        return 0
    tune_glibc_malloc()
    parallel, serial, convert_only = kernels(numba)
    print(f"numba {numba.__version__}, {numba.get_num_threads()} numba threads, {torch.get_num_threads()} torch threads")
    for size, classes in ((28, None), (84, 600)):
        images = kanji_images(size, classes)
        source = ArraySource(images, per_class=20)
        source.prepare("train")
        flat = images.reshape(images.shape[0], -1).numpy()
        rng = SplitMix64(1)
        draws = source.draw_many(rng, "train", args.episodes, WAYS, SHOTS, QUERIES)

        def fused(kernel, d):
            rows = np.array(d.support + d.query, dtype=np.int64)
            out = np.empty((len(rows), flat.shape[1]), np.float32)
            kernel(flat, rows, out)
            return torch.from_numpy(out).view(len(rows), *images.shape[1:])

        for kernel in (parallel, serial):
            want = source.materialize(draws[0], "train")
            got = fused(kernel, draws[0])
            n = len(draws[0].support)
            assert torch.equal(got[:n], want.support_x) and torch.equal(got[n:], want.query_x), "kernel differs"
        variants = {"torch materialize": lambda d: source.materialize(d, "train"),
                    "numba fused, parallel": lambda d: fused(parallel, d),
                    "numba fused, serial": lambda d: fused(serial, d),
                    "bound: convert only": lambda d: fused(convert_only, d)}
        rates = {name: [] for name in variants}
        for _ in range(args.reps):
            for name, fn in variants.items():
                start = time.perf_counter()
                for d in draws:
                    fn(d)
                rates[name].append(len(draws) / (time.perf_counter() - start))
        base = statistics.median(rates["torch materialize"])
        for name, r in rates.items():
            note = "no / 255: a bound, not a loader" if name.startswith("bound") else "images equal bit for bit"
            print(f"{size} px  {name:24s} {statistics.median(r):>9,.0f} episodes/s  "
                  f"({statistics.median(r) / base:.2f}x torch; {note})")
    print(f"numba threading layer used by the parallel kernels: {numba.threading_layer()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
