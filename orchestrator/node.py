"""`NodeJob`, which runs inside each job.

In a Slurm job, submitit runs one orchestrator task per node in the user's environment; the task on node 0
starts the engine ranks as an `srun --overlap` step (inside the container when one is configured), proves a
one-token generation, runs the client, and stops every rank. The other nodes' tasks return at once.
"""
from __future__ import annotations

import asyncio
import signal
import socket
import threading
from pathlib import Path

from .clusters.base import cluster_for
from .clusters.environment import job_environment
from .commits import remaining_units
from .config import Config
from .engines.server import EngineServer
from .errors import OrchestratorError
from .plan import Plan
from .preflight import check_engine_identity
from .report import _failed_summary, _final_summary
from .row_settings import check_row_engine
from .rundir import RunPaths, log_event


def engine_server(cfg: Config, paths: RunPaths, attempt: str, replica: int) -> EngineServer:
    tag = f"{attempt}-r{replica}"
    server = EngineServer(cfg, paths.logs / f"engine-{tag}.log", paths.root / "work" / f"engine-{tag}.port",
                          rank_dir=paths.root / "work" / f"ranks-{tag}", replica=replica)
    server.launcher = cluster_for(cfg).step_prefix(cfg, server.adapter) if server.adapter.starts_process else []
    return server


class Preempted(OrchestratorError):
    """The job was told to stop (SIGTERM, or the time-limit/preemption signal); what finished is committed."""


class NodeJob:
    """What each task of a job runs. On node 0: engine up, proven, client, engine down, stats.

    submitit calls `checkpoint()` on its time-limit/preemption signal (USR2): the client stops taking
    work, in-flight requests get client.grace_s, finished units are committed, and submitit requeues the
    job with the same arguments (up to cluster.max_requeues times), which resumes from the commits.
    SIGTERM (scontrol requeue, preemption) stops the same way.
    """

    def __init__(self, cfg: Config, run_dir: str, attempt: str, started_at: float, replica: int = 0):
        self.args = (cfg, run_dir, attempt, started_at, replica)
        self._client = None
        self._thread: threading.Thread | None = None
        self._stop_reason: str | None = None

    def __getstate__(self) -> dict:
        return {"args": self.args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["args"])

    def __call__(self) -> dict | None:
        import submitit

        if submitit.JobEnvironment().global_rank != 0:
            return None
        return self.run_node0()

    def _request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        if self._client is not None:
            self._client.request_stop(reason)

    def checkpoint(self, *args, **kwargs):
        import submitit

        cfg, run_dir, _, _, replica = self.args
        self._request_stop("time limit or preemption signal")
        if self._thread is not None:
            self._thread.join(timeout=cfg.client.grace_s + 30)
        units = self._client.stats.rows.units if self._client is not None else 0
        log_event(RunPaths(Path(run_dir)), f"replica {replica}: stopped (time limit or preemption signal); "
                                           f"{units} unit(s) committed since it started; requeueing")
        return submitit.helpers.DelayedSubmission(NodeJob(*self.args))

    def run_node0(self) -> dict:
        from .client import Client
        from .sender import EngineLost

        cfg, run_dir, attempt, started_at, replica = self.args
        paths = RunPaths(Path(run_dir))
        plan = Plan.from_json(paths.plan.read_text())
        owner = f"r{replica}"
        where = f"replica {replica} (job {job_environment().job_name or 'local'}, host {socket.gethostname()})"
        if not remaining_units(paths, plan, attempt):  # e.g. requeued after the others finished: no engine start
            log_event(paths, f"{where}: nothing left to do; the engine was not started")
            return _final_summary(cfg, paths, plan, attempt, started_at, owner)
        previous = signal.signal(signal.SIGTERM, lambda *_: self._request_stop("SIGTERM"))
        server = engine_server(cfg, paths, attempt, replica)
        log_event(paths, f"{where}: starting the {cfg.engine.name} engine" if server.adapter.starts_process
                  else f"{where}: connecting to the engine at {server.url}")
        outcome: list = []
        try:
            with server:  # starts the engine; stops it on the way out, whatever ended the block
                try:
                    info = server.wait_ready()
                    what = f"engine={cfg.engine.name}, protocol {info.protocol}" + \
                        (f" ({info.api})" if info.api else "")
                    print(f"engine ready at {info.url} ({what}, model {info.model_name})", flush=True)
                    log_event(paths, f"{where}: engine ready at {info.url} ({what}, model {info.model_name})")
                    check_engine_identity(paths, info)
                    check_row_engine(plan, cfg.engine.name, info.protocol)  # a detected protocol (engine=endpoint)
                    self._client = Client(cfg, plan, paths, info.url, attempt, owner, engine_alive=server.alive,
                                          info=info, replica=replica)
                    if self._stop_reason:
                        self._client.request_stop(self._stop_reason)

                    def target() -> None:
                        try:
                            outcome.append(asyncio.run(self._client.run()))
                        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                            outcome.append(exc)

                    self._thread = threading.Thread(target=target, name="orchestrator-client")
                    self._thread.start()
                    while self._thread.is_alive():  # the main thread stays free for signal handlers
                        self._thread.join(timeout=0.5)
                except SystemExit:  # submitit requeued the job after checkpoint()
                    raise
                except BaseException as exc:
                    log_event(paths, f"{where}: failed: {exc}".splitlines()[0])
                    _failed_summary(cfg, paths, plan, attempt, started_at, exc)
                    raise
        finally:  # once the engine is stopped: a SIGTERM while it stops still stops the client
            signal.signal(signal.SIGTERM, previous)
        result = outcome[0] if outcome else RuntimeError("the client ended without a result")
        if isinstance(result, EngineLost) and server.adapter.starts_process:
            result = EngineLost(f"{result}; engine log {server.log_path}:\n{server.log_tail()}")
        if isinstance(result, BaseException):
            log_event(paths, f"{where}: failed: {result}")
            _failed_summary(cfg, paths, plan, attempt, started_at, result)
            raise result
        stats = result
        if self._client.stop_reason:
            log_event(paths, f"{where}: stopped ({self._client.stop_reason}); {stats.rows.units} unit(s) committed "
                             f"by this replica; the rows answered in its unfinished units are kept in their "
                             f"journals, and a resume sends only the others")
            raise Preempted(f"stopped by {self._client.stop_reason}; committed work is kept, rerun or requeue resumes")
        log_event(paths, f"{where}: finished; {stats.rows.rows} row(s) committed by this replica")
        return _final_summary(cfg, paths, plan, attempt, started_at, owner)
