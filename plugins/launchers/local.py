"""Built-in launcher ``local``: the cells on this machine, ``workers`` at a time, with a live table.

Each cell is its own ``metabench run`` process (``metabench.sweep.run_cell``), started from a pool
of ``workers`` threads that only wait on their child processes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from metabench import hookimpl
from metabench.sweep import Cell, Launcher, Outcome, run_cell

_STYLE = {"done": "green", "skipped": "dim", "failed": "red", "running": "yellow", "waiting": ""}


class LocalLauncher(Launcher):
    options = {"workers": "cells run at once (default 1)", "live": "draw the live table (default true)"}

    def __init__(self, options):
        super().__init__(options)
        self.workers = self.int_option("workers", 1)
        self.live = bool(self.settings.get("live", True))

    def table(self, cells: list[Cell], status: dict[str, str]) -> Table:
        table = Table(title=f"metabench sweep: {len(cells)} cells, {self.workers} at a time")
        for column in ("task", "learner", "variant", "seed", "budget", "status"):
            table.add_column(column)
        for cell in cells:
            state = status[cell.key]
            style = _STYLE.get(state.split(" ")[0], "")
            table.add_row(cell.task, cell.learner, cell.variant or "-", str(cell.seed), cell.budget, state,
                          style=style or None)
        return table

    def run(self, cells, out: Path, report) -> None:
        status = {cell.key: "waiting" for cell in cells}
        console = Console(stderr=True)
        live = Live(self.table(cells, status), console=console, refresh_per_second=2) if self.live else _NoLive()
        with live:
            def one(cell: Cell) -> Outcome:
                status[cell.key] = "running"
                live.update(self.table(cells, status))
                return run_cell(cell, out)

            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                futures = [pool.submit(one, cell) for cell in cells]
                for future in as_completed(futures):
                    outcome = future.result()
                    status[outcome.cell.key] = outcome.status + (f" {outcome.seconds:.0f}s" if outcome.seconds else "")
                    live.update(self.table(cells, status))
                    report(outcome)


class _NoLive:
    """Stands in for rich's Live when the table is off."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, renderable) -> None:
        pass


@hookimpl
def metabench_register_launchers(register):
    register("local", LocalLauncher)
