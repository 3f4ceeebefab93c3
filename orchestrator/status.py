"""`orchestrator status`: where a run stands, read from its directory alone.

Everything here reads files the run writes anyway (plan.json, the commit ledger, progress, the request
records under work/requests/, the engine metrics under work/metrics/, run.log, work/frontend.json) plus the
scheduler's view of the jobs, so it works while the run goes on and after it, from any machine that shares
the filesystem. The cost follows what is asked, not the run's size: totals come from the ledger, error texts
only from the units that have failed rows (two columns, each commit once: work/status-errors.json keeps what
they held), recent rates from the end of each request file.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from .clusters.base import ACTIVE_STATES, adapter_named
from .commits import UnitStats, committed_rows, error_reason, scan_committed
from .errors import RunError
from .instances import owner_replica
from .metrics import engine_summary, format_engine
from .plan import Plan
from .report import attempt_start, busy_seconds, gpu_settings_of, gpu_usage, log_events
from .rundir import RunPaths, atomic_write_text
from .sinks import sink_for, sink_of_file

WINDOW_S = 60.0  # what "recent" means for rates and the ETA
LOG_LINES = 8


def open_run(run_dir: str | Path) -> tuple[RunPaths, Plan]:
    """The run's paths and plan; a directory that holds no run is a one-line error naming the fix."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise RunError(f"{root} is not a directory; give the run_dir= of an `orchestrator run` (the directory "
                       f"that holds plan.json and results/)")
    paths = RunPaths(root.resolve())
    try:
        plan = Plan.from_json(paths.plan.read_text())
    except FileNotFoundError:
        raise RunError(f"{root} holds no run: {paths.plan.name} is missing. Give the run_dir= of an "
                       f"`orchestrator run` (the directory that holds plan.json and results/)") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RunError(f"{paths.plan} cannot be read as a run's plan ({exc}); is {root} a run directory of this "
                       f"version of the orchestrator?") from None
    return paths, plan


ERRORS_CACHE = "status-errors.json"  # under work/: each failed unit's error groups, read once per commit


def _commit_key(paths: RunPaths, unit: int, record: dict) -> list | None:
    """What tells one commit of a unit from another: its ledger record's size and time, else the file's."""
    if isinstance(record.get("bytes"), int) and isinstance(record.get("at"), (int, float)):
        return [record["bytes"], record["at"]]
    try:
        found = sink_for(paths).file(unit).stat()
    except OSError:
        return None
    return [found.st_size, found.st_mtime_ns]


def _unit_errors(path: Path) -> list[tuple[str | None, int]] | None:
    """A result file's error texts and how many rows have each (its status and error columns only)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        table = sink_of_file(path).read_file(path, columns=["status", "error"])
    except (OSError, pa.ArrowException):  # replaced or put aside since the listing: the next status sees it
        return None
    errors = pc.filter(table.column("error"), pc.equal(table.column("status"), "error"))
    return [(item["values"], item["counts"]) for item in pc.value_counts(errors).to_pylist()]


def _read_errors_cache(path: Path) -> tuple[list[str], list[str], dict]:
    try:
        found = json.loads(path.read_text())
        reasons, examples, units = found["reasons"], found["examples"], found["units"]
        if isinstance(reasons, list) and isinstance(examples, list) and len(examples) == len(reasons) \
                and isinstance(units, dict):
            return reasons, examples, units
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return [], [], {}


def _cached_entry(entry, key: list, known: int) -> bool:
    """A cache entry of this very commit, well formed: [key, [[reason index, rows], ...]]."""
    try:
        return entry[0] == key and all(0 <= i < known and isinstance(n, int) for i, n in entry[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return False


def _recorded_errors(record: dict) -> bool:
    """Whether a unit's commit grouped its failed rows itself (commits.error_summary): [[reason, example, rows]]."""
    groups = record.get("errors")
    try:
        return isinstance(groups, list) and all(isinstance(r, str) and isinstance(e, str) and isinstance(n, int)
                                                for r, e, n in groups)
    except (TypeError, ValueError):
        return False


def error_groups(paths: RunPaths, stats: dict[int, dict]) -> list[dict]:
    """Failed rows of the committed units grouped by reason, most frequent first. A commit records its
    unit's groups in its stats (commits.error_summary), so nothing is read for it. Only units whose commit
    counted failed rows without them (an older version's, or more than MAX_ERROR_GROUPS reasons) are read,
    and of those only the status and error columns, each commit once: what a unit's file held is kept in
    work/status-errors.json (when the run directory is writable), so a later status reads only the units
    committed since."""
    cache_path = paths.root / "work" / ERRORS_CACHE
    reasons, examples, cached = _read_errors_cache(cache_path)
    index = {reason: i for i, reason in enumerate(reasons)}
    counts: Counter = Counter()
    failing = []  # units whose failed rows were not grouped at their commit (an older version's): to read
    for unit in sorted(u for u, st in stats.items() if st.get("failed")):
        if not _recorded_errors(stats[unit]):
            failing.append(unit)
            continue
        for reason, example, rows in stats[unit]["errors"]:  # grouped at the commit: nothing to read
            if reason not in index:
                index[reason] = len(reasons)
                reasons.append(reason)
                examples.append(example)
            counts[index[reason]] += rows
    keys = {u: _commit_key(paths, u, stats[u]) for u in failing}
    misses = [u for u in failing if keys[u] is None or not _cached_entry(cached.get(str(u)), keys[u], len(reasons))]
    sink = sink_for(paths)
    files = [sink.file(u) for u in misses]
    if len(files) > 16:  # the reads wait on the filesystem and pyarrow lets go of the GIL: a few at once
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
            read = dict(zip(misses, pool.map(_unit_errors, files)))
    else:
        read = dict(zip(misses, map(_unit_errors, files)))
    kept: dict[str, list] = {}
    for unit in failing:
        if unit in read:
            if read[unit] is None:
                continue
            groups: Counter = Counter()
            for text, rows in read[unit]:
                reason = error_reason(text)
                if reason not in index:
                    index[reason] = len(reasons)
                    reasons.append(reason)
                    examples.append((text or "")[:300])
                groups[index[reason]] += rows
            entry = [keys[unit], [[i, n] for i, n in groups.items()]]
        else:
            entry = cached[str(unit)]
        if entry[0] is not None:
            kept[str(unit)] = entry
        for i, rows in entry[1]:
            counts[i] += rows
    if misses or len(kept) != len(cached):
        try:
            if cache_path.parent.is_dir():
                atomic_write_text(cache_path, json.dumps({"reasons": reasons, "examples": examples, "units": kept},
                                                         separators=(",", ":")))
        except (OSError, RunError):  # a run directory this user cannot write: the next status reads them again
            pass
    return [{"reason": reasons[i], "rows": n, "example": examples[i]} for i, n in counts.most_common()]


def read_requests(paths: RunPaths, since: float | None = None, chunk: int = 1 << 18) -> list[dict]:
    """The request records of every replica and attempt, in order of their end. With since, only those that
    ended after it, each file read from its end: the cost follows the window, not the run's length."""
    found: list[dict] = []
    folder = paths.requests
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        run_attempt = path.stem.rsplit("-", 1)[0]
        for record in _tail_records(path, since, chunk):
            if isinstance(record, dict) and isinstance(record.get("at"), (int, float)):
                if since is None or record["at"] >= since:
                    record.setdefault("run_attempt", run_attempt)
                    found.append(record)
    found.sort(key=lambda r: r["at"])
    return found


def _tail_records(path: Path, since: float | None, chunk: int) -> list:
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = 0 if since is None else max(0, size - chunk)
            while True:
                fh.seek(start)
                lines = fh.read(size - start).splitlines()
                if start > 0:
                    lines = lines[1:]  # the first line may be cut
                records = []
                for line in lines:
                    try:
                        records.append(json.loads(line))
                    except ValueError:  # a line being appended, or cut by a crash
                        continue
                first = next((r.get("at") for r in records if isinstance(r, dict)), None)
                if start == 0 or (isinstance(first, (int, float)) and first < since):
                    return records
                start = max(0, size - (size - start) * 4)
    except OSError:
        return []


def _rates(records: list[dict], start: float, end: float, rollouts: int = 1) -> dict:
    """rows: result rows (answers) the records settled; prompts_per_s counts input rows (answers / rollouts)."""
    rows = sum(r.get("ok", 0) + r.get("failed", 0) for r in records)
    tokens = sum(r.get("output_tokens") or 0 for r in records)
    span = end - start
    return {"window_s": round(span, 1), "rows": rows,
            "prompts_per_s": round(rows / rollouts / span, 3) if span > 0 else 0.0,
            "answers_per_s": round(rows / span, 3) if span > 0 else 0.0,
            "output_tokens_per_s": round(tokens / span, 3) if span > 0 else 0.0}


def _progress(paths: RunPaths) -> list[dict]:
    from .report import attempt_progress

    return attempt_progress(paths, None)


def read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def cluster_name(paths: RunPaths, frontend: dict) -> str:
    if frontend.get("cluster"):
        return str(frontend["cluster"])
    try:
        import yaml

        return str(yaml.safe_load((paths.root / "config.yaml").read_text())["cluster"]["name"])
    except Exception:  # noqa: BLE001 - an old or partial config: the jobs' states are then unknown
        return ""


def log_tail(paths: RunPaths, lines: int = LOG_LINES) -> list[str]:
    try:
        with open(paths.root / "run.log", "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 64 * 1024))
            return fh.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def submitted_jobs(paths: RunPaths, since: float | None) -> list[str]:
    """Job ids submitit recorded under logs/submitit/, in the order they were submitted (from since on)."""
    folder = paths.logs / "submitit"
    found = []
    for pkl in folder.glob("*/*_submitted.pkl") if folder.is_dir() else []:
        try:
            at = pkl.stat().st_mtime
        except OSError:
            continue
        if since is None or at >= since - 1:
            found.append((at, pkl.parent.name))
    return [job for _, job in sorted(found)]


def job_states(cluster: str, ids: list[str], host: str, paths: RunPaths) -> dict[str, str]:
    """Each job's state as the scheduler sees it now; UNKNOWN when that cannot be read from here."""
    return adapter_named(cluster).job_states(ids, host, paths) if ids else {}


def collect(run_dir: str | Path, now: float | None = None) -> dict:
    """Where the run stands: rows, errors by reason, rates, ETA, replicas and their jobs, timings, log tail."""
    paths, plan = open_run(run_dir)
    now = time.time() if now is None else now
    committed = scan_committed(paths, plan)
    total = committed.total
    done_rows = committed_rows(plan, committed.units)
    progress = _progress(paths)
    attempt = max((p["attempt"] for p in progress), default=None)
    frontend = read_json(paths.root / "work" / "frontend.json")
    since = attempt_start(attempt)
    try:
        front_end_started = time.mktime(time.strptime(str(frontend.get("started")), "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        front_end_started = None
    if front_end_started and (since is None or front_end_started > since + 1):
        attempt, since = None, front_end_started  # a newer start, whose replicas have not reported yet
    current = [p for p in progress if p["attempt"] == attempt]
    this_attempt = sum((UnitStats.of(p) for p in current), start=UnitStats())
    generate_s = busy_seconds([s for p in current for s in p.get("segments", [])])

    recent_records = [r for r in read_requests(paths, since=max(now - WINDOW_S, since or 0))
                      if attempt is None or r.get("run_attempt") == attempt]
    began = min((r["at"] - (r.get("latency_s") or 0) for r in recent_records), default=now)
    n = plan.rollouts
    recent = _rates(recent_records, max(now - WINDOW_S, began), now, n)
    overall = {"window_s": round(generate_s, 1), "rows": this_attempt.rows,
               "prompts_per_s": round(this_attempt.rows / n / generate_s, 3) if generate_s > 0 else 0.0,
               "answers_per_s": round(this_attempt.rows / generate_s, 3) if generate_s > 0 else 0.0,
               "output_tokens_per_s": round(this_attempt.output_tokens / generate_s, 3) if generate_s > 0 else 0.0}
    left = (plan.total_rows - done_rows) * n  # answers
    if not left:
        eta_s = 0.0
    else:  # unknown until requests are answered
        eta_s = round(left / recent["answers_per_s"], 1) if recent["answers_per_s"] > 0 else None

    cluster = cluster_name(paths, frontend)
    jobs = [str(j) for j in frontend.get("jobs", [])] or submitted_jobs(paths, since)
    states = job_states(cluster, jobs, str(frontend.get("host") or ""), paths)
    events = log_events(paths, since)
    replicas = _replicas(paths, jobs, states, current, events, recent_records)
    seen = {s.split()[0] for s in states.values()}
    state = "complete" if done_rows >= plan.total_rows else "running" if seen & ACTIVE_STATES else \
        "unknown" if "UNKNOWN" in seen else "stopped"
    summary = read_json(paths.root / "summary.json")
    # a replica with no end line in run.log whose job is not seen queued or running (killed without a word, or
    # its state unknown) is counted until its last sign of life (its progress record), not until now
    gone = {int(r["replica"][1:]): float(r.get("updated") or 0.0) for r in replicas
            if (str(r["state"]).split() or ["UNKNOWN"])[0] not in ACTIVE_STATES}
    gpu = gpu_usage(paths, gpu_settings_of(paths), attempt, this_attempt.output_tokens, current, now, gone,
                    events if attempt is not None else [])
    return {
        "run_dir": str(paths.root),
        "cluster": cluster,
        "state": state,
        "attempt": attempt,
        # total, committed, ok, failed: result rows (answers); prompts: input rows (each has `rollouts` answers)
        "rows": {"total": plan.total_answers, "committed": done_rows * n, "ok": total.ok, "failed": total.failed,
                 "retryable": total.retryable, "output_tokens": total.output_tokens,
                 "invalid_structured": total.invalid_structured, "schema_retries": total.schema_retries,
                 "failed_upstream": total.failed_upstream,
                 "units": len(plan.units), "units_done": len(committed.units),
                 "prompts": done_rows, "prompts_total": plan.total_rows, "answers": done_rows * n,
                 "answers_total": plan.total_answers, "rollouts": n},
        "errors": error_groups(paths, committed.stats),
        "damaged": committed.damaged,
        "rates": {"recent": recent, "overall": overall},
        "eta_s": eta_s,
        "jobs": [{"job": j, "state": states.get(j, "UNKNOWN")} for j in jobs],
        "replicas": replicas,
        # the newest engine metrics of each live replica, their totals, and whether the engine is starved
        "engine": engine_summary(paths.root, now, rows_left=done_rows < plan.total_rows),
        "log": log_tail(paths),
        "summary": summary or None,
        "gpu": gpu,  # GPU-hours by state and their cost, this attempt (report.gpu_usage; the fields of summary.json)
        "now": round(now, 3),
    }


def _replicas(paths: RunPaths, jobs: list[str], states: dict, progress: list[dict], events: list,
              recent: list[dict]) -> list[dict]:
    """Each replica of this attempt: its job and state, rows, and where its time went (queue wait: from
    submission to the job's first line in run.log; start-up: engine start to readiness; generation: first
    request to last commit of each segment)."""
    found: dict[int, dict] = {}

    def replica(n: int) -> dict:
        return found.setdefault(n, {"replica": f"r{n}", "job": jobs[n] if n < len(jobs) else None, "host": None,
                                    "started_at": None, "startup_s": 0.0, "ready": False, "last_event": None})

    starting: dict[int, float] = {}
    for at, n, job, host, message in events:
        r = replica(n)
        if job != "local":
            r["job"] = job
        r["host"] = host
        r["last_event"] = message
        if message.startswith(("starting the ", "connecting to the engine")):
            starting[n] = at
            r["started_at"] = r["started_at"] or at
        elif message.startswith("engine ready at") and n in starting:
            r["startup_s"] += at - starting.pop(n)
            r["ready"] = True
    segments: dict[int, list] = {}
    for record in progress:  # a replica of pinned instances has a record per instance (instances.py): summed
        n = owner_replica(str(record.get("owner", "")))
        if n is not None:
            r = replica(n)
            for k in ("rows", "ok", "failed", "output_tokens"):
                r[k] = r.get(k, 0) + record.get(k, 0)
            segments.setdefault(n, []).extend(record.get("segments", []))
            r["generation_s"] = round(busy_seconds(segments[n]), 1)
            r["updated"] = max(filter(None, (r.get("updated"), record.get("updated"))), default=None)
    for n in range(len(jobs)):
        replica(n)
    per_owner = Counter()
    for record in recent:
        n = owner_replica(str(record.get("replica", "")))
        per_owner[f"r{n}" if n is not None else record.get("replica")] += record.get("ok", 0) + record.get("failed", 0)
    out = []
    for n in sorted(found):
        r = found[n]
        r["state"] = states.get(r["job"], "UNKNOWN") if r["job"] else "UNKNOWN"
        submitted = _submitted_at(paths, r["job"])
        r["queue_wait_s"] = round(r["started_at"] - submitted, 1) if r["started_at"] and submitted else None
        r["startup_s"] = round(r["startup_s"], 1) if r["ready"] else None
        r["recent_rows"] = per_owner.get(r["replica"], 0)
        out.append(r)
    return out


def _submitted_at(paths: RunPaths, job: str | None) -> float | None:
    try:
        return (paths.logs / "submitit" / job / f"{job}_submitted.pkl").stat().st_mtime if job else None
    except OSError:
        return None


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_status(s: dict) -> str:
    """The status as a few lines for a terminal."""
    rows = s["rows"]
    share = 100.0 * rows["committed"] / rows["total"] if rows["total"] else 100.0
    lines = [f"run:        {s['run_dir']}" + (f" (cluster={s['cluster']})" if s["cluster"] else ""),
             f"state:      {s['state']}" + ("; rerun the same command to resume" if s["state"] == "stopped" else ""),
             f"rows:       {rows['committed']}/{rows['total']} committed ({share:.1f}%), {rows['ok']} ok, "
             f"{rows['failed']} failed; {rows['units_done']}/{rows['units']} units"]
    if rows.get("rollouts", 1) > 1:  # several answers per prompt: rows are answers
        lines[-1] = (f"answers:    {rows['committed']}/{rows['total']} committed ({share:.1f}%), {rows['ok']} ok, "
                     f"{rows['failed']} failed; {rows['units_done']}/{rows['units']} units")
        lines.append(f"prompts:    {rows['prompts']}/{rows['prompts_total']} committed, "
                     f"{rows['rollouts']} answers each (sampling.rollouts)")
    if rows.get("invalid_structured") or rows.get("schema_retries"):  # structured answers (sampling.json_schema)
        lines.append(f"schema:     {rows['schema_retries']} re-ask(s) of answers that did not match their schema, "
                     f"{rows['invalid_structured']} row(s) InvalidStructuredOutput")
    if rows.get("failed_upstream"):  # data.follow: rows that failed in the run followed
        lines.append(f"upstream:   {rows['failed_upstream']} row(s) failed in the run this one follows, not sent "
                     f"(FailedUpstream)")
    if s["errors"]:
        lines.append(f"errors:     {rows['failed']} row(s) in {len(s['errors'])} group(s):")
        width = max(len(str(e["rows"])) for e in s["errors"])
        lines += [f"            {e['rows']:>{width}}  {e['reason']}" for e in s["errors"][:10]]
        if len(s["errors"]) > 10:
            lines.append(f"            ... and {len(s['errors']) - 10} more group(s) (--json lists them all)")
    for damaged in s["damaged"]:
        lines.append(f"damaged:    {damaged}")
    recent, overall = s["rates"]["recent"], s["rates"]["overall"]
    answers = (lambda rate: f" ({rate['answers_per_s']:.1f} answers/s)") if rows.get("rollouts", 1) > 1 else \
        (lambda rate: "")
    lines.append(f"rate:       recent {recent['prompts_per_s']:.1f} prompts/s{answers(recent)}, "
                 f"{recent['output_tokens_per_s']:.1f} output tokens/s (last {recent['window_s']:.0f} s)"
                 if recent["rows"]
                 else f"rate:       recent: no request answered in the last {WINDOW_S:.0f} s")
    lines.append(f"            overall {overall['prompts_per_s']:.1f} prompts/s{answers(overall)}, "
                 f"{overall['output_tokens_per_s']:.1f} output tokens/s over {_duration(overall['window_s'])} of "
                 f"generation (this attempt)")
    if s["state"] != "complete":
        lines.append(f"eta:        {_duration(s['eta_s'])} at the recent rate" if s["eta_s"] is not None
                     else "eta:        unknown until requests are answered")
    lines.extend(gpu_lines(s.get("gpu") or {}))
    if s.get("engine"):  # work/metrics/: the engines' own view (client.metrics_interval_s)
        lines += format_engine(s["engine"])
    if s["replicas"]:
        lines.append("replicas:")
        for r in s["replicas"]:
            times = ", ".join(f"{what} {_duration(r.get(key))}" for what, key in (
                ("queue wait", "queue_wait_s"), ("start-up", "startup_s"), ("generating", "generation_s"))
                if r.get(key) is not None)
            done = f"{r['rows']} rows ({r['ok']} ok, {r['failed']} failed)" if "rows" in r else "no rows yet"
            lines.append(f"  {r['replica']}  job {r['job'] or '?'}  {r['state']}"
                         + (f" on {r['host']}" if r["host"] else "") + f"; {done}" + (f"; {times}" if times else ""))
    if s["log"]:
        lines.append(f"run.log (last {len(s['log'])} lines):")
        lines += [f"  {line}" for line in s["log"]]
    return "\n".join(lines)


def _number(value: float) -> str:
    """A GPU-hour figure for the terminal: three significant digits, no exponent for small runs' hours."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}" if value >= 0.001 else f"{value:.2g}"


def gpu_lines(gpu: dict) -> list[str]:
    """The cost line: GPU-hours by state, GPU-hours per million output tokens, and the cost when
    cluster.gpu_hour_cost is set (report.gpu_usage's fields)."""
    if gpu.get("gpu_hours_basis") == "endpoint":
        return ["gpu-hours:  not counted: engine=endpoint sends to a server this run did not start, whose GPUs "
                "are not this run's"]
    if gpu.get("gpu_hours") is None:
        return []
    states = gpu["gpu_hours_by_state"]
    line = (f"gpu-hours:  {_number(gpu['gpu_hours'])} (startup {_number(states['startup'])}, generating "
            f"{_number(states['generating'])}, idle {_number(states['idle'])}) on {gpu['gpus']} GPU(s)")
    per_million = gpu.get("gpu_hours_per_million_output_tokens")
    line += f"; {_number(per_million)} GPU-h per million output tokens" if per_million is not None else \
        "; no output tokens yet"
    cost = gpu.get("cost")
    if cost:
        line += f"; cost {cost['total']:.2f}" if cost["total"] >= 1 else f"; cost {cost['total']:.3g}"
    if gpu.get("gpu_hours_basis") == "simulated":
        line += " (engine=mock: the layout's GPUs, simulated)"
    return [line]
