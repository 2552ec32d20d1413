"""Benchmark 5: end-to-end wall time of ``metabench run --budget quick`` per learner on kanji-5w1s.

Each run is a fresh ``metabench`` process (the installed console script's module, run with this
Python). Reported: the process wall time, and from the result file's ``timing`` the meta-training
and evaluation seconds; the rest (start-up, imports, data loading, writing) is wall - both.
Each learner also runs with ``GLIBC_TUNABLES`` raising glibc's mmap and trim thresholds (freed
tensor memory stays in the heap instead of being unmapped and faulted in again on the next
allocation), to measure what that does to a whole run.
Run it on a quiet machine: it takes a few minutes per learner and repetition.

``--from-results DIR ...`` runs nothing: it tabulates the ``timing`` of result files already
written by ``metabench run --budget quick`` (e.g. the leaderboard grid, ``leaderboards/results``),
per learner: the median meta-training and evaluation seconds over the seeds found, with the
threads each run used and its commit. Process start-up is not in those files.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def learners() -> list[str]:
    from metabench.plugins import PluginHost

    host = PluginHost()
    return [n for n in host.learners.names() if "classification" in host.learners.get(n).obj.problem_types]


def one_run(learner: str, task: str, budget: str, episodes: int | None, out: Path, threads: int | None = None,
            tunables: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "metabench.cli", "run", "--learner", learner, "--task", task, "--budget", budget,
           "--out", str(out)]
    if episodes:
        cmd += ["--episodes", str(episodes)]
    before = set(out.glob("**/*.json"))
    start = time.perf_counter()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    start_cpu = os.times()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    cpu = os.times()
    wall = time.perf_counter() - start
    user, system = cpu.children_user - start_cpu.children_user, cpu.children_system - start_cpu.children_system
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    new = sorted(set(out.glob("**/*.json")) - before)
    doc = json.loads(new[-1].read_text())
    timing = doc["timing"]
    return {"wall_s": wall, "meta_train_s": timing["meta_train_s"], "eval_s": timing["eval_s"],
            "other_s": wall - timing["meta_train_s"] - timing["eval_s"], "mean": doc["summary"].get("mean"),
            "user_s": user, "system_s": system,
            "episodes": doc["task"]["episodes"], "threads": doc["environment"]["threads"],
            "command": " ".join(["metabench"] + cmd[3:]).replace(str(out), "DIR")}


def from_results(args) -> None:
    """Tabulate the timing of stored quick-budget results of ``args.task`` (no runs)."""
    runs: dict[str, list[dict]] = {}
    for folder in args.from_results:
        for path in sorted(Path(folder).glob("**/*.json")):
            try:
                doc = json.loads(path.read_text())
                if doc["task"]["name"] != args.task or doc["budget"] != "quick":
                    continue
                runs.setdefault(doc["learner"]["name"], []).append(doc)
            except (KeyError, TypeError, ValueError):
                continue
    if not runs:
        raise SystemExit(f"bench_end_to_end: no quick-budget {args.task} results under {', '.join(args.from_results)}")
    rows, data = [], {}
    for name in sorted(runs):
        docs = runs[name]
        train = statistics.median(d["timing"]["meta_train_s"] for d in docs)
        evaluate = statistics.median(d["timing"]["eval_s"] for d in docs)
        episodes = docs[0]["task"]["episodes"]
        threads = sorted({d["environment"]["threads"] for d in docs})
        commits = sorted({(d["environment"].get("git_commit") or "?")[:7] for d in docs})
        rows.append([name, str(len(docs)), f"{train:.0f}", f"{evaluate:.1f}", f"{train + evaluate:.0f}",
                     f"{episodes / evaluate:.0f}", "/".join(map(str, threads)), ", ".join(commits)])
        data[name] = [{"seed": d["seed"], **d["timing"], "threads": d["environment"]["threads"]} for d in docs]
    md = [f"Stored results of `metabench run --learner LEARNER --task {args.task} --budget quick --seed S` under "
          f"{', '.join(f'`{f}`' for f in args.from_results)} (nothing rerun): medians over the seeds found, seconds. "
          "Process start-up (interpreter, torch, plugins, data cache) is not included.", "",
          common.table(["learner", "runs", "meta-train s", "evaluate s", "train + evaluate s", "eval episodes/s",
                        "threads", "commit"], rows)]
    common.emit(args, f"5. End to end ({args.task}, budget quick, from stored results)", "\n".join(md), data)


def main(argv=None) -> None:
    parser = common.arg_parser(__doc__.splitlines()[0], reps=1)
    parser.add_argument("--task", default="kanji-5w1s")
    parser.add_argument("--from-results", nargs="+", metavar="DIR",
                        help="tabulate the timing of stored result files instead of running")
    parser.add_argument("--learners", nargs="+", help="learners to run (default: every registered "
                        "classification learner; with 12 of them and two malloc settings that is over an hour)")
    parser.add_argument("--no-malloc-variant", action="store_true", help="skip the GLIBC_TUNABLES runs")
    args = common.parse(parser, argv)
    if args.from_results:
        return from_results(args)
    budget, episodes = ("smoke", 2) if args.quick else ("quick", None)
    names = ["protonet"] if args.quick else (args.learners or learners())
    modes = {"default": None}
    if not (args.quick or args.no_malloc_variant):
        modes["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    runs_of = [(n, m) for n in names for m in modes]
    results = {k: [] for k in runs_of}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.reps):
            for name, mode in (runs_of if r % 2 == 0 else runs_of[::-1]):
                results[name, mode].append(one_run(name, args.task, budget, episodes, Path(tmp),
                                                   threads=1 if args.quick else None, tunables=modes[mode]))
    rows = []
    keys = ("wall_s", "meta_train_s", "eval_s", "other_s", "user_s", "system_s")
    for (name, mode), runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in keys}
        rows.append([name, mode, f"{med['wall_s']:.1f}", f"{med['meta_train_s']:.1f}", f"{med['eval_s']:.1f}",
                     f"{med['other_s']:.1f}", f"{med['user_s']:.1f}", f"{med['system_s']:.1f}",
                     f"{runs[0]['episodes'] / med['eval_s']:.0f}" if med["eval_s"] else "n/a",
                     f"{statistics.median(x['mean'] for x in runs):.4f}"])
    md = [f"`{next(iter(results.values()))[0]['command'].replace(names[0], 'LEARNER')}`: median of {args.reps} "
          f"run(s) per learner (interleaved), seconds. 'other' = process wall - meta-train - evaluation "
          "(interpreter and torch start-up, plugin loading, data, writing the result).", "",
          common.table(["learner", "malloc", "wall s", "meta-train s", "evaluate s", "other s", "user CPU s",
                        "system CPU s", "eval episodes/s", "mean accuracy"], rows), "",
          f"GLIBC_TUNABLES row: the same command with `GLIBC_TUNABLES={MALLOC_TUNABLES}`."]
    common.emit(args, f"5. End to end ({args.task}, budget {budget})", "\n".join(md),
                {f"{n} / {m}": v for (n, m), v in results.items()})


if __name__ == "__main__":
    main()
