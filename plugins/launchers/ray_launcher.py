"""Built-in launcher ``ray``: every cell a Ray task asking for its CPUs and GPUs.

``pip install 'metabench[ray]'``. ``address`` names a running cluster (``auto``, ``ray://host:port``);
without it Ray starts a local one for the sweep and stops it after.
"""
from __future__ import annotations

from pathlib import Path

from metabench import MetabenchError, hookimpl
from metabench.sweep import Launcher, run_cell


class RayLauncher(Launcher):
    options = {"address": "Ray cluster to join (default: start a local one)",
               "num_cpus": "CPUs each cell asks for (default 1)", "num_gpus": "GPUs each cell asks for (default 0)",
               "local_cpus": "CPUs of a local cluster started for the sweep (default: all)"}

    def __init__(self, options):
        super().__init__(options)
        try:
            import ray  # noqa: F401
        except ImportError:
            raise MetabenchError("launcher 'ray' needs Ray: pip install 'metabench[ray]'") from None
        self.cpus = self.int_option("num_cpus", 1)
        self.gpus = self.int_option("num_gpus", 0, minimum=0)

    def run(self, cells, out: Path, report) -> None:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            kwargs = {"address": self.settings["address"]} if "address" in self.settings else {}
            if "local_cpus" in self.settings and "address" not in self.settings:
                kwargs["num_cpus"] = self.int_option("local_cpus", 1)
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        try:
            task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus)(run_cell)
            pending = {task.remote(cell, str(out)): cell for cell in cells}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pending.pop(ref)
                    report(ray.get(ref))
        finally:
            if started_here:
                ray.shutdown()


@hookimpl
def metabench_register_launchers(register):
    register("ray", RayLauncher)
