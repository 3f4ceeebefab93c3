"""`orchestrator cancel`: end every job of a run; what they committed is kept, and a rerun resumes."""
from __future__ import annotations

import time
from pathlib import Path

from .clusters.base import ACTIVE_STATES, adapter_named
from .commits import scan_committed
from .plan import Plan
from .rundir import RunPaths
from .status import cluster_name, open_run, read_json


def cancel(run_dir: str | Path, wait_s: float = 60.0) -> str:
    """Cancel every job of the run (Slurm: scancel; local: SIGTERM to the job's process on this host), wait
    up to wait_s for them to end (they commit what finished), and say what was committed."""
    paths, plan = open_run(run_dir)
    frontend = read_json(paths.root / "work" / "frontend.json")
    cluster = cluster_name(paths, frontend)
    adapter = adapter_named(cluster)
    host = str(frontend.get("host") or "")
    jobs = [str(j) for j in frontend.get("jobs", [])]
    # a job whose state cannot be read is cancelled all the same: the cluster says whether it still exists
    live = [j for j, st in adapter.job_states(jobs, host, paths).items()
            if st.split()[0] in ACTIVE_STATES or st.startswith("UNKNOWN")]
    if not live:
        said = (f"job(s) {' '.join(jobs)} (cluster={cluster}) are no longer queued or running" if jobs
                else "no job of this run is recorded in work/frontend.json")
        return f"nothing to cancel: {said}\n{_committed_line(paths, plan)}"
    adapter.cancel(live, host, paths)
    deadline = time.monotonic() + wait_s
    still = live
    while still and time.monotonic() < deadline:
        time.sleep(0.5)
        still = [j for j, st in adapter.job_states(still, host, paths).items() if st.split()[0] in ACTIVE_STATES]
    lines = [f"cancelled job(s) {' '.join(live)} (cluster={cluster}) of {paths.root}"]
    if still:
        lines.append(f"job(s) {' '.join(still)} are still stopping (committing what finished)")
    lines.append(_committed_line(paths, plan))
    return "\n".join(lines)


def _committed_line(paths: RunPaths, plan: Plan) -> str:
    done = scan_committed(paths, plan).units
    rows = sum(plan.units[u][2] for u in done if u < len(plan.units))
    if rows >= plan.total_rows:
        return f"committed: {rows}/{plan.total_rows} rows ({len(done)}/{len(plan.units)} units): the run is complete"
    return (f"committed: {rows}/{plan.total_rows} rows ({len(done)}/{len(plan.units)} units); they are kept. Rerun "
            f"the same `orchestrator run` command (same run_dir={paths.root}) to resume")
