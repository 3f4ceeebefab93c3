"""The cluster adapter: submit, state, result, the engine step's prefix, and render, per way of running.

Local and Slurm run the same job code (`NodeJob`) through submitit and differ only here, as hydra's
submitit launchers differ only in their executor.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import Config, choices
from ..errors import ConfigError, RunError
from ..rundir import RunPaths
from .environment import JobEnvironment

# a job in one of these states is queued or running (Slurm's names; a local job is RUNNING until it ends)
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


@runtime_checkable
class Job(Protocol):
    """What a cluster's executor().submit(NodeJob(...)) returns: one replica's job, as the front-end drives it
    (submitit's LocalJob and SlurmJob, the allocation's StepJob). The adapter reads its state (state, states)
    and its result (result); anything more a cluster's jobs hold (submitit's watcher, task(0)) only its own
    adapter touches."""

    job_id: Any  # str for every cluster; what work/frontend.json records and job_states takes

    def done(self) -> bool:
        """Whether the job has ended (by itself or cancelled)."""

    def cancel(self, check: bool = True) -> Any:
        """Stop the job (the front-end calls cancel(check=False): a job already gone is no error)."""

    def result(self) -> Any:
        """Wait for the job's end; its return value, or its failure raised (the adapter's result() words it)."""


class ClusterAdapter:
    name = ""
    jobs_outlive_front_end = True  # cluster.on_interrupt=leave can leave them running (not local processes)

    def problems(self, cfg: Config, engine) -> list[str]:
        """What this way of running cannot do with the config; checked before submission."""
        return []

    def executor(self, cfg: Config, paths: RunPaths):
        """What submits the run's jobs: executor.submit(NodeJob(...)) returns a `Job`."""
        raise NotImplementedError

    def array_key(self, cfg: Config) -> str | None:
        """Runs with the same key can go in one job array (None: this way of running has no arrays)."""
        return None

    def batch(self, executor, array: bool):
        """The context in which jobs submitted go in as one job array (when array)."""
        import contextlib

        return contextlib.nullcontext()

    def replicas(self, cfg: Config, engine) -> int:
        """How many replicas this run has (an allocation fits as many as its nodes hold)."""
        return cfg.replicas

    def step_prefix(self, cfg: Config, engine, instance=None) -> list[str]:
        """What starts the engine's tasks from node 0's job task (empty: run it here as one process). instance:
        one pinned instance of the replica (instances.Instance; cfg is then its instance_config), whose step
        runs on its own nodes."""
        return []

    def state(self, job) -> str:
        """The job's state read fresh; UNKNOWN when it cannot be read."""
        raise NotImplementedError

    def states(self, jobs: list) -> list[str]:
        """Every job's state, read fresh, in as few queries as the cluster allows."""
        return [self.state(job) for job in jobs]

    def job_states(self, ids: list[str], host: str, paths: RunPaths | None = None) -> dict[str, str]:
        """Each recorded job's state (ids as work/frontend.json holds them, submitted from host) as the cluster
        sees it now; UNKNOWN (with the reason after it) when that cannot be read from here. paths: the run's,
        when known, so a job id reused by another job is not taken for the run's."""
        return {i: "UNKNOWN" for i in ids}

    def live_jobs(self, ids: list[str], host: str) -> list[str] | None:
        """Which of these jobs (submitted from host) are still queued or running; None when that cannot be
        told from here."""
        if not ids:
            return []
        states = self.job_states(ids, host)
        if any(st.startswith("UNKNOWN") for st in states.values()):
            return None
        return [i for i, st in states.items() if st.split()[0] in ACTIVE_STATES]

    def cancel(self, ids: list[str], host: str, paths: RunPaths) -> None:
        """Ask the cluster to end these recorded jobs of the run at paths (submitted from host); they stop
        within client.grace_s, committing what finished. A RunError says why it cannot be done from here."""
        raise RunError(f"cannot cancel cluster={self.name} job(s) {' '.join(ids)} from here; stop them where they "
                       f"run")

    def stop(self, jobs: list, cfg: Config) -> list:
        """End the front-end's own jobs (an interrupt, a failed submission, jobs still waiting once the run is
        complete); returns those it could not see end. Here the cluster ends them (scancel: SIGTERM, then
        SIGKILL after its KillWait), so asking is enough."""
        for job in jobs:
            job.cancel(check=False)
        return []

    def environment(self, environ=None) -> JobEnvironment:
        """The job this process runs in, as this cluster's environment tells it."""
        return JobEnvironment(environ)

    def result(self, job, paths: RunPaths):
        """The job's return value; its failure as a RunError with the job's own last words."""
        try:
            return self._result(job)
        except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's failure with its traceback
            raise RunError(f"job {job.job_id} failed; logs in {paths.logs}\n{job_failure(str(exc))}") from None

    def _result(self, job):
        return job.result()

    def stopped_by(self, signal_name: str) -> str:
        """What this way of running does once a signal stopped the front-end and its jobs; said after the
        message."""
        return ""

    def poll_interval_s(self, cfg: Config) -> float:
        return cfg.cluster.poll_interval_s

    def follow_hint(self, jobs: list, paths: RunPaths) -> str:
        return ""

    def render(self, cfg: Config, paths: RunPaths, engine, write, out: Path, rv) -> None:
        """Write, through write(name, text) into out, the files this way of running would submit (rv: the
        engine's rendezvous, with placeholders for what the job decides)."""


def job_failure(text: str, max_lines: int = 25) -> str:
    """The job's own error from submitit's report: the message of the last traceback (all its lines: ours
    carry the engine log's tail), without the frames, and without the module path of our own errors."""
    lines = re.split(r"\n-{10,}\nYou can check full logs", text)[0].strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return "\n".join(lines[-12:])
    i = starts[-1] + 1
    while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
        i += 1
    message = lines[i:i + max_lines]
    if message:
        message[0] = re.sub(r"^orchestrator\.[\w.]+\.\w+: ", "", message[0])
    return "\n".join(message)


def _module_adapter(name: str) -> ClusterAdapter | None:
    if not re.fullmatch(r"[A-Za-z_]\w*", name or ""):
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}").ADAPTER
    except (ImportError, AttributeError):
        return None


def cluster_for(cfg: Config) -> ClusterAdapter:
    name = cfg.cluster.name
    found = _module_adapter(name)
    if found is None:
        raise ConfigError(f"cluster={name} has no adapter (orchestrator/clusters/{name}.py with ADAPTER); "
                          f"choose one of: {', '.join(choices('cluster'))}")
    return found


def adapter_named(name: str) -> ClusterAdapter:
    """The adapter of the cluster a run dir records (work/frontend.json, config.yaml); for a name with none
    (an old or partial run dir), one that reads every job's state as UNKNOWN and cancels nothing."""
    found = _module_adapter(name)
    if found is not None:
        return found
    unknown = ClusterAdapter()
    unknown.name = name
    return unknown


def submitit_folder(paths: RunPaths) -> str:
    return str(Path(paths.logs) / "submitit" / "%j")
