"""`NodeJob`, which runs inside each job.

In a Slurm job, submitit runs one orchestrator task per node in the user's environment; the task on node 0
starts the engine ranks as an `srun --overlap` step (inside the container when one is configured), proves a
one-token generation, runs the client, and stops every rank. The other nodes' tasks return at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from pathlib import Path

from .clusters.base import cluster_for
from .clusters.environment import job_environment
from .commits import remaining_units
from .config import Config
from .engines.base import adapter_for
from .engines.server import EngineServer
from .errors import OrchestratorError
from .instances import Instance, instance_config, instances, owner_name, pinned
from .plan import Plan
from .preflight import check_engine_identity
from .report import _failed_summary, _final_summary
from .row_settings import check_row_engine
from .rundir import RunPaths, log_event


def engine_server(cfg: Config, paths: RunPaths, attempt: str, replica: int,
                  inst: Instance | None = None) -> EngineServer:
    """The engine of one replica, or of one of its pinned instances (cfg is then the instance's config)."""
    tag = f"{attempt}-{owner_name(replica, None if inst is None else inst.index)}"
    server = EngineServer(cfg, paths.logs / f"engine-{tag}.log", paths.root / "work" / f"engine-{tag}.port",
                          rank_dir=paths.root / "work" / f"ranks-{tag}", replica=replica,
                          instance=None if inst is None else inst.index)
    server.launcher = cluster_for(cfg).step_prefix(cfg, server.adapter, inst) if server.adapter.starts_process else []
    return server


def engine_servers(cfg: Config, paths: RunPaths, attempt: str, replica: int) -> list[EngineServer]:
    """The replica's engines: one, or one per pinned instance (layout.data_parallel on an engine without data
    parallelism of its own: instances.py)."""
    adapter = adapter_for(cfg)
    if not pinned(cfg, adapter):
        return [engine_server(cfg, paths, attempt, replica)]
    return [engine_server(instance_config(cfg, inst), paths, attempt, replica, inst)
            for inst in instances(cfg, adapter)]


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
        self._clients: list = []  # one per engine (pinned instances: one each)
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
        for client in self._clients:
            client.request_stop(reason)

    def checkpoint(self, *args, **kwargs):
        import submitit

        cfg, run_dir, _, _, replica = self.args
        self._request_stop("time limit or preemption signal")
        if self._thread is not None:
            self._thread.join(timeout=cfg.client.grace_s + 30)
        units = sum(client.stats.rows.units for client in self._clients)
        log_event(RunPaths(Path(run_dir)), f"replica {replica}: stopped (time limit or preemption signal); "
                                           f"{units} unit(s) committed since it started; requeueing")
        return submitit.helpers.DelayedSubmission(NodeJob(*self.args))

    def run_node0(self) -> dict:
        from .client import Client
        from .sender import EngineLost

        cfg, run_dir, attempt, started_at, replica = self.args
        paths = RunPaths(Path(run_dir))
        plan = Plan.from_json(paths.plan.read_text())
        owner = owner_name(replica)
        where = f"replica {replica} (job {job_environment().job_name or 'local'}, host {socket.gethostname()})"
        if not remaining_units(paths, plan, attempt):  # e.g. requeued after the others finished: no engine start
            log_event(paths, f"{where}: nothing left to do; the engine was not started")
            return _final_summary(cfg, paths, plan, attempt, started_at, owner)
        previous = signal.signal(signal.SIGTERM, lambda *_: self._request_stop("SIGTERM"))
        servers = engine_servers(cfg, paths, attempt, replica)
        adapter = servers[0].adapter
        pins = pinned(cfg, adapter)
        shape = f" as {len(servers)} pinned instances" if pins else ""
        log_event(paths, f"{where}: starting the {cfg.engine.name} engine{shape}" if adapter.starts_process
                  else f"{where}: connecting to the engine at {servers[0].url}")
        outcome: list = []
        try:
            with contextlib.ExitStack() as stack:  # starts the engines; stops them on the way out, whatever ended it
                try:
                    for server in servers:
                        stack.enter_context(server)
                    infos = [server.wait_ready() for server in servers]
                    info = infos[0]
                    what = f"engine={cfg.engine.name}, protocol {info.protocol}" + \
                        (f" ({info.api})" if info.api else "")
                    urls = ", ".join(i.url for i in infos)
                    print(f"engine ready at {urls} ({what}, model {info.model_name})", flush=True)
                    log_event(paths, f"{where}: engine ready at {urls} ({what}, model {info.model_name})")
                    for got in infos:
                        check_engine_identity(paths, got)
                    check_row_engine(plan, cfg.engine.name, info.protocol)  # a detected protocol (engine=endpoint)
                    # one client per engine: a pinned instance claims work on its own (instances.py), and the
                    # scheduler's index spreads the replica's instances over the units
                    self._clients = [
                        Client(cfg, plan, paths, got.url, attempt, owner_name(replica, k) if pins else owner,
                               engine_alive=server.alive, info=got, replica=replica * len(servers) + k)
                        for k, (server, got) in enumerate(zip(servers, infos))]
                    if self._stop_reason:
                        self._request_stop(self._stop_reason)

                    async def clients() -> list:
                        return await asyncio.gather(*[c.run() for c in self._clients], return_exceptions=True)

                    def target() -> None:
                        try:
                            outcome.extend(asyncio.run(clients()))
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
        finally:  # once the engines are stopped: a SIGTERM while they stop still stops the clients
            signal.signal(signal.SIGTERM, previous)
        results = outcome if len(outcome) == len(servers) else \
            (outcome[-1:] if outcome else [RuntimeError("the client ended without a result")])
        for k, result in enumerate(results):
            if isinstance(result, EngineLost) and adapter.starts_process:
                results[k] = EngineLost(f"{result}; engine log {servers[k].log_path}:\n{servers[k].log_tail()}")
        lost = [(k, r) for k, r in enumerate(results) if isinstance(r, EngineLost)]
        if pins and lost and len(lost) < len(results) and \
                not any(isinstance(r, BaseException) and not isinstance(r, EngineLost) for r in results):
            for k, result in lost:  # the other instances went on: only this one's requests in flight were lost
                log_event(paths, f"{where}: instance {k} ({servers[k].url}) lost its engine; the live instances "
                                 f"took over its units (its answered rows kept in their journals): "
                                 f"{str(result).splitlines()[0]}")
            results = [r for r in results if not isinstance(r, EngineLost)]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            log_event(paths, f"{where}: failed: {failed}")
            _failed_summary(cfg, paths, plan, attempt, started_at, failed)
            raise failed
        rows = sum(stats.rows.rows for stats in results)
        stopped = next((c.stop_reason for c in self._clients if c.stop_reason), None)
        if stopped:
            units = sum(stats.rows.units for stats in results)
            log_event(paths, f"{where}: stopped ({stopped}); {units} unit(s) committed by this replica; the rows "
                             f"answered in its unfinished units are kept in their journals, and a resume sends only "
                             f"the others")
            raise Preempted(f"stopped by {stopped}; committed work is kept, rerun or requeue resumes")
        log_event(paths, f"{where}: finished; {rows} row(s) committed by this replica")
        return _final_summary(cfg, paths, plan, attempt, started_at, owner)
