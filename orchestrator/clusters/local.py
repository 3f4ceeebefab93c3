"""cluster=local: this machine, through submitit's LocalExecutor (the same job code Slurm runs)."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from ..config import Config
from ..errors import RunError
from ..rundir import RunPaths
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

    def job_states(self, ids: list[str], host: str, paths: RunPaths | None = None) -> dict[str, str]:
        """RUNNING while the job's process lives on this host, else ENDED (a local job leaves no record of
        how it ended); a job on another host cannot be seen from here."""
        if not ids:
            return {}
        if host and host != socket.gethostname():
            return {i: f"UNKNOWN (runs on {host})" for i in ids}
        return {i: "RUNNING" if _local_job_alive(i, paths) else "ENDED" for i in ids}

    def live_jobs(self, ids: list[str], host: str) -> list[str] | None:
        if host != socket.gethostname():
            return None
        return super().live_jobs(ids, host)

    def cancel(self, ids: list[str], host: str, paths: RunPaths) -> None:
        """SIGTERM to each job's process, on the host that runs them."""
        if host and host != socket.gethostname():
            raise RunError(f"the run's local job(s) {' '.join(ids)} run on {host}, not here; run `orchestrator "
                           f"cancel {paths.root}` on {host}")
        for job in ids:
            try:
                os.kill(int(job), signal.SIGTERM)
            except ProcessLookupError:
                pass

    def poll_interval_s(self, cfg: Config) -> float:
        return cfg.client.progress_interval_s


def _local_job_alive(job: str, paths: RunPaths | None) -> bool:
    """A local job's id is its pid; the pid counts only while it is still this run's submitit job (a pid is
    reused once its process is gone)."""
    if not job.isdigit() or not pid_alive(int(job)):
        return False
    if paths is None:
        return True
    try:
        cmdline = Path(f"/proc/{job}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True
    return str(paths.logs) in cmdline


def pid_alive(pid: int) -> bool:
    """Whether the process pid (on this host) is alive: the one place that asks."""
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
