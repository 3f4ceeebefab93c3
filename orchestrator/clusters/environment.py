"""The job this process runs in, as the cluster's environment tells it: one map of our names to the
variables that hold them (as submitit's JobEnvironment `_env` does), so no other module names a SLURM_*
variable it reads.

`sbatch.py` writes SLURM_* into the scripts it renders for engine steps: those are shell text for the
step, not reads, and stay there.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar


class JobEnvironment:
    """Our names for what the cluster tells a job, read from its environment. Each name maps to the
    variables that may hold it, first choice first: a variable that is unset or empty gives way to the next."""

    _env: ClassVar[dict[str, tuple[str, ...]]] = {
        "job_id": ("SLURM_JOB_ID",),
        "array_job_id": ("SLURM_ARRAY_JOB_ID",),
        "array_task_id": ("SLURM_ARRAY_TASK_ID",),
        "restart_count": ("SLURM_RESTART_COUNT",),
        "global_rank": ("SLURM_PROCID",),
        "local_rank": ("SLURM_LOCALID",),
        "node": ("SLURM_NODEID",),
        "num_tasks": ("SLURM_NTASKS",),
        "nodelist": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
        "step_nodelist": ("SLURM_STEP_NODELIST",),
        "gpus_on_node": ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"),
        "cpus_on_node": ("SLURM_CPUS_ON_NODE",),
    }

    def __init__(self, environ: Mapping[str, str] | None = None):
        self.environ = os.environ if environ is None else environ

    @classmethod
    def variables(cls, name: str) -> tuple[str, ...]:
        """The variables that hold name, first choice first (for messages that name them)."""
        try:
            return cls._env[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a name of the job environment; choose one of: "
                           f"{', '.join(cls._env)}") from None

    def values(self, name: str) -> list[str]:
        """Every non-empty value name has, in the order of its variables."""
        return [self.environ[v] for v in self.variables(name) if self.environ.get(v)]

    def get(self, name: str, default: str | None = None) -> str | None:
        """name's value: its first variable set and not empty, else default."""
        found = self.values(name)
        return found[0] if found else default

    @property
    def job_id(self) -> str | None:
        """The cluster's id of the job this process runs in; None outside one."""
        return self.get("job_id")

    @property
    def job_name(self) -> str | None:
        """The job as the cluster's commands show it: `<array job>_<task>` for a task of a job array (what
        squeue, sacct and scancel take and the front-end prints), else the job id; None outside a job."""
        array, task = self.get("array_job_id"), self.get("array_task_id")
        return f"{array}_{task}" if array and task else self.job_id

    @property
    def global_rank(self) -> int:
        """This task's rank among the job step's tasks (0 outside a step)."""
        return int(self.get("global_rank", "0"))

    @property
    def gpus_on_node(self) -> int | None:
        """GPUs each node of the job holds, when the job says (`--gpus-per-node`, `--gres=gpu:N`)."""
        for value in self.values("gpus_on_node"):
            value = value.split(":")[-1].split("(")[0]
            if value.isdigit():
                return int(value)
        return None


def job_environment(environ: Mapping[str, str] | None = None) -> JobEnvironment:
    """The environment of the job this process runs in (os.environ unless given)."""
    return JobEnvironment(environ)
