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

from .clusters.base import cluster_for
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
    """The members of one sweep, submitted one after another and followed together. A member whose settings
    are refused is recorded with its error (sweep.json, the table) and the others run. A sweep one of whose
    run_dirs another front-end holds (the same sweep started twice) submits nothing and leaves sweep.json
    as the first wrote it."""

    def __init__(self, refused: list[dict] | None = None) -> None:
        self.members: list[dict] = []
        self.dir: Path | None = None
        self.refused = list(refused or [])  # members dropped before the launch (see screen())
        self.in_use: str | None = None

    def add(self, cfg, name: str, overrides: list[str], sweep_dir: str) -> None:
        from .frontend import submit
        from .runlock import RunDirInUse

        self.dir = Path(sweep_dir).resolve()
        if self.in_use:
            return
        member = {"name": name or "(no overrides)", "overrides": list(overrides), "run_dir": cfg.run_dir,
                  "submission": None, "error": None, "cfg": cfg}
        print(f"sweep member {name or '(no overrides)'}: {cfg.run_dir}", flush=True)
        try:
            member["submission"] = submit(cfg, defer=True)  # the jobs go in together, at finish()
        except RunDirInUse as exc:
            self.in_use = str(exc)
            return
        except OrchestratorError as exc:
            member["error"] = str(exc)
            print(f"error: sweep member {name}: {exc}", file=sys.stderr, flush=True)
        self.members.append(member)
        self._write()

    def add_refused(self, name: str, overrides: list[str], sweep_dir: str, error: str) -> None:
        """A member whose settings were refused (the config checks): recorded, not run."""
        self.dir = Path(sweep_dir).resolve()
        if self.in_use:
            return
        print(f"error: sweep member {name or '(no overrides)'}: {error}", file=sys.stderr, flush=True)
        self.members.append({"name": name or "(no overrides)", "overrides": list(overrides), "run_dir": "",
                             "submission": None, "error": error.splitlines()[0], "cfg": None})
        self._write()

    def _write(self) -> None:
        if self.dir is None or self.in_use:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        record = [{"name": m["name"], "overrides": m["overrides"], "run_dir": m["run_dir"],
                   "jobs": [str(j.job_id) for j in m["submission"].jobs] if m["submission"] else [],
                   "error": m["error"]} for m in [*self.refused, *self.members]]
        from .rundir import atomic_write_text

        atomic_write_text(self.dir / "sweep.json", json.dumps({"members": record}, indent=1) + "\n")

    @property
    def wait(self) -> bool:
        return next((m["cfg"].wait for m in self.members if m["cfg"] is not None), True)

    def finish(self, wait: bool) -> int:
        """Follow every member (wait=true) or report their jobs; print the table; the exit status."""
        from .frontend import Interrupted, follow, report_submitted, submit_jobs
        from .rundir import RunPaths

        if self.in_use:
            for member in self.members:
                if member["submission"] is not None:
                    member["submission"].release(None)
            raise RunError(f"{self.in_use.split('; a second run')[0]}: this sweep is already running (or its "
                           f"jobs are). Nothing was submitted and {self.dir / 'sweep.json'} is left as it was; "
                           f"follow it with `orchestrator status {self.dir}`")
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
                except Interrupted as exc:
                    raise Interrupted(self._stop_others(i, exc)) from None
                except OrchestratorError as exc:
                    member["error"] = str(exc).splitlines()[0]
        finally:
            for member in self.members:
                if member["submission"] is not None:
                    member["submission"].release({"jobs": []} if not wait else None)
            self._write()
        print(table(self.dir))
        return 0 if all(row["status"] == "complete" for row in rows(self.dir)) or not wait else 1

    def _stop_others(self, interrupted: int, exc: Exception) -> str:
        """Member `interrupted` was stopped by a signal while followed: stop every later member's jobs too
        (each gets its grace), record each as interrupted, and name every member's jobs in one message."""
        from .report import _failed_summary

        why = str(exc).split(":")[0]
        lines = [str(exc).splitlines()[0]]
        for member in self.members[interrupted + 1:]:
            sub = member["submission"]
            if sub is None or sub.summary is not None:
                continue
            alive = cluster_for(sub.cfg).stop(sub.jobs, sub.cfg)
            said = f"{why}: cancelled job(s) {sub.ids}" + (f"; {' '.join(str(j.job_id) for j in alive)} did not "
                                                           f"end" if alive else "")
            _failed_summary(sub.cfg, sub.paths, sub.plan, sub.attempt, sub.started_at, RunError(said))
            lines.append(f"sweep member {member['name']}: {said}")
        print("\n".join(lines[1:]), flush=True)
        return "\n".join(lines) + f"\nevery member's jobs are stopped; rerun the same sweep to resume " \
                                   f"({self.dir / 'sweep.json'})"


def _refusal(exc: BaseException) -> str:
    """A composition's refusal in one line: Hydra's words and the cause it wraps (OmegaConf's)."""
    parts = []
    while exc is not None and len(parts) < 2:
        line = " ".join(x.strip() for x in str(exc).strip().splitlines()[:1])
        if line and line not in parts and "$VALUE" not in line:
            parts.append(line)
        exc = exc.__cause__ or exc.__context__
    return ": ".join(parts) or "refused"


def screen(args: list[str]) -> tuple[list[str], list[dict]]:
    """Each value of each swept key composed alone (with the sweep's other, fixed overrides), before Hydra
    launches: a value Hydra or the config checks refuse (a wrong type, an unknown key, out of range) would
    abort the launch of every member. It is dropped from the sweep and recorded as the error of the members
    that take it; the others run. Returns the overrides to launch and the refused members."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import compose

    plain = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except Exception:  # noqa: BLE001 - Hydra words a syntax error better itself when it parses them
        return args, []
    fixed = [a for a, o in zip(plain, parsed) if not o.is_sweep_override() and not o.is_hydra_override()]
    if not any(o.is_sweep_override() for o in parsed):
        return args, []
    try:
        compose(fixed)
    except Exception:  # noqa: BLE001 - every member has these settings: refused as a plain run's would be
        return args, []
    kept, refused = [a for a in args if a.startswith("-")], []
    for arg, override in zip(plain, parsed):
        if not override.is_sweep_override():
            kept.append(arg)
            continue
        key, good = override.get_key_element(), []
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - e.g. glob(), which only Hydra's sweeper can expand
            kept.append(arg)
            continue
        for value in values:
            try:
                compose([*fixed, f"{key}={value}"])
            except Exception as exc:  # noqa: BLE001 - Hydra's and OmegaConf's refusals have no common base
                text = _refusal(exc)
                refused.append({"name": f"{key.lstrip('+~')}={value}", "overrides": [*fixed, f"{key}={value}"],
                                "run_dir": "", "submission": None, "cfg": None,
                                "error": f"{key.lstrip('+~')}={value} is refused: {text}"})
                print(f"error: sweep member(s) with {key.lstrip('+~')}={value}: {text}; the others run",
                      file=sys.stderr, flush=True)
            else:
                good.append(value)
        if not good:
            raise RunError(f"every value of the swept key {key.lstrip('+~')} is refused: "
                           + "; ".join(m["error"] for m in refused) + ". Nothing was submitted")
        kept.append(f"{key}={','.join(good)}")
    return kept, refused


def rows(sweep_dir: Path) -> list[dict]:
    """Each member's state from its run directory (works while the sweep runs and after)."""
    found = []
    for member in json.loads((Path(sweep_dir) / "sweep.json").read_text())["members"]:
        run_dir = Path(member["run_dir"]) if member.get("run_dir") else None  # none: refused before it ran
        row = {"member": member["name"], "status": "failed" if member.get("error") else "running", "ok": "",
               "failed": "", "tokens_per_s": "", "gpu_h_per_million_tokens": "",
               "run_dir": str(run_dir) if run_dir else "-",
               "error": member.get("error")}
        try:
            summary = json.loads((run_dir / "summary.json").read_text()) if run_dir else None
        except (OSError, ValueError):
            summary = None
        if summary and summary.get("attempt"):
            row.update(ok=summary["ok"], failed=summary["failed"], tokens_per_s=summary["output_tokens_per_s"])
            per_million = summary.get("gpu_hours_per_million_output_tokens")  # null: no tokens, or engine=endpoint
            row["gpu_h_per_million_tokens"] = "" if per_million is None else per_million
            error = str(summary.get("error") or "")
            row["status"] = "complete" if summary["complete"] else \
                ("interrupted" if error.startswith("interrupted by") else "failed" if error else "incomplete")
        found.append(row)
    return found


def table(sweep_dir: Path) -> str:
    header = ("member", "status", "rows ok", "failed", "output tok/s", "GPU-h/M tok", "run dir")
    lines = [header] + [(r["member"], r["status"], str(r["ok"]), str(r["failed"]), str(r["tokens_per_s"]),
                         _per_million(r["gpu_h_per_million_tokens"]), r["run_dir"]) for r in rows(sweep_dir)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    return f"sweep {sweep_dir}:\n{text}"


def _per_million(value) -> str:
    """GPU-hours per million output tokens, to three significant digits ('' when unknown)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / "sweep.json").is_file()
