"""cluster=local: this machine, through submitit's LocalExecutor (the same job code Slurm runs)."""
from __future__ import annotations

import os
import signal
import socket
import time
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

    def stop(self, jobs: list, cfg: Config) -> list:
        """SIGTERM to each job, never submitit's SIGINT (a front-end started from a script with `&`, by cron or
        nohup, and so its jobs, ignore SIGINT): the job's submitit controller passes it to the task, whose
        client stops within client.grace_s, commits what finished and stops its engine. A job still alive
        STOP_MARGIN_S after that is SIGKILLed with every process under it (its engine too). Returns once every
        job has ended; the jobs that did not end even then (a process stuck in the kernel)."""
        live = [job for job in jobs if not job.done()]
        for job in live:
            process = getattr(job, "_process", None)  # submitit's LocalJob: the controller it started
            if process is None:
                job.cancel(check=False)  # not a process of ours: it is asked, as any cluster's job
            else:
                _signal([process.pid], signal.SIGTERM)
        live = _wait_ended(live, time.monotonic() + cfg.client.grace_s + STOP_MARGIN_S)
        killed = []
        for job in live:
            process = getattr(job, "_process", None)
            if process is not None:
                killed += _process_tree(process.pid)
        _signal(killed, signal.SIGKILL)
        deadline = time.monotonic() + STOP_MARGIN_S
        live = _wait_ended(live, deadline)
        while any(pid_alive(pid) for pid in killed) and time.monotonic() < deadline:  # not our children: polled
            time.sleep(0.05)
        return live

    def poll_interval_s(self, cfg: Config) -> float:
        return cfg.client.progress_interval_s


STOP_MARGIN_S = 15.0  # past client.grace_s: a stopping job's last commit and its engine's stop


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_ended(jobs: list, deadline: float) -> list:
    """The jobs still running at the deadline (none as soon as all have ended)."""
    while True:
        jobs = [job for job in jobs if not job.done()]
        if not jobs or time.monotonic() >= deadline:
            return jobs
        time.sleep(0.05)


def _process_tree(pid: int) -> list[int]:
    """pid and every process under it (children first listed after their parent), from /proc: read before
    any is killed, since an orphan's parent becomes init."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


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
