"""Bad input, each case: a clear message before anything is submitted, or a recorded row error."""
import decimal
import json
import shutil
import subprocess

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import compose
from orchestrator.errors import InputError
from orchestrator.preflight import prepare
from tests.conftest import write_prompts

EXE = shutil.which("orchestrator")


def cli(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


def test_duplicate_ids_are_refused_with_examples_before_submitting(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "a", "c", "b"], "prompt": list("vwxyz")}), tmp_path / "in.parquet")
    proc = cli("run", f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 1
    assert "2 rows repeat an id" in proc.stderr and "'a' at in.parquet:0, in.parquet:2" in proc.stderr
    assert "data.duplicate_ids=positional" in proc.stderr
    assert not (tmp_path / "r" / "plan.json").exists()


@pytest.mark.parametrize("policy,ids", [("positional", [f"in.parquet:{i}" for i in range(5)]),
                                        ("keep", ["a", "a", "b", "b", "c"])])
def test_duplicate_id_policies(tmp_path, policy, ids):
    pq.write_table(pa.table({"id": ["a", "b", "a", "c", "b"], "prompt": list("vwxyz")}), tmp_path / "in.parquet")
    proc = cli("run", f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'r'}",
               f"data.duplicate_ids={policy}", "sampling.tokens_to_generate=3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(pd.read_parquet(tmp_path / "r" / "results")["id"]) == sorted(ids)


def test_truncated_parquet_is_a_clear_error(tmp_path):
    good = write_prompts(tmp_path / "good.parquet", 100)
    data = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.parquet is not a readable Parquet file"):
        prepare(compose([f"data.input={tmp_path / 'cut.parquet'}", f"run_dir={tmp_path / 'r'}"]))


def test_zero_rows_complete_with_a_summary_of_zero(tmp_path):
    write_prompts(tmp_path / "empty.parquet", 0, prompts=[])
    proc = cli("run", f"data.input={tmp_path / 'empty.parquet'}", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["total"] == 0 and summary["ok"] == 0 and summary["failed"] == 0 and summary["complete"]


def test_files_with_different_extra_columns_run_together(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "prompt": ["hi"], "extra": [1]}), tmp_path / "d1.parquet")
    pq.write_table(pa.table({"prompt": pa.array(["yo"], pa.large_string()), "id": ["b"], "other": [[1, 2]]}),
                   tmp_path / "d2.parquet")
    proc = cli("run", f"data.input={tmp_path}/d*.parquet", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(pd.read_parquet(tmp_path / "r" / "results")["id"]) == ["a", "b"]


def test_files_missing_the_prompt_column_are_named(tmp_path):
    write_prompts(tmp_path / "d" / "ok.parquet", 2)
    pq.write_table(pa.table({"id": ["z"], "text": ["x"]}), tmp_path / "d" / "bad.parquet")
    proc = cli("run", f"data.input={tmp_path / 'd'}", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and "bad.parquet: no prompt column 'prompt'" in proc.stderr
    assert "['id', 'text']" in proc.stderr


def test_changing_settings_on_resume_is_refused(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    base = ["run", f"data.input={src}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=3"]
    assert cli(*base).returncode == 0
    proc = cli(*base, "sampling.temperature=0.5")
    assert proc.returncode == 1 and "sampling.temperature was 1.0, now 0.5" in proc.stderr
    assert "new run_dir" in proc.stderr
    proc = cli(*base, "model=nemotron3_8b_base")
    assert proc.returncode == 1 and "model was 'nemotron4_340b_instruct', now 'nemotron3_8b_base'" in proc.stderr
    write_prompts(src, 11)
    proc = cli(*base)
    assert proc.returncode == 1 and "input files changed" in proc.stderr


def test_a_null_id_among_good_ids_is_refused_before_submitting(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", None, "c"], "prompt": ["p1", "p2", "p3"]}), src)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(InputError, match=r"1 row\(s\) have a null id in column 'id' \(first at in.parquet:1\)"):
        prepare(cfg)
    positional = compose([f"data.input={src}", f"run_dir={tmp_path / 'p'}", "data.duplicate_ids=positional"])
    plan, _ = prepare(positional)
    assert plan.id_column is None  # ids become <file>:<row>


@pytest.mark.parametrize("override,key", [
    ("client.request_timeout_s=0", "client.request_timeout_s"), ("client.retry_backoff_s=-1", "client.retry_backoff_s"),
    ("client.grace_s=-5", "client.grace_s"), ("engine.port=70000", "engine.port"),
    ("client.retry_backoff_max_s=-1", "client.retry_backoff_max_s"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, key):
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key}=.* is out of range"):
        compose([override])


def test_two_first_starts_at_once_cannot_mix_settings(tmp_path):
    """The second of two first starts on one new run_dir (it saw no plan yet) must still be checked
    against the settings the first one published."""
    src = write_prompts(tmp_path / "in.parquet", 30)
    first = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=8"])
    prepare(first)
    (tmp_path / "r" / "plan.json").unlink()  # the moment between the two first starts
    second = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=16"])
    with pytest.raises(InputError, match="was started with other settings.*tokens_to_generate was 8, now 16"):
        prepare(second)
    prepare(first)  # the same settings are welcome


def test_dictionary_encoded_ids_work_end_to_end(tmp_path):
    """pandas categoricals are stored dictionary-encoded; they used to fail inside the job, after the plan
    was fixed, so that run_dir could never succeed."""
    from orchestrator.frontend import run

    df = pd.DataFrame({"id": pd.Categorical([f"c{i}" for i in range(30)]), "prompt": [f"q {i}" for i in range(30)]})
    df.to_parquet(tmp_path / "in.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "in.parquet").field("id").type)
    cfg = compose([f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'r'}", "data.unit_rows=10"])
    summary = run(cfg, show_progress=False)
    out = pd.read_parquet(tmp_path / "r" / "results")
    assert summary["complete"] and sorted(out["id"]) == sorted(f"c{i}" for i in range(30))


@pytest.mark.parametrize("column", [
    lambda: pa.array([decimal.Decimal("1.5"), decimal.Decimal("2.5")], pa.decimal128(4, 1)),
    lambda: pa.array([{"a": 1}, {"a": 2}]), lambda: pa.array([[1], [2]]),
])
def test_id_columns_that_cannot_be_ids_are_refused_before_submitting(tmp_path, column):
    pq.write_table(pa.table({"id": column(), "prompt": ["p1", "p2"]}), tmp_path / "in.parquet")
    cfg = compose([f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(InputError, match=r"id column 'id' has type .*; ids must be text or integers"):
        prepare(cfg)
    assert not (tmp_path / "r" / "plan.json").exists()


def _result_ids(run_dir):
    return list(pd.read_parquet(run_dir / "results")["id"])


@pytest.mark.parametrize("pattern", ["", "**/*.parquet", "**/*"])
def test_a_run_dir_inside_the_input_is_refused_before_anything_runs(tmp_path, pattern):
    """Its results would be read as input by every rerun ("results/part-...: no prompt column")."""
    write_prompts(tmp_path / "in" / "a.parquet", 5)
    spec = tmp_path / "in" / pattern if pattern else tmp_path / "in"
    run_dir = tmp_path / "in" / "run"
    proc = cli("run", f"data.input={spec}", f"run_dir={run_dir}", "sampling.tokens_to_generate=3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "run_dir=" in proc.stderr and f"data.input={str(spec)!r}" in proc.stderr, proc.stderr
    assert "choose a run_dir outside" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (run_dir / "plan.json").exists()


def test_a_run_dir_the_input_glob_does_not_reach_runs_and_reruns(tmp_path):
    """data.input=in/*.parquet never matches in/run/results/part-*: no refusal, and a rerun resumes."""
    write_prompts(tmp_path / "in" / "a.parquet", 5)
    args = (f"data.input={tmp_path / 'in' / '*.parquet'}", f"run_dir={tmp_path / 'in' / 'run'}",
            "sampling.tokens_to_generate=3")
    for _ in range(2):
        proc = cli("run", *args)
        assert proc.returncode == 0, proc.stderr
    assert sorted(_result_ids(tmp_path / "in" / "run")) == sorted(f"q{i}" for i in range(5))


def _linked_input(root):
    """An input directory holding a symlink to one of its files and a symlink to one of its directories."""
    write_prompts(root / "a.parquet", 3, ids=False)
    write_prompts(root / "sub" / "x.parquet", 2, start=3, ids=False)
    (root / "b_link.parquet").symlink_to("a.parquet")
    (root / "sub_link").symlink_to("sub", target_is_directory=True)
    return root


@pytest.mark.parametrize("pattern", ["", "**/*.parquet"])
def test_a_symlinked_input_file_or_directory_is_planned_once(tmp_path, pattern):
    root = _linked_input(tmp_path / "in")
    spec = root / pattern if pattern else root
    plan = prepare(compose([f"data.input={spec}", f"run_dir={tmp_path / 'p'}"]))[0]
    assert sorted(f.name for f in plan.files) == ["a.parquet", "sub/x.parquet"]
    proc = cli("run", f"data.input={spec}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=3")
    assert proc.returncode == 0, proc.stderr
    ids = _result_ids(tmp_path / "r")
    assert sorted(ids) == sorted([f"a.parquet:{i}" for i in range(3)] + [f"sub/x.parquet:{i}" for i in range(2)])


def test_a_symlinked_input_file_with_ids_is_not_a_repeated_id(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 4)
    (tmp_path / "in" / "b.parquet").symlink_to("a.parquet")
    proc = cli("run", f"data.input={tmp_path / 'in'}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(_result_ids(tmp_path / "r")) == [f"q{i}" for i in range(4)]


def test_a_run_dir_planned_with_a_file_twice_still_resumes(tmp_path, monkeypatch):
    """A run_dir whose plan (written before the fix) lists a symlinked file twice resumes on its stored plan."""
    from orchestrator import plan as plan_module

    root = _linked_input(tmp_path / "in")
    discover = plan_module.discover_inputs

    def twice(spec):  # the discovery before the fix: one entry per name, the same resolved file under two
        files, top = discover(spec)
        return sorted(files + [files[0]]), top

    args = [f"data.input={root}", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=3"]
    with monkeypatch.context() as patched:
        patched.setattr(plan_module, "discover_inputs", twice)
        old = prepare(compose(args))[0]
    assert [f.name for f in old.files] == ["a.parquet", "a.parquet", "sub/x.parquet"]
    proc = cli("run", *args)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["complete"] and summary["total"] == 8, summary


@pytest.mark.parametrize("spec,run_dir,refused", [
    ("in", "in/run", True), ("in", "in", True), ("in", "out/run", False), ("in/a.parquet", "in/run", False),
    ("in/*/*/*.parquet", "in/run", True), ("in/*.parquet", "in/run", False), ("in/**", "in/run", True),
    ("in/**/*.parquet", "in/.run", False), ("via/**/*.parquet", "in/run", True), ("in", "via/run", True),
    ("in/**/*.parquet", "out/run", False)])
def test_which_run_dirs_the_input_reaches(tmp_path, spec, run_dir, refused):
    """A directory reaches every run_dir under it (even through a symlink); a glob, the run_dirs whose results
    it would match."""
    from orchestrator.errors import ConfigError
    from orchestrator.inputs import check_run_dir_outside_input

    write_prompts(tmp_path / "in" / "a.parquet", 1)
    (tmp_path / "via").symlink_to("in", target_is_directory=True)
    check = lambda: check_run_dir_outside_input(str(tmp_path / spec), str(tmp_path / run_dir))  # noqa: E731
    if refused:
        with pytest.raises(ConfigError, match="choose a run_dir outside the input directory"):
            check()
    else:
        check()


def test_a_corrupt_data_page_in_the_id_column_names_the_file_and_column(tmp_path):
    """A damaged data page of the id column (footer intact, so the file opens) is met by the duplicate-id scan
    before anything is submitted: the refusal names the file, the column and the fix, never a raw pyarrow
    traceback (issue 19, item 12)."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(1000)], "prompt": [f"prompt {i}" for i in range(1000)]}),
                   src, compression="snappy")
    page = pq.read_metadata(src).row_group(0).column(0).data_page_offset
    data = bytearray(src.read_bytes())
    data[page:page + 200] = b"\xff" * 200
    src.write_bytes(bytes(data))
    proc = cli("run", f"data.input={src}", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{src}: the id column 'id' cannot be read from row 0 on" in proc.stderr
    assert "the file is damaged" in proc.stderr and "nothing was submitted" in proc.stderr
    assert not list((tmp_path / "r").glob("work/submitit/*"))
