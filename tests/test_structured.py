"""Structured answers (docs/output.md "Structured answers"): sampling.json_schema (a file or inline) or a
per-row data.schema_column; each engine's own request fields; every answer parsed and validated, typed
columns (output.parse=struct|columns), re-asks with new seeds (client.invalid_retries) then the row error
InvalidStructuredOutput; counts in summary.json and status; bad schemas refused before submission; resume."""
import json
import subprocess
from pathlib import Path

import jsonschema
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from orchestrator.config import compose
from orchestrator.errors import ConfigError, InputError, OrchestratorError
from orchestrator.frontend import run
from orchestrator.html_report import write_report
from orchestrator.journal import parse
from orchestrator.plan import rollout_seed
from orchestrator.protocols import make_codec
from orchestrator.protocols.base import EngineInfo, RowSampling
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import EngineSettings
from orchestrator.status import collect, format_status
from orchestrator.structured import RESEED, arrow_type, check_answer
from tests.conftest import committed, journaled, kill_jobs_when, orchestrator_cmd, write_prompts

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "score": {"type": "number"}, "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                                           "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
          "required": ["name", "age"]}
COLUMN_TYPES = {"name": pa.string(), "age": pa.int64(), "score": pa.float64(), "ok": pa.bool_(),
                "tags": pa.list_(pa.string()), "either": pa.string()}  # anyOf: its JSON text


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "person.json"
    path.write_text(json.dumps(SCHEMA))
    return path


def run_rows(tmp_path, *overrides, rows=20, name="run", src=None):
    src = src or tmp_path / f"{name}.parquet"
    if not src.exists():
        write_prompts(src, rows)
    run(compose([f"data.input={src}", f"run_dir={tmp_path / name}", "data.unit_rows=10", "engine.protocol=openai",
                 "sampling.tokens_to_generate=64", *overrides]), show_progress=False)
    return read(tmp_path / name)


def read(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results").sort_values(["id"]).reset_index(drop=True)


def nulls(column: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in column]


def result_schema(run_dir: Path) -> pa.Schema:
    return pq.read_schema(next((run_dir / "results").glob("*.parquet")))


# ------------------------------------------------------------------------------------ config, before submission

def test_the_schema_is_read_from_a_file_or_inline_and_kept_in_the_config(schema_file):
    from_file = compose([f"sampling.json_schema={schema_file}"]).sampling.json_schema
    assert from_file == SCHEMA
    inline = compose(["sampling.json_schema={type: object, properties: {a: {type: integer}}}"]).sampling.json_schema
    assert inline == {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = compose(["+sampling.json_schema='{\"type\": \"array\", \"items\": {\"type\": \"string\"}}'"])
    assert text.sampling.json_schema == {"type": "array", "items": {"type": "string"}}
    assert compose([]).sampling.json_schema is None


@pytest.mark.parametrize("value, expected", [
    ("/nonexistent/schema.json", "no such file"),
    ("'{\"type\": \"object\",'", "is not JSON"),
    ("{type: 12}", "is not a valid JSON Schema"),
    ("{properties: {a: {minimum: x}}}", "is not a valid JSON Schema"),
])
def test_a_bad_schema_is_refused_with_the_key_and_the_fix(value, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        compose([f"sampling.json_schema={value}"])
    assert "sampling.json_schema" in str(info.value)


def test_a_schema_file_that_is_not_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json.* is not JSON"):
        compose([f"sampling.json_schema={bad}"])


def test_parse_columns_needs_top_level_properties_that_do_not_clash():
    with pytest.raises(ConfigError, match="no top-level properties"):
        compose(["sampling.json_schema={type: array, items: {type: string}}", "output.parse=columns"])
    with pytest.raises(ConfigError, match=r"\['error', 'status'\] clash with result columns"):
        compose(["sampling.json_schema={type: object, properties: {status: {type: string}, error: {type: string},"
                 " fine: {type: string}}}", "output.parse=columns"])
    with pytest.raises(ConfigError, match="needs a schema"):
        compose(["output.parse=columns"])
    with pytest.raises(ConfigError, match="output.parse=struct"):
        compose(["data.schema_column=schema", "output.parse=columns"])
    with pytest.raises(ConfigError, match=r"data.keep_columns names \['seed'\]"):
        compose(["sampling.json_schema={type: object}", "data.keep_columns=[seed]"])
    with pytest.raises(ConfigError, match="client.invalid_retries"):
        compose(["client.invalid_retries=-1"])


def test_a_schema_column_the_input_lacks_or_that_is_not_text_is_refused_before_submission(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "schema": [3]}), src)
    for column, expected in (("nope", "no schema column 'nope'"), ("schema", "has type int64, not text")):
        with pytest.raises(InputError, match=expected):
            run(compose([f"data.input={src}", f"run_dir={tmp_path / column}", f"data.schema_column={column}"]),
                show_progress=False)
        assert not (tmp_path / column / "results").exists()


# ------------------------------------------------------------------------------------ type mapping, validation

def test_json_schema_types_map_to_arrow_types():
    assert arrow_type(SCHEMA) == pa.struct(list(COLUMN_TYPES.items()))
    assert arrow_type({"type": ["integer", "null"]}) == pa.int64()
    assert arrow_type({"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}}) == \
        pa.list_(pa.struct([("x", pa.float64())]))
    for other in ({}, {"type": "object"}, {"type": "array"}, {"enum": [1, "a"]}, {"type": ["string", "integer"]}):
        assert arrow_type(other) == pa.string()  # JSON text


def test_an_answer_is_checked_after_stripping_whitespace_and_says_why_it_is_invalid():
    text = json.dumps(SCHEMA)
    assert check_answer('  \n{"name": "a", "age": 3}\n ', text) == ({"name": "a", "age": 3}, None)
    value, why = check_answer('{"name": "a", "age": -1}', text)
    assert value is None and "-1 is less than the minimum of 0" in why and "/age" in why
    assert "not JSON" in check_answer('{"name": "a", ', text)[1]


# ------------------------------------------------------------------------------------ the engines' request fields

def codec(*overrides, api="completions"):
    cfg = compose(["engine.protocol=openai", f"engine.api={api}", "sampling.json_schema={type: object}", *overrides])
    return make_codec(cfg, EngineInfo(url="http://x", protocol="openai", model_name="m", api=api))


@pytest.mark.parametrize("engine, api, fields", [
    ("mock", "completions", {"structured_outputs": {"json": {"type": "object"}}}),
    ("vllm", "completions", {"structured_outputs": {"json": {"type": "object"}}}),
    ("endpoint", "chat", {"response_format": {"type": "json_schema",
                                              "json_schema": {"name": "answer", "schema": {"type": "object"}}}}),
    ("vllm", "chat", {"response_format": {"type": "json_schema",
                                          "json_schema": {"name": "answer", "schema": {"type": "object"}}}}),
    ("sglang", "completions", {"json_schema": '{"type": "object"}'}),
    ("sglang", "chat", {"response_format": {"type": "json_schema",
                                            "json_schema": {"name": "answer", "schema": {"type": "object"}}}}),
    ("trtllm", "completions", {"response_format": {"type": "json", "schema": {"type": "object"}}}),
    ("trtllm", "chat", {"response_format": {"type": "json", "schema": {"type": "object"}}}),
])
def test_each_engine_gets_the_schema_in_its_own_fields(engine, api, fields):
    extra = ["engine.url=http://x"] if engine == "endpoint" else []
    body = codec(f"engine={engine}", *extra, api=api).payload(["p"])
    assert {k: body[k] for k in fields} == fields
    others = {"structured_outputs", "response_format", "json_schema"} - set(fields)
    assert not others & set(body)


def test_a_rows_own_schema_wins_and_no_schema_sends_none():
    row = RowSampling(schema='{"type": "array"}')
    assert codec().payload(["p"], row=row)["structured_outputs"] == {"json": {"type": "array"}}
    plain = make_codec(compose(["engine.protocol=openai"]), EngineInfo(url="http://x", protocol="openai",
                                                                       model_name="m"))
    assert "structured_outputs" not in plain.payload(["p"]) and "response_format" not in plain.payload(["p"])
    assert plain.payload(["p"], row=row)["structured_outputs"] == {"json": {"type": "array"}}


@pytest.mark.parametrize("protocol", ["nemo", "triton"])
def test_nemo_and_triton_get_no_schema_their_answers_are_checked_after(protocol):
    cfg = compose([f"engine.protocol={protocol}", "sampling.json_schema={type: object}"])
    info = EngineInfo(url="http://x", protocol=protocol, model_name="m", api="generate" if protocol == "triton"
                      else "completions", inputs={"text_input": "BYTES", "max_tokens": "INT32"})
    text = json.dumps(make_codec(cfg, info).payload(["p"]))
    assert "object" not in text and "schema" not in text


# ------------------------------------------------------------------------------------ the embedded engine

@pytest.fixture(scope="module")
def engine():
    with EngineThread(EngineSettings()) as e:
        yield e


def post(engine, path, body):
    return requests.post(engine.url + path, json={"model": "mock", "max_tokens": 64, **body}, timeout=30)


def test_the_embedded_engine_answers_an_instance_of_the_schema_deterministic_from_the_seed(engine):
    bodies = [("/v1/completions", {"prompt": "Tell me", "structured_outputs": {"json": SCHEMA}}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me"}],
                                        "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "p", "schema": SCHEMA}}})]
    for path, body in bodies:
        texts = []
        for seed in (1, 1, 2):
            resp = post(engine, path, {**body, "seed": seed})
            assert resp.status_code == 200, resp.text
            choice = resp.json()["choices"][0]
            texts.append(choice["text"] if "text" in choice else choice["message"]["content"])
            jsonschema.validate(json.loads(texts[-1]), SCHEMA)
            assert choice["finish_reason"] == "stop"
        assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize("field, expected", [
    ({"structured_outputs": "json"}, "valid dictionary"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a+"}}, "only use one kind of structured outputs"),
    ({"structured_outputs": {"json": {"type": 3}}}, "invalid JSON schema"),
    ({"structured_outputs": {"jsn": SCHEMA}}, "Unexpected keyword argument 'jsn'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "Field required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_the_embedded_engine_refuses_malformed_structured_fields_with_vllms_400(engine, field, expected):
    resp = post(engine, "/v1/completions", {"prompt": "p", **field})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert expected in error["message"] and error["type"] == "BadRequestError" and error["code"] == 400


# ------------------------------------------------------------------------------------ runs

def test_a_run_parses_every_answer_into_a_typed_struct_column(tmp_path, schema_file):
    df = run_rows(tmp_path, f"sampling.json_schema={schema_file}")
    assert (df["status"] == "ok").all()
    schema = result_schema(tmp_path / "run")
    assert schema.field("parsed").type == pa.struct(list(COLUMN_TYPES.items()))
    assert schema.field("schema_retries").type == pa.int32() and schema.field("seed").type == pa.int64()
    for response, parsed in zip(df["response"], df["parsed"]):
        value = json.loads(response)
        jsonschema.validate(value, SCHEMA)
        assert parsed["name"] == value["name"] and parsed["age"] == value["age"]
        assert parsed["either"] == json.dumps(value["either"])
    assert (df["schema_retries"] == 0).all() and df["seed"].isna().all()


def test_parse_columns_gives_the_top_level_properties_as_typed_columns(tmp_path, schema_file):
    df = run_rows(tmp_path, f"sampling.json_schema={schema_file}", "output.parse=columns", "engine.api=chat")
    assert (df["status"] == "ok").all()
    schema = result_schema(tmp_path / "run")
    assert {name: schema.field(name).type for name in COLUMN_TYPES} == COLUMN_TYPES
    assert "parsed" not in schema.names
    assert list(df["age"]) == [json.loads(r)["age"] for r in df["response"]]


def test_a_schema_column_gives_each_row_its_schema_and_a_bad_one_is_that_rows_error(tmp_path):
    schemas = [json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
               json.dumps({"type": "array", "items": {"type": "boolean"}, "minItems": 1}),
               None,  # the run's schema
               "{not json",
               json.dumps({"type": "nonsense"})]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(5)], "prompt": [f"question {i}" for i in range(5)],
                             "schema": schemas}), src)
    df = run_rows(tmp_path, "data.schema_column=schema", "sampling.json_schema={type: string}", src=src)
    assert result_schema(tmp_path / "run").field("parsed").type == pa.string()  # JSON text: types vary per row
    assert list(df["status"]) == ["ok", "ok", "ok", "error", "error"]
    assert isinstance(json.loads(df["parsed"][0])["n"], int)
    assert all(isinstance(v, bool) for v in json.loads(df["parsed"][1]))
    assert isinstance(json.loads(df["parsed"][2]), str)
    assert "data.schema_column 'schema'" in df["error"][3] and "is not JSON" in df["error"][3]
    assert "is not a valid JSON Schema" in df["error"][4]


def test_invalid_answers_are_asked_again_with_new_seeds_then_are_invalid_structured_output(tmp_path, schema_file):
    df = run_rows(tmp_path, f"sampling.json_schema={schema_file}", "engine.simulator.invalid_json_rate=0.5",
                  rows=40)
    retried = df[df["schema_retries"] > 0]
    failed = df[df["status"] == "error"]
    assert len(retried) and len(failed) and (df["status"] == "ok").sum()
    ok = df[df["status"] == "ok"]
    for response in ok["response"]:
        jsonschema.validate(json.loads(response), SCHEMA)
    # re-ask k is seeded RESEED * k above the first ask (no sampling.seed: 0), and recorded
    assert list(ok["seed"].fillna(0).astype(int)) == [RESEED * k for k in ok["schema_retries"]]
    assert (failed["schema_retries"] == 2).all()  # client.invalid_retries, all taken
    assert failed["error"].str.startswith("InvalidStructuredOutput: ").all()
    assert failed["parsed"].isna().all()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["invalid_structured"] == len(failed)
    assert summary["schema_retries"] == int(df["schema_retries"].sum())
    status = collect(tmp_path / "run")
    assert status["rows"]["invalid_structured"] == len(failed)
    assert f"{int(df['schema_retries'].sum())} re-ask(s)" in format_status(status)
    page = write_report(tmp_path / "run").read_text()
    assert f"{int(df['schema_retries'].sum())} re-ask(s) of answers that did not match, {len(failed)} row(s)" in page


def test_with_no_retries_every_invalid_answer_is_a_row_error_at_once(tmp_path):
    df = run_rows(tmp_path, "sampling.json_schema={type: object}", "engine.simulator.invalid_json_rate=1.0",
                  "client.invalid_retries=0", "client.max_error_fraction=1.0", rows=10)
    assert (df["status"] == "error").all() and (df["schema_retries"] == 0).all()
    assert df["error"].str.startswith("InvalidStructuredOutput: [] is not of type 'object'").all()


def test_each_rollout_is_asked_again_alone_with_its_own_seed(tmp_path):
    df = run_rows(tmp_path, "sampling.json_schema={type: object, properties: {x: {type: integer}}}",
                  "sampling.rollouts=3", "sampling.greedy=false", "engine.simulator.invalid_json_rate=0.4",
                  "client.invalid_retries=4", "sampling.seed=7", rows=10)
    assert len(df) == 30
    ok = df[df["status"] == "ok"]
    again = ok[ok["schema_retries"] > 0]
    assert len(again) and len(ok) > 20
    for _, row in ok.iterrows():  # rollout k is sampled with base + k, then RESEED further per re-ask
        base = rollout_seed(7, row["id"])
        assert row["seed"] == (base + row["rollout"] + RESEED * row["schema_retries"]) % 2 ** 31


def test_resume_with_a_changed_schema_is_refused(tmp_path, schema_file):
    run_rows(tmp_path, f"sampling.json_schema={schema_file}", rows=10)
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**SCHEMA, "required": ["name"]}))
    with pytest.raises(OrchestratorError, match="sampling.json_schema"):
        run_rows(tmp_path, f"sampling.json_schema={changed}", rows=10)
    with pytest.raises(OrchestratorError, match="structured.parse"):
        run_rows(tmp_path, f"sampling.json_schema={schema_file}", "output.parse=columns", rows=10)


def test_retry_failed_with_more_re_asks_recovers_invalid_rows_and_keeps_the_ok_ones(tmp_path):
    args = ["sampling.json_schema={type: object}", "engine.simulator.invalid_json_rate=0.6",
            "client.max_error_fraction=1.0"]
    before = run_rows(tmp_path, *args, "client.invalid_retries=0", rows=20)
    failed = before["status"] == "error"
    assert failed.any() and (~failed).any()
    after = run_rows(tmp_path, *args, "client.invalid_retries=6", "retry_failed=true", rows=20)
    assert (after["status"] == "error").sum() < failed.sum()
    assert list(after["response"][~failed]) == list(before["response"][~failed])
    assert (after["schema_retries"][failed & (after["status"] == "ok")] > 0).all()


def test_a_journal_keeps_re_asks_and_seeds_and_reads_old_records():
    digest = "d" * 16
    head = json.dumps({"journal": 1, "settings": digest, "unit": 0, "rows": 3}) + "\n"
    old = {"i": [0], "id": ["a"], "response": ["{}"], "tokens": [1], "latency": [0.1], "attempts": [1]}
    new = {"i": [1, 2], "id": ["b", "c"], "response": ["{}", None], "tokens": [1, None], "latency": [0.1, 0.2],
           "attempts": [1, 1], "sretries": [1, 2], "seed": [RESEED, 2 * RESEED], "status": ["ok", "error"],
           "error": [None, "InvalidStructuredOutput: no"], "blamed": [2]}
    entries, _ = parse((head + json.dumps(old) + "\n" + json.dumps(new) + "\n").encode(), digest, 0, 3)
    assert (entries[0].schema_retries, entries[0].seed) == (0, None)
    assert (entries[1].schema_retries, entries[1].seed) == (1, RESEED)
    assert (entries[2].schema_retries, entries[2].status, entries[2].blamed) == (2, "error", True)
    bad = dict(new, sretries=["x", 1])
    entries, _ = parse((head + json.dumps(bad) + "\n").encode(), digest, 0, 3)
    assert entries == {}  # a record of the wrong types is skipped whole: its rows are asked again


def test_sigkill_then_resume_keeps_the_parsed_rows_and_their_re_asks(tmp_path, schema_file):
    src = write_prompts(tmp_path / "in.parquet", 60)
    args = [f"data.input={src}", "data.unit_rows=20", "engine.protocol=openai", "sampling.tokens_to_generate=64",
            f"sampling.json_schema={schema_file}", "engine.simulator.invalid_json_rate=0.5",
            "engine.simulator.request_latency_s=0.05", "client.max_in_flight=2"]
    whole = tmp_path / "whole"
    assert subprocess.run([*orchestrator_cmd(), "run", f"run_dir={whole}", *args], capture_output=True,
                          timeout=300).returncode == 0
    run_dir = tmp_path / "run"
    first = subprocess.Popen([*orchestrator_cmd(), "run", f"run_dir={run_dir}", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    kill_jobs_when(first, run_dir, lambda: committed(run_dir) >= 1 and any(
        "sretries" in r for r in journaled(run_dir)))
    assert committed(run_dir) < 3
    second = subprocess.run([*orchestrator_cmd(), "run", f"run_dir={run_dir}", *args], capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert json.loads((run_dir / "summary.json").read_text())["journal_rows"] > 0  # rows kept from the journal
    got, expected = read(run_dir), read(whole)
    assert list(got["id"]) == list(expected["id"])  # every row once
    for column in ("response", "status", "schema_retries", "seed"):
        assert nulls(got[column]) == nulls(expected[column]), column
    parsed = [pq.read_table(d / "results").sort_by("id").column("parsed").to_pylist() for d in (run_dir, whole)]
    assert parsed[0] == parsed[1]


def test_a_rows_own_schema_is_checked_whatever_set_it_and_an_unusable_one_is_that_rows_error():
    """RowSampling.schema may come from data.schema_column or from another reader (an OpenAI batch line's
    response_format): the answers are checked against it, with or without a run schema, never a crash."""
    from orchestrator.protocols.base import Completion, Request
    from orchestrator.unit_source import Reasks, UnitBuffer, settle_answers

    buf = UnitBuffer(0, 3)
    buf.ids = ["a", "b", "c"]
    rows = [RowSampling(schema='{"type": "array"}'), RowSampling(schema="{not json"),
            RowSampling(schema='{"$ref": "https://example.invalid/x.json"}')]
    reasks = Reasks(None, 1, None)
    for i, row in enumerate(rows):
        settle_answers([Request(buf, i, "p", None, 1, row)], [Completion("{}", 1)], 0.1, 1, [], False, 8,
                       schemas=reasks)
    again = reasks.take()
    assert [[(item.first, item.seed) for item in batch] for batch in again] == [[(0, RESEED)]]  # re-asked
    assert buf.status == [None, "error", "error"]
    assert "is not JSON" in buf.error[1] and "cannot be applied" in buf.error[2]
    settle_answers(again[0], [Completion("[1]", 1)], 0.1, 1, [], False, 8, schemas=reasks)
    assert (buf.status[0], buf.schema_retries[0], buf.seed[0]) == ("ok", 1, RESEED)
