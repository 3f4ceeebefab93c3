"""Never lose a row: SIGKILL and rerun, injected faults, reading results while a run goes on."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from tests.conftest import committed, kill_jobs_when, write_prompts

EXE = shutil.which("orchestrator")
SLOW = ["engine.simulator.request_latency_s=0.05", "client.batch_size=10", "data.unit_rows=20",
        "sampling.tokens_to_generate=6"]


def cli(*args, timeout=300):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def answers(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results").sort_values("id").reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    src = write_prompts(base / "in.parquet", 600)
    run_dir = base / "run"
    proc = cli("run", f"data.input={src}", f"run_dir={run_dir}", *SLOW)
    assert proc.returncode == 0, proc.stderr
    return src, answers(run_dir)


@pytest.mark.parametrize("kill_after_units", [1, 12, 28])
def test_sigkill_then_rerun_gives_every_id_once_and_the_same_answers(tmp_path, uninterrupted, kill_after_units):
    src, expected = uninterrupted
    run_dir = tmp_path / "run"
    args = ["run", f"data.input={src}", f"run_dir={run_dir}", *SLOW]
    first = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_jobs_when(first, run_dir, lambda: committed(run_dir) >= kill_after_units)
    assert first.returncode != 0
    done_before = committed(run_dir)
    assert kill_after_units <= done_before < 30
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert f"{done_before * 20}/600 rows already committed" in second.stdout
    got = answers(run_dir)
    assert list(got["id"]) == list(expected["id"])  # every id, exactly once
    assert list(got["response"]) == list(expected["response"])  # and no answer differs
    assert (got["status"] == "ok").all()
    assert subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout == b""


def test_engine_errors_and_timeouts_end_as_ok_or_recorded_errors(tmp_path):
    # With one retry, a row is an error when both attempts fail: stalls are frequent enough here that
    # 1000 rows give about 12 rows whose last failure is an HTTP 500 and about 110 ending in a timeout.
    # Near the end, every request left may be a stalled one; an engine answering nothing for a whole
    # client.hung_after_s counts as hung, so that is raised above these per-request stalls.
    src = write_prompts(tmp_path / "in.parquet", 1000)
    run_dir = tmp_path / "run"
    proc = cli("run", f"data.input={src}", f"run_dir={run_dir}", "engine.simulator.error_rate=0.05",
               "engine.simulator.stall_rate=0.3", "engine.simulator.stall_s=5", "client.request_timeout_s=1",
               "client.hung_after_s=60", "client.max_retries=1", "client.retry_backoff_s=0.05",
               "engine.protocol=openai", "client.max_in_flight=32", "sampling.tokens_to_generate=4",
               "data.unit_rows=50")
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(1000))
    assert set(df["status"]) <= {"ok", "error"} and (df["status"] == "error").any() and (df["attempts"] > 1).any()
    errors = df[df["status"] == "error"]["error"]
    assert errors.str.contains("gave up after 2 attempts").all()
    assert errors.str.contains("HTTP 500").any()
    # the reason, not "TimeoutError: "
    assert errors.str.contains("timed out: no answer within 1 s (client.request_timeout_s)", regex=False).any()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] == (df["status"] == "ok").sum() and summary["failed"] == (df["status"] == "error").sum()
    assert summary["total"] == len(df) == 1000


def test_too_many_errors_stop_the_run_early(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 2000)
    run_dir = tmp_path / "run"
    proc = cli("run", f"data.input={src}", f"run_dir={run_dir}", "engine.simulator.error_rate=0.6",
               "client.max_retries=0",
               "client.max_error_fraction=0.3", "client.min_rows_for_error_check=100", "engine.protocol=openai",
               "data.unit_rows=50", "sampling.tokens_to_generate=2")
    assert proc.returncode == 1
    assert "client.max_error_fraction=0.3" in proc.stderr and "stopping early" in proc.stderr
    assert committed(run_dir) < 40  # it did not burn through the whole input


def test_results_read_during_a_run_are_never_partial(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 600)
    run_dir = tmp_path / "run"
    run = subprocess.Popen([EXE, "run", f"data.input={src}", f"run_dir={run_dir}", *SLOW],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, reads = 0, 0
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:
        if committed(run_dir):
            table = ds.dataset(run_dir / "results", format="parquet").to_table(columns=["id", "status"])
            ids = table.column("id").to_pylist()
            assert len(ids) == len(set(ids)) and len(ids) % 20 == 0  # whole units, each row once
            assert len(ids) >= seen
            seen, reads = len(ids), reads + 1
    assert run.wait(timeout=60) == 0
    assert reads > 5 and 0 < seen <= 600


def _part(run_dir: Path, unit: int) -> Path:
    return run_dir / "results" / f"part-{unit:08d}.parquet"


def test_a_run_dir_with_results_but_no_fingerprint_is_refused_not_replanned(tmp_path):
    """Issue 19.2: with fingerprint.json gone, a rerun with another data.unit_rows built a new plan over the
    committed results and trusted the old files by size: 1,250/2,000 rows, 'nothing left to do', exit 0."""
    src = write_prompts(tmp_path / "in.parquet", 2000)
    run_dir = tmp_path / "run"
    first = cli("run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=250")
    assert first.returncode == 0, first.stderr
    for unit in (5, 6, 7):  # where a run killed after 5 of its 8 units stands: 1,250 of 2,000 rows committed
        _part(run_dir, unit).unlink()
    (run_dir / "fingerprint.json").unlink()
    plan_before = (run_dir / "plan.json").read_text()
    rerun = cli("run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=500")
    assert rerun.returncode != 0, f"a rerun over results with no fingerprint.json succeeded:\n{rerun.stdout}"
    assert "nothing left to do" not in rerun.stdout
    assert "fingerprint.json" in rerun.stderr and str(run_dir) in rerun.stderr, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert (run_dir / "plan.json").read_text() == plan_before  # never re-planned
    assert sorted(p.name for p in (run_dir / "results").iterdir()) == [_part(run_dir, u).name for u in range(5)]


def test_a_committed_unit_whose_rows_disagree_with_the_plan_is_redone(tmp_path):
    """A unit file the ledger vouches for by size but with another row count than the plan's unit (a plan made
    over old results, as before issue 19.2's fix) is not trusted: it is put aside and redone."""
    src = write_prompts(tmp_path / "in.parquet", 2000)
    run_dir, other = tmp_path / "run", tmp_path / "other"
    assert cli("run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=250").returncode == 0
    assert cli("run", f"data.input={src}", f"run_dir={other}", "data.unit_rows=500").returncode == 0
    expected = answers(other)
    for name in ("plan.json", "fingerprint.json"):  # a re-plan with unit_rows=500 over the 250-row files
        shutil.copy(other / name, run_dir / name)
    for unit in range(4, 8):
        _part(run_dir, unit).unlink()
    rerun = cli("run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=500")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "nothing left to do" not in rerun.stdout
    assert "holds 250 rows, the unit has 500" in rerun.stderr, rerun.stderr
    got = answers(run_dir)
    assert list(got["id"]) == list(expected["id"])  # every id, exactly once
    assert list(got["response"]) == list(expected["response"])
    assert len(list((run_dir / "work" / "damaged").iterdir())) == 4
    assert json.loads((run_dir / "summary.json").read_text())["complete"] is True
