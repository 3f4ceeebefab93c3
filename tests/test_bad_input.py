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
