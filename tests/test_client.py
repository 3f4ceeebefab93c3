import asyncio
import json
import threading
from contextlib import contextmanager

import pandas as pd
import pytest
from aiohttp import web

from orchestrator.client import Client
from orchestrator.commits import done_units
from orchestrator.config import compose
from orchestrator.engines.server import EngineServer
from orchestrator.errors import EngineError
from orchestrator.preflight import prepare
from orchestrator.protocols.base import RejectedError, TransientError
from orchestrator.protocols.nemo import NemoCodec
from orchestrator.rundir import RunPaths
from tests.conftest import write_prompts


@contextmanager
def engine_process(cfg, tmp_path):
    """The engine started (not yet proven ready), and stopped on the way out."""
    server = EngineServer(cfg, tmp_path / "engine.log", tmp_path / "engine.port")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_engine(cfg, tmp_path):
    with engine_process(cfg, tmp_path) as server:
        server.wait_ready()
        yield server


def run_client(cfg, tmp_path, attempt="a1"):
    plan, paths = prepare(cfg)
    with running_engine(cfg, tmp_path) as server:
        stats = asyncio.run(Client(cfg, plan, paths, server.url, attempt, "r0", server.model_name).run())
    return plan, paths, stats


def results(paths):
    return pd.read_parquet(paths.results)


@pytest.mark.parametrize("protocol", ["nemo", "openai"])
def test_every_id_exactly_once_and_answers_are_deterministic(tmp_path, protocol):
    src = write_prompts(tmp_path / "in.parquet", 300, row_group_size=50)
    overrides = [f"data.input={src}", "data.unit_rows=64", f"engine.protocol={protocol}",
                 "sampling.tokens_to_generate=20", "client.max_in_flight=8"]
    _, paths, stats = run_client(compose(overrides + [f"run_dir={tmp_path / 'r1'}"]), tmp_path)
    df = results(paths)
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(300))
    assert (df["status"] == "ok").all() and df["error"].isna().all()
    assert df["response"].str.startswith("[simulated]").all()
    assert not df["response"].str.contains("Question number").any()  # the echoed prompt is stripped
    assert (df["output_tokens"] <= 20).all() and (df["output_tokens"] >= 1).all()
    assert stats.rows.rows == 300 and stats.rows.units == 5
    _, paths2, _ = run_client(compose(overrides + [f"run_dir={tmp_path / 'r2'}"]), tmp_path)
    again = results(paths2).set_index("id").loc[df["id"]]
    assert list(again["response"]) == list(df["response"])


def test_bad_rows_become_recorded_errors(tmp_path):
    prompts = ["fine", None, "", "   ", "ünïcödé ✓ 日本語", "x" * 100_000]
    src = write_prompts(tmp_path / "in.parquet", 0, prompts=prompts)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=5"])
    _, paths, _ = run_client(cfg, tmp_path)
    df = results(paths).set_index("id")
    assert list(df.loc[["q0", "q4"], "status"]) == ["ok", "ok"]
    assert df.loc["q1", "error"] == "prompt is null"
    assert df.loc["q2", "error"] == "prompt is empty" and df.loc["q3", "error"] == "prompt is empty"
    assert df.loc["q5", "status"] == "error" and "longer than the model's 4096-token context" in df.loc["q5", "error"]
    assert "data.truncate_prompts=true" in df.loc["q5", "error"]
    assert len(df) == 6


def test_long_and_non_ascii_prompts_with_truncation(tmp_path):
    long_words = " ".join(f"wörd{i} 日本" for i in range(12_000))  # ~130 KB of UTF-8
    prompts = [long_words, "ünïcödé ✓ 日本語 — ok?", "short"]
    src = write_prompts(tmp_path / "in.parquet", 0, prompts=prompts)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=5",
                   "data.truncate_prompts=true", "model=nemotron3_8b_base"])
    _, paths, _ = run_client(cfg, tmp_path)
    df = results(paths).set_index("id")
    assert (df["status"] == "ok").all() and len(df) == 3
    assert all(r.startswith("[simulated]") for r in df["response"])


def test_non_text_prompt_column_rows_are_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "prompt": [1, 2]}), tmp_path / "in.parquet")
    cfg = compose([f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'r'}"])
    _, paths, _ = run_client(cfg, tmp_path)
    df = results(paths)
    assert list(df["status"]) == ["error", "error"] and (df["error"] == "prompt is not text (int)").all()


def test_engine_errors_are_retried_then_recorded(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 200)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "engine.protocol=openai",
                   "engine.simulator.error_rate=0.3",
                   "client.max_retries=0", "client.max_in_flight=16", "sampling.tokens_to_generate=4",
                   "engine.ready_timeout_s=20"])
    _, paths, stats = run_client(cfg, tmp_path)
    df = results(paths)
    assert len(df) == 200 and df["id"].is_unique
    failed = df[df["status"] == "error"]
    assert 20 < len(failed) < 110
    assert failed["error"].str.contains("gave up after 1 attempts: HTTP 500").all()
    assert stats.rows.failed == len(failed) and stats.rows.ok == 200 - len(failed)


def test_retries_with_backoff_recover_transient_errors(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 100)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "engine.protocol=openai",
                   "engine.simulator.error_rate=0.3",
                   "client.max_retries=8", "client.retry_backoff_s=0.01", "client.max_in_flight=16",
                   "sampling.tokens_to_generate=4", "engine.ready_timeout_s=20"])
    _, paths, _ = run_client(cfg, tmp_path)
    df = results(paths)
    assert (df["status"] == "ok").all()
    assert (df["attempts"] > 1).any() and (df["attempts"] >= 1).all()


def test_rerun_skips_committed_units(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 50)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=10",
                   "sampling.tokens_to_generate=3"])
    plan, paths = prepare(cfg)
    first = sorted(done_units(paths))
    assert first == []
    _, paths, stats = run_client(cfg, tmp_path, attempt="a1")
    assert stats.rows.units == 5
    _, _, stats2 = run_client(cfg, tmp_path, attempt="a2")
    assert stats2.rows.units == 0 and stats2.skipped_units == 5
    assert len(results(paths)) == 50


class RecordingServer:
    """A tiny engine on a thread that records request sizes and the peak number of requests in flight."""

    def __init__(self, route: str, delay: float = 0.02):
        self.route, self.delay = route, delay
        self.sizes, self.active, self.peak = [], 0, 0
        self.ready = threading.Event()

    async def handle(self, request):
        body = await request.json()
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(self.delay)
        self.active -= 1
        if self.route == "/generate":
            self.sizes.append(len(body["sentences"]))
            return web.json_response({"sentences": [s + " answer" for s in body["sentences"]],
                                      "tokens": [[s, " answer"] for s in body["sentences"]]})
        self.sizes.append(1)
        return web.json_response({"choices": [{"text": "answer", "index": 0}], "usage": {"completion_tokens": 1}})

    def start(self):
        def serve():
            self.loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route("PUT" if self.route == "/generate" else "POST", self.route, self.handle)
            runner = web.AppRunner(app)
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            self.ready.set()
            self.loop.run_forever()
        threading.Thread(target=serve, daemon=True).start()
        assert self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_against_recorder(cfg, route: str):
    """The client over cfg's input against a RecordingServer on `route`; returns (server, paths)."""
    plan, paths = prepare(cfg)
    server = RecordingServer(route)
    url = server.start()
    try:
        asyncio.run(Client(cfg, plan, paths, url, "a", "r0").run())
    finally:
        server.stop()
    return server, paths


def test_openai_strategy_keeps_max_in_flight_requests_and_never_more(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 200)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "engine.protocol=openai",
                   "client.max_in_flight=12"])
    server, paths = run_against_recorder(cfg, "/v1/completions")
    assert server.peak == 12 and sum(server.sizes) == 200
    assert (results(paths)["response"] == "answer").all()


def test_nemo_strategy_sends_full_batches_of_128_with_one_waiting(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 1000)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=300"])
    server, paths = run_against_recorder(cfg, "/generate")
    assert server.sizes.count(128) == 7 and sum(server.sizes) == 1000 and max(server.sizes) <= 128
    assert server.peak == 2  # one generating, the next already queued at the server
    df = results(paths)
    assert (df["output_tokens"] == 1).all() and len(df) == 1000


def test_nemo_codec_reads_a_bare_string_as_a_rejection_and_5xx_as_transient():
    proto = NemoCodec(compose([]))
    with pytest.raises(RejectedError, match="temperature must be"):
        proto.parse(200, "temperature must be a positive number less than or equal to 100.0", ["p"])
    with pytest.raises(RejectedError, match="Maximum number of sentences is 128"):
        proto.parse(400, "Maximum number of sentences is 128", ["p"])
    with pytest.raises(TransientError):
        proto.parse(503, "busy", ["p"])
    payload = proto.payload(["a", "b"])
    assert payload["sentences"] == ["a", "b"] and payload["greedy"] is True
    assert payload["end_strings"] == ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]


def test_engine_that_dies_before_ready_fails_fast_with_its_log(tmp_path):
    cfg = compose(["engine=nemo", "engine.checkpoint=/nonexistent/model.nemo", "engine.script=/nonexistent/eval.py",
                   "engine.ready_timeout_s=600", "engine.host=127.0.0.1"])
    with engine_process(cfg, tmp_path) as server, pytest.raises(EngineError, match="exited with status"):
        server.wait_ready()


def test_engine_that_never_answers_hits_the_deadline(tmp_path):
    cfg = compose(["engine.ready_timeout_s=1", "engine.simulator.error_rate=1.0"])
    with engine_process(cfg, tmp_path) as server, \
            pytest.raises(EngineError, match="did not answer a one-token generation within 1 s"):
        server.wait_ready()


def test_an_engine_that_disappears_is_lost_not_blamed_on_the_rows(tmp_path):
    from orchestrator.sender import EngineLost

    src = write_prompts(tmp_path / "in.parquet", 300)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=10", "client.batch_size=10",
                   "engine.simulator.request_latency_s=0.05", "client.max_retries=2", "client.retry_backoff_s=0.01"])
    plan, paths = prepare(cfg)
    with running_engine(cfg, tmp_path) as server:
        client = Client(cfg, plan, paths, server.url, "a", "r0")  # engine_alive unknown, as with engine.url

        async def scenario():
            task = asyncio.create_task(client.run())
            while len(done_units(paths)) < 3:
                await asyncio.sleep(0.01)
            server.stop()
            return await task

        with pytest.raises(EngineLost, match="no longer answers"):
            asyncio.run(scenario())
    df = results(paths)
    assert (df["status"] == "ok").all() and len(df) < 300  # nothing recorded as an error


def test_a_stop_request_after_the_client_ended_is_harmless(tmp_path):
    """SIGTERM can arrive while the job stops its engine, after the client's event loop has closed
    (seen on Slurm at a time limit): it must not turn a finished run into a failed job."""
    src = write_prompts(tmp_path / "in.parquet", 20)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}"])
    plan, paths = prepare(cfg)
    with running_engine(cfg, tmp_path) as server:
        client = Client(cfg, plan, paths, server.url, "a", "r0")
        asyncio.run(client.run())
    client.request_stop("SIGTERM")
    assert client.stop_reason == "SIGTERM"


def test_a_job_with_nothing_left_does_not_start_its_engine(tmp_path):
    """A job requeued after every unit was committed (a node crash, another replica finishing) must not
    load the model again: the engine here cannot even start, and the job still succeeds."""
    from orchestrator.node import NodeJob

    src = write_prompts(tmp_path / "in.parquet", 30)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=10"])
    plan, paths = prepare(cfg)
    with running_engine(cfg, tmp_path) as server:
        asyncio.run(Client(cfg, plan, paths, server.url, "a1", "r0").run())
    broken = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=10",
                      "engine.command=[/nonexistent/engine]"])
    summary = NodeJob(broken, str(paths.root), "a2", 0.0).run_node0()
    assert summary["complete"] and summary["ok"] == 30
    assert "nothing left to do; the engine was not started" in (paths.root / "run.log").read_text()
    assert not list(paths.logs.glob("engine-a2-*.log"))


def test_a_failed_submission_cancels_what_it_submitted(tmp_path, monkeypatch):
    from orchestrator.clusters.local import LocalCluster
    from orchestrator.errors import RunError
    from orchestrator.frontend import run

    submitted = []
    real_executor = LocalCluster.executor

    class Refusing:
        def __init__(self, inner):
            self.inner = inner

        def submit(self, fn):
            if submitted:
                raise RuntimeError("sbatch: error: Batch job submission failed: Invalid account")
            submitted.append(self.inner.submit(fn))
            return submitted[-1]

    monkeypatch.setattr(LocalCluster, "executor", lambda self, cfg, paths: Refusing(real_executor(self, cfg, paths)))
    src = write_prompts(tmp_path / "in.parquet", 2000)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "replicas=3",
                   "engine.simulator.request_latency_s=0.5"])
    with pytest.raises(RunError, match=r"submitting replica 1 of 3 failed: sbatch: error: .*Invalid account; "
                                       r"cancelled the 1 job\(s\) already submitted"):
        run(cfg, show_progress=False)
    (job,) = submitted
    job.wait()  # bounded by the cancel: the job was stopped, not left running
    assert job.state == "INTERRUPTED"  # stopped by the cancel; left alone it would finish every row
    assert (len(done_units(RunPaths(tmp_path / "r"))) < 2000 // 2048 + 1
            or not (tmp_path / "r" / "summary.json").exists())


def test_a_failed_job_reports_its_own_message_with_the_engine_log_not_frames():
    from orchestrator.clusters.base import job_failure

    report = ("Job (task=0) failed during processing with trace:\n----------------------\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise EngineLost(msg)\n"
              "orchestrator.client.EngineLost: the engine process exited during the run; engine log /r/e.log:\n"
              "RuntimeError: CUDA error: an illegal memory access\nsrun: error: n2: task 1: Killed\n"
              "\n----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
              "  - /r/logs/1_0_log.err\n")
    assert job_failure(report).splitlines() == [
        "the engine process exited during the run; engine log /r/e.log:",
        "RuntimeError: CUDA error: an illegal memory access", "srun: error: n2: task 1: Killed"]


def test_a_replica_waiting_for_work_is_woken_only_once_the_commit_is_written(tmp_path, monkeypatch):
    """unit_done wakes a producer that found no free unit; woken before the commit was on disk, it found the
    unit neither free nor committed and slept a whole poll more (1-2 s at the end of every replica's run)."""
    src = write_prompts(tmp_path / "in.parquet", 40)
    cfg = compose([f"data.input={src}", "data.unit_rows=8", f"run_dir={tmp_path / 'run'}"])
    plan, paths = prepare(cfg)
    seen: list[tuple[int, bool]] = []
    commit = Client._commit

    async def watched(self, buf):
        class Watch(asyncio.Event):
            def set(event):
                seen.append((buf.unit, (paths.results / f"part-{buf.unit:08d}.parquet").exists()))
                super().set()

        self.unit_done = Watch()
        await commit(self, buf)

    monkeypatch.setattr(Client, "_commit", watched)
    with running_engine(cfg, tmp_path) as server:
        asyncio.run(Client(cfg, plan, paths, server.url, "a1", "r0", server.model_name).run())
    assert sorted(unit for unit, _ in seen) == list(range(5))
    assert all(written for _, written in seen), seen


def test_a_commit_groups_its_failed_rows_so_status_reads_no_result_file(tmp_path, monkeypatch):
    """The first `orchestrator status` of a big run read every failed unit's file (seconds at 5,000 of them):
    the commit now records its unit's error groups, and status takes them from the ledger."""
    from orchestrator import status
    from orchestrator.commits import MAX_ERROR_GROUPS, error_summary

    prompts = ["fine", None, "", "   ", "also fine", "x" * 100_000] * 3
    src = write_prompts(tmp_path / "in.parquet", 0, prompts=prompts)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=5",
                   "data.unit_rows=6"])
    _, paths, _ = run_client(cfg, tmp_path)
    ledger = [json.loads(line) for p in (paths.root / "work" / "ledger").glob("*.jsonl")
              for line in p.read_text().splitlines()]
    assert len(ledger) == 3 and all(r["failed"] == sum(n for _, _, n in r["errors"]) == 4 for r in ledger)
    monkeypatch.setattr(status, "_unit_errors", lambda path: pytest.fail(f"read {path}"))
    groups = {g["reason"]: g["rows"] for g in status.collect(paths.root)["errors"]}
    assert groups["prompt is empty"] == 6 and groups["prompt is null"] == 3 and len(groups) == 3
    assert not (paths.root / "work" / status.ERRORS_CACHE).exists()  # nothing read, nothing to keep
    assert error_summary(f"error {chr(97 + i)}" for i in range(MAX_ERROR_GROUPS + 1)) is None  # then status reads it


def test_one_null_sentence_fails_only_its_row_and_retry_failed_redoes_only_it(tmp_path, monkeypatch):
    """Issue 19.3: the embedded engine (NeMo route, in this process) answers one row's sentence with null.
    Before, all rows of its request were errors ("malformed answer: sentences[k] is NoneType"), and
    retry_failed=true failed the same rows again; now only that row is an error, and a retry redoes it alone."""
    import re
    import subprocess

    from orchestrator.simulator.app import EngineThread
    from orchestrator.simulator.engine import _Engine
    from orchestrator.simulator.model import EngineSettings
    from tests.conftest import orchestrator_cmd

    generate, asked, spoil = _Engine.generate, [], {"on": True}

    async def one_null_sentence(self, request):
        resp = await generate(self, request)
        body = json.loads(resp.body)
        for k, sentence in enumerate(body.get("sentences") or []):
            row = re.search(r"Question number (\d+):", sentence or "")
            if row:
                asked.append(int(row.group(1)))
                if spoil["on"] and row.group(1) == "7":
                    body["sentences"][k] = None  # what a broken NeMo batch gave for one of its 128
        return web.json_response(body, status=resp.status)

    monkeypatch.setattr(_Engine, "generate", one_null_sentence)
    src = write_prompts(tmp_path / "in.parquet", 40)
    run_dir = tmp_path / "r"
    with EngineThread(EngineSettings()) as engine:
        args = [*orchestrator_cmd(), "run", "engine=endpoint", f"engine.url={engine.url}", "engine.protocol=nemo",
                f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=20", "client.batch_size=10",
                "sampling.tokens_to_generate=4", "client.max_error_fraction=1.0"]
        first = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        df = pd.read_parquet(run_dir / "results").set_index("id")
        assert len(df) == 40 and list(df.index[df["status"] == "error"]) == ["q7"], df["error"].value_counts()
        assert df.loc["q7", "error"] == "malformed answer: sentences[7] is NoneType, not text"
        assert df.drop("q7")["response"].str.startswith("[simulated]").all()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["failed"], summary["retryable"]) == (1, 1)  # the engine's fault: retry_failed may recover it
        spoil["on"], asked[:] = False, []
        again = subprocess.run(args + ["retry_failed=true"], capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
    assert "redoing the 1 failed row(s)" in again.stdout
    assert asked == [7]  # only the bad row was asked again
    after = pd.read_parquet(run_dir / "results").set_index("id")
    assert (after["status"] == "ok").all() and len(after) == 40
    assert after.drop("q7")["response"].equals(df.drop("q7")["response"])
