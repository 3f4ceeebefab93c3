"""cluster=local: this machine, through submitit's LocalExecutor (the same job code Slurm runs)."""
from __future__ import annotations

import os
import socket

from ..config import Config
from ..work import RunPaths
from .base import ClusterAdapter, submitit_folder


class LocalCluster(ClusterAdapter):
    name = "local"
    jobs_outlive_front_end = False  # a local job and its engine end with the front-end

    def problems(self, cfg: Config, engine) -> list[str]:
        if cfg.layout.nodes > 1 and engine.starts_process and not engine.simulated:
            return [f"cluster=local runs on one machine; {cfg.model.name} on engine={engine.name} needs "
                    f"{cfg.layout.nodes} nodes: use cluster=slurm"]
        return []

    def executor(self, cfg: Config, paths: RunPaths):
        import submitit

        executor = submitit.LocalExecutor(folder=submitit_folder(paths))
        executor.update_parameters(timeout_min=cfg.cluster.timeout_min)
        return executor

    def state(self, job) -> str:
        return "COMPLETED" if job.done() else "RUNNING"

    def live_jobs(self, ids: list[str], host: str) -> list[str] | None:
        if host != socket.gethostname():
            return None
        return [i for i in ids if pid_alive(int(i))]  # a local job's id is its process id

    def poll_interval_s(self, cfg: Config) -> float:
        return cfg.client.progress_interval_s


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


ADAPTER = LocalCluster()
