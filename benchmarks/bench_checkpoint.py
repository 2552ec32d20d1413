"""Benchmark 8: checkpoints during meta-training: their size, one write's time, and what writing costs.

A run writes a checkpoint of its training state (metabench/resume.py ``TrainingState.save``:
every tracked module, optimiser and scheduler, the random states, the sampler's position) with
``CheckpointFolder.write`` (metabench/checkpoint.py: ``torch.save`` to a temporary file, fsync,
rename, keep the two newest). By default it writes every 5 minutes of training (``5m``), and never
sooner than ``COST_FACTOR`` = 50 times the last write's duration after it, so that writing costs
at most 2% of the training time; ``off`` writes only at the end of each phase.

Each learner runs in this process (under metabench's glibc malloc setting, as ``metabench run``
does: metabench/malloc.py) on kanji-5w1s at budget ``quick`` with its step count reduced
(``LEARNERS``), two episodes evaluated, no learner file, each run in a fresh folder, twice per
repetition, interleaved (alternating order) after one untimed round:

- ``--checkpoint-every off``: the step time without checkpoints is the median interval between
  two consecutive steps' progress reports (per phase; a learner with two phases, mtl, weights
  the phases' medians by their step counts), so start-up and the first step do not count;
- ``--checkpoint-every 1`` (a checkpoint after every step): one write's time is the result's
  ``timing.checkpoint_s / timing.checkpoints``; the size is the newest checkpoint file's, read
  before the folder is removed.

Derived: a write per step as a share of the step time; the share of training time at the default
5-minute interval (write time / 300 s); the shortest interval whose writes stay within 2% (50 x
write time, the floor ``COST_FACTOR`` puts under any interval). End to end: the result's
``timing.meta_train_s`` of the two runs of the same repetition, (every step - off) / off, median
over the repetitions; next to it the share the recorded write times account for,
(checkpoint_s(every step) - checkpoint_s(off)) / meta_train_s(off), and the step time of both runs
(the every-step run's intervals include its write), with their difference per repetition.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

import torch  # noqa: E402

TASK = "kanji-5w1s"
#: the step counts of the reduced runs (their quick-budget values: protonet 700, maml 350, mtl 600 + 150,
#: reptile and baseline as in their plugins); everything else stays at budget quick
LEARNERS = {
    "protonet": {"meta_steps": 30},
    "maml": {"meta_steps": 12},
    "mtl": {"pretrain_steps": 20, "meta_steps": 5},
    "reptile": {"meta_steps": 12},
    "baseline": {"pretrain_steps": 30},
}
QUICK = {"protonet": {"meta_steps": 4}, "maml": {"meta_steps": 3}}
DEFAULT_SECONDS = 300.0  # the default interval, "5m"
TARGET = 0.02  # 1 / COST_FACTOR


class StepClock:
    """A ``Progress`` that notes when each training step reported (per phase): the reports of
    ``ctx.step``, which carry the step's loss (data preparation and evaluation report without one)."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def start(self, phase: str, total: int) -> None:
        pass

    def update(self, phase: str, completed: int, **metrics: float) -> None:
        if "loss" in metrics:
            self.times.setdefault(phase, []).append(time.perf_counter())

    def step_seconds(self) -> dict[str, tuple[float, int]]:
        """phase -> (median interval between consecutive steps, steps reported)."""
        out = {}
        for phase, ts in self.times.items():
            gaps = [b - a for a, b in zip(ts, ts[1:])]
            if gaps:
                out[phase] = (statistics.median(gaps), len(ts))
        return out


def filesystem(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def one_run(host, learner: str, overrides: dict, every: str, episodes: int, base: Path | None) -> dict:
    from metabench.resume import CheckpointInterval
    from metabench.runner import RunControl, RunRequest, execute, prepare

    plan = prepare(RunRequest(learner=learner, task=TASK, budget="quick", episodes=episodes,
                              learner_layers=[("bench_checkpoint", dict(overrides))]), host)
    clock = StepClock()
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        control = RunControl(out_dir=Path(tmp), checkpoint_every=CheckpointInterval.parse(every), save_learner=False)
        doc = execute(plan, host, progress=clock, control=control)
        files = sorted(Path(tmp).glob("checkpoints/*/checkpoint-*.pt"))
        size = files[-1].stat().st_size if files else 0  # before the folder goes
    t = doc["timing"]
    phases = clock.step_seconds()
    steps = sum(n for _, n in phases.values())
    step_s = sum(s * n for s, n in phases.values()) / steps if steps else float("nan")
    return {"meta_train_s": t["meta_train_s"], "checkpoints": t["checkpoints"], "checkpoint_s": t["checkpoint_s"],
            "size": size, "step_s": step_s, "steps": steps,
            "phases": {p: {"median_step_s": s, "steps": n} for p, (s, n) in phases.items()},
            "parameters": doc["backbone"]["parameters"]}


def measure(host, learner: str, overrides: dict, reps: int, episodes: int, base: Path | None) -> dict:
    """Interleaved off / every-step runs after one untimed round; the runs of each repetition."""
    variants = ["off", "1"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    load = common.load_average()[0]
    for r in range(reps + 1):
        order = variants if r % 2 == 0 else variants[::-1]
        for every in order:
            run = one_run(host, learner, overrides, every, episodes, base)
            if r:  # round 0 warms up (data, allocator, first-call paths)
                runs[every].append(run)
    return {"overrides": overrides, "load_1min": load, "runs": runs}


def summarize(m: dict) -> dict:
    off, on = m["runs"]["off"], m["runs"]["1"]
    write_s = statistics.median(r["checkpoint_s"] / r["checkpoints"] for r in on)
    step_s = statistics.median(r["step_s"] for r in off)
    overhead = [(b["meta_train_s"] - a["meta_train_s"]) / a["meta_train_s"] for a, b in zip(off, on)]
    accounted = [(b["checkpoint_s"] - a["checkpoint_s"]) / a["meta_train_s"] for a, b in zip(off, on)]
    step_increase = [b["step_s"] - a["step_s"] for a, b in zip(off, on)]
    return {
        "size_bytes": on[-1]["size"], "parameters": on[-1]["parameters"], "steps": on[-1]["steps"],
        "write_s": write_s, "step_s": step_s, "per_step_overhead": write_s / step_s,
        "default_interval_cost": write_s / DEFAULT_SECONDS, "interval_for_2pct_s": write_s / TARGET,
        "off_writes": statistics.median(r["checkpoints"] for r in off),
        "off_checkpoint_s": statistics.median(r["checkpoint_s"] for r in off),
        "on_writes": statistics.median(r["checkpoints"] for r in on),
        "meta_train_off_s": statistics.median(r["meta_train_s"] for r in off),
        "meta_train_on_s": statistics.median(r["meta_train_s"] for r in on),
        "overhead": statistics.median(overhead), "overhead_min": min(overhead), "overhead_max": max(overhead),
        "accounted": statistics.median(accounted),
        "step_on_s": statistics.median(r["step_s"] for r in on), "step_increase_s": statistics.median(step_increase),
    }


def pct(x: float) -> str:
    return f"{common.fmt(x * 100, 2)}%"


def main(argv=None) -> None:
    parser = common.arg_parser(__doc__.splitlines()[0], reps=5)
    parser.add_argument("--learners", nargs="+", choices=list(LEARNERS), help="default: all in LEARNERS")
    parser.add_argument("--episodes", type=int, default=2, help="test episodes per run (not timed; default 2)")
    parser.add_argument("--dir", type=Path, help="where the runs' checkpoint folders go (default: the system's "
                                                 "temporary folder); the file system matters for fsync")
    args = common.parse(parser, argv)
    from metabench.malloc import tune_glibc_malloc
    from metabench.plugins import get_host

    tuned = tune_glibc_malloc()  # as `metabench run` does (metabench/malloc.py)
    host = get_host()
    plan = QUICK if args.quick else {n: LEARNERS[n] for n in (args.learners or LEARNERS)}
    base = args.dir
    fs = filesystem(base or Path(tempfile.gettempdir()))
    load_start = common.load_average()
    started = time.perf_counter()
    measured, rows, e2e_rows = {}, [], []
    for name, overrides in plan.items():
        m = measure(host, name, overrides, args.reps, args.episodes, base)
        s = summarize(m)
        measured[name] = {**m, "summary": s}
        steps = " + ".join(f"{v} {k}" for k, v in overrides.items())
        rows.append([name, steps, f"{s['parameters']:,}", f"{s['size_bytes'] / 2**20:.2f}",
                     common.fmt(s["write_s"] * 1e3), common.fmt(s["step_s"] * 1e3), pct(s["per_step_overhead"]),
                     f"{s['default_interval_cost'] * 100:.4f}%", common.fmt(s["interval_for_2pct_s"]),
                     f"{m['load_1min']:.2f}"])
        e2e_rows.append([name, f"{s['meta_train_off_s']:.2f}", f"{s['off_writes']:g}",
                         f"{s['meta_train_on_s']:.2f}", f"{s['on_writes']:g}", pct(s["overhead"]),
                         f"{pct(s['overhead_min'])} .. {pct(s['overhead_max'])}", pct(s["accounted"]),
                         f"{common.fmt(s['step_s'] * 1e3)} / {common.fmt(s['step_on_s'] * 1e3)}",
                         common.fmt(s["step_increase_s"] * 1e3), common.fmt(s["write_s"] * 1e3)])
        print(f"{name}: {s}", file=sys.stderr, flush=True)
    load_end = common.load_average()
    took = time.perf_counter() - started
    threads = torch.get_num_threads()
    md = [
        f"Each learner on {TASK}, budget quick with its step count reduced (column 'steps'), {args.episodes} test "
        f"episodes, in-process `execute` runs with a fresh output folder on {fs}; median of {args.reps} interleaved "
        f"repetitions after one untimed round, {threads} thread(s), "
        f"{'metabench' if tuned else 'glibc default'} malloc setting. 'write' = `timing.checkpoint_s / "
        "timing.checkpoints` of the `--checkpoint-every 1` run (one checkpoint after every step); 'step' = the median "
        "interval between step reports of the `off` run (no checkpoint but the phase end's); 'size' = its newest "
        "checkpoint file; 'at 5m' = write / 300 s (the default interval); 'interval for 2%' = 50 x write (the floor "
        "`COST_FACTOR` puts under any interval). 'load' = the 1-minute load average when the learner's runs began "
        f"(2 cores; a test suite was running alongside: load {load_start[0]:.2f} at the start, {load_end[0]:.2f} at "
        "the end).", "",
        common.table(["learner", "steps", "parameters", "size MiB", "write ms", "step ms", "write / step",
                      "at 5m", "interval for 2%, s", "load"], rows),
        "", "End to end, the same runs: `timing.meta_train_s` with `--checkpoint-every off` and `1`; overhead = "
        "(every step - off) / off per repetition, its median and range; 'write time' = the share the recorded write "
        "times account for, (checkpoint_s(1) - checkpoint_s(off)) / meta_train_s(off); 'step ms' = median step "
        "interval (the every-step run's includes its write), 'increase' = its difference per repetition (median), "
        "next to one write's time.", "",
        common.table(["learner", "meta-train s, off", "writes", "meta-train s, every step", "writes", "overhead",
                      "range", "write time", "step ms, off / every step", "increase ms",
                      "write ms"], e2e_rows),
    ]
    common.emit(args, "8. Checkpoints during meta-training", "\n".join(md),
                {"task": TASK, "filesystem": fs, "threads": threads, "malloc_tuned": tuned, "reps": args.reps,
                 "episodes": args.episodes,
                 "load_start": load_start, "load_end": load_end, "seconds": took, "learners": measured})


if __name__ == "__main__":
    main()
