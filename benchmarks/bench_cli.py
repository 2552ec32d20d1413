"""How fast the command line answers: `metabench --version`, `--help`, `list tasks`, a misspelled
learner's one-line error, next to a bare `import torch`, each a fresh process (wall time).

`list tasks` and the misspelled learner run twice: with the plugin index of metabench/plugin_index.py
(a cache folder of the benchmark's own, warmed once before the timings), and with no index (a new,
empty cache folder each time: the plugins are loaded as before the index existed; `list` then writes
the index, the refused command writes nothing).

    python benchmarks/bench_cli.py [--reps N] [--json FILE]
"""
from __future__ import annotations

import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

METABENCH = [sys.executable, "-m", "metabench"]
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'pass' (the interpreter alone)": [sys.executable, "-c", "pass"],
    "metabench --version": METABENCH + ["--version"],
    "metabench --help": METABENCH + ["--help"],
    "metabench run --help": METABENCH + ["run", "--help"],
    "metabench run --budget huge (argparse error)": METABENCH + ["run", "--learner", "protonet", "--budget", "huge"],
    "metabench list tasks": METABENCH + ["list", "tasks"],
    "metabench list tasks (no plugin index)": METABENCH + ["list", "tasks"],
    "metabench run --learner protonett (unknown learner)": METABENCH + ["run", "--learner", "protonett"],
    "metabench run --learner protonett (unknown learner, no plugin index)": METABENCH + ["run", "--learner",
                                                                                       "protonett"],
}


def wall(argv: list[str], cache: str) -> tuple[float, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80", METABENCH_CACHE=cache)
    env.pop("METABENCH_PLUGINS", None)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True)
    return time.perf_counter() - start, proc.returncode


def main(argv=None) -> None:
    parser = common.arg_parser(__doc__.splitlines()[0], reps=5)
    args = common.parse(parser, argv)
    reps = 2 if args.quick else args.reps
    warm = tempfile.mkdtemp(prefix="bench-cli-cache-")
    try:
        wall(METABENCH + ["list"], warm)  # writes the plugin index the rows without "no plugin index" use
        indexed = os.path.isfile(os.path.join(warm, "plugin-index.json"))
        load_start = common.load_average()
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        codes: dict[str, int] = {}
        for _ in range(reps):  # interleaved: each repetition runs every command once
            for name, command in COMMANDS.items():
                cold = tempfile.mkdtemp(prefix="bench-cli-cache-") if "no plugin index" in name else None
                try:
                    seconds, codes[name] = wall(command, cold or warm)
                finally:
                    if cold:
                        shutil.rmtree(cold, ignore_errors=True)
                times[name].append(seconds)
        load_end = common.load_average()
    finally:
        shutil.rmtree(warm, ignore_errors=True)
    torch_s = statistics.median(times["python -c 'import torch'"])
    rows = [[f"`{name}`", common.fmt(statistics.median(t)), f"{statistics.median(t) / torch_s:.2f}",
             str(codes[name])] for name, t in times.items()]
    md = [f"Each command in a fresh process, wall time, median of {reps} interleaved repetitions "
          f"(load average before / after: {load_start[0]:.2f} / {load_end[0]:.2f}); 'x import torch' = the median "
          "over a bare `import torch`'s; the plugin index (metabench/plugin_index.py) in a cache folder of the "
          "benchmark's own, written once before the timings"
          + ("" if indexed else " (it was NOT written: every row loaded the plugins)")
          + "; 'no plugin index': a new, empty cache folder each time.", "",
          common.table(["command", "seconds", "x import torch", "exit"], rows)]
    common.emit(args, "9. Command-line start-up", "\n".join(md),
                {"reps": reps, "times": times, "exit": codes, "load_start": load_start, "load_end": load_end,
                 "index_written": indexed})


if __name__ == "__main__":
    main()
