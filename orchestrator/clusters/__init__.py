"""One adapter per way of running jobs: `local` (this machine) and `slurm` (submitit's SlurmExecutor)."""
