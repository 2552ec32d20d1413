"""Benchmark 3: peak memory (RSS) of second-order MAML, each variant in a fresh subprocess; and the allocator.

84 px, conv4-32, 3 channels, 5-way 1-shot 15-query, meta-batch 4, 5 inner steps (and 10, to show
how the checkpointed inner loop scales with the inner loop's length). The child builds its
model and tasks, runs one warm-up step, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``)
and runs ``steps`` more meta-training steps; it reports

* peak RSS: the process's peak (VmHWM) during the measured steps, torch and data included;
* above setup: that peak minus the RSS before the first (warm-up) step, once torch, the model
  and the tasks are in memory: what the meta-training step itself adds;
* s/step: median seconds per meta-training step in the child;
* page faults/step: the child's minor page faults during the measured steps, per step.

Every child of the memory table runs under metabench's malloc setting, as ``metabench run`` does
(``metabench/malloc.py``). The allocator table runs metabench's loop and learn2learn's MAML under
that setting and under glibc's defaults (at 28 px with 1 inner step, and 84 px with 1 and 5).

(The RSS right after the warm-up step is no baseline: the allocator keeps much of the step's
freed memory, so it already holds most of the peak.)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

VARIANTS = ["metabench loop", "metabench per-task backward", "metabench checkpointed", "metabench vmap",
            "attempt: tasks as conv groups", "learn2learn MAML", "higher innerloop_ctx", "torchopt MetaSGD"]
PEERS = {"learn2learn MAML": "learn2learn", "higher innerloop_ctx": "higher", "torchopt MetaSGD": "torchopt"}
#: a child's allocator: "metabench" = metabench.malloc.tune_glibc_malloc (as `metabench run`), "default" = glibc's
MALLOC = ("metabench", "default")
#: the allocator table's setups (size, width, channels, inner steps) and (variant, allocator) pairs
ALLOCATOR_CONFIGS = [(28, 64, 1, 1), (84, 32, 3, 1), (84, 32, 3, 5)]
ALLOCATOR_PAIRS = [("metabench loop", "metabench"), ("metabench loop", "default"),
                   ("learn2learn MAML", "metabench"), ("learn2learn MAML", "default")]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, size: int, width: int, channels: int, inner_steps: int, steps: int,
          malloc: str = "metabench") -> dict:
    import resource

    if malloc == "metabench":  # before anything large is allocated, as `metabench run` does
        from metabench.malloc import tune_glibc_malloc

        if not tune_glibc_malloc():
            raise RuntimeError("metabench's malloc setting could not be applied here (not glibc, or opted out)")
    import torch

    from benchmarks import bench_maml
    from benchmarks import maml_variants as mv

    classes = {cls.name: (cls, {}) for cls in mv.OURS + mv.ATTEMPTS}
    if variant == mv.Learn2Learn.name:  # a peer is imported only in its own child
        classes[variant] = (mv.Learn2Learn, {"l2l": common.peer("learn2learn")})
    elif variant == mv.Higher.name:
        classes[variant] = (mv.Higher, {"higher": common.peer("higher")})
    elif variant == mv.TorchOpt.name:
        classes[variant] = (mv.TorchOpt, {"torchopt": common.peer("torchopt")})
    cls, extra = classes[variant]
    template, tasks = bench_maml.make_setup(size, width, channels, classes=10)
    v = cls(template, tasks, bench_maml.INNER_LR, inner_steps, **extra)
    setup = _status_kib("VmRSS")
    v.step()  # warm-up: allocator pools, lazy initialisation
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    baseline = _status_kib("VmRSS")
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        start = time.perf_counter()
        v.step()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = _status_kib("VmHWM") if reset else int(common.peak_rss_mib() * 1024)
    return {"variant": variant, "malloc": malloc, "peak_mib": peak / 1024, "setup_mib": setup / 1024,
            "after_warmup_mib": baseline / 1024, "above_setup_mib": (peak - setup) / 1024,
            "s_per_step": statistics.median(times), "page_faults_per_step": faults / steps,
            "hwm_reset": reset, "threads": torch.get_num_threads()}


def run_child(variant: str, config: tuple, steps: int, threads: int | None = None, malloc: str = "metabench") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant,
           "--config", ",".join(map(str, config)), "--steps", str(steps), "--malloc", malloc]
    env = {k: v for k, v in os.environ.items() if k not in ("METABENCH_MALLOC", "GLIBC_TUNABLES")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def allocator_comparison(reps: int, steps: int, quick: bool) -> tuple[list[str], dict]:
    """Seconds per step, page faults per step and peak RSS of metabench's loop and of learn2learn's
    MAML, each under metabench's allocator setting and under glibc's defaults: one fresh child per
    (variant, allocator) and repetition, interleaved; ratios per repetition, then the median."""
    pairs = [p for p in ALLOCATOR_PAIRS if p[0] not in PEERS or common.peer(PEERS[p[0]]) is not None]
    base = ("metabench loop", "metabench")
    rows, data = [], {}
    for config in [(16, 4, 3, 1)] if quick else ALLOCATOR_CONFIGS:
        key = f"{config[0]}px conv4-{config[1]} {config[3]} inner step{'s' if config[3] > 1 else ''}"
        results = {p: [] for p in pairs}
        for r in range(reps):
            for pair in (pairs if r % 2 == 0 else pairs[::-1]):
                results[pair].append(run_child(pair[0], config, steps, threads=1 if quick else None, malloc=pair[1]))
        data[key] = {f"{v} / {m}": res for (v, m), res in results.items()}
        for pair in pairs:
            res = results[pair]
            vs_base = statistics.median(x["s_per_step"] / b["s_per_step"] for x, b in zip(res, results[base]))
            rows.append([key, pair[0], "metabench's" if pair[1] == "metabench" else "glibc default",
                         f"{statistics.median(x['s_per_step'] for x in res):.3g}",
                         f"{statistics.median(x['page_faults_per_step'] for x in res):,.0f}",
                         f"{statistics.median(x['peak_mib'] for x in res):,.0f}", f"{vs_base:.2f}"])
    md = ["Allocator: the same children under metabench's malloc setting (`metabench.malloc.tune_glibc_malloc`, "
          "which `metabench run` applies: mmap threshold 32 MiB, no trimming, no mmap) and under glibc's defaults "
          "(how a plain script runs). "
          f"Medians of {reps} fresh subprocesses per row (interleaved), {steps} measured steps each after one warm-up "
          "step; last column: the row's s/step over metabench loop's under metabench's setting, per repetition, "
          "then the median (above 1: slower than metabench as `metabench run` runs it).", "",
          common.table(["setup", "variant", "malloc", "s/step", "page faults/step", "peak RSS MiB",
                        "time / metabench loop (metabench's malloc)"], rows), ""]
    return md, data


def main(argv=None) -> None:
    parser = common.arg_parser(__doc__.splitlines()[0], reps=3)
    parser.add_argument("--child", help=argparse_hidden())
    parser.add_argument("--config", help=argparse_hidden())
    parser.add_argument("--steps", type=int, default=2, help="measured steps per child")
    parser.add_argument("--malloc", choices=MALLOC, default="metabench", help=argparse_hidden())
    args = common.parse(parser, argv)
    if args.child:
        print(json.dumps(child(args.child, *map(int, args.config.split(",")), args.steps, malloc=args.malloc)))
        return
    notes = []
    variants = []
    for name in ([] if args.quick else VARIANTS):
        if name in PEERS and common.peer(PEERS[name]) is None:
            notes.append(common.skipped(PEERS[name]))
        else:
            variants.append(name)
    if args.quick:
        configs = [(16, 4, 3, 2)]
        variants = ["metabench loop", "metabench checkpointed"]
        steps = 1
    else:
        configs = [(84, 32, 3, 5), (84, 32, 3, 10)]
        steps = args.steps
    rows, data = [], {}
    for config in configs:
        key = f"{config[0]}px conv4-{config[1]} {config[3]} inner steps"
        names = variants if config[3] == 5 or args.quick else ["metabench loop", "metabench per-task backward",
                                                                "metabench checkpointed"]
        results = {n: [] for n in names}
        for r in range(args.reps):  # interleaved: one child per variant per repetition
            for name in (names if r % 2 == 0 else names[::-1]):
                results[name].append(run_child(name, config, steps, threads=1 if args.quick else None))
        data[key] = results
        base_peak = statistics.median(x["peak_mib"] for x in results["metabench loop"])
        base_above = statistics.median(x["above_setup_mib"] for x in results["metabench loop"])
        base_time = statistics.median(x["s_per_step"] for x in results["metabench loop"])
        for name in names:
            peak = statistics.median(x["peak_mib"] for x in results[name])
            above = statistics.median(x["above_setup_mib"] for x in results[name])
            secs = statistics.median(x["s_per_step"] for x in results[name])
            rows.append([key, name, f"{peak:,.0f}", f"{base_peak / peak:.2f}", f"{above:,.0f}",
                         f"{base_above / above:.2f}" if above > 0 else "n/a", f"{secs:.3g}", f"{secs / base_time:.2f}"])
        data[key + " (loop medians)"] = {"peak_mib": base_peak, "above_setup_mib": base_above, "s_per_step": base_time}
    md = [f"Medians of {args.reps} fresh subprocesses per variant (interleaved); {steps} measured steps each after "
          "one warm-up step; every child runs under metabench's malloc setting, as `metabench run` does "
          "(`metabench/malloc.py`; the allocator table below compares it with glibc's defaults). 'lower by' = the "
          "loop's figure / the variant's; 'time vs loop' = the variant's s/step / the loop's (medians of the "
          "children).", "",
          common.table(["setup", "variant", "peak RSS MiB", "peak lower by", "above setup MiB", "above setup lower by",
                        "s/step", "time vs loop"], rows), ""]
    allocator_md, data["allocator"] = allocator_comparison(args.reps, steps, args.quick)
    md += allocator_md
    md += [f"- {n}" for n in notes]
    common.emit(args, "3. Memory of second-order MAML", "\n".join(md), data)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
