"""The front-end: plan and submit one job per replica through submitit, follow their progress until they
end, and stop them on Ctrl-C or a stop signal. The local and Slurm paths run the same job code and differ
only in the executor."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from .clusters.base import cluster_for, submitit_folder
from .commits import committed_rows, done_units, remaining_units, retried_units, scan_committed, write_retry_units
from .config import Config
from .engines.base import adapter_for
from .errors import RunError
from .node import NodeJob
from .plan import Plan
from .preflight import prepare
from .report import (
    _failed_summary,
    _kept_summary,
    _summary_extra,
    build_summary,
    incomplete_error,
    one_line,
    write_summary,
)
from .rundir import RunPaths, log_event
from .runlock import RunLock

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "FINISHED", "INTERRUPTED"}


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
            cluster.stop(pending, cfg)
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


@contextlib.contextmanager
def _signals_ignored(stop_signals: dict):
    """Ctrl-C and the stop signals are ignored inside (in the main thread: elsewhere none reach us)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, *stop_signals)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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


def run(cfg: Config, show_progress: bool = True, stop: threading.Event | None = None) -> dict:
    """Plan, submit one job per replica through submitit, follow progress until they end (wait=true). stop: set
    from another thread (a pipeline's front-end) to stop the run as Ctrl-C does."""
    sub = submit(cfg, stop=stop)
    outcome = None
    try:
        if sub.summary is not None:
            outcome = sub.summary
        elif not cfg.wait:
            outcome = report_submitted(sub)
        else:
            outcome = follow(sub, show_progress, stop=stop)
        return outcome
    finally:
        sub.release(outcome)


def submit(cfg: Config, defer: bool = False, stop: threading.Event | None = None) -> Submission:
    """Everything up to the submitted jobs: checks, plan, the run_dir's lock, one job per replica
    (defer: all but the jobs, which submit_jobs() submits with other runs'; stop: ends a data.follow wait)."""
    started_at = time.time()
    plan, paths = prepare(cfg, stop=stop)
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
        if not summary["complete"]:  # never a success with rows missing
            raise incomplete_error(paths, plan, summary)
        print(f"nothing left to do\nresults: {paths.results}\nsummary: {one_line(summary)}")
        sub.summary = summary
        return sub
    sub.replicas = cluster_for(cfg).replicas(cfg, adapter_for(cfg))
    return sub


_LOCAL_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO)


def _submit_failure(exc: BaseException, folder: RunPaths) -> tuple[str, str]:
    """Why a submission failed and the fix that fits: a file that could not be written here (a full disk or
    quota, a read-only or foreign directory: waiting for the cluster would not help) names that file; anything
    else is the cluster refusing, and the same command is to be rerun once it accepts jobs."""
    if isinstance(exc, OSError) and exc.errno in _LOCAL_WRITE:
        where = exc.filename or submitit_folder(folder)
        return (f"writing {where} failed: {exc.strerror or exc} (the job's files go under "
                f"{submitit_folder(folder)})", f"free space or quota there, or make {folder.root} writable, then "
                f"rerun the same command")
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return reason, "rerun the same command once the cluster accepts jobs"


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
        cluster.stop(submitted, group[0].cfg)
        done = f"; cancelled the {len(submitted)} job(s) already submitted " \
               f"({', '.join(str(j.job_id) for j in submitted)})" if submitted else ""
        what = f"a job array of {len(pending)} jobs" if len(pending) > 1 and cluster.array_key(group[0].cfg) \
            else f"replica {len(jobs)} of {len(pending)}"
        reason, fix = _submit_failure(exc, folder)
        raise RunError(f"submitting {what} failed: {reason}{done}. Nothing was committed by them; {fix}") from None
    for (sub, _), job in zip(pending, jobs):
        sub.jobs.append(job)
    for sub in group:
        sub.lock.jobs([str(job.job_id) for job in sub.jobs])


def follow(sub: Submission, show_progress: bool = True, stop: threading.Event | None = None) -> dict:
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
        def tick_or_stop() -> None:
            tick()
            if stop is not None and stop.is_set():
                raise FrontEndStopped("the pipeline stopping")

        left = wait_for_jobs(jobs, cfg, tick_or_stop, lambda: remaining_units(paths, plan, attempt) == 0)
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
        print(f"interrupted by {why}: stopping job(s) {ids} (they commit what finished within "
              f"client.grace_s={cfg.client.grace_s:g} s)", flush=True)
        log_event(paths, f"front-end: interrupted by {why}; stopping job(s) {ids}")
        with _signals_ignored(stop_signals):  # a second signal must not cut the stop short
            alive = cluster.stop(jobs, cfg)
        ended = (f"job(s) {' '.join(str(j.job_id) for j in alive)} did not end even after SIGKILL (stuck in the "
                 f"kernel?): check them with `orchestrator status {paths.root}`; the others were cancelled"
                 if alive else f"cancelled job(s) {ids}")
        message = (f"interrupted by {why}: {ended}; what they committed is kept "
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
    if cfg.output.format == "openai_batch" and summary["complete"]:  # the Batch API's own two files
        print(f"batch output: {paths.root / 'output.jsonl'}; errors: {paths.root / 'errors.jsonl'}")
    print(f"summary: {one_line(summary)}")
    if not summary["complete"]:
        raise incomplete_error(paths, plan, summary)
    return summary
