"""summary.json: totals over every committed unit, timings of this attempt (every requeued segment
included), stats that add, GPU-hours and their cost (gpu_usage); and the summaries a run writes when it
completes, is found complete, or fails."""
from __future__ import annotations

import importlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from . import fsops
from .commits import UnitStats, committed_rows, remaining_units, scan_committed
from .config import Config
from .errors import OrchestratorError, RunError
from .instances import owner_replica
from .journal import remove_leftovers
from .plan import Plan
from .rundir import RunPaths, atomic_write_text, log_event
from .sinks import sink_for

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) replica (\d+) \(job ([^,]+), host ([^)]*)\): (.*)$")


def attempt_start(attempt: str | None) -> float | None:
    """When an attempt began, from its id (YYYYmmdd-HHMMSS-...)."""
    try:
        return time.mktime(time.strptime(attempt[:15], "%Y%m%d-%H%M%S")) if attempt else None
    except ValueError:
        return None


def log_events(paths: RunPaths, since: float | None = None) -> list[tuple[float, int, str, str, str]]:
    """run.log's replica lines: (time, replica, job, host, message), from since on."""
    try:
        text = (paths.root / "run.log").read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
        if since is None or at >= since - 1:  # run.log has whole seconds
            events.append((at, int(m.group(2)), m.group(3), m.group(4), m.group(5)))
    return events


def attempt_progress(paths: RunPaths, attempt: str | None) -> list[dict]:
    """Each replica's totals in this attempt (None: in whichever attempt it last ran), as its client last
    wrote them (all its segments)."""
    found = []
    for path in sorted(paths.progress.glob("*.json")) if paths.progress.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("attempt"), str) \
                and (attempt is None or record["attempt"] == attempt):
            found.append(record)
    return found


def busy_seconds(segments: list) -> float:
    """Length of the union of [start, end] intervals: time when at least one replica was generating."""
    total, reach = 0.0, None
    for start, end in sorted(s for s in segments if s and s[0] and s[1] and s[1] >= s[0]):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


GPU_STATES = ("startup", "generating", "idle")
_LAUNCH = ("starting the ", "connecting to the engine")  # run.log: node.py's line before the engine starts
_READY = "engine ready at"
_END = ("finished", "failed", "stopped", "nothing left to do")


@dataclass(frozen=True)
class GpuSettings:
    """What GPU-hours are counted with: the GPUs one replica holds (layout.nodes x layout.gpus_per_node, 0
    for engine=endpoint), what they are (`basis`) and cluster.gpu_hour_cost (None: no cost).

    basis: `layout` (an engine this run starts holds the layout's GPUs), `simulated` (engine=mock: the
    embedded engine runs the layout's ranks on CPUs; its GPU-hours are those the layout would hold for that
    time, to try the accounting out, not GPUs anyone held) or `endpoint` (engine=endpoint: a server this run
    did not start, whose GPUs are not this run's to count: no GPU-hours, no cost)."""

    engine: str
    gpus_per_replica: int
    basis: str
    price: float | None = None


def gpu_settings(cfg: Config) -> GpuSettings:
    return _gpu_settings(cfg.engine.name, cfg.layout.nodes * cfg.layout.gpus_per_node, cfg.cluster.gpu_hour_cost)


def gpu_settings_of(paths: RunPaths) -> GpuSettings | None:
    """The run directory's own settings, from its config.yaml (the latest submission's); None without one."""
    import yaml

    try:
        found = yaml.safe_load((paths.root / "config.yaml").read_text()) or {}
        layout, price = found.get("layout") or {}, (found.get("cluster") or {}).get("gpu_hour_cost")
        gpus = int(layout.get("nodes", 1)) * int(layout.get("gpus_per_node", 1))
        return _gpu_settings(str((found.get("engine") or {}).get("name", "")), gpus,
                             float(price) if price is not None else None)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None


def _gpu_settings(engine: str, gpus: int, price: float | None) -> GpuSettings:
    try:
        adapter = importlib.import_module(f"{__package__}.engines.{engine}").ADAPTER
    except (ImportError, AttributeError, ValueError):  # an engine of another version: counted as one that starts
        adapter = None
    if adapter is not None and not adapter.starts_process:
        return GpuSettings(engine, 0, "endpoint", price)
    return GpuSettings(engine, gpus, "simulated" if adapter is not None and adapter.simulated else "layout", price)


def replica_windows(events: list, segments: dict[int, list], open_end: dict[int, float], now: float) -> dict:
    """Each replica's engine windows in one attempt, from run.log's replica lines (`events`, as
    report.log_events gives them) and its progress record's generation segments: one window per job segment
    (a requeued job has several), [launch, ready, end] in Unix time, and the seconds of each state.

    - launch: node.py's "starting the <engine> engine" line, written just before the engine's processes are
      asked for ("connecting to the engine" for engine=endpoint);
    - ready: its "engine ready at" line, once a one-token generation has been answered (none: the engine
      never got ready, and the whole window is start-up);
    - end: its "finished", "failed" or "stopped" line, written once the engine's processes have stopped, or
      the last commit of the segment when that is later. A window with no end line ends at open_end[replica]
      (default `now`) when it is the replica's last, else at its last commit or readiness, whichever is later:
      the next launch shows it ended, but not when.

    run.log has whole seconds, so launch, ready and the end line are each up to a second early; the
    generation segments ([first request, last commit]) have the client's clock. The states never overlap:
    startup = ready - launch; generating = the segments' time within [ready, end]; idle = the rest of
    [launch, end] (between readiness and the first request, waiting for claims, the tail once no unit is
    left while others finish theirs, and the engine's shut-down)."""
    found: dict[int, list[dict]] = {}
    for at, n, _job, _host, message in events:
        windows = found.setdefault(n, [])
        last = windows[-1] if windows and windows[-1]["end"] is None else None
        if message.startswith(_LAUNCH):
            windows.append({"launch": at, "ready": None, "end": None})
        elif last is not None and message.startswith(_READY) and last["ready"] is None:
            last["ready"] = at
        elif last is not None and message.startswith(_END):
            last["end"] = at
    for n, windows in found.items():
        for i, w in enumerate(windows):
            until = windows[i + 1]["launch"] if i + 1 < len(windows) else float("inf")
            mine = _union([s for s in segments.get(n, []) if w["launch"] <= s[0] < until])  # instances overlap
            floor = max([w["ready"] or w["launch"]] + [s[1] for s in mine])
            if w["end"] is None:
                w["end"] = open_end.get(n, now) if i + 1 == len(windows) else floor
            w["end"] = max(w["end"], floor)
            start = w["ready"] if w["ready"] is not None else w["end"]
            generating = sum(max(0.0, min(e, w["end"]) - max(s, start)) for s, e in mine)
            startup = start - w["launch"]
            w.update(startup_s=startup, generating_s=generating,
                     idle_s=max(0.0, w["end"] - w["launch"] - startup - generating))
    return found


def _union(segments: list) -> list[tuple[float, float]]:
    """[start, end] intervals merged where they overlap, in order."""
    merged: list[list[float]] = []
    for start, end in sorted((s[0], s[1]) for s in segments):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _significant(x: float) -> float:
    """x rounded to 6 significant digits: a short run's GPU-hours are small, and rounding them to a fixed
    number of decimals put a 1e-4 relative error between total and gpu_hours x price."""
    return float(f"{x:.6g}")


def gpu_usage(paths: RunPaths, settings: GpuSettings | None, attempt: str | None, output_tokens: int,
              progress: list[dict] | None = None, now: float | None = None,
              open_end: dict[int, float] | None = None, events: list | None = None) -> dict:
    """summary.json's and status's GPU fields for one attempt: every replica that started its engine holds
    settings.gpus_per_replica GPUs from its engine's launch to its end, split into start-up, generating and
    idle as replica_windows measures them (queue wait is not counted: no GPU is held then; nor the job's own
    set-up before the launch line). gpu_hours = the sum over replicas and job segments of (end - launch) x
    GPUs per replica, in hours, and gpu_hours_by_state adds up to it (each is rounded to 6 significant digits).
    output_tokens are this attempt's (what these GPU-hours produced); output_tokens_per_gpu_hour and
    gpu_hours_per_million_output_tokens are null without any; `cost` (only when cluster.gpu_hour_cost is
    set): total = gpu_hours x price, per_million_output_tokens = gpu_hours_per_million_output_tokens x price.
    engine=endpoint: gpus 0 and the rest null (the server's GPUs are not this run's); engine=mock:
    gpu_hours_basis `simulated` (see GpuSettings). `events`: run.log's replica lines of the attempt, when
    already read (log_events); open_end: see replica_windows."""

    now = time.time() if now is None else now
    if settings is None:
        return {"gpus": None, "gpu_hours": None}
    progress = attempt_progress(paths, attempt) if progress is None else progress
    segments: dict[int, list] = {}  # per replica: its pinned instances' segments together (instances.py)
    for record in progress:
        n = owner_replica(str(record.get("owner", "")))
        if n is not None:
            segments.setdefault(n, []).extend(s for s in record.get("segments", []) if s and s[0] and s[1])
    if events is None:  # run.log's replica lines of this attempt
        since = attempt_start(attempt)
        events = log_events(paths, since) if since is not None else []
    windows = replica_windows(events, segments, open_end or {}, now)
    ran = sorted(n for n, w in windows.items() if w)
    usage: dict = {"gpus": settings.gpus_per_replica * len(ran), "gpus_per_replica": settings.gpus_per_replica,
                   "replicas_with_gpus": len(ran), "gpu_hours_basis": settings.basis,
                   "output_tokens_this_attempt": output_tokens}
    if settings.basis == "endpoint":
        usage.update(gpus=0, gpus_per_replica=0, gpu_hours=None, gpu_hours_by_state=None,
                     output_tokens_per_gpu_hour=None, gpu_hours_per_million_output_tokens=None)
        if settings.price is not None:
            usage["cost"] = None
        return usage
    seconds = {state: sum(w[f"{state}_s"] for n in ran for w in windows[n]) for state in GPU_STATES}
    hours = sum(seconds.values()) * settings.gpus_per_replica / 3600
    per_million = hours / output_tokens * 1e6 if output_tokens else None
    usage.update(gpu_hours=_significant(hours),
                 gpu_hours_by_state={state: _significant(seconds[state] * settings.gpus_per_replica / 3600)
                                     for state in GPU_STATES},
                 output_tokens_per_gpu_hour=round(output_tokens / hours, 3) if output_tokens and hours else None,
                 gpu_hours_per_million_output_tokens=_significant(per_million) if per_million is not None else None)
    if settings.price is not None:
        usage["cost"] = {"gpu_hour_cost": settings.price, "total": _significant(hours * settings.price),
                         "per_million_output_tokens": _significant(per_million * settings.price)
                         if per_million is not None else None}
    return usage


def build_summary(paths: RunPaths, plan: Plan, attempt: str, started_at: float, extra: dict | None = None,
                  gpu: GpuSettings | None = None) -> dict:
    """total, committed, ok, failed, retryable, rows_this_attempt count result rows (answers: with
    sampling.rollouts = N, N per input row); prompts and answers count input rows and result rows committed;
    prompts_per_s is input rows (answers / N) per second of generation, answers_per_s result rows.
    The GPU fields are gpu_usage's, with `gpu` or else the run directory's config.yaml."""
    committed = scan_committed(paths, plan, verify=False)  # the ledger's totals: no stat per unit
    total = committed.total
    replicas = attempt_progress(paths, attempt)
    this_attempt = sum((UnitStats.of(r) for r in replicas), start=UnitStats())
    generate_s = busy_seconds([s for r in replicas for s in r.get("segments", [])])
    n = plan.rollouts
    summary = {
        "total": plan.total_answers,
        "ok": total.ok,
        "failed": total.failed,
        "retryable": total.retryable,
        # structured answers: rows whose answer never matched its schema, and the re-asks taken
        "invalid_structured": total.invalid_structured,
        "schema_retries": total.schema_retries,
        "failed_upstream": total.failed_upstream,  # data.follow: rows that failed in the run followed, not sent
        "committed": total.rows,
        "complete": total.rows == plan.total_answers,
        "prompts": committed_rows(plan, committed.units),  # input rows whose answers are all committed
        "answers": total.rows,  # result rows committed: prompts x rollouts
        "rollouts": n,
        "units": len(plan.units),
        "units_done": total.units,
        "output_tokens": total.output_tokens,
        "duration_s": round(time.time() - started_at, 3),
        "generate_s": round(generate_s, 3),
        "rows_this_attempt": this_attempt.rows,
        "resumed_units": max(0, total.units - this_attempt.units),
        "prompts_per_s": round(this_attempt.rows / n / generate_s, 3) if generate_s > 0 else 0.0,
        "answers_per_s": round(this_attempt.rows / generate_s, 3) if generate_s > 0 else 0.0,
        "output_tokens_per_s": round(this_attempt.output_tokens / generate_s, 3) if generate_s > 0 else 0.0,
        "backup_copies": sum(r.get("backup_copies", 0) for r in replicas),  # units run again for a straggler
        "discarded_rows": sum(r.get("discarded_rows", 0) for r in replicas),  # answered by a copy that lost
        # kept through a crash or stop, not asked again
        "journal_rows": sum(r.get("journal_rows", 0) for r in replicas),
        "attempt": attempt,
    }
    summary.update(gpu_usage(paths, gpu or gpu_settings_of(paths), attempt, this_attempt.output_tokens, replicas))
    summary.update(extra or {})
    return summary


def write_summary(paths: RunPaths, summary: dict) -> Path:
    path = paths.root / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path


def one_line(summary: dict) -> str:
    if summary.get("rollouts", 1) > 1:  # several answers per prompt: both counts
        line = (f"{summary['ok']}/{summary['total']} answers ok ({summary['prompts']} prompts x {summary['rollouts']} "
                f"rollouts), {summary['failed']} failed, {summary['prompts_per_s']:.1f} prompts/s, "
                f"{summary['answers_per_s']:.1f} answers/s, {summary['output_tokens_per_s']:.1f} output tokens/s, "
                f"{summary['duration_s']:.1f} s in all")
    else:
        line = (f"{summary['ok']}/{summary['total']} ok, {summary['failed']} failed, "
                f"{summary['prompts_per_s']:.1f} prompts/s, {summary['output_tokens_per_s']:.1f} output tokens/s, "
                f"{summary['duration_s']:.1f} s in all")
    if summary.get("failed_upstream"):
        line += f" ({summary['failed_upstream']} of them failed upstream, not sent)"
    if summary.get("retryable"):
        line += (f"; {summary['retryable']} failed row(s) were the engine's fault (5xx, timeouts, malformed answers): "
                 f"rerun with retry_failed=true to redo the failed rows")
    return line


def _final_summary(cfg: Config, paths: RunPaths, plan: Plan, attempt: str, started_at: float, owner: str) -> dict:
    """summary.json once the run is complete, written by the first replica to see that (one summary per
    attempt, not one per replica: each reads every unit's ledger record). Others return their own totals."""
    if remaining_units(paths, plan, attempt) == 0 and \
            fsops.create_exclusive(paths.root / "work" / f"summary-{attempt}.by", owner):
        summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths), gpu_settings(cfg))
        write_summary(paths, summary)
        sink_for(paths).finish()  # output.format=openai_batch: output.jsonl and errors.jsonl
        removed = remove_leftovers(paths)
        left = f"; removed {removed} journal(s) left by stopped copies" if removed else ""
        log_event(paths, f"{owner}: run complete, {summary['committed']}/{summary['total']} rows committed; "
                         f"summary.json written{left}")
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
        summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths), gpu_settings(cfg))
        summary["error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
        write_summary(paths, summary)
    except (OSError, OrchestratorError):  # the failure itself may be a full disk: the error is what matters
        pass


def incomplete_error(paths: RunPaths, plan: Plan, summary: dict) -> RunError:
    """Why a run that ended with complete: false did not succeed: which units (and rows) have no trusted
    result, and what to do."""
    have = scan_committed(paths, plan, verify=False).units
    missing = [u for u in range(len(plan.units)) if u not in have]
    rows = sum(plan.unit_answers(u) for u in missing)
    shown = ", ".join(str(u) for u in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    units = f"; unit(s) {shown} ({rows} rows) have no committed result" if missing else ""
    if plan.follow:  # data.follow: units the run followed has not committed cannot be done here
        from .follow import Upstream

        upstream = Upstream(plan.follow)
        absent = [u for u in missing if u not in upstream.committed()]
        if absent:
            return RunError(f"run_dir {paths.root} is incomplete: {summary['committed']}/{summary['total']} rows "
                            f"committed{units}, {len(absent)} of them because the run it follows, {plan.follow}, "
                            f"ended without committing them. Rerun that run to resume it, with this one (or after "
                            f"it): the missing units are done as they come")
    return RunError(f"run_dir {paths.root} is incomplete: {summary['committed']}/{summary['total']} rows committed"
                    f"{units}. Rerun the same command to resume: the missing units are redone")


def _summary_extra(cfg: Config, paths: RunPaths) -> dict:
    return {"model": cfg.model.name, "engine": cfg.engine.name, "cluster": cfg.cluster.name,
            "replicas": cfg.replicas, "run_dir": str(paths.root)}
