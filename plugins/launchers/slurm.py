"""Built-in launcher ``slurm``: the cells as one Slurm job array through submitit.

``pip install 'metabench[slurm]'`` (submitit). Every cell is one array task running
``metabench.sweep.run_cell``; submitit's logs go to ``<out>/.sweep/submitit/``. With
``cluster = "local"`` submitit runs the array on this machine (its LocalExecutor: how the tests run
it); ``cluster = "debug"`` runs it in this process.
"""
from __future__ import annotations

from pathlib import Path

from metabench import MetabenchError, hookimpl
from metabench.sweep import MARKERS, Launcher, Outcome, run_cell


class SlurmLauncher(Launcher):
    options = {
        "partition": "Slurm partition (slurm_partition)",
        "timeout_min": "time limit of each cell in minutes (default 240)",
        "cpus_per_task": "CPUs per cell (default 1)",
        "gpus_per_node": "GPUs per cell (default 0)",
        "mem_gb": "memory per cell in GB (default 16)",
        "array_parallelism": "cells running at once (default 64)",
        "cluster": "submitit cluster: slurm (default), local or debug",
    }

    def __init__(self, options):
        super().__init__(options)
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise MetabenchError("launcher 'slurm' needs submitit: pip install 'metabench[slurm]'") from None
        self.cluster = self.settings.get("cluster", "slurm")
        if self.cluster not in ("slurm", "local", "debug"):
            raise MetabenchError(f"launcher option cluster: {self.cluster!r}; accepted: slurm, local, debug")
        self.timeout = self.int_option("timeout_min", 240)
        self.cpus = self.int_option("cpus_per_task", 1)
        self.gpus = self.int_option("gpus_per_node", 0, minimum=0)
        self.mem = self.int_option("mem_gb", 16)
        self.parallel = self.int_option("array_parallelism", 64)

    def run(self, cells, out: Path, report) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=out / MARKERS / "submitit" / "%j", cluster=self.cluster)
        params = {"timeout_min": self.timeout, "cpus_per_task": self.cpus, "mem_gb": self.mem,
                  "slurm_array_parallelism": self.parallel}
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if "partition" in self.settings:
            params["slurm_partition"] = str(self.settings["partition"])
        if self.cluster != "slurm":
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        executor.update_parameters(**params)
        jobs = executor.map_array(run_cell, cells, [out] * len(cells))
        for cell, job in zip(cells, jobs):
            try:
                outcome = job.result()
            except Exception as exc:  # the job itself failed (killed, out of time): the cell failed
                outcome = Outcome(cell, "failed", error=f"job {job.job_id}: {type(exc).__name__}: "
                                                        f"{str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}")
            report(outcome)


@hookimpl
def metabench_register_launchers(register):
    register("slurm", SlurmLauncher)
