"""Benchmark 3: peak memory (RSS) of second-order MAML, each variant in a fresh subprocess.

84 px, conv4-32, 3 channels, 5-way 1-shot 15-query, meta-batch 4, 5 inner steps (and 10, to show
how the checkpointed inner loop scales with the inner loop's length). The child builds its
model and tasks, runs one warm-up step, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``)
and runs ``steps`` more meta-training steps; it reports

* peak RSS: the process's peak (VmHWM) during the measured steps, torch and data included;
* above setup: that peak minus the RSS before the first (warm-up) step, once torch, the model
  and the tasks are in memory: what the meta-training step itself adds;
* s/step: median seconds per meta-training step in the child.

(The RSS right after the warm-up step is no baseline: glibc keeps much of the step's freed
memory mapped, so it already holds most of the peak.)
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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, size: int, width: int, channels: int, inner_steps: int, steps: int) -> dict:
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
    for _ in range(steps):
        start = time.perf_counter()
        v.step()
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM") if reset else int(common.peak_rss_mib() * 1024)
    return {"variant": variant, "peak_mib": peak / 1024, "setup_mib": setup / 1024, "after_warmup_mib": baseline / 1024,
            "above_setup_mib": (peak - setup) / 1024, "s_per_step": statistics.median(times),
            "hwm_reset": reset, "threads": torch.get_num_threads()}


def run_child(variant: str, config: tuple, steps: int, threads: int | None = None) -> dict:
    size, width, channels, inner_steps = config
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant,
           "--config", ",".join(map(str, config)), "--steps", str(steps)]
    env = os.environ.copy()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = common.arg_parser(__doc__.splitlines()[0], reps=3)
    parser.add_argument("--child", help=argparse_hidden())
    parser.add_argument("--config", help=argparse_hidden())
    parser.add_argument("--steps", type=int, default=2, help="measured steps per child")
    args = common.parse(parser, argv)
    if args.child:
        print(json.dumps(child(args.child, *map(int, args.config.split(",")), args.steps)))
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
          "one warm-up step. 'lower by' = the loop's figure / the variant's; 'time vs loop' = the variant's "
          "s/step / the loop's (medians of the children).", "",
          common.table(["setup", "variant", "peak RSS MiB", "peak lower by", "above setup MiB", "above setup lower by",
                        "s/step", "time vs loop"], rows), ""]
    md += [f"- {n}" for n in notes]
    common.emit(args, "3. Memory of second-order MAML", "\n".join(md), data)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
