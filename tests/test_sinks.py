"""Result sinks (orchestrator.sinks): each output.format publishes a unit exactly once, says which units
are done, and reads its columns and stats back; runs with output.format=jsonl end to end."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from orchestrator import sinks
from orchestrator.sinks import JsonlDirSink, ParquetDirSink, sink_for
from tests.conftest import kill_jobs_when, write_prompts

SCHEMA = pa.schema([("id", pa.string()), ("asked_at", pa.timestamp("us")), ("response", pa.string()),
                    ("responses", pa.list_(pa.string())), ("status", pa.string()), ("error", pa.string()),
                    ("output_tokens", pa.int64()), ("latency_s", pa.float64()), ("attempts", pa.int32())])
STATS = {"rows": 3, "ok": 2, "failed": 1, "output_tokens": 9, "units": 1, "errors": [["HTTP 500", "HTTP 500", 1]]}


def result_table(tag: str = "a") -> pa.Table:
    at = datetime.datetime(2024, 5, 1, 12, 30, 15, 250000)
    return pa.table({
        "id": [f"{tag}0", f"{tag}1", f"{tag}2"], "asked_at": [at, None, at],
        "response": ["x", "y é", None], "responses": [["h", "x"], [], None],
        "status": ["ok", "ok", "error"], "error": [None, None, "HTTP 500"],
        "output_tokens": [4, 5, None], "latency_s": [0.25, 1.0, None], "attempts": [1, 2, 5],
    }, schema=SCHEMA)


def make(kind, root):
    (root / "results").mkdir(parents=True, exist_ok=True)
    (root / "work" / "tmp").mkdir(parents=True, exist_ok=True)
    return kind(root)


@pytest.fixture(params=list(sinks.SINKS.values()), ids=list(sinks.SINKS))  # the contract, for every sink
def sink(request, tmp_path):
    return make(request.param, tmp_path)


def test_every_output_format_has_a_sink():
    """output.format's choices (config.py's OutputFormat) and the sinks are the same list."""
    from orchestrator.config import OUTPUT_FORMATS

    assert tuple(sinks.SINKS) == OUTPUT_FORMATS == sinks.FORMATS


def test_a_unit_is_published_once_and_reads_back_whole(sink):
    size = sink.publish(3, result_table(), STATS)
    assert size == sink.file(3).stat().st_size and sink.file(3).name == f"part-00000003{sink.suffix}"
    assert sink.publish(3, result_table("b"), {**STATS, "ok": 0}) is None  # the first commit wins
    assert sink.done_units() == {3} and sink.is_done(3) and not sink.is_done(4)
    back = sink.read(3)
    assert back.schema.equals(SCHEMA) and back.to_pylist() == result_table().to_pylist()
    assert sink.read(3, ["status", "error"]).to_pydict() == {"status": ["ok", "ok", "error"],
                                                            "error": [None, None, "HTTP 500"]}
    assert sink.stats(3) == STATS and sink.check(3, rows=3) == STATS
    assert "rows" in sink.check(3, rows=4)
    assert os.listdir(sink.tmp) == []


def test_replace_publishes_a_retried_unit_over_its_commit(sink):
    sink.publish(0, result_table(), STATS)
    redone = {**STATS, "ok": 3, "failed": 0}
    assert sink.publish(0, result_table("r"), redone, replace=True) == sink.file(0).stat().st_size
    assert sink.read(0, ["id"]).column("id").to_pylist() == ["r0", "r1", "r2"]
    assert sink.stats(0) == redone and sink.done_units() == {0}


def test_a_crash_between_the_write_and_the_link_leaves_no_visible_unit(sink, monkeypatch):
    from orchestrator import fsops

    def crash(*_):
        raise KeyboardInterrupt("killed before the link")

    monkeypatch.setattr(fsops, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        sink.publish(5, result_table(), STATS)
    monkeypatch.undo()
    assert sink.done_units() == set() and not sink.is_done(5) and not sink.file(5).exists()
    assert sink.publish(5, result_table("n"), STATS) is not None  # the redo commits the unit
    assert sink.read(5, ["id"]).column("id").to_pylist() == ["n0", "n1", "n2"] and sink.stats(5) == STATS


def test_a_failed_write_leaves_nothing_and_raises_oserror(sink, monkeypatch):
    from orchestrator import fsops

    real = fsops.open_file

    def full(path, mode):
        if "w" in mode:
            raise OSError(28, "No space left on device")
        return real(path, mode)

    monkeypatch.setattr(fsops, "open_file", full)
    with pytest.raises(OSError):
        sink.publish(1, result_table(), STATS)
    monkeypatch.undo()
    assert sink.done_units() == set() and os.listdir(sink.tmp) == []


def test_only_its_own_files_are_units(tmp_path):
    parquet, jsonl = make(ParquetDirSink, tmp_path), JsonlDirSink(tmp_path)
    jsonl.publish(1, result_table(), STATS)
    parquet.publish(2, result_table(), STATS)
    (tmp_path / "results" / "part-x.jsonl").write_text("")
    (tmp_path / "results" / "notes.txt").write_text("")
    assert jsonl.done_units() == {1} and parquet.done_units() == {2}
    assert sorted(u for u, _ in jsonl.entries()) == [1]
    assert sinks.sink_of_file(jsonl.file(1)).format == "jsonl"


def test_jsonl_files_hold_only_rows_for_pandas(tmp_path):
    sink = make(JsonlDirSink, tmp_path)
    sink.publish(0, result_table(), STATS)
    df = pd.read_json(sink.file(0), lines=True)
    assert list(df.columns) == SCHEMA.names and len(df) == 3
    assert df["id"].tolist() == ["a0", "a1", "a2"] and df["responses"].tolist()[:2] == [["h", "x"], []]


def test_a_changed_jsonl_file_is_not_trusted(tmp_path):
    sink = make(JsonlDirSink, tmp_path)
    sink.publish(0, result_table(), STATS)
    sink.file(0).write_bytes(sink.file(0).read_bytes()[:-20])  # cut by a crash of the disk, say
    assert "no stats sidecar" in sink.check(0, rows=3)


def test_of_two_jsonl_publishers_the_stats_are_the_winners(tmp_path, monkeypatch):
    """The loser's sidecar is written too (before its link fails); the winner's is the one read back."""
    sink = make(JsonlDirSink, tmp_path)
    sink.publish(0, result_table(), STATS)
    assert sink.publish(0, result_table("late"), {**STATS, "ok": 0}) is None
    assert len(os.listdir(sink.sidecars)) == 2
    assert sink.stats(0) == STATS and sink.read(0, ["id"]).column("id").to_pylist() == ["a0", "a1", "a2"]


def test_sink_for_reads_the_format_of_the_run_directory(tmp_path):
    assert isinstance(sink_for(tmp_path), ParquetDirSink)  # no config.yaml: a bare directory
    (tmp_path / "config.yaml").write_text("run_dir: x\n")  # a run directory from before sinks existed
    assert isinstance(sink_for(tmp_path / "."), ParquetDirSink)
    other = tmp_path / "j"
    other.mkdir()
    (other / "config.yaml").write_text("output:\n  format: jsonl\n")
    assert isinstance(sink_for(other), JsonlDirSink) and isinstance(sink_for(other, "parquet"), ParquetDirSink)
    with pytest.raises(Exception, match="output.format='csv' is not valid; choose one of: parquet, jsonl"):
        sink_for(other, "csv")


# End to end: output.format=jsonl through the CLI (engine=mock), locally and on the local Slurm cluster.

EXE = shutil.which("orchestrator") or "orchestrator"
SLOW = ["engine.simulator.request_latency_s=0.05", "client.batch_size=10", "data.unit_rows=20",
        "sampling.tokens_to_generate=6"]


def cli(*args, timeout=300):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def jsonl_units(run_dir: Path) -> int:
    folder = run_dir / "results"
    return len(list(folder.glob("part-*.jsonl"))) if folder.is_dir() else 0


def jsonl_results(run_dir: Path) -> pd.DataFrame:
    """Every result file read by pandas alone, as a user would."""
    files = sorted((run_dir / "results").iterdir())
    assert files and all(f.name.startswith("part-") and f.suffix == ".jsonl" for f in files), files
    return pd.concat([pd.read_json(f, lines=True, dtype={"id": str}) for f in files]).sort_values("id") \
        .reset_index(drop=True)


def commits(run_dir: Path) -> list[int]:
    return sorted(json.loads(line)["unit"] for path in (run_dir / "work" / "ledger").glob("*.jsonl")
                  for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def parquet_run(tmp_path_factory):
    """The same input run uninterrupted with the default output.format: the answers to match."""
    base = tmp_path_factory.mktemp("sinks")
    src = write_prompts(base / "in.parquet", 300)
    proc = cli("run", f"data.input={src}", f"run_dir={base / 'run'}", *SLOW)
    assert proc.returncode == 0, proc.stderr
    assert not list((base / "run" / "results").glob("*.jsonl"))
    return src, pd.read_parquet(base / "run" / "results").sort_values("id").reset_index(drop=True)


def test_a_jsonl_run_killed_and_resumed_has_every_row_once_with_the_same_answers(tmp_path, parquet_run):
    src, expected = parquet_run
    run_dir = tmp_path / "run"
    args = ["run", f"data.input={src}", f"run_dir={run_dir}", "output.format=jsonl", *SLOW]
    first = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_jobs_when(first, run_dir, lambda: jsonl_units(run_dir) >= 3)
    assert first.returncode != 0
    done_before = jsonl_units(run_dir)
    assert 3 <= done_before < 15
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert f"{done_before * 20}/300 rows already committed" in second.stdout
    got = jsonl_results(run_dir)
    assert got["id"].tolist() == expected["id"].tolist()  # every id, exactly once
    assert got["response"].tolist() == expected["response"].tolist() and (got["status"] == "ok").all()
    units = commits(run_dir)
    assert len(units) == len(set(units)) and set(units) <= set(range(15))  # no unit committed twice
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] == 300 and summary["resumed_units"] == done_before
    back = sink_for(run_dir).read(0)  # the sink reads a unit back in the result schema's types
    assert back.schema.field("output_tokens").type == pa.int64() and back.schema.field("attempts").type == pa.int32()
    assert back.column("id").to_pylist() == [f"q{i}" for i in range(20)]


def test_a_jsonl_resume_checks_its_files_and_redoes_a_damaged_one(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 60)
    run_dir = tmp_path / "run"
    args = ["run", f"data.input={src}", f"run_dir={run_dir}", "output.format=jsonl", "data.unit_rows=20",
            "sampling.tokens_to_generate=4"]
    assert cli(*args).returncode == 0
    damaged = run_dir / "results" / "part-00000001.jsonl"
    damaged.write_bytes(damaged.read_bytes()[:-30])  # cut: its size no longer is what the ledger says
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "part-00000001.jsonl is damaged" in proc.stdout + proc.stderr
    assert jsonl_results(run_dir)["id"].tolist() == sorted(f"q{i}" for i in range(60))
    assert list((run_dir / "work" / "damaged").iterdir())


def test_retry_failed_replaces_jsonl_units_keeping_their_ok_rows(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 100)
    run_dir = tmp_path / "r"
    base = ["run", f"data.input={src}", f"run_dir={run_dir}", "output.format=jsonl", "data.unit_rows=20",
            "engine.protocol=openai", "sampling.tokens_to_generate=4", "client.max_retries=0",
            "client.max_error_fraction=1.0"]
    proc = cli(*base, "engine.simulator.error_rate=0.3")
    assert proc.returncode == 0, proc.stderr
    first = jsonl_results(run_dir).set_index("id")
    failed = first[first["status"] == "error"]
    assert len(failed) > 0 and failed["error"].notna().all()
    assert first.loc[first["status"] == "ok", "error"].isna().all()
    proc = cli(*base, "retry_failed=true")
    assert proc.returncode == 0, proc.stderr
    assert f"redoing the {len(failed)} failed row(s)" in proc.stdout
    after = jsonl_results(run_dir)
    assert sorted(after["id"]) == sorted(first.index)  # each row once
    after = after.set_index("id")
    assert (after["status"] == "ok").all()
    ok = first[first["status"] == "ok"].index
    assert after.loc[ok, "latency_s"].equals(first.loc[ok, "latency_s"])  # kept as they were
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["ok"] == 100
    assert "no committed row failed" in cli(*base, "retry_failed=true").stdout


def test_status_and_report_read_a_jsonl_run(tmp_path, monkeypatch):
    from orchestrator import status
    from orchestrator.commits import scan_committed
    from orchestrator.rundir import RunPaths

    src = write_prompts(tmp_path / "in.parquet", 100)
    run_dir = tmp_path / "r"
    proc = cli("run", f"data.input={src}", f"run_dir={run_dir}", "output.format=jsonl", "data.unit_rows=20",
               "engine.protocol=openai", "sampling.tokens_to_generate=4", "client.max_retries=0",
               "client.max_error_fraction=1.0", "engine.simulator.error_rate=0.3")
    assert proc.returncode == 0, proc.stderr
    df = jsonl_results(run_dir)
    failed = int((df["status"] == "error").sum())
    shown = cli("status", str(run_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    assert found["rows"]["committed"] == 100 and found["rows"]["failed"] == failed and found["rows"]["units_done"] == 5
    assert "HTTP 500" in json.dumps(found)
    # a commit without its error groups (an older version's): status reads them from the JSONL files
    paths = RunPaths(run_dir)
    stats = {u: {k: v for k, v in st.items() if k != "errors"} for u, st in scan_committed(paths).stats.items()}
    read = []
    real = status._unit_errors
    monkeypatch.setattr(status, "_unit_errors", lambda path: read.append(path.name) or real(path))
    (run_dir / "work" / status.ERRORS_CACHE).unlink(missing_ok=True)
    groups = status.error_groups(paths, stats)
    assert read and all(name.endswith(".jsonl") for name in read)
    assert sum(g["rows"] for g in groups) == failed
    made = cli("report", str(run_dir))
    assert made.returncode == 0, made.stderr
    page = Path(made.stdout.strip().splitlines()[-1])
    assert page.is_file() and "no answered row committed yet" not in page.read_text()


@pytest.mark.slurm
def test_a_jsonl_run_on_slurm_killed_and_resumed_has_every_row_once(slurm_cluster, tmp_path):
    """The front-end is SIGKILLed and its job killed mid-run; the same command resumes on Slurm and every row is
    in the JSONL results once."""
    from tests.test_slurm import SLOW_SLURM, first_job_id, leftover, sacct_state, wait_for

    src = write_prompts(tmp_path / "in.parquet", 400)
    run_dir = tmp_path / "run"
    args = ["run", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}", f"run_dir={run_dir}",
            "output.format=jsonl", *SLOW_SLURM]
    run = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = first_job_id(run_dir)
    wait_for(lambda: jsonl_units(run_dir) >= 2, 120, "a few committed units")
    run.kill()  # the front-end dies: nothing cancels its job...
    run.communicate(timeout=60)
    subprocess.run(["scancel", "--signal=KILL", "--full", job], check=True)  # ...which is killed too
    subprocess.run(["scancel", job], check=True)
    assert sacct_state(job) in ("CANCELLED", "FAILED")
    def gone() -> bool:
        return not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()

    wait_for(gone, 120, f"job {job} to leave the queue (COMPLETING)")  # else the rerun is refused: in use by the job
    done_before = jsonl_units(run_dir)
    assert 2 <= done_before < 20
    proc = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = jsonl_results(run_dir)
    assert got["id"].tolist() == sorted(f"q{i}" for i in range(400)) and (got["status"] == "ok").all()
    units = commits(run_dir)
    assert len(units) == len(set(units)) and set(units) <= set(range(20))  # no unit committed twice
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] == 400 and summary["cluster"] == "slurm"
    assert leftover(run_dir) == ""


def test_a_resume_with_another_output_format_is_refused_and_the_original_resumes(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 40)
    run_dir = tmp_path / "r"
    args = ["run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=20", "sampling.tokens_to_generate=4"]
    assert cli(*args, "output.format=jsonl").returncode == 0
    proc = cli(*args)  # output.format=parquet, the default
    assert proc.returncode != 0
    assert "output.format was 'jsonl', now 'parquet'" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((run_dir / "results").glob("*.parquet"))
    again = cli(*args, "output.format=jsonl")
    assert again.returncode == 0, again.stderr
    assert "nothing left to do" in again.stdout and jsonl_units(run_dir) == 2
