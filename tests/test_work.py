import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.commits import commit_unit, committed_stats, done_units
from orchestrator.config import DataConfig
from orchestrator.errors import InputError
from orchestrator.inputs import discover_inputs
from orchestrator.plan import Plan, build_plan
from orchestrator.reader import read_unit
from orchestrator.rundir import RunPaths
from tests.conftest import write_prompts


def all_rows(plan, batch_rows=7):
    out = []
    for unit in range(len(plan.units)):
        for ids, prompts in read_unit(plan, unit, batch_rows):
            out.extend(zip(ids, prompts))
    return out


def test_units_cover_every_row_once_across_row_groups(weird_tmp_path):
    write_prompts(weird_tmp_path / "a.parquet", 103, row_group_size=10)
    plan = build_plan(DataConfig(unit_rows=25), str(weird_tmp_path / "a.parquet"))
    assert [u[2] for u in plan.units] == [25, 25, 25, 25, 3]
    rows = all_rows(plan)
    assert [r[0] for r in rows] == [f"q{i}" for i in range(103)]
    assert rows[57][1] == "Question number 57: what is 57 + 57?"


def test_directory_and_glob_inputs(weird_tmp_path):
    write_prompts(weird_tmp_path / "d" / "one.parquet", 5)
    write_prompts(weird_tmp_path / "d" / "sub" / "two.parquet", 4, start=5)
    (weird_tmp_path / "d" / "notes.txt").write_text("ignored")
    plan = build_plan(DataConfig(unit_rows=3), str(weird_tmp_path / "d"))
    assert plan.total_rows == 9 and len(plan.files) == 2
    assert sorted(r[0] for r in all_rows(plan)) == sorted(f"q{i}" for i in range(9))
    files, _ = discover_inputs(str(weird_tmp_path / "d" / "*.parquet"))
    assert [f.name for f in files] == ["one.parquet"]


def test_positional_ids_when_the_id_column_is_absent(tmp_path):
    write_prompts(tmp_path / "in" / "p.parquet", 4, ids=False)
    plan = build_plan(DataConfig(unit_rows=3), str(tmp_path / "in"))
    assert plan.id_column is None and plan.id_type == "string"
    assert [r[0] for r in all_rows(plan)] == ["p.parquet:0", "p.parquet:1", "p.parquet:2", "p.parquet:3"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_plan(DataConfig(), str(tmp_path / "nope.parquet"))
    with pytest.raises(InputError, match="matches no file"):
        build_plan(DataConfig(), str(tmp_path / "*.parquet"))


def test_missing_prompt_column_lists_the_columns(tmp_path):
    pq.write_table(pa.table({"text": ["a"], "id": [1]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"no prompt column 'prompt'.*\['text', 'id'\].*data.prompt_column"):
        build_plan(DataConfig(), str(tmp_path / "x.parquet"))


def test_not_parquet_is_a_clear_error(tmp_path):
    (tmp_path / "x.parquet").write_text("id,prompt\n1,hello\n")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        build_plan(DataConfig(), str(tmp_path / "x.parquet"))


def test_list_typed_prompt_column_is_refused(tmp_path):
    pq.write_table(pa.table({"prompt": [["a", "b"]]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="not text"):
        build_plan(DataConfig(), str(tmp_path / "x.parquet"))


def test_files_disagreeing_on_ids_are_refused(tmp_path):
    write_prompts(tmp_path / "d" / "a.parquet", 2)
    write_prompts(tmp_path / "d" / "b.parquet", 2, ids=False)
    with pytest.raises(InputError, match="disagree on the id column"):
        build_plan(DataConfig(), str(tmp_path / "d"))


def test_plan_roundtrips_through_json(tmp_path):
    write_prompts(tmp_path / "a.parquet", 10)
    plan = build_plan(DataConfig(unit_rows=4), str(tmp_path / "a.parquet"))
    again = Plan.from_json(plan.to_json())
    assert again == plan


def test_commit_is_atomic_and_carries_stats(tmp_path):
    paths = RunPaths(tmp_path)
    paths.make()
    table = pa.table({"id": ["a", "b"], "status": ["ok", "error"]})
    commit_unit(paths, 7, table, {"rows": 2, "ok": 1, "failed": 1, "output_tokens": 5, "units": 1})
    assert done_units(paths) == {7}
    assert os.listdir(paths.tmp) == []
    stats = committed_stats(paths)
    assert (stats.rows, stats.ok, stats.failed, stats.output_tokens) == (2, 1, 1, 5)
    assert pq.read_table(paths.result_file(7)).column("id").to_pylist() == ["a", "b"]


def test_totals_come_from_the_ledger_and_fall_back_to_footers(tmp_path):
    import shutil

    paths = RunPaths(tmp_path)
    paths.make()
    for unit in range(3):
        commit_unit(paths, unit, pa.table({"id": [f"{unit}"]}),
                    {"rows": 1, "ok": 1, "failed": 0, "output_tokens": 2, "units": 1}, "r0")
    ledger = tmp_path / "work" / "ledger" / "r0.jsonl"
    assert len(ledger.read_text().splitlines()) == 3
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n" + '{"unit": 1, "rows"')  # a crash cut the rest
    stats = committed_stats(paths)
    assert (stats.rows, stats.ok, stats.output_tokens, stats.units) == (3, 3, 6, 3)
    shutil.rmtree(tmp_path / "work" / "ledger")
    assert committed_stats(paths).rows == 3


def test_unit_reader_reads_any_order_and_each_row_once(tmp_path):
    from orchestrator.reader import UnitReader

    write_prompts(tmp_path / "a.parquet", 100, row_group_size=30)
    write_prompts(tmp_path / "b.parquet", 50, start=100, row_group_size=7)
    plan = build_plan(DataConfig(unit_rows=9), str(tmp_path / "*.parquet"))
    order = list(range(len(plan.units)))
    shuffled = order[::3] + order[1::3] + order[2::3][::-1]  # forward, skipping, and backwards
    for units in (order, shuffled):
        reader = UnitReader(plan, batch_rows=4)
        got = {}
        for unit in units:
            got[unit] = [row for ids, prompts in reader.read(unit) for row in zip(ids, prompts)]
            assert len(got[unit]) == plan.units[unit][2]
        flat = [row for unit in order for row in got[unit]]
        assert [r[0] for r in flat] == [f"q{i}" for i in range(150)]
        assert all(p.startswith(f"Question number {i}:") for i, (_, p) in enumerate(flat))
