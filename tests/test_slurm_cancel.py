"""`orchestrator cancel` and `status` against a real Slurm job (the local cluster, scripts/local_slurm.sh)."""
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_prompts
from tests.test_slurm import SLOW_SLURM, committed_units, job_ids, leftover, run_cli, sacct_state, wait_for

pytestmark = pytest.mark.slurm


def status_json(run_dir: Path) -> dict:
    proc = run_cli("status", str(run_dir), "--json", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_cancel_ends_a_running_job_and_says_what_was_committed(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 1200)
    run_dir = tmp_path / "run"
    proc = run_cli("run", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}",
                   f"run_dir={run_dir}", "wait=false", *SLOW_SLURM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_ids(proc.stdout)
    wait_for(lambda: committed_units(run_dir) >= 2, 180, "a few committed units")

    running = status_json(run_dir)
    assert running["cluster"] == "slurm" and running["state"] == "running"
    assert running["jobs"] == [{"job": job, "state": "RUNNING"}]
    (replica,) = running["replicas"]
    assert replica["job"] == job and replica["state"] == "RUNNING" and replica["host"]
    assert replica["queue_wait_s"] is not None and replica["startup_s"] is not None
    assert 0 < running["rows"]["committed"] < 1200

    cancelled = run_cli("cancel", str(run_dir), timeout=180)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert f"cancelled job(s) {job} (cluster=slurm)" in cancelled.stdout
    assert "still stopping" not in cancelled.stdout, cancelled.stdout
    assert sacct_state(job) == "CANCELLED"
    committed = len(pd.read_parquet(run_dir / "results"))
    assert 0 < committed < 1200
    assert f"committed: {committed}/1200 rows" in cancelled.stdout and "to resume" in cancelled.stdout
    assert leftover(run_dir) == ""

    after = status_json(run_dir)
    assert after["jobs"] == [{"job": job, "state": "CANCELLED"}] and after["state"] == "stopped"
    assert after["rows"]["committed"] == committed
    text = run_cli("status", str(run_dir)).stdout
    assert f"job {job}  CANCELLED" in text and "rerun the same command to resume" in text
    again = run_cli("cancel", str(run_dir))
    assert again.returncode == 0 and again.stdout.startswith("nothing to cancel"), again.stdout + again.stderr
    assert subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip() == ""
