"""`orchestrator status` and `cancel` on local runs: the numbers against the result files and the request
records, a run followed while it goes on and then cancelled, and a directory that holds no run."""
import json
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.commits import error_reason
from tests.conftest import hydra_value, write_prompts

EXE = shutil.which("orchestrator")
pytestmark = pytest.mark.skipif(EXE is None, reason="`pip install -e .` puts `orchestrator` on PATH")
ROWS = 240
BAD = {5: None, 77: ""}  # rows the client refuses before sending: "prompt is null", "prompt is empty"


def cli(*args, timeout=180):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def status_json(run_dir) -> dict:
    proc = cli("status", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed local run with engine errors (20% of requests answer HTTP 500, never retried) and two bad
    rows."""
    tmp = tmp_path_factory.mktemp("status run")
    prompts = [BAD.get(i, f"Question number {i}: what is {i} + {i}?") for i in range(ROWS)]
    src = write_prompts(tmp / "in.parquet", ROWS, prompts=prompts)
    run_dir = tmp / "run"
    proc = cli("run", f"data.input={hydra_value(src)}", f"run_dir={hydra_value(run_dir)}",
               "engine.simulator.error_rate=0.2",
               "client.max_retries=0", "engine.protocol=openai", "client.max_in_flight=8", "data.unit_rows=40",
               "sampling.tokens_to_generate=6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir


def kind(error: str) -> str:
    """The test's own grouping of the result files' errors, independent of the code under test."""
    return "http 500" if "HTTP 500" in error else error


def test_status_json_matches_the_result_files(finished_run):
    df = pd.read_parquet(finished_run / "results", columns=["status", "error"])
    failed = df[df["status"] == "error"]
    s = status_json(finished_run)
    assert s["state"] == "complete"
    assert s["rows"]["total"] == ROWS and s["rows"]["committed"] == len(df) == ROWS
    assert s["rows"]["ok"] == int((df["status"] == "ok").sum()) and s["rows"]["failed"] == len(failed)
    assert 0 < s["rows"]["failed"] < ROWS / 2
    expected = Counter(kind(e) for e in failed["error"])
    assert expected["prompt is null"] == 1 and expected["prompt is empty"] == 1 and expected["http 500"] > 2
    groups = {kind(g["example"]): g for g in s["errors"]}
    assert {k: g["rows"] for k, g in groups.items()} == dict(expected)
    assert [g["rows"] for g in s["errors"]] == sorted((g["rows"] for g in s["errors"]), reverse=True)
    http = groups["http 500"]["reason"]
    assert "HTTP 500" in http and "1 attempts" not in http, http  # the status code stays, the count is stripped
    assert s["jobs"] and s["jobs"][0]["state"] == "ENDED" and s["cluster"] == "local"
    (replica,) = s["replicas"]
    assert replica["replica"] == "r0" and replica["rows"] == ROWS and replica["failed"] == len(failed)
    assert replica["startup_s"] is not None and replica["generation_s"] > 0
    assert s["rates"]["overall"]["prompts_per_s"] > 0 and s["eta_s"] == 0.0
    assert any("finished" in line for line in s["log"])
    assert json.loads((finished_run / "summary.json").read_text())["failed"] == s["summary"]["failed"]


def test_request_records_account_for_every_row_sent(finished_run):
    files = list((finished_run / "work" / "requests").glob("*.jsonl"))
    assert len(files) == 1 and files[0].name.endswith("-r0.jsonl")
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    df = pd.read_parquet(finished_run / "results")
    sent = ROWS - len(BAD)
    assert sum(r["ok"] + r["failed"] for r in records) == sent == len(records)  # OpenAI route: one prompt a request
    assert sum(r["ok"] for r in records) == int((df["status"] == "ok").sum())
    assert sum(r["output_tokens"] for r in records) == int(df.loc[df["status"] == "ok", "output_tokens"].sum())
    for r in records:
        assert r["replica"] == "r0" and r["attempt"] == 1 and r["prompts"] == 1 and r["latency_s"] >= 0
        if r["error"] is None:
            assert r["ok"] == r["prompts"] and r["failed"] == 0
        else:
            assert r["ok"] == 0 and r["failed"] == r["prompts"] and r["error"].startswith("HTTP 500")
    ends = [r["at"] for r in records]
    summary = json.loads((finished_run / "summary.json").read_text())
    assert max(ends) - min(ends) <= summary["duration_s"]


def test_status_text_names_rows_errors_and_the_replica(finished_run):
    proc = cli("status", str(finished_run))
    assert proc.returncode == 0, proc.stderr
    s = status_json(finished_run)
    out = proc.stdout
    assert f"{ROWS}/{ROWS} committed" in out and f"{s['rows']['failed']} failed" in out
    assert "state:      complete" in out
    for group in s["errors"]:
        assert f"{group['rows']}  {group['reason']}" in out
    assert "r0  job " in out and "ENDED" in out and "start-up" in out
    assert s["log"][-1] in out


def test_similar_errors_group_and_status_codes_stay():
    a = error_reason("gave up after 5 attempts: timed out: no answer within 300 s (client.request_timeout_s)")
    b = error_reason("gave up after 2 attempts: timed out: no answer within 12.5 s (client.request_timeout_s)")
    assert a == b
    assert error_reason("request 3f2a9c1e-77aa-4bcd-9def-0123456789ab: HTTP 503") == \
        error_reason("request 0b1c2d3e-0000-4111-8222-333344445555: HTTP 503")
    assert error_reason("HTTP 500: x") != error_reason("HTTP 503: x")


@pytest.mark.parametrize("what", ["missing", "not a run", "a file"])
def test_status_on_a_directory_that_holds_no_run_is_one_line_and_exit_1(tmp_path, what):
    target = tmp_path / "nothing here"
    if what == "not a run":
        target.mkdir()
        (target / "results").mkdir()
    elif what == "a file":
        target.write_text("")
    for command in (["status", str(target)], ["status", str(target), "--json"], ["report", str(target)],
                    ["cancel", str(target)]):
        proc = cli(*command)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert proc.stderr.startswith("error: ") and str(target) in proc.stderr
        assert ("holds no run: plan.json is missing" if what == "not a run" else "is not a directory") in proc.stderr


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        found = predicate()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_local_run_followed_while_it_goes_on_then_cancelled(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 1000)  # 100 requests of 0.5 s, one generation at a time: 50 s
    run_dir = tmp_path / "run"
    out = tmp_path / "run.out"
    with open(out, "w") as fh:  # not a pipe: the local job inherits it and would hold a reader until it ends
        proc = subprocess.run([EXE, "run", f"data.input={src}", f"run_dir={run_dir}", "wait=false",
                               "engine.simulator.request_latency_s=0.5", "client.batch_size=10", "data.unit_rows=20",
                               "sampling.tokens_to_generate=4"], stdout=fh, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, out.read_text()
    job = json.loads((run_dir / "work" / "frontend.json").read_text())["jobs"][0]

    def generating():
        s = status_json(run_dir)
        return s if s["rows"]["units_done"] >= 2 and s["rates"]["recent"]["rows"] > 0 else None

    s = wait_for(generating, 120, "a few committed units and answered requests")
    assert s["state"] == "running" and s["jobs"] == [{"job": job, "state": "RUNNING"}]
    assert s["replicas"][0]["job"] == job and s["replicas"][0]["state"] == "RUNNING"
    assert s["rates"]["recent"]["prompts_per_s"] > 0 and s["eta_s"] > 0
    assert 0 < s["rows"]["committed"] < 1000
    text = cli("status", str(run_dir)).stdout
    assert "state:      running" in text and "eta:" in text and "RUNNING" in text

    cancelled = cli("cancel", str(run_dir))
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert f"cancelled job(s) {job} (cluster=local)" in cancelled.stdout and "still stopping" not in cancelled.stdout
    committed = len(pd.read_parquet(run_dir / "results"))
    assert f"committed: {committed}/1000 rows" in cancelled.stdout and "rerun the same" in cancelled.stdout.lower()
    assert 0 < committed < 1000
    left = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout.strip()
    assert left == "", f"the job and its engine end with the cancel: {left}"
    after = status_json(run_dir)
    assert after["state"] == "stopped" and after["jobs"] == [{"job": job, "state": "ENDED"}]
    assert after["rows"]["committed"] == committed
    again = cli("cancel", str(run_dir))
    assert again.returncode == 0 and again.stdout.startswith("nothing to cancel")
    assert f"committed: {committed}/1000 rows" in again.stdout
