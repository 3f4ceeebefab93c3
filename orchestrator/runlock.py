"""One front-end per run_dir: the lock file work/frontend.json and what tells a live holder from a gone one."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

from .clusters.base import cluster_for
from .clusters.environment import job_environment
from .config import Config
from .errors import RunError
from .rundir import RunPaths, atomic_write_text, publish_once


def _incarnation() -> list | None:
    """[job id, restart count] when running in a Slurm job's batch step: a requeued job is a new one."""
    env = job_environment()
    return [env.job_id, env.get("restart_count", "0")] if env.job_id else None


class RunLock:
    """One front-end per run_dir: work/frontend.json names it (host, pid) and its jobs. Another start on the
    same run_dir is refused while that front-end is alive (its pid on this host, or its heartbeat: the
    file's time, refreshed while it waits) or while any of its jobs is queued or running; a lock left by a
    front-end and jobs that are all gone is taken over."""

    def __init__(self, cfg: Config, paths: RunPaths):
        self.cfg, self.path = cfg, paths.root / "work" / "frontend.json"
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "cluster": cfg.cluster.name, "jobs": [],
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "incarnation": _incarnation()}
        self.held = False

    def acquire(self) -> None:
        for _ in range(5):
            if publish_once(self.path, json.dumps(self.record)):
                self.held = True
                return
            try:
                other = json.loads(self.path.read_text())
            except FileNotFoundError:
                continue
            except ValueError:
                other = {}
            holder = self._still_running(other)
            if holder:
                raise RunError(f"run_dir {self.path.parent.parent} is in use by {holder}; a second run there would "
                               f"compute the same units twice. Wait for it to end, stop it, or choose another run_dir=."
                               f" (If it is certainly gone, delete {self.path}.)")
            stale = self.path.with_name(f".frontend.stale-{uuid.uuid4().hex}")
            try:
                os.rename(self.path, stale)
                stale.unlink()
            except FileNotFoundError:  # another start took it over first: look again
                continue
        raise RunError(f"could not take {self.path}: other starts keep taking it; try again")

    def _still_running(self, other: dict) -> str:
        host, pid, jobs = other.get("host"), other.get("pid"), [str(j) for j in other.get("jobs", [])]
        from .clusters.local import pid_alive

        mine, theirs = self.record["incarnation"], other.get("incarnation")
        if mine and theirs and mine[0] == theirs[0] and mine != theirs:
            return ""  # an earlier run of this same Slurm job, requeued since: it is gone

        if host == socket.gethostname() and isinstance(pid, int) and pid_alive(pid):
            return f"the orchestrator front-end pid {pid} on {host} (started {other.get('started')})"
        try:
            silent = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return ""
        if host != socket.gethostname() and silent < max(60.0, 4 * self.cfg.cluster.poll_interval_s):
            return f"the orchestrator front-end pid {pid} on {host} (started {other.get('started')})"
        if jobs:
            live = cluster_for(self.cfg).live_jobs(jobs, host or "") if other.get("cluster") == self.cfg.cluster.name \
                else None
            if live is None:
                return f"job(s) {' '.join(jobs)} (cluster={other.get('cluster')}, submitted from {host}), " \
                       f"whose state cannot be read from here"
            if live:
                return f"job(s) {' '.join(live)} (cluster={other.get('cluster')}, submitted from {host})"
        return ""

    def jobs(self, ids: list[str]) -> None:
        self.record["jobs"] = ids
        atomic_write_text(self.path, json.dumps(self.record))

    def beat(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self, keep_for_jobs: bool) -> None:
        """wait=false leaves the record of its jobs, so a start while they run is refused."""
        if self.held and not keep_for_jobs:
            self.path.unlink(missing_ok=True)
