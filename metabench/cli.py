"""The ``metabench`` command line: run, eval, list, plugins, episodes, compare, plot, leaderboard.

Bad input prints one line ``metabench: error: ...`` and exits with status 2 (argparse's
convention); a learner that crashes exits with status 1 and names its plugin.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .cli_leaderboard import add_parsers as add_leaderboard_parsers, cmd_leaderboard, cmd_publish
from .config import RUN_KEYS, parse_set, read_toml
from .errors import MetabenchError, PluginError
from .settings import BUDGETS, DEFAULT_TASK

DEFAULTS = {"task": DEFAULT_TASK, "backbone": None, "seed": 0, "budget": "quick", "episodes": None,
            "device": "cpu", "out": "metabench-results", "checkpoint_every": "5m", "eval_batch": None,
            "precision": "fp32"}

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def make_table(title: str, *columns: str) -> Table:
    """A table whose cells wrap instead of being cut (output may be read by scripts and tests)."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, overflow="fold", no_wrap=i == 0)  # the first column holds names: keep whole
    return table


def add_data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder holding the data sets (default $METABENCH_DATA); NAME=DIR for one data set")


def add_eval_batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-batch", type=int, metavar="N",
                        help="test episodes per call, for learners that predict several at once (default 1 on "
                             "cpu, 16 on cuda)")


def data_roots(args: argparse.Namespace, toml: dict | None = None):
    """DataRoots from --data-root (DIR or NAME=DIR), the config's [data] table and $METABENCH_DATA."""
    from .data import DataRoots

    per = dict((toml or {}).get("data", {}))
    bad = [k for k, v in per.items() if not isinstance(v, str)]
    root = per.pop("root", None) or ((toml or {}).get("run", {}).get("data_root"))
    if bad:
        raise MetabenchError(f"[data] {', '.join(bad)}: expected a folder path (text)")
    value = getattr(args, "data_root", None)
    if value and "=" in value and not os.path.isdir(value):
        name, _, folder = value.partition("=")
        per[name] = folder
    elif value:
        root = value
    return DataRoots.from_settings(root, per)  # a ~name of no such user: MetabenchError naming it


def one_line(text: str) -> str:
    """``text`` with its line breaks (a path or value given with one) written as ``\\n``: an error is one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line ``metabench: error: ...`` (exit status 2), like every other
    bad input; the usage is one ``--help`` away (the subcommands' parsers are of this class too)."""

    def error(self, message: str):
        command = self.prog.removeprefix("metabench").strip()
        self.exit(2, f"metabench: error: {command + ': ' if command else ''}{one_line(message)} "
                     f"(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="metabench", description="Benchmark meta-learning on fixed episodes.")
    parser.add_argument("--version", action="version", version=f"metabench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="meta-train a learner and evaluate it on a task's fixed episodes")
    run.add_argument("--learner", required=True, help="registered learner (see `metabench list learners`)")
    run.add_argument("--task", help=f"registered task (default {DEFAULTS['task']})")
    run.add_argument("--backbone", help="registered backbone (default: the learner's)")
    run.add_argument("--seed", type=int, help="training seed (default 0); evaluation episodes never depend on it")
    run.add_argument("--budget", choices=BUDGETS, help="training length (default quick)")
    run.add_argument("--episodes", type=int, help="evaluate on the first N fixed episodes (default: the protocol's)")
    run.add_argument("--device", help="cpu (default), cuda or cuda:N")
    add_eval_batch(run)
    run.add_argument("--precision", metavar="fp32|bf16",
                     help="training precision: fp32 (default) or bf16 (autocast, where the learner allows it); "
                          "evaluation runs in fp32")
    run.add_argument("--config", metavar="FILE.toml", help="TOML file with [run], [learner], [backbone] tables")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a learner setting, or backbone.KEY=VALUE (repeatable)")
    run.add_argument("--out", help="folder for the result JSON, the saved learner and the run's checkpoints "
                                   "(default ./metabench-results/)")
    run.add_argument("--resume", action="store_true",
                     help="continue this run from its last checkpoint in --out (training or evaluation)")
    run.add_argument("--checkpoint-every", metavar="N|30s|10m|off",
                     help="checkpoint every N steps, or every so much time (default 5m, never more often than "
                          "50 times a checkpoint's cost); phase ends and Ctrl-C always write one")
    run.add_argument("--no-save", action="store_true", help="do not keep the trained learner (<run>.learner.pt)")
    run.add_argument("--validate-every", type=int, metavar="N",
                     help="score validation episodes every N training steps and test the best state "
                          "(0: off; default: as the learner's paper config at budget paper, else off)")
    run.add_argument("--validation-episodes", type=int, metavar="N", help="validation episodes (default 100)")
    add_data_root(run)

    ev = sub.add_parser("eval", help="evaluate a saved learner (<run>.learner.pt) on any task it can take")
    ev.add_argument("learner_file", metavar="LEARNER_FILE")
    ev.add_argument("--task", help="registered task (default: the one it was trained on)")
    ev.add_argument("--episodes", type=int, help="evaluate on the first N fixed episodes (default: the protocol's)")
    ev.add_argument("--device", help="cpu (default), cuda or cuda:N")
    add_eval_batch(ev)
    ev.add_argument("--out", help="folder for the result JSON (default ./metabench-results/)")
    add_data_root(ev)

    sw = sub.add_parser("sweep", help="run a grid of runs (learners x tasks x seeds x budgets x variants) through a "
                                      "launcher plugin: local, slurm (submitit), ray")
    sw.add_argument("grid", nargs="?", metavar="GRID.toml", help="grid file ([grid] and [launcher] tables)")
    sw.add_argument("--learners", help="comma-separated learners (instead of a grid file)")
    sw.add_argument("--tasks", help=f"comma-separated tasks (default {DEFAULTS['task']})")
    sw.add_argument("--seeds", help="comma-separated seeds (default 0)")
    sw.add_argument("--budgets", help="comma-separated budgets (default quick)")
    sw.add_argument("--episodes", type=int, help="the first N fixed episodes of every cell")
    sw.add_argument("--launcher", help="launcher plugin (default local; see `metabench list launchers`)")
    sw.add_argument("--option", dest="launcher_options", action="append", default=[], metavar="KEY=VALUE",
                    help="a launcher option, e.g. workers=2 (repeatable)")
    sw.add_argument("--out", help="folder of the results (default ./metabench-results/)")

    lst = sub.add_parser("list", help="list registered learners, tasks or backbones")
    lst.add_argument("kind", nargs="?", choices=("learners", "tasks", "backbones", "launchers"),
                     help="what to list (default: all)")
    lst.add_argument("--long", action="store_true", help="learners: the full reference of each paper")

    sub.add_parser("plugins", help="list loaded plugins with distribution, version and hooks")

    eps = sub.add_parser("episodes", help="print the SHA-256 of a task's fixed episode set")
    eps.add_argument("--task", required=True)
    eps.add_argument("--split", help="split (default: the protocol's evaluation split)")
    eps.add_argument("--episodes", type=int, help="first N episodes (default: the protocol's count)")
    add_data_root(eps)

    data = sub.add_parser("data", help="prepare (decode and cache) a task's data set, or show what is cached")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for action, text in (("prepare", "decode, resize and cache every split once"),
                         ("info", "what is cached: size, SHA-256, class counts")):
        p = data_sub.add_parser(action, help=text)
        p.add_argument("task")
        p.add_argument("--config", metavar="FILE.toml", help="TOML file whose [data] table names data folders")
        add_data_root(p)

    cmp_ = sub.add_parser("compare", help="paired t-test and Wilcoxon test of two results on the same episodes")
    cmp_.add_argument("a", metavar="A.json")
    cmp_.add_argument("b", metavar="B.json")

    plot = sub.add_parser("plot", help="draw a result's training curve (loss, accuracy against step) from the "
                                       "<stem>.curve.jsonl beside it")
    plot.add_argument("result", metavar="RESULT.json")
    plot.add_argument("--out", metavar="FILE.png|FILE.svg", help="where to draw it (default <stem>.curve.png)")
    add_leaderboard_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``) and return its exit status (never raises SystemExit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0), or a usage error already printed as one line (2)
        return exc.code or 0
    try:
        code = COMMANDS[args.command](args)
        _keep_plugin_index()
        return code
    except MetabenchError as exc:  # exit 2: bad input; PluginError, exit 1: a plugin failed (metabench/errors.py)
        err.print(f"metabench: error: {one_line(str(exc))}", markup=False, soft_wrap=True)
        if isinstance(exc, PluginError) and exc.__cause__ is not None:  # a plugin's own code raised
            if os.environ.get("METABENCH_DEBUG"):
                raise
            err.print("(set METABENCH_DEBUG=1 for the traceback)", markup=False)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        from .resume import RunInterrupted

        if isinstance(exc, RunInterrupted):
            err.print(f"metabench: {exc}", markup=False, soft_wrap=True)
        else:
            err.print("metabench: interrupted; no result was written (checkpoints already written are kept: "
                      "--resume continues from the last)", markup=False, soft_wrap=True)
        return 130


def _host():
    from .plugin_index import load_host

    host = load_host()
    host.forget_task_files()  # one command reads a task file's folder once, and afresh
    for line in host.errors:
        _warn(line)
    return host


def _warn(line: str) -> None:
    err.print(f"metabench: warning: {line}", markup=False, soft_wrap=True)


def _check_names(*lookups: tuple[str, object]) -> None:
    """Refuse an unknown learner, task, backbone or launcher name before anything heavy is imported:
    from the plugin index where it is fresh, else from the loaded plugins (metabench/plugin_index.py)."""
    from .plugin_index import check_names

    check_names(lookups, _warn)


def _keep_plugin_index() -> None:
    """After a command that succeeded: write the plugin index if this command loaded the plugins."""
    from .plugin_index import write_pending

    write_pending()


class RichProgress:
    """Progress bars for meta-training and evaluation (on stderr), drawn from the first report."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def start(self, phase: str, total: int) -> None:
        if not self.tasks:
            self.progress.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total, info="")

    def update(self, phase: str, completed: int, **metrics: float) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.progress.update(self.tasks[phase], completed=completed, info=info)


@contextlib.contextmanager
def progress_bars(*columns):
    """A :class:`RichProgress` on stderr for the ``with`` block. Bad input found under way (an
    unreadable image) takes the bars away (they are transient then), so that its error is the one
    line left on stderr; a plugin's failure or an interrupt leaves them, to show where it stopped."""
    bars = Progress(*columns, console=err, transient=False)
    reporter = RichProgress(bars)
    try:
        yield reporter
    except MetabenchError as exc:
        if reporter.tasks and not isinstance(exc, PluginError):
            bars.live.transient = True
            bars.live.stop()  # not bars.stop(): that adds an empty line where stderr is not a terminal
            reporter.tasks.clear()
        raise
    finally:
        if reporter.tasks:
            bars.stop()


BAR_COLUMNS = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))


def cmd_run(args: argparse.Namespace) -> int:
    from .malloc import tune_glibc_malloc

    tune_glibc_malloc()  # freed blocks stay in the heap, no page faults for them again (metabench/malloc.py)

    toml = read_toml(args.config) if args.config else {}
    opts = dict(DEFAULTS)
    opts.update(toml.get("run", {}))
    opts.update({k: getattr(args, k) for k in RUN_KEYS if getattr(args, k) is not None})
    set_learner, set_backbone = parse_set(args.overrides)
    layers = []
    if toml.get("learner"):
        layers.append((f"--config {args.config} [learner]", toml["learner"]))
    if set_learner:
        layers.append(("--set", set_learner))
    backbone_options = {**toml.get("backbone", {}), **set_backbone}
    out_dir = Path(opts["out"])
    if out_dir.exists() and not out_dir.is_dir():
        raise MetabenchError(f"--out {out_dir}: exists and is not a folder")
    validation = dict(toml["validation"]) if "validation" in toml else None
    for key, value in (("every", args.validate_every), ("episodes", args.validation_episodes)):
        if value is not None:
            validation = {**(validation or {}), key: value}
    _check_names(("learner", args.learner), ("task", opts["task"]), ("backbone", opts["backbone"]))
    from .lifecycle import RunInfo
    from .results import write_result
    from .resume import CheckpointInterval
    from .distributed import init_world, shutdown
    from .runner import RunControl, RunRequest, execute, finish, prepare

    world = init_world(str(opts["device"]))  # torchrun: join its process group (one process: nothing to do)
    try:
        device = opts["device"]
        if world.active and device == "cuda":  # one GPU per process, or processes sharing the GPUs there are
            import torch

            device = f"cuda:{world.local_rank % max(1, torch.cuda.device_count())}"
        request = RunRequest(data_roots=data_roots(args, toml), learner=args.learner, task=opts["task"],
                             backbone=opts["backbone"], seed=int(opts["seed"]), budget=opts["budget"],
                             episodes=opts["episodes"], device=device, learner_layers=layers,
                             backbone_options=backbone_options, validation=validation,
                             eval_batch=opts["eval_batch"], precision=opts["precision"])
        control = RunControl(out_dir, resume=args.resume,
                             checkpoint_every=CheckpointInterval.parse(opts["checkpoint_every"]),
                             save_learner=not args.no_save, world=world)
        host = _host()
        plan = prepare(request, host)  # refuse bad input before any progress bar is drawn
        control.open(plan)  # a resume finds its checkpoint (or is refused) before any progress bar too
        if not world.is_main:  # rank 0 reports and writes; the others compute their share
            execute(plan, host, None, RunInfo.start(request.learner, plan.protocol.name, plan.backbone,
                                                    request.seed, request.budget), control)
            return 0
        run = RunInfo.start(request.learner, plan.protocol.name, plan.backbone, request.seed, request.budget, out_dir,
                            run_id=control.run_id, elapsed=control.elapsed)
        with progress_bars(*BAR_COLUMNS) as bars:
            doc = execute(plan, host, bars, run, control)
        path = write_result(doc, out_dir)
        finish(plan, control)
    finally:
        shutdown(world)
    try:
        host.on_result(run, doc, path)
    except PluginError as exc:
        raise PluginError(f"{exc} (the result itself was written: {path})") from exc
    out.print(result_table(doc))
    out.print(f"result: {path}", markup=False, soft_wrap=True)
    return 0


def _launcher_option(text: str):
    """``KEY=VALUE`` with VALUE read as TOML where it parses (2, true, "x"), else as text."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise MetabenchError(f"--option {text!r}: expected KEY=VALUE (e.g. --option workers=2)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # nested too deeply for the TOML parser: text too
        parsed = value.strip()
    return key.strip(), parsed


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import grid_from_table, read_grid, summary_lines

    if args.grid and args.learners:
        raise MetabenchError("give a grid file or --learners, not both")
    if args.grid:
        grid = read_grid(args.grid)
    elif args.learners:
        def listed(text: str | None, default: list, kind=str) -> list:
            if text is None:
                return default
            try:
                return [kind(x.strip()) for x in text.split(",") if x.strip()]
            except ValueError:
                raise MetabenchError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        table = {"learners": listed(args.learners, []), "tasks": listed(args.tasks, [DEFAULTS["task"]]),
                 "seeds": listed(args.seeds, [0], int), "budgets": listed(args.budgets, ["quick"])}
        if args.episodes is not None:
            table["episodes"] = args.episodes
        grid = grid_from_table(table, {}, "command line")
    else:
        raise MetabenchError("metabench sweep needs a grid file (GRID.toml) or --learners NAME,...")
    launcher_table = dict(grid.launcher)
    name = args.launcher or launcher_table.pop("name", "local")
    launcher_table.pop("name", None)
    if not isinstance(name, str):
        raise MetabenchError(f"[launcher] name must be a launcher's name (text, e.g. \"local\"), got {name!r}")
    launcher_table.update(dict(_launcher_option(o) for o in args.launcher_options))
    out_dir = Path(args.out or grid.out or DEFAULTS["out"])
    if out_dir.exists() and not out_dir.is_dir():
        raise MetabenchError(f"--out {out_dir}: exists and is not a folder")
    cell_names = [lookup for cell in grid.cells for lookup in (("learner", cell.learner), ("task", cell.task))]
    _check_names(*cell_names, ("launcher", name))
    host = _host()
    from .sweep import check_cells

    check_cells(grid.cells, host)
    entry = host.launchers.get(name)
    try:
        launcher = entry.obj(launcher_table)
    except MetabenchError as exc:
        raise MetabenchError(f"launcher {name!r}: {exc}") from None
    outcomes = []
    launcher.run(grid.cells, out_dir, outcomes.append)
    lines = summary_lines(outcomes)
    for line in lines:
        out.print(line, markup=False, soft_wrap=True)
    failed = sum(o.status == "failed" for o in outcomes)
    return 1 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    out_dir = Path(args.out or DEFAULTS["out"])
    if out_dir.exists() and not out_dir.is_dir():
        raise MetabenchError(f"--out {out_dir}: exists and is not a folder")
    _check_names(("task", args.task))
    from .cross_task import evaluate_saved
    from .results import write_result

    host = _host()
    with progress_bars(*BAR_COLUMNS) as bars:
        doc = evaluate_saved(args.learner_file, host, args.task, args.episodes, args.device or "cpu",
                             data_roots(args), bars, eval_batch=args.eval_batch)
    path = write_result(doc, out_dir)
    out.print(result_table(doc))
    trained = doc["trained_on"]["task"]
    if trained != doc["task"]["name"]:
        out.print(f"trained on {trained}, tested on {doc['task']['name']}"
                  + (f" (images resized from {doc['resized']['from']} to {doc['resized']['to']} px)"
                     if "resized" in doc else ""), markup=False)
    out.print(f"result: {path}", markup=False, soft_wrap=True)
    return 0


def format_metric(summary: dict, metric: str) -> str:
    scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
    ci = f" ± {summary['ci95'] * scale:.2f}" if summary.get("ci95") is not None else ""
    return f"{summary['mean'] * scale:.2f}{ci}{unit}"


def result_table(doc: dict) -> Table:
    import statistics

    from .stats import worst_episode

    metric, per = doc["task"]["metric"], doc["per_episode"]
    scale = 100.0 if metric == "accuracy" else 1.0
    worst, at = worst_episode(per, doc["task"]["higher_is_better"])
    table = make_table(f"metabench {doc['metabench_version']} · budget {doc['budget']} · seed {doc['seed']}",
                       "task", "learner", "backbone", f"{metric} (95% CI)", "median", "worst", "episodes",
                       "meta-train", "eval")
    table.add_row(doc["task"]["name"], doc["learner"]["name"], doc["backbone"]["name"],
                  format_metric(doc["summary"], metric), f"{statistics.median(per) * scale:.4g}",
                  f"{worst * scale:.4g} (#{at})", str(doc["summary"]["n"]),
                  f"{doc['timing']['meta_train_s']:.1f}s", f"{doc['timing']['eval_s']:.1f}s")
    return table


def short_reference(text: str) -> str:
    """'Finn, Abbeel & Levine. Model-Agnostic ... ICML 2017.' -> 'Finn et al. 2017' (the first
    author and the first year); a metabench-defined variant says so."""
    import re

    if not text:
        return ""
    if text.lower().startswith("metabench"):
        return "metabench variant"
    authors = text.split(". ")[0]
    first = re.split(r",| & | and ", authors)[0].strip()
    surname = first.split()[-1] if first.split() else first
    many = "," in authors or "&" in authors or " and " in authors
    year = re.search(r"\b(19|20)\d\d\b", text)
    return f"{surname}{' et al.' if many else ''}{' ' + year.group(0) if year else ''}"


def cmd_list(args: argparse.Namespace) -> int:
    from .plugin_index import describe, fresh_index

    index = fresh_index()  # what the plugins registered, without loading them (metabench/plugin_index.py)
    if index is not None:
        for line in index.warnings:
            _warn(line)
    rows = index.listing if index is not None else describe(_host())
    kinds = [args.kind] if args.kind else ["learners", "tasks", "backbones", "launchers"]
    if "learners" in kinds:
        table = make_table("learners (transd.: transductive; --long: full references)", "name", "plugin",
                           "problems", "transd.", "backbone", "reference")
        for r in rows["learners"]:
            table.add_row(r["name"], r["plugin"], r["problems"], r["transductive"], r["backbone"],
                          r["reference"] if args.long else short_reference(r["reference"]))
        out.print(table)
    if "tasks" in kinds:
        table = make_table("tasks (metric ↑ higher is better, ↓ lower)", "name", "v", "episode", "episodes", "input",
                           "metric")
        for r in rows["tasks"]:
            table.add_row(r["name"], r["version"], r["episode"], r["episodes"], r["input"], r["metric"])
        out.print(table)
    if "backbones" in kinds:
        table = make_table("backbones", "name", "plugin", "description")
        for r in rows["backbones"]:
            table.add_row(r["name"], r["plugin"], r["description"])
        out.print(table)
    if "launchers" in kinds:
        table = make_table("sweep launchers", "name", "plugin", "options")
        for r in rows["launchers"]:
            table.add_row(r["name"], r["plugin"], r["options"])
        out.print(table)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    host = _host()
    table = make_table("plugins (hooks: metabench_register_<name>, metabench_<on_event>)", "name", "distribution",
                       "version", "hooks", "status")
    for info in host.plugins.values():
        hooks = ", ".join(h.removeprefix("metabench_register_").removeprefix("metabench_") for h in info.hooks)
        table.add_row(info.name, info.distribution, info.version, hooks or "-", "; ".join(info.errors) or "ok")
    out.print(table)
    return 0


def cmd_episodes(args: argparse.Namespace) -> int:
    _check_names(("task", args.task))
    from .episodes import episodes_sha256, eval_draws

    host = _host()
    protocol, source, _ = host.task(args.task)
    if args.episodes is not None and args.episodes < 1:
        raise MetabenchError(f"--episodes {args.episodes}: must be a positive integer")
    split = args.split or protocol.eval_split
    source.set_roots(data_roots(args))
    draws = eval_draws(protocol, source, split, args.episodes)
    out.print(f"{episodes_sha256(draws)}  {protocol.name} v{protocol.version} {split} {len(draws)} episodes",
              markup=False, soft_wrap=True)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .results import load_result
    from .stats import paired_compare

    a, b = load_result(args.a), load_result(args.b)
    ta, tb = a["task"], b["task"]
    if (ta["name"], ta["version"]) != (tb["name"], tb["version"]):
        raise MetabenchError(f"cannot pair results of different tasks: {ta['name']} v{ta['version']} "
                             f"vs {tb['name']} v{tb['version']}")
    if ta["episodes_sha256"] != tb["episodes_sha256"]:
        raise MetabenchError(f"cannot pair results on different episode sets ({ta['episodes']} episodes "
                             f"{ta['episodes_sha256'][:12]}… vs {tb['episodes']} episodes {tb['episodes_sha256'][:12]}…)")
    if len(a["per_episode"]) != len(b["per_episode"]):  # one hash, two lengths: a file was edited
        raise MetabenchError(f"cannot pair results of {len(a['per_episode'])} and {len(b['per_episode'])} episodes "
                             f"with the same episode hash {ta['episodes_sha256'][:12]}…: one of them was edited")
    if len(a["per_episode"]) < 2:
        raise MetabenchError(f"cannot pair results of {len(a['per_episode'])} episode: the paired tests need at "
                             "least 2 episodes")
    c = paired_compare(a["per_episode"], b["per_episode"])
    metric, higher = ta["metric"], ta["higher_is_better"]
    table = make_table(f"{ta['name']} · {c.n} paired episodes · {metric} ({'higher' if higher else 'lower'} is better)", *("", "A", "B"))
    table.add_row("learner", a["learner"]["name"], b["learner"]["name"])
    table.add_row("file", args.a, args.b)
    table.add_row("mean (95% CI)", format_metric(a["summary"], metric), format_metric(b["summary"], metric))
    out.print(table)
    diff_ci = f" ± {c.ci95_diff:.4g}" if c.ci95_diff is not None else ""
    out.print(f"A - B = {c.mean_diff:.4g}{diff_ci} (95% CI)", markup=False)
    t = "undefined" if c.t_statistic is None else f"{c.t_statistic:.4g}"
    out.print(f"paired t-test: t = {t}, p = {c.t_pvalue:.4g}", markup=False)
    w = "undefined" if c.wilcoxon_statistic is None else f"{c.wilcoxon_statistic:.4g}"
    out.print(f"Wilcoxon signed-rank: W = {w}, p = {c.wilcoxon_pvalue:.4g}", markup=False)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    _check_names(("task", args.task))
    host = _host()
    protocol, source, plugin = host.task(args.task)
    source.set_roots(data_roots(args, read_toml(args.config) if args.config else None))
    if args.data_command == "prepare":
        from .runner import prepare_split

        columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"))
        with progress_bars(*columns) as bars:
            for split in source.splits:
                prepare_split(source, split, plugin, bars)
    info = source.info()
    table = make_table(f"{protocol.dataset} data ({args.task})", "split", "cached", "classes", "images",
                       "per class", "size")
    for split, row in info.items():
        per_class = f"{row['min_per_class']}-{row['max_per_class']}" if "min_per_class" in row else ""
        size = f"{row['bytes'] / 2**20:.1f} MiB" if "bytes" in row else ""
        table.add_row(split, "yes" if row.get("cached") else "no", str(row.get("classes", "")),
                      str(row.get("images", "")), per_class, size)
    out.print(table)
    for split, row in info.items():
        if row.get("cached"):
            out.print(f"{split}: sha256 {row.get('sha256', '?')}  {row.get('path', '')}", markup=False, soft_wrap=True)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .curves import PLOT_FORMATS, curve_path_for, metric_names, read_curve, render_curve
    from .results import load_result

    result_path = Path(args.result)
    if not result_path.name:  # "", "." or "/": no file name to put the plot's beside
        raise MetabenchError(f"{args.result!r}: not a result file; expected RESULT.json")
    target = Path(args.out) if args.out else result_path.with_name(result_path.stem + ".curve.png")
    fmt = target.suffix.lower().removeprefix(".")
    if fmt not in PLOT_FORMATS:
        raise MetabenchError(f"--out {target}: unknown suffix {target.suffix or '(none)'!r}; accepted: "
                             + ", ".join(f".{f}" for f in PLOT_FORMATS))
    doc = load_result(result_path)
    curve = curve_path_for(result_path)
    if not curve.is_file():
        raise MetabenchError(f"{result_path}: no training curve beside it (expected {curve}; the training_curve "
                             "plugin writes it for runs that report training progress)")
    points = read_curve(curve)
    if not metric_names(points):
        raise MetabenchError(f"{curve}: no metric has a value to draw (every one is null)")
    title = (f"{doc['task']['name']} · {doc['learner']['name']} / {doc['backbone']['name']} · "
             f"budget {doc['budget']} · seed {doc['seed']}")
    data = render_curve(points, fmt, title)
    if not target.parent.is_dir():
        raise MetabenchError(f"--out {target}: folder {target.parent} does not exist")
    from .files import write_bytes_atomic

    write_bytes_atomic(target, data)  # a failed write: one line "cannot write <target>: <reason>"
    out.print(f"plot: {target}", markup=False, soft_wrap=True)
    return 0


COMMANDS = {"sweep": cmd_sweep, "eval": cmd_eval, "leaderboard": cmd_leaderboard, "publish": cmd_publish, "data": cmd_data, "run": cmd_run, "list": cmd_list, "plugins": cmd_plugins, "episodes": cmd_episodes, "compare": cmd_compare, "plot": cmd_plot}

if __name__ == "__main__":
    sys.exit(main())
