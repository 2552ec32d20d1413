"""Run every speed benchmark and write ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py                  # full run (about 30-40 minutes on 2 cores)
    python benchmarks/run_all.py --quick          # tiny sizes: checks that everything runs
    python benchmarks/run_all.py --only maml eval # rerun a subset, keep the other sections

Each benchmark runs in its own process (``benchmarks/bench_*.py --json``), in the order below,
end to end last. Each section's figures are kept in ``benchmarks/results/<name>.json`` (with the
command, time and load average of its run), and RESULTS.md is rebuilt from all of them, so
``--only`` replaces just those sections. Run it with the Python of an environment holding the peers (see README.md);
without them their figures are skipped with a note. Measure on a quiet machine: the load average
before and after each benchmark is recorded.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

BENCHMARKS = {
    "episodes": "bench_episodes.py",
    "maml": "bench_maml.py",
    "memory": "bench_memory.py",
    "eval": "bench_eval.py",
    "end_to_end": "bench_end_to_end.py",
    "gpu": "bench_gpu.py",  # needs CUDA: on a GPU machine, benchmarks/gpu_run.sh; kept from its last run
    "sine": "bench_sine.py",
    "checkpoint": "bench_checkpoint.py",
    "cli": "bench_cli.py",
}
HERE = Path(__file__).resolve().parent
STORE = HERE / "results"

GPU_NOTE = ("Sections 1-5 and 7-9 were measured on this CPU machine. Section 6 (GPU path) was measured on a lent "
            "GPU machine with `benchmarks/gpu_run.sh` (its own hardware and software are listed there); "
            "without CUDA, `run_all.py` keeps that section from its last run.")
NO_GPU_NOTE = ("No GPU path was measured: no GPU was available (torch.cuda.is_available() is False). "
               "Every figure here is CPU-only; nothing about CUDA speed follows from them.")


def peer_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("learn2learn", "higher", "torchopt", "torchvision", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition; does not write RESULTS.md "
                                                        "unless --out is given")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    p.add_argument("--reps", type=int, help="repetitions for every benchmark (default: each script's own)")
    p.add_argument("--out", type=Path, help="where to write the markdown (default benchmarks/RESULTS.md)")
    p.add_argument("--learners", nargs="+", help="end to end: only these learners (default: all registered)")
    p.add_argument("--rebuild", action="store_true",
                   help="run nothing: rewrite RESULTS.md from the sections kept in benchmarks/results/")
    p.add_argument("--end-to-end-from", nargs="+", metavar="DIR",
                   help="end to end: tabulate stored quick-budget results (e.g. leaderboards/results) instead of running")
    args = p.parse_args(argv)
    out = args.out or (None if args.quick else HERE / "RESULTS.md")
    import torch

    names = [] if args.rebuild else args.only or [n for n in BENCHMARKS if n != "gpu" or torch.cuda.is_available()]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/run_all.py", *(argv or sys.argv[1:])])
    started = time.time()
    m = common.machine()
    docs: dict[str, dict] = {}
    if not args.quick:
        STORE.mkdir(exist_ok=True)
        for name in BENCHMARKS:
            if name not in names and (STORE / f"{name}.json").exists():
                docs[name] = json.loads((STORE / f"{name}.json").read_text())
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / BENCHMARKS[name]), "--json", str(path)]
            if args.quick:
                cmd += ["--quick", "--reps", "1"]
            elif args.reps:
                cmd += ["--reps", str(args.reps)]
            if name == "end_to_end" and args.learners:
                cmd += ["--learners", *args.learners]
            if name == "end_to_end" and args.end_to_end_from:
                cmd += ["--from-results", *args.end_to_end_from]
            before = common.load_average()
            section_start = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
            t0 = time.perf_counter()
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, env=os.environ.copy())
            took = time.perf_counter() - t0
            if proc.returncode != 0:
                failed.append(name)
                docs[name] = {"markdown": f"## {name}\n\nFAILED (exit {proc.returncode}); see the console output.\n"}
                continue
            doc = json.loads(path.read_text())
            doc["run"] = {"command": command, "started_utc": section_start,
                          "seconds": round(took), "load_before": before, "load_after": common.load_average()}
            docs[name] = doc
            if not args.quick:
                (STORE / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    sections = []
    for name in BENCHMARKS:
        if name not in docs:
            continue
        doc = docs[name]
        run = doc.get("run")
        tail = ""
        if run:
            tail = (f"\n_Measured {run['started_utc']} UTC by `{run['command']}`; took {run['seconds']} s; "
                    f"load average (1 min) before / after: {run['load_before'][0]:.2f} / {run['load_after'][0]:.2f}._\n")
        sections.append(doc["markdown"] + tail)
    header = [
        "# metabench speed benchmarks: results",
        "",
        f"Written by `{command}` on {_dt.datetime.fromtimestamp(started, _dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        "each section names the command and time of its own measurement (`--only` reruns replace single sections).",
        "",
        "## Machine",
        "",
        common.table(["", ""], [
            ["CPU", m["cpu"]], ["cores", str(m["cores"])], ["torch", m["torch"]],
            ["threads (intra-op / inter-op)", f"{m['threads']} / {m['interop_threads']}"],
            ["python", m["python"]], ["platform", m["platform"]],
            ["GLIBC_TUNABLES", m["glibc_tunables"] or "(unset)"],
            ["OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "(unset)")],
            ["peers", ", ".join(f"{k} {v}" for k, v in peer_versions().items())],
        ]),
        "",
        GPU_NOTE if "gpu" in docs else NO_GPU_NOTE,
        "",
        "Method: every figure is the median of several repetitions; the variants of one table run interleaved "
        "(round-robin, alternating order), and each ratio is computed per repetition within the same run, then "
        "its median is reported. 'spread' is (max - min) / median of a variant's per-repetition rates. "
        "Figures measured while other jobs shared the 2 cores are marked by the load average under each section.",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n".join(sections)
    if out:
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
