"""Launching with submitit, and `NodeJob`, which runs inside each job.

The local and Slurm paths run the same job code and differ only in the executor. In a Slurm job,
submitit runs one orchestrator task per node in the user's environment; the task on node 0 starts
the engine ranks as an `srun --overlap` step (inside the container when one is configured), proves a
one-token generation, runs the client, and stops every rank. The other nodes' tasks return at once.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path


from .clusters.base import cluster_for
from .config import Config, config_yaml
from .engines.base import adapter_for, check_engine
from .engines.server import EngineServer
from .errors import ConfigError, EngineError, OrchestratorError, RunError
from .layout import build_layout
from . import fsops
from .report import build_summary, one_line, write_summary
from .work import (InputError, Plan, RunPaths, apply_duplicate_policy, atomic_write_text, build_plan, committed_rows,
                   UnitStats, done_units, log_event, publish_once, remaining_units, retried_units, scan_committed,
                   write_retry_units)

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "FINISHED", "INTERRUPTED"}


def check_writable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RunError(f"run_dir={str(root)!r} is a file, not a directory; choose another run_dir= (or move that "
                       f"file away)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"run_dir={str(root)!r} is not writable ({exc.strerror}); choose another run_dir=") from None


def prepare(cfg: Config) -> tuple[Plan, RunPaths]:
    """Everything checked before a job is submitted: layout, engine, cluster, input, run directory.
    Writes plan and config."""
    build_layout(cfg)
    check_launch(cfg)
    plan = build_plan(cfg.data, cfg.input_path, cfg.sampling.rollouts)
    paths = RunPaths(Path(cfg.run_dir).expanduser().resolve())
    check_writable(paths.root)
    current = fingerprint(cfg, plan)
    stored_print = paths.root / "fingerprint.json"
    if paths.plan.exists() and stored_print.exists():
        _check_same_settings(paths, stored_print, current)
        plan = Plan.from_json(paths.plan.read_text())
        resumed = True
    else:
        plan = apply_duplicate_policy(plan, cfg.data, spill_dir=paths.root / "work")  # big inputs spill there
        resumed = False
    paths.make()
    if not resumed:  # the plan is fixed at the first start; of two first starts at once, one publishes
        if not publish_once(stored_print, json.dumps(current, indent=1, sort_keys=True)):
            _check_same_settings(paths, stored_print, current)
        atomic_write_text(paths.plan, plan.to_json())
    atomic_write_text(paths.root / "config.yaml", config_yaml(cfg))
    return plan, paths


def _check_same_settings(paths: RunPaths, stored_print: Path, current: dict) -> None:
    stored = json.loads(stored_print.read_text())
    if isinstance(stored.get("sampling"), dict):  # a run_dir started before sampling.rollouts existed: one answer a row
        stored["sampling"].setdefault("rollouts", 1)
    changed = _differences(stored, current)
    if changed:
        raise InputError(f"run_dir {paths.root} was started with other settings, so old and new results would "
                         f"disagree: {'; '.join(changed[:8])}. Rerun with the original settings to resume, or "
                         f"choose a new run_dir= for a fresh run")


def check_launch(cfg: Config) -> None:
    """The engine's and the cluster's own checks, before any GPU is asked for."""
    engine = check_engine(cfg)
    found = cluster_for(cfg).problems(cfg, engine)
    if found:
        raise ConfigError("\n".join(found))


def fingerprint(cfg: Config, plan: Plan) -> dict:
    """What decides the answers: model, prompt format, sampling, engine, and the exact input files."""
    return {
        "model": cfg.model.name,
        "model.path": cfg.model.path,
        "model.max_seq_len": cfg.model.architecture.max_seq_len,
        "model.prompt": asdict(cfg.model.prompt),
        "end_strings": cfg.end_strings,
        # rollouts decides the answers and the units' layout; whether they go in one request does neither,
        # except on NeMo, where it sends them as copies under one seed (other answers): see _nemo_copies
        "sampling": {k: v for k, v in asdict(cfg.sampling).items() if k != "rollouts_in_one_request"},
        **({"sampling.rollouts_in_one_request": True} if _nemo_copies(cfg) else {}),
        "engine": cfg.engine.name,
        "engine.answers": adapter_for(cfg).answer_settings(cfg),
        "engine.settings": {k: getattr(cfg.engine, k) for k in ("checkpoint", "url", "protocol", "api", "precision",
                                                               "command", "script", "extra_args", "options",
                                                               "served_model_name", "skip_special_tokens",
                                                               "extra_body")},
        "data": {**{k: getattr(cfg.data, k) for k in ("prompt_column", "id_column", "unit_rows", "duplicate_ids",
                                                      "truncate_prompts", "bytes_per_token")},
                 # conversations; unset is None, as in a run_dir started before they existed
                 **{k: getattr(cfg.data, k) or None for k in ("messages_column", "turns_column",
                                                             "attributes_column", "keep_columns")}},
        "input_files": [[f.path, f.rows, f.size, f.mtime_ns] for f in plan.files],
    }


def _nemo_copies(cfg: Config) -> bool:
    """codecs.nemo_copies, on an engine that may speak NeMo's protocol."""
    from .engines.codecs import nemo_copies

    return adapter_for(cfg).protocol_for(cfg) in ("nemo", None) and nemo_copies(cfg)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in old and prefix.startswith("engine.settings"):  # recorded by a later version: not a change
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if key == "input_files":
                found.append(_input_changes(a or [], b or []))
            else:
                found.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return found


def _input_changes(old: list, new: list) -> str:
    """Which input files changed since the first start, and how: [path, rows, size, mtime_ns] each."""
    before, after = {f[0]: f for f in old}, {f[0]: f for f in new}
    said = [f"{p} is gone" for p in before if p not in after] + [f"{p} is new" for p in after if p not in before]
    for path in before.keys() & after.keys():
        (_, rows0, size0, _), (_, rows1, size1, _) = before[path], after[path]
        if before[path] != after[path]:
            said.append(f"{path} changed (" + (f"{rows0} -> {rows1} rows" if rows0 != rows1 else
                                               f"{size0} -> {size1} bytes" if size0 != size1 else
                                               "modified since") + ")")
    shown = ", ".join(sorted(said)[:4]) + (f" and {len(said) - 4} more" if len(said) > 4 else "")
    return f"the input files changed since the first start: {shown}"


def check_engine_identity(paths: RunPaths, info) -> None:
    """What the running engine says about itself (its served model, protocol, context) is part of the
    run's settings: behind an unchanged engine.url there may now be another model."""
    identity = {"served model": info.model_name, "protocol": info.protocol, "api": info.api,
                "context": info.max_model_len}
    path = paths.root / "engine.json"
    if publish_once(path, json.dumps(identity, indent=1, sort_keys=True)):
        return
    changed = _differences(json.loads(path.read_text()), identity)
    if changed:
        raise EngineError(f"the engine at {info.url} is not the one that answered this run_dir's committed rows: "
                          f"{'; '.join(changed)}. Resume against the original engine, or choose a new run_dir= for a "
                          f"fresh run")


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
        from .client import Client, EngineLost

        cfg, run_dir, attempt, started_at, replica = self.args
        paths = RunPaths(Path(run_dir))
        plan = Plan.from_json(paths.plan.read_text())
        owner = f"r{replica}"
        where = f"replica {replica} (job {os.environ.get('SLURM_JOB_ID', 'local')}, host {socket.gethostname()})"
        if not remaining_units(paths, plan, attempt):  # e.g. requeued after the others finished: no engine start
            log_event(paths, f"{where}: nothing left to do; the engine was not started")
            return _final_summary(cfg, paths, plan, attempt, started_at, owner)
        previous = signal.signal(signal.SIGTERM, lambda *_: self._request_stop("SIGTERM"))
        server = engine_server(cfg, paths, attempt, replica)
        log_event(paths, f"{where}: starting the {cfg.engine.name} engine" if server.adapter.starts_process
                  else f"{where}: connecting to the engine at {server.url}")
        server.start()
        outcome: list = []
        try:
            info = server.wait_ready()
            what = f"engine={cfg.engine.name}, protocol {info.protocol}" + (f" ({info.api})" if info.api else "")
            print(f"engine ready at {info.url} ({what}, model {info.model_name})", flush=True)
            log_event(paths, f"{where}: engine ready at {info.url} ({what}, model {info.model_name})")
            check_engine_identity(paths, info)
            self._client = Client(cfg, plan, paths, info.url, attempt, owner, engine_alive=server.alive, info=info,
                                  replica=replica)
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
        finally:
            server.stop()
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


def _final_summary(cfg: Config, paths: RunPaths, plan: Plan, attempt: str, started_at: float, owner: str) -> dict:
    """summary.json once the run is complete, written by the first replica to see that (one summary per
    attempt, not one per replica: each reads every unit's ledger record). Others return their own totals."""
    if remaining_units(paths, plan, attempt) == 0 and \
            fsops.create_exclusive(paths.root / "work" / f"summary-{attempt}.by", owner):
        summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths))
        write_summary(paths, summary)
        log_event(paths, f"{owner}: run complete, {summary['committed']}/{summary['total']} rows committed; "
                         f"summary.json written")
        return summary
    return {"replica": owner, "attempt": attempt}


def _kept_summary(paths: RunPaths, total: UnitStats) -> dict | None:
    """summary.json of a run that completed, when it still agrees with the committed totals."""
    try:
        summary = json.loads((paths.root / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(summary, dict) and summary.get("complete") and summary.get("committed") == total.rows \
            and summary.get("ok") == total.ok and summary.get("failed") == total.failed:
        return summary
    return None


def _failed_summary(cfg: Config, paths: RunPaths, plan: Plan, attempt: str, started_at: float,
                    error: BaseException) -> None:
    """A run that fails still says where it stands: summary.json with complete=false and the reason."""
    if isinstance(error, (SystemExit, KeyboardInterrupt)):
        return
    try:
        summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths))
        summary["error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
        write_summary(paths, summary)
    except (OSError, OrchestratorError):  # the failure itself may be a full disk: the error is what matters
        pass


def _summary_extra(cfg: Config, paths: RunPaths) -> dict:
    return {"model": cfg.model.name, "engine": cfg.engine.name, "cluster": cfg.cluster.name,
            "replicas": cfg.replicas, "run_dir": str(paths.root)}


def make_executor(cfg: Config, paths: RunPaths):
    """submitit's executor for this config's cluster adapter, with its parameters."""
    return cluster_for(cfg).executor(cfg, paths)


def wait_for_jobs(jobs: list, cfg: Config, on_tick, complete=None, settle_s: float = 30.0) -> list:
    """Poll until every job is in a terminal state; never forever on a state that cannot be read. Once
    complete() says the run has nothing left (checked every few polls), jobs still queued or running get
    settle_s to end by themselves (writing their stats), then are cancelled: a requeued job waiting in the
    queue, with no work left, never holds the run open. Returns the jobs cancelled so."""
    cluster = cluster_for(cfg)
    unknown_since: dict[str, float] = {}
    pending = list(jobs)
    checked_at, complete_since = 0.0, None
    while pending:
        on_tick()
        if complete is not None and complete_since is None and time.monotonic() - checked_at >= 10.0:
            checked_at = time.monotonic()
            if complete():
                complete_since = time.monotonic()
        if complete_since is not None and time.monotonic() - complete_since >= settle_s:
            for job in pending:
                job.cancel(check=False)
            return pending
        still = []
        for job, state in zip(pending, cluster.states(pending)):  # one query for all (sacct on Slurm)
            if state in TERMINAL_STATES:
                continue
            if state == "UNKNOWN":
                first = unknown_since.setdefault(job.job_id, time.monotonic())
                if time.monotonic() - first > cfg.cluster.unknown_state_timeout_s:
                    raise RunError(f"job {job.job_id}: its state could not be read for "
                                   f"{cfg.cluster.unknown_state_timeout_s:.0f} s (is accounting up? try sacct -j "
                                   f"{job.job_id}); not waiting any longer")
            else:
                unknown_since.pop(job.job_id, None)
            still.append(job)
        pending = still
        if pending:
            time.sleep(cluster.poll_interval_s(cfg))
    return []


class Interrupted(RunError):
    """The front-end was interrupted while it waited and cancelled its jobs."""


class FrontEndStopped(Exception):
    """SIGTERM, SIGHUP (a closed terminal) or SIGUSR2 (a time-limit warning) reached the front-end while it
    waited on its jobs."""


def _raise_on_stop_signals() -> dict:
    """While waiting, SIGTERM and SIGHUP stop the front-end the way Ctrl-C does: its jobs are cancelled,
    so a local job and its engine never outlive it. Returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, _frame):
        raise FrontEndStopped(signal.Signals(signum).name)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)}


def _incarnation() -> list | None:
    """[job id, restart count] when running in a Slurm job's batch step: a requeued job is a new one."""
    job = os.environ.get("SLURM_JOB_ID")
    return [job, os.environ.get("SLURM_RESTART_COUNT", "0")] if job else None


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
                return f"job(s) {' '.join(jobs)} (cluster={other.get('cluster')}, submitted from {host}), whose state " \
                       f"cannot be read from here"
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


@dataclass
class Submission:
    """One run's jobs, submitted and not yet followed; it holds the run_dir's lock until released."""

    cfg: Config
    plan: Plan
    paths: RunPaths
    lock: RunLock
    attempt: str
    started_at: float
    already: int
    retry: list
    jobs: list = field(default_factory=list)
    replicas: int = 0
    summary: dict | None = None  # set when nothing was left to do: no job was submitted

    @property
    def ids(self) -> str:
        return " ".join(str(job.job_id) for job in self.jobs)

    def release(self, outcome: dict | None) -> None:
        """wait=false, or jobs left running on an interrupt: the lock keeps naming them."""
        self.lock.release(keep_for_jobs=bool(outcome and "jobs" in outcome))


def run(cfg: Config, show_progress: bool = True) -> dict:
    """Plan, submit one job per replica through submitit, follow progress until they end (wait=true)."""
    sub = submit(cfg)
    outcome = None
    try:
        if sub.summary is not None:
            outcome = sub.summary
        elif not cfg.wait:
            outcome = report_submitted(sub)
        else:
            outcome = follow(sub, show_progress)
        return outcome
    finally:
        sub.release(outcome)


def submit(cfg: Config, defer: bool = False) -> Submission:
    """Everything up to the submitted jobs: checks, plan, the run_dir's lock, one job per replica
    (defer: all but the jobs, which submit_jobs() submits with other runs')."""
    started_at = time.time()
    plan, paths = prepare(cfg)
    lock = RunLock(cfg, paths)
    lock.acquire()
    try:
        sub = _submit(cfg, plan, paths, lock, started_at)
        if sub.summary is None and not defer:
            submit_jobs([sub])
        return sub
    except BaseException:
        lock.release(keep_for_jobs=False)
        raise


def report_submitted(sub: Submission) -> dict:
    cluster, paths = cluster_for(sub.cfg), sub.paths
    print(f"submitted job(s) {sub.ids} for {paths.root}")
    hint = cluster.follow_hint(sub.jobs, paths)
    if hint:
        print(hint)
    print(f"when done: {paths.root / 'summary.json'}; results: {paths.results}")
    return {"jobs": [str(j.job_id) for j in sub.jobs], "run_dir": str(paths.root)}


def _submit(cfg: Config, plan: Plan, paths: RunPaths, lock: RunLock, started_at: float) -> Submission:
    attempt = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    committed = scan_committed(paths, plan, put_aside=True)
    for damaged in committed.damaged:
        print(f"warning: {damaged}", file=sys.stderr)
        log_event(paths, f"front-end: {damaged}")
    already = committed_rows(plan, committed.units)
    retry = sorted(u for u, st in committed.stats.items() if st.get("failed")) if cfg.retry_failed else []
    if already:
        print(f"resuming {paths.root}: {already}/{plan.total_rows} rows already committed", flush=True)
    if retry:
        failed = sum(committed.stats[u]["failed"] for u in retry)
        write_retry_units(paths, attempt, retry)
        print(f"retry_failed=true: redoing the {failed} failed row(s) of {len(retry)} unit(s); their ok rows are kept",
              flush=True)
        log_event(paths, f"front-end: retry_failed=true: redoing {failed} failed row(s) of {len(retry)} unit(s)")
    elif cfg.retry_failed:
        print("retry_failed=true: no committed row failed", flush=True)
    sub = Submission(cfg, plan, paths, lock, attempt, started_at, already, retry)
    if already == plan.total_rows and not retry:
        summary = _kept_summary(paths, committed.total)  # the finished run's own figures, not a rerun's zero rate
        if summary is None:
            summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths))
            write_summary(paths, summary)
        print(f"nothing left to do\nresults: {paths.results}\nsummary: {one_line(summary)}")
        sub.summary = summary
        return sub
    sub.replicas = cluster_for(cfg).replicas(cfg, adapter_for(cfg))
    return sub


def submit_jobs(subs: list[Submission], folder: RunPaths | None = None) -> None:
    """Submit the jobs of one or more runs (a sweep's members). Runs whose jobs ask the cluster for the
    same resources go in as one job array where the cluster has arrays (submitit logs under folder)."""
    groups: dict = {}
    for sub in subs:
        key = cluster_for(sub.cfg).array_key(sub.cfg)
        groups.setdefault(key if key is not None else id(sub), []).append(sub)
    for group in groups.values():
        _submit_group(group, folder if len(group) > 1 and folder is not None else group[0].paths)


def _submit_group(group: list[Submission], folder: RunPaths) -> None:
    cluster = cluster_for(group[0].cfg)
    executor = cluster.executor(group[0].cfg, folder)
    pending = [(sub, replica) for sub in group for replica in range(sub.replicas)]
    jobs: list = []
    try:
        with cluster.batch(executor, len(pending) > 1):  # a run's replicas and a sweep's members: one array
            for sub, replica in pending:
                jobs.append(executor.submit(NodeJob(sub.cfg, str(sub.paths.root), sub.attempt, sub.started_at,
                                                    replica)))
    except Exception as exc:  # noqa: BLE001 - sbatch refused, Slurm down, ...: never leave a partial run behind
        submitted = [job for job in jobs if getattr(job, "_job_id", getattr(job, "job_id", None))]
        for job in submitted:
            job.cancel(check=False)
        done = f"; cancelled the {len(submitted)} job(s) already submitted " \
               f"({', '.join(str(j.job_id) for j in submitted)})" if submitted else ""
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        what = f"a job array of {len(pending)} jobs" if len(pending) > 1 and cluster.array_key(group[0].cfg) \
            else f"replica {len(jobs)} of {len(pending)}"
        raise RunError(f"submitting {what} failed: {reason}{done}. Nothing was committed by them; rerun the same "
                       f"command once the cluster accepts jobs") from None
    for (sub, _), job in zip(pending, jobs):
        sub.jobs.append(job)
    for sub in group:
        sub.lock.jobs([str(job.job_id) for job in sub.jobs])


def follow(sub: Submission, show_progress: bool = True) -> dict:
    """Wait for a submission's jobs with progress, then report: the summary, or the failure."""
    cfg, plan, paths, lock, attempt = sub.cfg, sub.plan, sub.paths, sub.lock, sub.attempt
    started_at, already, retry, jobs, replicas = sub.started_at, sub.already, sub.retry, sub.jobs, sub.replicas
    cluster, ids = cluster_for(cfg), sub.ids
    if cluster.follow_hint(jobs, paths):
        print(f"submitted job(s) {ids}" + (f" ({replicas} replicas)" if replicas > 1 else ""), flush=True)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total_rows, initial=already, unit="prompt", file=sys.stderr,
                   disable=not sys.stderr.isatty() and os.environ.get("ORCHESTRATOR_PROGRESS") != "1")

    last_line = [time.monotonic()]
    retried = set(retry)

    def tick() -> None:
        lock.beat()
        if bar is None:
            return
        # one listing per tick, whatever the number of replicas (retried units count again once redone)
        redone = retried & retried_units(paths, attempt) if retried else set()
        bar.n = min(plan.total_rows, committed_rows(plan, (done_units(paths) - retried) | redone))
        bar.refresh()
        if bar.disable and time.monotonic() - last_line[0] >= 60:  # logs of sbatch-submitted runs get a line a minute
            last_line[0] = time.monotonic()
            print(f"progress: {bar.n}/{plan.total_rows} {'prompts' if plan.rollouts > 1 else 'rows'} committed",
                  file=sys.stderr, flush=True)

    failures: list[RunError] = []
    stop_signals = _raise_on_stop_signals()
    try:
        left = wait_for_jobs(jobs, cfg, tick, lambda: remaining_units(paths, plan, attempt) == 0)
        if left:
            print(f"every unit is committed; cancelled job(s) {' '.join(str(j.job_id) for j in left)}, which had "
                  f"nothing left to do", flush=True)
            log_event(paths, f"front-end: run complete; cancelled job(s) {' '.join(str(j.job_id) for j in left)}, "
                             f"which had nothing left to do")
        for job in jobs:
            if job in left:
                continue
            try:
                cluster.result(job, paths)
            except RunError as exc:
                failures.append(exc)
    except (KeyboardInterrupt, FrontEndStopped) as exc:
        why = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else str(exc)
        if cfg.cluster.on_interrupt == "leave" and cluster.jobs_outlive_front_end:
            hint = cluster.follow_hint(jobs, paths)
            print(f"interrupted by {why}: job(s) {ids} go on running (cluster.on_interrupt=leave). "
                  f"{hint + '. ' if hint else ''}Cancel them with: orchestrator cancel {paths.root}", flush=True)
            return {"jobs": [str(j.job_id) for j in jobs], "run_dir": str(paths.root), "left_running": True}
        for job in jobs:
            job.cancel(check=False)
        message = (f"interrupted by {why}: cancelled job(s) {ids}; what they committed is kept "
                   f"({committed_rows(plan, done_units(paths))}/{plan.total_rows} rows). Rerun the same command "
                   f"to resume")
        _failed_summary(cfg, paths, plan, attempt, started_at, RunError(message))
        if threading.current_thread() is threading.main_thread():  # a requeue's own SIGTERM must not cut us off
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        after = cluster.stopped_by(why)  # e.g. an allocation's time-limit warning: requeue it
        raise Interrupted(message + after) from None
    finally:
        for signum, handler in stop_signals.items():
            signal.signal(signum, handler)
        if bar is not None:
            tick()
            bar.close()
    summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths))
    summary["failed_jobs"], summary["replicas"] = len(failures), replicas
    if failures and not summary["complete"]:
        summary["error"] = str(failures[0]).splitlines()[0]
        write_summary(paths, summary)
        raise failures[0]
    for failure in failures:  # the run completed all the same: other replicas took the lost work
        print(f"warning: {failure}", file=sys.stderr)
    write_summary(paths, summary)
    print(f"results: {paths.results}")
    print(f"summary: {one_line(summary)}")
    if not summary["complete"]:
        raise RunError(f"{summary['committed']}/{summary['total']} rows committed; rerun the same command to resume")
    return summary


def render(cfg: Config, out_dir: Path | None = None) -> list[Path]:
    """Write what `run` would submit, and submit nothing: the cluster's job script, the engine's step and
    per-task command lines, the resolved config, and the plain sbatch template filled from the config."""

    from .engines.base import Rendezvous
    from .sbatch import MASTER_ADDR_PLACEHOLDER, MASTER_PORT_PLACEHOLDER, PORT_PLACEHOLDER, rank_lines, with_placeholders

    build_layout(cfg)
    check_launch(cfg)
    cluster = cluster_for(cfg)
    paths = RunPaths(Path(cfg.run_dir).expanduser().resolve())
    out = Path(out_dir) if out_dir else paths.root / "render"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name: str, text: str) -> None:
        atomic_write_text(out / name, with_placeholders(text))
        written.append(out / name)

    write("config.yaml", config_yaml(cfg))
    server = engine_server(cfg, paths, "<attempt>", 0)
    engine = server.adapter
    if not engine.starts_process:
        return written
    e = cfg.engine
    rv = Rendezvous(port=e.port or (0 if engine.reports_port else PORT_PLACEHOLDER),
                    master_addr=e.master_addr or MASTER_ADDR_PLACEHOLDER,
                    master_port=e.master_port or MASTER_PORT_PLACEHOLDER,
                    port_file=server.rendezvous.port_file, rank_dir=server.rendezvous.rank_dir)
    step = server.launcher + engine.step_command(cfg, rv)
    tasks = engine.tasks_per_node(cfg)
    notes = ["PORT: " + ("a free port chosen on node 0 when the job starts" if not e.port else str(e.port))]
    if cfg.layout.nodes > 1 and (e.master_port or e.master_addr or MASTER_PORT_PLACEHOLDER in " ".join(step)):
        notes.append("MASTER_ADDR: node 0's hostname; MASTER_PORT: a free port on node 0")
    env = engine.env(cfg)
    env_line = f"# environment of the engine tasks: {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())}\n" \
        if env else ""
    ranks = "\n".join(rank_lines(cfg, tasks, [engine.node_env_prefix(cfg, n) + engine.node_argv(cfg, n, rv)
                                             for n in range(cfg.layout.nodes)]))
    write("engine_ranks.sh",
          f"# The engine step started by the orchestrator's task on node 0 ({'; '.join(notes)}):\n{env_line}"
          f"{shlex.join(step)}\n\n# What each rank runs, with the environment srun gives it:\n{ranks}\n")
    cluster.render(cfg, paths, engine, write, out, rv)
    return written
