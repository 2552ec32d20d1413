"""Built-in sweep launchers: local worker processes, Slurm through submitit, Ray."""
