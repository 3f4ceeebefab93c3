"""Sweeps: `orchestrator run -m key=a,b other=x,y` submits every member at once, then follows them.

Hydra expands the sweep and calls the run command once per member; each call only submits (checks,
plan, lock, jobs) and returns, so every member's jobs run at the same time. Each member's run_dir is
`<hydra.sweep.dir>/<its swept overrides>` (Hydra's override_dirname of the swept keys), so rerunning
the same sweep with the same `hydra.sweep.dir` skips finished members and resumes the others. The
sweep directory holds `sweep.json` (members, overrides, run dirs); the table at the end, and
`orchestrator status SWEEP_DIR`, show each member's state.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import OrchestratorError, RunError

SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(")


def swept_keys(args: list[str]) -> list[str]:
    """The keys an override list sweeps over (a top-level comma, or a sweep function)."""
    keys = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        depth, quote, top_comma = 0, "", False
        for ch in value:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch in "[({":
                depth += 1
            elif ch in "])}":
                depth -= 1
            elif ch == "," and depth == 0:
                top_comma = True
        if top_comma or value.startswith(SWEEP_FUNCTIONS):
            keys.append(key.lstrip("+~"))
    return keys


def sweep_overrides(args: list[str]) -> list[str]:
    """Hydra overrides naming each member's directory after its swept keys only."""
    if any(a.split("=", 1)[0].lstrip("+~") == "run_dir" for a in args):
        raise RunError("run_dir= is one directory, and a sweep has many: give the sweep's directory as "
                       "hydra.sweep.dir=DIR (each member's run_dir is DIR/<its swept overrides>)")
    swept = set(swept_keys(args))
    others = sorted({a.split("=", 1)[0].lstrip("+~") for a in args
                     if "=" in a and not a.startswith("-") and a.split("=", 1)[0].lstrip("+~") not in swept})
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(others)}]"] if others else []


class Sweep:
    """The members of one sweep, submitted one after another and followed together."""

    def __init__(self) -> None:
        self.members: list[dict] = []
        self.dir: Path | None = None

    def add(self, cfg, name: str, overrides: list[str], sweep_dir: str) -> None:
        from .frontend import submit

        self.dir = Path(sweep_dir).resolve()
        member = {"name": name or "(no overrides)", "overrides": list(overrides), "run_dir": cfg.run_dir,
                  "submission": None, "error": None, "cfg": cfg}
        print(f"sweep member {name or '(no overrides)'}: {cfg.run_dir}", flush=True)
        try:
            member["submission"] = submit(cfg, defer=True)  # the jobs go in together, at finish()
        except OrchestratorError as exc:
            member["error"] = str(exc)
            print(f"error: sweep member {name}: {exc}", file=sys.stderr, flush=True)
        self.members.append(member)
        self._write()

    def _write(self) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        record = [{"name": m["name"], "overrides": m["overrides"], "run_dir": m["run_dir"],
                   "jobs": [str(j.job_id) for j in m["submission"].jobs] if m["submission"] else [],
                   "error": m["error"]} for m in self.members]
        from .rundir import atomic_write_text

        atomic_write_text(self.dir / "sweep.json", json.dumps({"members": record}, indent=1) + "\n")

    def finish(self, wait: bool) -> int:
        """Follow every member (wait=true) or report their jobs; print the table; the exit status."""
        from .frontend import Interrupted, follow, report_submitted, submit_jobs
        from .rundir import RunPaths

        pending = [m for m in self.members if m["submission"] is not None and m["submission"].summary is None]
        try:
            submit_jobs([m["submission"] for m in pending], RunPaths(self.dir))
        except OrchestratorError as exc:  # the array was refused: no member's jobs went in
            for member in pending:
                member["error"] = str(exc).splitlines()[0]
                member["submission"].release(None)
                member["submission"] = None
            print(f"error: {exc}", file=sys.stderr, flush=True)
        self._write()
        try:
            for i, member in enumerate(self.members):
                sub = member["submission"]
                if sub is None or sub.summary is not None:
                    continue
                if not wait:
                    report_submitted(sub)
                    continue
                try:
                    follow(sub, show_progress=False)
                except Interrupted:
                    for other in self.members[i + 1:]:
                        if other["submission"] is not None:
                            for job in other["submission"].jobs:
                                job.cancel(check=False)
                    raise
                except OrchestratorError as exc:
                    member["error"] = str(exc).splitlines()[0]
        finally:
            for member in self.members:
                if member["submission"] is not None:
                    member["submission"].release({"jobs": []} if not wait else None)
            self._write()
        print(table(self.dir))
        return 0 if all(row["status"] == "complete" for row in rows(self.dir)) or not wait else 1


def rows(sweep_dir: Path) -> list[dict]:
    """Each member's state from its run directory (works while the sweep runs and after)."""
    found = []
    for member in json.loads((Path(sweep_dir) / "sweep.json").read_text())["members"]:
        run_dir = Path(member["run_dir"])
        row = {"member": member["name"], "status": "failed" if member.get("error") else "running", "ok": "",
               "failed": "", "tokens_per_s": "", "run_dir": str(run_dir), "error": member.get("error")}
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        if summary and summary.get("attempt"):
            row.update(ok=summary["ok"], failed=summary["failed"], tokens_per_s=summary["output_tokens_per_s"])
            row["status"] = "complete" if summary["complete"] else ("failed" if summary.get("error") else "incomplete")
        found.append(row)
    return found


def table(sweep_dir: Path) -> str:
    header = ("member", "status", "rows ok", "failed", "output tok/s", "run dir")
    lines = [header] + [(r["member"], r["status"], str(r["ok"]), str(r["failed"]), str(r["tokens_per_s"]),
                         r["run_dir"]) for r in rows(sweep_dir)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    return f"sweep {sweep_dir}:\n{text}"


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / "sweep.json").is_file()
