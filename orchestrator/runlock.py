"""One front-end per run_dir: the lock file work/frontend.json and what tells a live holder from a gone one."""
from __future__ import annotations

import hashlib
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

TAKEOVER_S = 10.0  # how long starts racing to take over a stale lock keep looking; a gate held longer is abandoned


def _incarnation() -> list | None:
    """[job id, restart count] when running in a Slurm job's batch step: a requeued job is a new one."""
    env = job_environment()
    return [env.job_id, env.get("restart_count", "0")] if env.job_id else None


class RunDirInUse(RunError):
    """Another front-end (or its jobs) holds the run_dir."""


class RunLock:
    """One front-end per run_dir: work/frontend.json names it (host, pid) and its jobs. Another start on the
    same run_dir is refused while that front-end is alive (its pid on this host, or its heartbeat: the
    file's time, refreshed while it waits) or while any of its jobs is queued or running; a lock left by a
    front-end and jobs that are all gone is taken over."""

    def __init__(self, cfg: Config, paths: RunPaths):
        self.cfg, self.path = cfg, paths.root / "work" / "frontend.json"
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "cluster": cfg.cluster.name, "jobs": [],
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "incarnation": _incarnation(),
                       "nonce": uuid.uuid4().hex}  # tells two starts' records apart (a takeover compares them)
        self.held = False

    def acquire(self) -> None:
        deadline = time.monotonic() + TAKEOVER_S
        while time.monotonic() < deadline:
            if publish_once(self.path, json.dumps(self.record)):
                self.held = True
                return
            try:
                seen = self.path.read_bytes()
            except FileNotFoundError:
                continue
            other = self._lock_record(seen)
            holder = self._still_running(other)
            if holder:
                raise RunDirInUse(f"run_dir {self.path.parent.parent} is in use by {holder}; a second run there would "
                               f"compute the same units twice. Wait for it to end, stop it, or choose another run_dir=."
                               f" (If it is certainly gone, delete {self.path}.)")
            if not self._take_over(seen):
                time.sleep(0.01)  # another start is taking this same stale lock over: look again once it has
        raise RunError(f"could not take {self.path}: other starts kept taking it over for {TAKEOVER_S:.0f} s; try "
                       f"again (if no other start is running, delete {self.path} and any "
                       f"{self.path.parent / '.frontend.takeover-*'})")

    def _lock_record(self, seen: bytes) -> dict:
        """The record of the lock there. One that is not a JSON object naming a host and a pid was not written
        by a front-end (locks are published whole, never in part): it cannot be judged live or gone, so it is
        named with the fix rather than taken over or read as "pid None on None"."""
        try:
            other = json.loads(seen)
        except ValueError:
            other = None
        if isinstance(other, dict) and isinstance(other.get("host"), str) and isinstance(other.get("pid"), int) \
                and not isinstance(other.get("pid"), bool):
            return other
        raise RunError(f"the lock file {self.path} is unreadable (not a front-end's record: {seen[:60]!r}), so "
                       f"whether another front-end uses run_dir {self.path.parent.parent} cannot be told. If no "
                       f"other run is using it, delete {self.path} and start again.")

    def _take_over(self, seen: bytes) -> bool:
        """Remove the lock judged stale, a compare and swap: only while it still holds `seen`, and only by
        the one start that wins the gate named for it (publish_once is atomic), so no start removes a fresh
        lock another has just published. Nothing else changes a lock whose front-end is gone: a start
        publishes only where there is none. False when another start holds the gate (it is taking over)."""
        gate = self.path.with_name(f".frontend.takeover-{hashlib.sha256(seen).hexdigest()[:16]}")
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "nonce": uuid.uuid4().hex})
        if not publish_once(gate, mine):
            self._clear_abandoned(gate)
            return False
        try:
            try:
                now = self.path.read_bytes()
            except FileNotFoundError:
                return True
            if now == seen:  # still the stale record: nobody but the gate's holder removes it
                self.path.unlink(missing_ok=True)
            return True
        finally:
            gate.unlink(missing_ok=True)

    @staticmethod
    def _clear_abandoned(gate) -> None:
        """A takeover gate whose start died while holding it (it is held for milliseconds) would block the
        takeover for good: one older than TAKEOVER_S is removed (renamed aside, then checked to be that same
        file, else put back)."""
        try:
            old = gate.read_bytes()
            if time.time() - gate.stat().st_mtime < TAKEOVER_S:
                return
        except FileNotFoundError:
            return
        aside = gate.with_name(f"{gate.name}.gone-{uuid.uuid4().hex}")
        try:
            os.rename(gate, aside)
        except FileNotFoundError:
            return
        if aside.read_bytes() != old:  # a fresh gate of another start: put it back
            try:
                os.link(aside, gate)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

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
