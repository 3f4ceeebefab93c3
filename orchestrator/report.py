"""summary.json: totals over every committed unit, timings of this attempt (every requeued segment
included), stats that add; and the summaries a run writes when it completes, is found complete, or fails."""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import fsops
from .commits import UnitStats, committed_rows, remaining_units, scan_committed
from .config import Config
from .errors import OrchestratorError, RunError
from .journal import remove_leftovers
from .plan import Plan
from .rundir import RunPaths, atomic_write_text, log_event
from .sinks import sink_for


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


def build_summary(paths: RunPaths, plan: Plan, attempt: str, started_at: float, extra: dict | None = None) -> dict:
    """total, committed, ok, failed, retryable, rows_this_attempt count result rows (answers: with
    sampling.rollouts = N, N per input row); prompts and answers count input rows and result rows committed;
    prompts_per_s is input rows (answers / N) per second of generation, answers_per_s result rows."""
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
        summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths))
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
        summary = build_summary(paths, plan, attempt, started_at, _summary_extra(cfg, paths))
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
