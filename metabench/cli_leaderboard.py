"""Commands ``metabench leaderboard build|check`` and ``metabench publish`` (wired in by ``metabench.cli``).

``leaderboard check`` exits 1 naming every file that differs from what the results regenerate; bad
input (an invalid result file, a missing folder) is a MetabenchError: one line, exit 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from .errors import MetabenchError

LEADERBOARDS = Path("leaderboards")
RESULTS = LEADERBOARDS / "results"
PUBLISHED = "published.toml"

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def add_parsers(sub) -> None:
    """Add ``leaderboard {build,check}`` and ``publish`` to the ``metabench`` subparsers."""
    from .cli import add_data_root

    lb = sub.add_parser("leaderboard", help="regenerate the leaderboard tables from result files, or check them")
    actions = lb.add_subparsers(dest="leaderboard_command", required=True, metavar="ACTION")
    for action, text in (("build", "regenerate every table, plot and the summary README from the result files"),
                         ("check", "exit 1, naming the file, where a table differs from what the results regenerate")):
        p = actions.add_parser(action, help=text)
        p.add_argument("--results", action="append", metavar="DIR",
                       help=f"folder of result files, searched recursively (repeatable; default {RESULTS}/)")
        p.add_argument("--out", default=str(LEADERBOARDS), metavar="DIR",
                       help=f"leaderboard folder (default {LEADERBOARDS}/)")
        p.add_argument("--published", metavar="FILE.toml",
                       help=f"published paper numbers (default: {PUBLISHED} in --out, if present)")
        if action == "check":
            p.add_argument("--skip-plots", action="store_true",
                           help="compare only .md, .csv and .json (plots depend on the matplotlib version)")

    pub = sub.add_parser("publish", help="validate result files against the installed tasks and copy them "
                                         f"into {RESULTS}/<task>/<learner>/")
    pub.add_argument("results", nargs="+", metavar="RESULT.json")
    pub.add_argument("--to", default=str(RESULTS), metavar="DIR", help=f"results folder (default {RESULTS}/)")
    add_data_root(pub)


def _inputs(args: argparse.Namespace) -> tuple[list[Path], Path, Path | None]:
    out_dir = Path(args.out)
    if args.results:
        dirs = [Path(d) for d in args.results]
    else:  # the default folder may not exist yet: no results
        dirs = [RESULTS] if RESULTS.is_dir() else []
    if args.published:
        published = Path(args.published)
        if not published.is_file():
            raise MetabenchError(f"--published {published}: no such file")
    else:
        published = out_dir / PUBLISHED
    return dirs, out_dir, published


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from . import leaderboard

    dirs, out_dir, published = _inputs(args)
    if args.leaderboard_command == "build":
        written, removed = leaderboard.build(dirs, out_dir, published)
        for path in written:
            out.print(f"wrote {path}", markup=False, soft_wrap=True)
        for path in removed:
            out.print(f"removed {path} (no result backs it)", markup=False, soft_wrap=True)
        if not written and not removed:
            out.print(f"{out_dir}: up to date", markup=False, soft_wrap=True)
        return 0
    problems = leaderboard.check(dirs, out_dir, published, plots=not args.skip_plots)
    for line in problems:
        err.print(f"metabench: {line}", markup=False, soft_wrap=True)
    if problems:
        err.print("metabench: regenerate with `metabench leaderboard build` and commit the result", markup=False)
        return 1
    out.print(f"{out_dir}: every table matches the results", markup=False, soft_wrap=True)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .cli import _host, data_roots
    from .publish import publish_report

    report = publish_report([Path(p) for p in args.results], _host(), Path(args.to), data_roots(args))
    for src, (dst, copied) in zip(args.results, report):
        line = f"published {src} -> {dst}" if copied else f"already published: {src} is {dst} (nothing copied)"
        out.print(line, markup=False, soft_wrap=True)
    out.print("now run `metabench leaderboard build` and commit the results and tables", markup=False)
    return 0
