"""summary.json: totals over every committed unit, timings of this attempt, stats that add."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .work import Plan, RunPaths, UnitStats, atomic_write_text, committed_stats


def write_replica_stats(paths: RunPaths, attempt: str, owner: str, stats: dict) -> None:
    folder = paths.root / "work" / "stats" / attempt
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{owner}.json", json.dumps(stats))


def read_replica_stats(paths: RunPaths, attempt: str) -> list[dict]:
    folder = paths.root / "work" / "stats" / attempt
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def build_summary(paths: RunPaths, plan: Plan, attempt: str, started_at: float, extra: dict | None = None) -> dict:
    total = committed_stats(paths)
    replicas = read_replica_stats(paths, attempt)
    this_attempt = sum((UnitStats(**r["rows"]) for r in replicas), start=UnitStats())
    starts = [r["first_request_at"] for r in replicas if r.get("first_request_at")]
    ends = [r["last_commit_at"] for r in replicas if r.get("last_commit_at")]
    generate_s = max(ends) - min(starts) if starts and ends else 0.0
    summary = {
        "total": plan.total_rows,
        "ok": total.ok,
        "failed": total.failed,
        "committed": total.rows,
        "complete": total.rows == plan.total_rows,
        "units": len(plan.units),
        "units_done": total.units,
        "output_tokens": total.output_tokens,
        "duration_s": round(time.time() - started_at, 3),
        "generate_s": round(generate_s, 3),
        "rows_this_attempt": this_attempt.rows,
        "resumed_units": total.units - this_attempt.units,
        "prompts_per_s": round(this_attempt.rows / generate_s, 3) if generate_s > 0 else 0.0,
        "output_tokens_per_s": round(this_attempt.output_tokens / generate_s, 3) if generate_s > 0 else 0.0,
        "attempt": attempt,
    }
    summary.update(extra or {})
    return summary


def write_summary(paths: RunPaths, summary: dict) -> Path:
    path = paths.root / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path


def one_line(summary: dict) -> str:
    return (f"{summary['ok']}/{summary['total']} ok, {summary['failed']} failed, "
            f"{summary['prompts_per_s']:.1f} prompts/s, {summary['output_tokens_per_s']:.1f} output tokens/s, "
            f"{summary['duration_s']:.1f} s in all")
