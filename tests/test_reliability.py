"""Faults found by breaking the orchestrator on purpose (issue 8): each test failed before its fix."""
import asyncio
import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.client import Client
from orchestrator.commits import done_units
from orchestrator.config import compose
from orchestrator.engines.server import free_port
from orchestrator.errors import EngineError, InputError, OrchestratorError, RunError
from orchestrator.frontend import run, wait_for_jobs
from orchestrator.node import NodeJob
from orchestrator.preflight import prepare
from orchestrator.reader import read_unit
from orchestrator.report import build_summary
from orchestrator.sender import EngineHung
from tests.conftest import write_prompts
from tests.test_client import running_engine
from tests.test_endpoint import faithful_server

EXE = shutil.which("orchestrator")


def cli(*args, timeout=300):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def results(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results")


# 2. Everything that decides an answer is in the resume check, the endpoint's own identity included.

@pytest.mark.parametrize("override", [
    "engine.checkpoint=/models/other.nemo", "engine.precision=fp16", "engine.extra_args=[--quantization,fp8]",
    "model.architecture.max_seq_len=2048", "model.path=/models/other-hf", "engine.command=[/opt/other/vllm,serve]",
])
def test_every_setting_that_decides_answers_is_checked_on_resume(tmp_path, override):
    src = write_prompts(tmp_path / "in.parquet", 10)
    base = [f"data.input={src}", f"run_dir={tmp_path / 'r'}"]
    prepare(compose(base))
    key = override.split("=")[0].replace("architecture.", "")
    with pytest.raises(InputError, match=f"started with other settings, .*{key.split('.')[-1]}"):
        prepare(compose(base + [override]))


def endpoint_at(tmp_path, port: int, model_name: str):
    return faithful_server(tmp_path, "openai", "--model-name", model_name, port=port)


def test_resume_against_another_model_behind_the_same_url_is_refused(tmp_path):
    """Same engine.url, same config: only the server knows it now serves another model."""
    src = write_prompts(tmp_path / "in.parquet", 40)
    port = free_port()
    cfg = compose(["engine=endpoint", f"engine.url=http://127.0.0.1:{port}", f"data.input={src}",
                   f"run_dir={tmp_path / 'r'}", "data.unit_rows=10", "sampling.tokens_to_generate=4"])
    with endpoint_at(tmp_path, port, "model-a"):
        assert run(cfg, show_progress=False)["complete"]
    for part in sorted((tmp_path / "r" / "results").iterdir())[:2]:
        part.unlink()
    with endpoint_at(tmp_path, port, "model-b"), pytest.raises(RunError, match="is not the one that answered this "
                                                                     "run_dir's committed rows: served model was "
                                                                     "'model-a', now 'model-b'"):
        run(cfg, show_progress=False)
    assert len(results(tmp_path / "r")) == 20  # nothing from model-b was committed
    with endpoint_at(tmp_path, port, "model-a"):
        assert run(cfg, show_progress=False)["complete"]


# 4. A damaged result file is put aside and its unit redone.

@pytest.mark.parametrize("ledger", [True, False])
def test_a_damaged_result_file_is_put_aside_and_redone(tmp_path, ledger):
    src = write_prompts(tmp_path / "in.parquet", 50)
    run_dir = tmp_path / "r"
    base = ["run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=10", "sampling.tokens_to_generate=4"]
    assert cli(*base).returncode == 0
    before = results(run_dir).sort_values("id").reset_index(drop=True)
    victim = run_dir / "results" / "part-00000003.parquet"
    os.truncate(victim, 1000)
    if not ledger:
        shutil.rmtree(run_dir / "work" / "ledger")
    proc = cli(*base)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{victim} is damaged: 1000 bytes" in proc.stderr and "the unit is redone" in proc.stderr
    after = results(run_dir).sort_values("id").reset_index(drop=True)
    assert after["id"].tolist() == before["id"].tolist()  # every row exactly once again
    assert after["response"].tolist() == before["response"].tolist()
    assert json.loads((run_dir / "summary.json").read_text())["complete"]
    assert list((run_dir / "work" / "damaged").iterdir())  # kept for a look, out of the dataset


# 5. One front-end per run_dir.

def test_a_second_front_end_on_a_live_run_is_refused_naming_the_first(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 400)
    run_dir = tmp_path / "r"
    args = ["run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=4", "client.batch_size=4",
            "engine.simulator.request_latency_s=0.05", "sampling.tokens_to_generate=4"]
    first = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run_dir / "work" / "frontend.json"
    deadline = time.monotonic() + 60
    while not (lock.exists() and json.loads(lock.read_text() or "{}").get("jobs")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    second = cli(*args)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 1
    assert f"is in use by the orchestrator front-end pid {first.pid}" in second.stderr
    commits = [json.loads(line)["unit"] for path in (run_dir / "work" / "ledger").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert sorted(commits) == list(range(100))  # each unit computed once: no second engine ran
    assert not lock.exists()  # released at the end: the next start is welcome
    assert "nothing left to do" in cli(*args).stdout


def test_a_lock_left_by_a_dead_front_end_is_taken_over(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    run_dir = tmp_path / "r"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / "work").mkdir(parents=True)
    import socket

    (run_dir / "work" / "frontend.json").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "cluster": "local", "jobs": [str(dead.pid)]}))
    proc = cli("run", f"data.input={src}", f"run_dir={run_dir}", "sampling.tokens_to_generate=4")
    assert proc.returncode == 0, proc.stderr


# 7. wait ends when the run is complete, whatever its jobs still do.

def test_waiting_ends_when_every_unit_is_committed_and_cancels_idle_jobs(make_cfg):
    class Stuck:  # a requeued job that sits in the queue
        job_id, cancelled = "7", False

        def done(self):
            return self.cancelled

        def cancel(self, check=True):
            self.cancelled = True

    job, ticks = Stuck(), []
    left = wait_for_jobs([job], make_cfg("client.progress_interval_s=0.01"), lambda: ticks.append(1),
                         complete=lambda: len(ticks) >= 3, settle_s=0.05)
    assert left == [job] and job.cancelled


# 10. A hung engine costs one timeout window, and its rows are not blamed.

def test_the_default_request_timeout_is_bounded_by_the_engines_worst_case(make_cfg):
    short, long = make_cfg("sampling.tokens_to_generate=64"), make_cfg("sampling.tokens_to_generate=4096")
    assert short.request_timeout_s < long.request_timeout_s < 3600  # was 3600 s whatever the length
    assert make_cfg("client.request_timeout_s=42").request_timeout_s == 42


def test_a_hung_engine_is_lost_after_one_timeout_not_blamed_on_rows(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 40)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "engine.protocol=openai",
                   "engine.simulator.stall_rate=1.0",
                   "engine.simulator.stall_s=600", "client.request_timeout_s=1", "client.max_retries=4",
                   "client.retry_backoff_s=0.01"])
    plan, paths = prepare(cfg)
    from orchestrator.engines.server import EngineServer

    # its readiness cannot be proven (every generation hangs): the client is pointed at it directly
    with EngineServer(cfg, tmp_path / "e.log", tmp_path / "e.port") as server:
        deadline = time.monotonic() + 30
        while not server.port_file.exists():
            assert server.alive() and time.monotonic() < deadline
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(server.port_file.read_text())}"
        client = Client(cfg, plan, paths, url, "a1", "r0", model_name=cfg.model.name)
        with pytest.raises(EngineHung, match=r"answered nothing for \d+ s while requests were in flight"):
            asyncio.run(client.run())
    assert not done_units(paths)  # no row recorded as an error: before, each gave up after 5 attempts


# 11. retry_failed=true redoes the failed rows once and keeps the rest.

def test_retry_failed_redoes_only_the_failed_rows_once(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 200)
    run_dir = tmp_path / "r"
    base = ["run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=20", "engine.protocol=openai",
            "sampling.tokens_to_generate=4", "client.max_retries=0", "client.max_error_fraction=1.0"]
    proc = cli(*base, "engine.simulator.error_rate=0.3")
    assert proc.returncode == 0, proc.stderr
    first = results(run_dir).set_index("id")
    failed = first[first["status"] == "error"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(failed) > 0 and summary["retryable"] == len(failed)  # every one was the engine's 500
    assert "rerun with retry_failed=true" in proc.stdout
    assert "nothing left to do" in cli(*base).stdout  # a plain rerun does not touch them
    proc = cli(*base, "retry_failed=true")
    assert proc.returncode == 0, proc.stderr
    assert f"redoing the {len(failed)} failed row(s)" in proc.stdout
    after = results(run_dir)
    assert sorted(after["id"]) == sorted(first.index)  # each row once
    after = after.set_index("id")
    assert (after["status"] == "ok").all()
    ok = first[first["status"] == "ok"].index
    assert after.loc[ok, "latency_s"].equals(first.loc[ok, "latency_s"])  # kept as they were, not sent again
    assert json.loads((run_dir / "summary.json").read_text())["failed"] == 0
    assert "no committed row failed" in cli(*base, "retry_failed=true").stdout


# 13. Totals are true across a requeue, and a failed run still writes its summary.

def test_totals_count_every_segment_of_a_requeued_replica(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 120)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=10", "client.batch_size=10",
                   "engine.simulator.request_latency_s=0.02"])
    plan, paths = prepare(cfg)
    with running_engine(cfg, tmp_path) as server:
        first = Client(cfg, plan, paths, server.url, "a1", "r0")

        async def until_some_units():
            task = asyncio.create_task(first.run())
            while len(done_units(paths)) < 4:
                await asyncio.sleep(0.01)
            first.request_stop("time limit")  # submitit requeues the job: same attempt, same replica
            return await task

        asyncio.run(until_some_units())
        segment_one = first.stats.rows.rows
        second = Client(cfg, plan, paths, server.url, "a1", "r0")
        asyncio.run(second.run())
    assert 0 < segment_one < 120
    assert second.stats.rows.rows == 120  # the progress bar used to fall back to 0 here
    summary = build_summary(paths, plan, "a1", time.time() - 60)
    assert summary["rows_this_attempt"] == 120 and summary["resumed_units"] == 0
    assert summary["prompts_per_s"] > 0


def test_a_failed_job_still_writes_a_summary_saying_it_is_incomplete(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 300, prompts=[""] * 300)  # every row fails
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=10",
                   "client.min_rows_for_error_check=20"])
    plan, paths = prepare(cfg)
    with pytest.raises(RunError, match="rows failed"):
        NodeJob(cfg, str(paths.root), "a1", time.time()).run_node0()
    summary = json.loads((paths.root / "summary.json").read_text())
    assert summary["complete"] is False and "rows failed" in summary["error"] and summary["committed"] < 300


# 14. Expected failures are sentences that name the file and the fix.

def test_a_run_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "taken").write_text("")
    proc = cli("run", f"run_dir={tmp_path / 'taken'}")
    assert proc.returncode == 1 and "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_a_full_disk_while_writing_the_plan_is_a_sentence_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    src = write_prompts(tmp_path / "in.parquet", 10)
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        if ".plan.json." in self.name:
            real(self, text[: len(text) // 2])  # part of it made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(RunError, match=r"cannot write .*plan.json \(No space left on device\); free some space"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}"]))
    assert not list((tmp_path / "r").glob(".plan.json.*"))


def test_a_corrupt_data_page_names_the_file_and_the_rows(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(1000)],
                             "prompt": [f"prompt {i} " * 20 for i in range(1000)]}), src, compression="snappy")
    meta = pq.read_metadata(src).row_group(0).column(1)
    data = bytearray(src.read_bytes())
    start = meta.data_page_offset
    data[start:start + 200] = b"\xff" * 200  # the prompt column's data page (its header), footer intact
    src.write_bytes(bytes(data))
    plan, _ = prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}"]))
    with pytest.raises(InputError, match=rf"{src}: rows 0-999 cannot be read .*the file is damaged"):
        list(read_unit(plan, 0, 1024))


def test_a_changed_input_file_is_named(tmp_path):
    write_prompts(tmp_path / "d" / "a.parquet", 5)
    write_prompts(tmp_path / "d" / "b.parquet", 5, start=5)
    base = [f"data.input={tmp_path / 'd'}", f"run_dir={tmp_path / 'r'}"]
    prepare(compose(base))
    write_prompts(tmp_path / "d" / "b.parquet", 6, start=5)
    with pytest.raises(InputError, match=r"the input files changed since the first start: .*b.parquet changed "
                                         r"\(5 -> 6 rows\)"):
        prepare(compose(base))


def test_every_domain_error_shares_one_base():
    from orchestrator.client import TooManyErrors
    from orchestrator.sender import EngineLost

    for kind in (EngineHung, EngineLost, TooManyErrors, EngineError, InputError, RunError):
        assert issubclass(kind, OrchestratorError)


def test_a_full_disk_at_submission_names_the_file_and_says_free_space_not_wait_for_the_cluster(tmp_path,
                                                                                                monkeypatch):
    """submitit writes the job's pickle under the run_dir when it submits; a full disk there is this machine's
    problem, not the cluster's: the message names the file and says to free space, never "once the cluster
    accepts jobs" (issue 19, item 12)."""
    import submitit

    src = write_prompts(tmp_path / "in.parquet", 10)
    pickle = tmp_path / "r" / "work" / "submitit" / "job.pkl"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(pickle))

    monkeypatch.setattr(submitit.LocalExecutor, "submit", full)
    with pytest.raises(RunError) as err:
        run(compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}"]), show_progress=False)
    message = str(err.value)
    assert f"writing {pickle} failed: No space left on device" in message
    assert "free space or quota there" in message and "once the cluster accepts jobs" not in message


@pytest.mark.parametrize("key", ["cluster.partition", "cluster.account", "cluster.job_name",
                                 "cluster.sbatch_args.comment", "cluster.srun_args"])
def test_a_newline_in_a_value_that_becomes_a_job_script_line_is_refused_naming_the_key(tmp_path, monkeypatch,
                                                                                       key):
    """A newline in a value that becomes an #SBATCH or srun line would start a new line of the script (an
    injected command sbatch would run): it is refused at the config check naming the key, not passed to sbatch
    and reported as "once the cluster accepts jobs" (issue 19, item 12). The value comes from the environment
    (Hydra's command line refuses a raw newline itself)."""
    monkeypatch.setenv("ORCH_TEST_VALUE", "gpu\nrm -rf /tmp/x")
    value = "[${oc.env:ORCH_TEST_VALUE}]" if key == "cluster.srun_args" else "${oc.env:ORCH_TEST_VALUE}"
    shown = "cluster.srun_args[0]" if key == "cluster.srun_args" else key
    src = write_prompts(tmp_path / "in.parquet", 4)
    proc = subprocess.run([EXE, "plan", "cluster=slurm", f"data.input={src}", f"run_dir={tmp_path / 'r'}",
                           f"{'+' if 'sbatch_args' in key else ''}{key}={value}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{shown}='gpu\\nrm -rf /tmp/x' holds a control character" in proc.stderr, proc.stderr
    assert "remove the line break" in proc.stderr
