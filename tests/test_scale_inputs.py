"""Big inputs (issue 10): a compact plan.json that derives its units, the duplicate-id scan spilling to disk
with the same answer, and `orchestrator status` over many committed units."""
import json
import random
from collections import Counter
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import duplicates, inputs, status
from orchestrator.commits import commit_unit, committed_rows
from orchestrator.config import DataConfig, compose
from orchestrator.duplicates import find_duplicate_ids
from orchestrator.errors import InputError
from orchestrator.plan import Plan, Units, build_plan, result_schema
from orchestrator.preflight import prepare
from orchestrator.report import build_summary
from tests.conftest import write_prompts


def old_units(plan: Plan, unit_rows: int) -> list[tuple[int, int, int]]:
    """The units as the previous version listed them in plan.json: every file cut into unit_rows runs."""
    return [(index, start, min(unit_rows, f.rows - start))
            for index, f in enumerate(plan.files) for start in range(0, f.rows, unit_rows)]


def old_plan_json(plan: Plan) -> str:
    """plan.json as the previous version wrote it: files as objects, every unit listed."""
    d = {name: getattr(plan, name) for name in ("prompt_column", "id_column", "id_type", "unit_rows",
                                                 "messages_column", "turns_column", "attributes_column",
                                                 "keep_columns", "keep_schema")}
    return json.dumps({**d, "files": [asdict(f) for f in plan.files],
                       "units": [list(u) for u in old_units(plan, plan.unit_rows)]})


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """240 small files in two folders, some empty, of varied lengths."""
    root = tmp_path_factory.mktemp("many")
    rng = random.Random(7)
    start = 0
    for i in range(240):
        n = rng.choice([0, 1, 2, 5, 9, 17])
        write_prompts(root / f"d{i % 2}" / f"part-{i:04d}.parquet", n, start=start)
        start += n
    return root


def test_plan_json_holds_files_not_units_and_round_trips(many_files):
    plan = build_plan(DataConfig(unit_rows=4), str(many_files))
    assert len(plan.files) == 240 and plan.total_rows == sum(f.rows for f in plan.files) > 0
    expected = old_units(plan, 4)
    assert len(plan.units) == len(expected) and list(plan.units) == expected and plan.units == expected
    assert [plan.units[u] for u in range(len(expected))] == expected
    assert plan.units[-1] == expected[-1] and plan.units[3:9] == expected[3:9]
    with pytest.raises(IndexError):
        plan.units[len(expected)]
    stored = json.loads(plan.to_json())
    assert "units" not in stored and stored["format"] == 2 and stored["unit_rows"] == 4
    again = Plan.from_json(plan.to_json())
    assert again == plan and list(again.units) == expected
    assert [f.path for f in again.files] == [f.path for f in plan.files]
    # the size follows the files, not the units: one row per unit costs no more than 1,000
    one_row = build_plan(DataConfig(unit_rows=1), str(many_files))
    assert len(one_row.units) == plan.total_rows
    assert abs(len(one_row.to_json()) - len(build_plan(DataConfig(unit_rows=1000), str(many_files)).to_json())) < 8
    assert len(one_row.to_json()) < 60 * len(plan.files) + 600  # the old format took ~170 bytes a file + 12 a unit
    done = set(random.Random(1).sample(range(len(expected)), 50)) | {len(expected) + 5}
    assert committed_rows(plan, done) == sum(expected[u][2] for u in done if u < len(expected))


def test_units_compare_and_count_like_the_list_they_stand_for():
    units = Units([0, 5, 0, 3, 8], 3)
    listed = [(1, 0, 3), (1, 3, 2), (3, 0, 3), (4, 0, 3), (4, 3, 3), (4, 6, 2)]
    assert list(units) == listed and units == listed and listed == units and len(units) == 6
    assert units != listed[:-1] and units != [(1, 0, 3)] * 6 and units == Units([0, 5, 0, 3, 8], 3)
    assert [units[i] for i in range(-6, 0)] == listed
    assert units.rows_of({0, 1, 5, 99}) == 3 + 2 + 2 and units.rows_of(set()) == 0


def test_build_plan_reads_each_footer_once(many_files, monkeypatch):
    opened, read_metadata = [], []
    real_open = inputs._open
    monkeypatch.setattr(inputs, "_open", lambda path: opened.append(path) or real_open(path))
    monkeypatch.setattr(pq, "read_metadata", lambda *a, **k: read_metadata.append(a) or pytest.fail("second read"))
    plan = build_plan(DataConfig(unit_rows=4), str(many_files))
    assert sorted(map(str, opened)) == sorted(f.path for f in plan.files) and not read_metadata


def test_a_bad_file_among_many_is_the_one_named(many_files, tmp_path):
    import shutil

    shutil.copytree(many_files, tmp_path / "in")
    (tmp_path / "in" / "d1" / "part-0101.parquet").write_text("not parquet")
    (tmp_path / "in" / "d1" / "part-0201.parquet").write_text("not parquet either")
    with pytest.raises(InputError, match=r"part-0101.parquet is not a readable Parquet file"):
        build_plan(DataConfig(unit_rows=4), str(tmp_path / "in"))


def test_an_old_plan_json_still_loads_and_resumes(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 23)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=5"])
    plan, paths = prepare(cfg)
    assert "units" not in json.loads(paths.plan.read_text())
    paths.plan.write_text(old_plan_json(plan))  # a run_dir started by the previous version
    again, _ = prepare(cfg)
    assert list(again.units) == old_units(plan, 5) == [(0, 0, 5), (0, 5, 5), (0, 10, 5), (0, 15, 5), (0, 20, 3)]
    assert again.files == plan.files and again.total_rows == 23
    _, opened = status.open_run(paths.root)
    assert opened.units == again.units
    # units that are not the files cut into unit_rows runs (none this version makes) stay listed
    odd = json.loads(old_plan_json(plan))
    odd["units"] = [[0, 0, 12], [0, 12, 11]]
    weird = Plan.from_json(json.dumps(odd))
    assert weird.units == [(0, 0, 12), (0, 12, 11)] and len(weird.units) == 2
    assert json.loads(weird.to_json())["units"] == [[0, 0, 12], [0, 12, 11]]
    assert Plan.from_json(weird.to_json()).units == weird.units


def write_ids(folder, groups: list[list], row_group_size: int = 13):
    folder.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(groups):
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "prompt": ["p"] * len(ids)}),
                       folder / f"f{i}.parquet", row_group_size=row_group_size)


@pytest.fixture(scope="module")
def messy_ids(tmp_path_factory):
    """Five files: unique ids, ids repeated across files, one id repeated 300 times, nulls."""
    rng = random.Random(3)
    groups = []
    for f in range(5):
        groups.append([rng.choice([f"x{rng.randrange(120)}", None, "same", f"u{f}-{i}", f"u{f}-{i}"])
                       for i in range(260)])
    folder = tmp_path_factory.mktemp("messy") / "in"
    write_ids(folder, groups)
    return folder, groups


def test_the_spilling_scan_gives_the_in_memory_answer(messy_ids, tmp_path, monkeypatch):
    folder, groups = messy_ids
    plan = build_plan(DataConfig(unit_rows=7), str(folder))
    in_memory = find_duplicate_ids(plan, 50)
    # the answer itself, computed here from the ids: nulls repeat each other as any id does
    ids = [(i, f"f{f}.parquet:{row}") for f, group in enumerate(groups) for row, i in enumerate(group)]
    counts = Counter(i for i, _ in ids)
    extra, examples, (nulls, first_null) = in_memory
    assert extra == sum(n - 1 for n in counts.values()) > 300
    assert nulls == counts[None] and first_null == next(where for i, where in ids if i is None)
    assert len(examples) == 3
    for ident, where in examples:
        assert counts[ident] > 1 and where == [w for i, w in ids if i == ident][:4]

    spilled = []
    real = duplicates._Buckets.repeats

    def spy(self, *args):
        spilled.append((self.skip, len(list(self.folder.iterdir())) if self.skip == 0 else 0))  # bucket files
        return real(self, *args)

    monkeypatch.setattr(duplicates._Buckets, "repeats", spy)
    for budget in (1, 3, 8, 64, 4096):
        spill = tmp_path / f"spill-{budget}"
        assert find_duplicate_ids(plan, 50, budget=budget, spill_dir=spill) == in_memory, budget
        assert not spill.exists() or list(spill.iterdir()) == []  # the bucket files are gone
    top = [files for skip, files in spilled if skip == 0]
    assert len(top) == 4 and all(files > 1 for files in top)  # budget 4096: the 1,300 ids fit, no spill
    assert any(skip > 0 for skip, _ in spilled)  # a bucket over its budget was split again
    assert find_duplicate_ids(plan, 50, budget=10**6, spill_dir=tmp_path / "none") == in_memory


def test_the_spilling_scan_with_nothing_repeated_and_one_null(tmp_path):
    write_ids(tmp_path / "in", [[f"a{i}" for i in range(40)], [f"b{i}" for i in range(30)] + [None]])
    plan = build_plan(DataConfig(), str(tmp_path / "in"))
    assert find_duplicate_ids(plan, 16, budget=2, spill_dir=tmp_path / "s") == (0, [], (1, "f1.parquet:30"))
    write_ids(tmp_path / "one", [["same"] * 50, ["same"] * 20])  # one bucket, one value, far over the budget
    plan = build_plan(DataConfig(), str(tmp_path / "one"))
    expected = (69, [("same", ["f0.parquet:0", "f0.parquet:1", "f0.parquet:2", "f0.parquet:3"])], (0, None))
    assert find_duplicate_ids(plan, 16, budget=4, spill_dir=tmp_path / "s") == expected == find_duplicate_ids(plan, 16)


def test_prepare_spills_under_the_run_dir_and_keeps_its_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(duplicates, "DUPLICATE_SCAN_HASHES", 2)
    folders = []
    real = duplicates._HashScratch.__enter__

    def spy(self):
        found = real(self)
        folders.append(found.folder)
        return found

    monkeypatch.setattr(duplicates._HashScratch, "__enter__", spy)
    pq.write_table(pa.table({"id": ["a", "b", "a", "c", "b"], "prompt": list("vwxyz")}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"2 rows repeat an id of column 'id' \(e\.g\. .*'a' at in\.parquet:0, "
                                         r"in\.parquet:2"):
        prepare(compose([f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'r'}"]))
    assert folders and folders[0].parent == (tmp_path / "r" / "work").resolve() and not folders[0].exists()
    assert not list((tmp_path / "r" / "work").iterdir())
    pq.write_table(pa.table({"id": ["a", None, "c", None], "prompt": list("wxyz")}), tmp_path / "nulls.parquet")
    with pytest.raises(InputError, match=r"2 row\(s\) have a null id in column 'id' \(first at nulls\.parquet:1\)"):
        prepare(compose([f"data.input={tmp_path / 'nulls.parquet'}", f"run_dir={tmp_path / 'n'}"]))
    plan, _ = prepare(compose([f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'p'}",
                               "data.duplicate_ids=positional"]))
    assert plan.id_column is None


UNITS = 1200


@pytest.fixture(scope="module")
def many_units(tmp_path_factory):
    """A run directory whose plan has 1,200 units, every one committed; one in ten holds a failed row."""
    root = tmp_path_factory.mktemp("units")
    src = write_prompts(root / "in.parquet", UNITS)
    plan, paths = prepare(compose([f"data.input={src}", f"run_dir={root / 'run'}", "data.unit_rows=1"]))
    for unit in range(UNITS):
        commit_unit(paths, unit, unit_table(plan, unit, bad=unit % 10 == 0), unit_stats(unit % 10 == 0), "r0")
    return plan, paths


def unit_table(plan, unit: int, bad: bool, error: str | None = None) -> pa.Table:
    return pa.table({"id": [f"q{unit}"], "response": [None if bad else "x"], "status": ["error" if bad else "ok"],
                     "error": [(error or f"gave up after {unit % 4 + 1} attempts: HTTP 503") if bad else None],
                     "finish_reason": [None if bad else "stop"], "stop": [None], "prompt_tokens": [None if bad else 9],
                     "reasoning": [None], "output_tokens": [0 if bad else 2], "latency_s": [0.5],
                     "attempts": pa.array([1], pa.int32())},
                    schema=result_schema(plan))


def unit_stats(bad: bool) -> dict:
    return {"rows": 1, "ok": int(not bad), "failed": int(bad), "output_tokens": 0 if bad else 2, "units": 1,
            "retryable": int(bad)}


def test_status_and_summary_over_many_units(many_units, monkeypatch):
    plan, paths = many_units
    (paths.root / "work" / status.ERRORS_CACHE).unlink(missing_ok=True)
    first = status.collect(paths.root)
    assert first["rows"] == {"total": UNITS, "committed": UNITS, "ok": UNITS - UNITS // 10, "failed": UNITS // 10,
                             "retryable": UNITS // 10, "output_tokens": 2 * (UNITS - UNITS // 10),
                             "units": UNITS, "units_done": UNITS, "prompts": UNITS, "prompts_total": UNITS,
                             "answers": UNITS, "answers_total": UNITS, "rollouts": 1, "invalid_structured": 0,
                             "schema_retries": 0, "failed_upstream": 0}
    assert first["state"] == "complete" and first["damaged"] == []
    assert [(g["reason"], g["rows"]) for g in first["errors"]] == \
        [("gave up after <n> attempts: HTTP 503", UNITS // 10)]
    assert (paths.root / "work" / status.ERRORS_CACHE).exists()
    # a second status finds every failed unit's errors in the cache: no result file is read
    monkeypatch.setattr(status, "_unit_errors", lambda path: pytest.fail(f"read {path} again"))
    assert status.collect(paths.root)["errors"] == first["errors"]
    summary = build_summary(paths, plan, "a", 0.0)
    assert (summary["committed"], summary["ok"], summary["failed"], summary["units"], summary["units_done"]) == \
        (UNITS, UNITS - UNITS // 10, UNITS // 10, UNITS, UNITS)


def test_status_reads_a_recommitted_unit_again(many_units):
    plan, paths = many_units
    status.collect(paths.root)
    commit_unit(paths, 10, unit_table(plan, 10, bad=False), unit_stats(False), "r0", **replace_kw())  # retried: ok now
    s = status.collect(paths.root)
    assert s["rows"]["failed"] == UNITS // 10 - 1
    assert [g["rows"] for g in s["errors"]] == [UNITS // 10 - 1]
    commit_unit(paths, 10, unit_table(plan, 10, bad=True, error="prompt is empty"), unit_stats(True), "r0",
                **replace_kw())  # failed again, for another reason: what the cache held for unit 10 is stale
    assert [(g["reason"], g["rows"]) for g in status.collect(paths.root)["errors"]] == \
        [("gave up after <n> attempts: HTTP 503", UNITS // 10 - 1), ("prompt is empty", 1)]
    commit_unit(paths, 10, unit_table(plan, 10, bad=True), unit_stats(True), "r0", **replace_kw())
    assert [g["rows"] for g in status.collect(paths.root)["errors"]] == [UNITS // 10]


def replace_kw() -> dict:
    """commit_unit's way to replace an earlier commit of the unit (retry_failed), where it has one."""
    import inspect

    return {"replace": True} if "replace" in inspect.signature(commit_unit).parameters else {}
