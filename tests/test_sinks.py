"""Result sinks (orchestrator.sinks): each output.format publishes a unit exactly once, says which units
are done, and reads its columns and stats back; runs with output.format=jsonl end to end."""
from __future__ import annotations

import datetime
import os

import pandas as pd
import pyarrow as pa
import pytest

from orchestrator import sinks
from orchestrator.sinks import JsonlDirSink, ParquetDirSink, sink_for

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


@pytest.fixture(params=[ParquetDirSink, JsonlDirSink], ids=["parquet", "jsonl"])
def sink(request, tmp_path):
    return make(request.param, tmp_path)


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
