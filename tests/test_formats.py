"""Issue 21's per-row sampling and the formats users bring: data.sampling_columns, JSONL input, OpenAI Batch
API input, and output.format=openai_batch, on the embedded engine."""
import json
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError, InputError, OrchestratorError
from orchestrator.frontend import run
from orchestrator.plan import build_plan
from orchestrator.preflight import prepare
from orchestrator.protocols import make_codec
from orchestrator.reader import UnitReader
from orchestrator.row_settings import row_settings
from orchestrator.sinks import sink_for
from tests.conftest import kill_jobs_when, orchestrator_cmd

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE = ["engine.protocol=openai", "sampling.tokens_to_generate=12"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def batch_line(i, extra=None, **fields) -> dict:
    line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"Tell me a story {i}"}],
                     **(extra or {})}}
    line.update(fields)
    return line


def run_dir_of(tmp_path, src, *overrides, name="run"):
    run(compose([f"data.input={src}", f"run_dir={tmp_path / name}", "data.unit_rows=4", *BASE, *overrides]),
        show_progress=False)
    return tmp_path / name


def results(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results").sort_values("id").reset_index(drop=True)


def sampled_input(tmp_path) -> Path:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "id": [f"q{i}" for i in range(8)],
        "prompt": ["Tell me a long story about the sea"] * 8,  # one prompt: only the row's own settings differ
        "budget": pa.array([2, None, 3, None, 2, None, 3, None], pa.int64()),
        "temp": pa.array([0.5, None, 1.5, None, 0.5, None, 1.5, None], pa.float64()),
        "nucleus": pa.array([0.9] * 8, pa.float32()),
        "row_seed": pa.array([1, 2, 3, 4, 1, 2, 3, 4], pa.int32()),
    }), src)
    return src


SAMPLING = "data.sampling_columns={max_tokens:budget,temperature:temp,top_p:nucleus,seed:row_seed}"


def test_sampling_columns_reach_the_request_and_are_kept_in_the_results(tmp_path):
    src = sampled_input(tmp_path)
    cfg = compose([f"data.input={src}", SAMPLING, *BASE])
    plan = build_plan(cfg.data, str(src))
    codec = make_codec(cfg, protocol="openai")
    _, part = next(UnitReader(plan, 100).read_parts(0))
    bodies = [codec.payload(["x"], row=row) for row, why in row_settings(part, plan)]
    assert [b["max_tokens"] for b in bodies] == [2, 12, 3, 12, 2, 12, 3, 12]  # a null is the config's
    config = codec.base["temperature"]
    assert [b["temperature"] for b in bodies] == [0.5, config, 1.5, config] * 2
    assert [b["top_p"] for b in bodies] == [pytest.approx(0.9)] * 8
    assert [b["seed"] for b in bodies] == [1, 2, 3, 4, 1, 2, 3, 4]

    df = results(run_dir_of(tmp_path, src, SAMPLING, "sampling.tokens_to_generate=40"))
    assert (df["status"] == "ok").all()
    assert list(df["budget"].astype("Int64")) == [2, pd.NA, 3, pd.NA, 2, pd.NA, 3, pd.NA]  # kept, as its column
    assert list(df["row_seed"]) == [1, 2, 3, 4, 1, 2, 3, 4]
    own = df["budget"].notna()
    assert (df.loc[own, "output_tokens"] == df.loc[own, "budget"]).all()
    assert (df.loc[own, "finish_reason"] == "length").all()  # the row's own budget was used up
    assert (df.loc[~own, "output_tokens"] > 3).all()
    # the same prompt under the same row seed (and settings) gives the same answer, under another seed another
    assert df["response"][0] == df["response"][4] and df["response"][1] == df["response"][5]
    assert df["response"][1] != df["response"][3]


def test_a_rows_own_max_tokens_is_the_budget_of_its_finish_reason():
    """Where the engine gives only a token count (NeMo), finish_reason is judged by the row's own budget."""
    from orchestrator.protocols.base import Completion, Request, RowSampling
    from orchestrator.unit_source import UnitBuffer, settle_answers

    buf = UnitBuffer(0, 2)
    buf.ids = ["a", "b"]
    batch = [Request(buf, 0, "p", row=RowSampling(max_tokens=3)), Request(buf, 1, "p")]
    settle_answers(batch, [Completion("x y z", 3), Completion("x y z", 3)], 0.1, 1, [], False, budget=100)
    assert buf.finish_reason == ["length", "stop"]  # 3 of the row's 3 tokens; 3 of the config's 100


def test_a_row_seed_is_the_base_of_its_rollout_seeds(tmp_path):
    src = sampled_input(tmp_path)
    rollouts = ["sampling.rollouts=2", "sampling.greedy=false"]
    own = results(run_dir_of(tmp_path, src, "data.sampling_columns={seed:row_seed}", "sampling.seed=99", *rollouts))
    as_config = results(run_dir_of(tmp_path, src, "sampling.seed=1", *rollouts, name="one"))
    plain = results(run_dir_of(tmp_path, src, "sampling.seed=99", *rollouts, name="plain"))
    seeded_one = own["row_seed"] == 1  # these rows' rollouts are those of a run with sampling.seed=1
    assert seeded_one.sum() == 4
    assert list(own.loc[seeded_one, "response"]) == list(as_config.loc[seeded_one, "response"])
    assert list(own.loc[seeded_one, "response"]) != list(plain.loc[seeded_one, "response"])


def test_a_sampling_column_of_the_wrong_type_is_refused_before_submission(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "budget": [2.5], "temp": ["hot"]}), src)
    with pytest.raises(InputError, match=r"column 'budget' \(data.sampling_columns.max_tokens\) has type double; "
                                         r"it must hold integers"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'a'}",
                         "data.sampling_columns={max_tokens:budget}"]))
    with pytest.raises(InputError, match=r"column 'temp' \(data.sampling_columns.temperature\) has type string"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'b'}", "data.sampling_columns={temperature:temp}"]))
    with pytest.raises(InputError, match=r"no column 'nope' \(data.sampling_columns.seed\)"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'c'}", "data.sampling_columns={seed:nope}"]))
    with pytest.raises(Exception, match="max_token"):  # an unknown field, when the config is read
        compose(["data.sampling_columns={max_token:budget}"])


def test_an_out_of_range_sampling_value_is_that_rows_error(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": ["p a", "p b", "p c", "p d"],
                             "temp": [0.7, 0.0, None, 0.7], "p": [0.5, 0.5, 1.5, 0.5],
                             "budget": pa.array([4, 4, 4, 0], pa.int64())}), src)
    df = results(run_dir_of(tmp_path, src, "data.sampling_columns={temperature:temp,top_p:p,max_tokens:budget}"))
    assert list(df["status"]) == ["ok", "error", "error", "error"]
    assert "column 'temp' (data.sampling_columns.temperature) is 0.0; it must be > 0" in df["error"][1]
    assert "column 'p' (data.sampling_columns.top_p) is 1.5" in df["error"][2]
    assert "column 'budget' (data.sampling_columns.max_tokens) is 0; it must be >= 1" in df["error"][3]


def test_changing_sampling_columns_on_a_run_dir_is_refused(tmp_path):
    src = sampled_input(tmp_path)
    run_dir_of(tmp_path, src, "data.sampling_columns={max_tokens:budget}")
    with pytest.raises(InputError, match="sampling_columns"):
        run_dir_of(tmp_path, src, "data.sampling_columns={max_tokens:budget,seed:row_seed}")


def test_jsonl_input_of_plain_prompts(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "topic": "math"}
                                              for i in range(10)] + [""])  # a blank line is no row
    df = results(run_dir_of(tmp_path, src, "data.keep_columns=[topic]"))
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(10)) and (df["status"] == "ok").all()
    assert set(df["topic"]) == {"math"}


@pytest.mark.parametrize("line,why", [("{not json", "not valid JSON"), ("[1, 2]", "a JSON list, not an object")])
def test_a_bad_jsonl_line_is_named_with_its_line_number(tmp_path, line, why):
    rows = [json.dumps({"prompt": f"p{i}"}) for i in range(7)]
    rows.insert(5, line)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(InputError, match=rf"in.jsonl:6: {why}"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.unit_rows=3"]))
    assert not (tmp_path / "run" / "plan.json").exists()


def test_repeated_ids_of_a_jsonl_input_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i % 5}", "prompt": f"p{i}"} for i in range(8)])
    with pytest.raises(InputError, match="rows repeat an id of column 'id'"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.unit_rows=3"]))


def test_parquet_and_jsonl_in_one_input_are_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "x"}])
    pq.write_table(pa.table({"prompt": ["y"]}), folder / "b.parquet")
    with pytest.raises(InputError, match="mixes Parquet .*b.parquet.* and JSONL .*a.jsonl"):
        prepare(compose([f"data.input={folder}", f"run_dir={tmp_path / 'run'}"]))


def test_a_big_jsonl_is_read_unit_by_unit_from_its_offsets(tmp_path, monkeypatch):
    import orchestrator.jsonl_input as jsonl_input

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"row {i} " + "x" * (i % 7)} for i in range(5000)])
    plan = build_plan(compose(["data.unit_rows=500"]).data, str(src))
    assert len(plan.units) == 10 and len(plan.offsets[0]) == 10
    read = []
    real = jsonl_input.read_unit_lines
    monkeypatch.setattr(jsonl_input, "read_unit_lines",
                        lambda path, offset, count: read.append(count) or real(path, offset, count))
    reader = UnitReader(plan, 128)
    ids = [i for ids, _ in reader.read_parts(7) for i in ids]
    assert ids == list(range(3500, 4000)) and read == [500]  # unit 7's own lines, and only those, were read
    assert [i for ids, _ in reader.read_parts(2) for i in ids] == list(range(1000, 1500))


def test_kill_and_resume_of_a_jsonl_input_gives_every_row_once(tmp_path, cli_env):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}?"} for i in range(200)])
    run_dir = tmp_path / "run"
    args = [*orchestrator_cmd(), "run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=10",
            "engine.simulator.request_latency_s=0.05", "client.batch_size=5", "sampling.tokens_to_generate=4",
            "output.format=openai_batch"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    kill_jobs_when(first, run_dir, lambda: len(list((run_dir / "results").glob("*.batch.jsonl"))) >= 3
                   if (run_dir / "results").is_dir() else False)
    assert first.returncode != 0
    second = subprocess.run(args, capture_output=True, text=True, env=cli_env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "rows already committed" in second.stdout
    lines = [json.loads(x) for x in (run_dir / "output.jsonl").read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"q{i}" for i in range(200))  # each once
    assert (run_dir / "errors.jsonl").read_text() == ""


def test_an_openai_batch_file_round_trip(tmp_path):
    lines = [batch_line(0), batch_line(1, {"max_tokens": 3}), batch_line(2, {"temperature": -1}),
             batch_line(3, {"max_completion_tokens": 2, "seed": 5, "stop": ["never"]}), batch_line(4)]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    cfg = compose([f"data.input={src}", "data.unit_rows=2", *BASE])
    plan = build_plan(cfg.data, str(src))
    assert plan.input_format == "openai_batch" and plan.body_fields == ["stop"]
    rows = [row for _, part in UnitReader(plan, 10).read_parts(1) for row, _ in row_settings(part, plan)]
    body = make_codec(cfg, protocol="openai").payload(["x"], row=rows[1])
    assert body["max_tokens"] == 2 and body["seed"] == 5 and body["stop"] == ["never"]  # the body's own, last

    run_dir = run_dir_of(tmp_path, src, "data.unit_rows=2", "engine.api=chat", "output.format=openai_batch",
                         "sampling.tokens_to_generate=30")
    assert sorted(p.name for p in (run_dir / "results").iterdir()) == \
        [f"part-0000000{u}.batch.jsonl" for u in range(3)]
    out = {x["custom_id"]: x for x in map(json.loads, (run_dir / "output.jsonl").read_text().splitlines())}
    errors = [json.loads(x) for x in (run_dir / "errors.jsonl").read_text().splitlines()]
    assert sorted(out) == ["req-0", "req-1", "req-3", "req-4"]
    assert [e["custom_id"] for e in errors] == ["req-2"] and errors[0]["response"] is None
    assert "body.temperature is -1" in errors[0]["error"]["message"]
    one = out["req-1"]
    assert one["id"].startswith("batch_req_") and one["error"] is None
    assert one["response"]["status_code"] == 200 and one["response"]["request_id"]
    answer = one["response"]["body"]
    assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] == "length"
    assert answer["model"] == json.loads((run_dir / "engine.json").read_text())["served model"]
    assert answer["usage"]["completion_tokens"] == 3 and answer["usage"]["total_tokens"] == \
        answer["usage"]["prompt_tokens"] + 3
    assert out["req-3"]["response"]["body"]["usage"]["completion_tokens"] == 2
    assert out["req-0"]["response"]["body"]["usage"]["completion_tokens"] > 3
    assert isinstance(out["req-0"]["response"]["body"]["choices"][0]["message"]["content"], str)
    # status and report read the units back as a table
    table = sink_for(run_dir).read(0)
    assert table.column("id").to_pylist() == ["req-0", "req-1"] and "latency_s" in table.schema.names
    # a rerun finds every unit done
    run_dir_of(tmp_path, src, "data.unit_rows=2", "engine.api=chat", "output.format=openai_batch",
               "sampling.tokens_to_generate=30")
    assert len((run_dir / "output.jsonl").read_text().splitlines()) == 4


def test_a_completions_batch_file_runs_and_answers_text_completions(tmp_path):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": f"Once upon a time {i}", "max_tokens": 4}} for i in range(3)]
    run_dir = run_dir_of(tmp_path, write_jsonl(tmp_path / "b.jsonl", lines), "output.format=openai_batch")
    out = [json.loads(x) for x in (run_dir / "output.jsonl").read_text().splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["c0", "c1", "c2"]
    assert all(x["response"]["body"]["object"] == "text_completion" for x in out)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 4 for x in out)


@pytest.mark.parametrize("change,message", [
    ({"url": "/v1/embeddings"}, r"batch.jsonl:2: url is '/v1/embeddings'; .*must be /v1/chat/completions or"),
    ({"custom_id": None}, r"batch.jsonl:2: no custom_id"),
    ({"custom_id": "req-0"}, r"batch.jsonl:2: custom_id 'req-0' repeats the one of .*batch.jsonl:1"),
    ({"method": "GET"}, r"batch.jsonl:2: method is 'GET'"),
    ({"body": None}, r"batch.jsonl:2: no body"),
    ({"body": {"messages": []}}, r"batch.jsonl:2: body.messages is missing or empty"),
])
def test_a_bad_batch_line_is_refused_before_submission(tmp_path, change, message):
    lines = [batch_line(0), batch_line(1, **change), batch_line(2)]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    with pytest.raises(InputError, match=message):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run" / "plan.json").exists()


def test_mixed_urls_are_refused(tmp_path):
    first = batch_line(0, url="/v1/completions")
    first["body"] = {"prompt": "hi"}
    src = write_jsonl(tmp_path / "batch.jsonl", [first, batch_line(1)])
    with pytest.raises(InputError, match="all requests of a batch use one url"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}"]))
    second = dict(first, custom_id="other", body={"model": "m"})
    src = write_jsonl(tmp_path / "batch.jsonl", [first, second])
    with pytest.raises(InputError, match=r"batch.jsonl:2: body.prompt is missing"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}"]))


def test_body_fields_a_nemo_engine_cannot_honour_are_refused_naming_them(tmp_path):
    src = write_jsonl(tmp_path / "batch.jsonl", [batch_line(0, {"max_tokens": 5}),
                                                 batch_line(1, {"frequency_penalty": 0.2})])
    with pytest.raises(ConfigError, match="frequency_penalty, which engine=mock \\(the nemo protocol\\)"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "engine.protocol=nemo"]))
    # the sampling fields alone reach every engine
    ok = write_jsonl(tmp_path / "ok.jsonl", [batch_line(0, {"max_tokens": 5}), batch_line(1, {"temperature": 0.3})])
    df = results(run_dir_of(tmp_path, ok, "engine.protocol=nemo", name="nemo"))
    assert list(df["id"]) == ["req-0", "req-1"] and (df["status"] == "ok").all()
    assert df["output_tokens"][0] <= 5


def test_body_fields_on_an_endpoint_found_to_speak_nemo_are_refused_at_readiness(tmp_path):
    from tests.test_endpoint import faithful_server

    src = write_jsonl(tmp_path / "batch.jsonl", [batch_line(0, {"logit_bias": {"5": 10}})])
    with faithful_server(tmp_path, "nemo") as url:
        with pytest.raises(OrchestratorError, match="logit_bias, which engine=endpoint \\(the nemo protocol\\)"):
            run(compose(["engine=endpoint", f"engine.url={url}", f"data.input={src}", f"run_dir={tmp_path / 'r'}",
                         "engine.ready_timeout_s=30"]), show_progress=False)


def test_the_example_batch_file_stays_valid(tmp_path):
    src = EXAMPLES / "mt_bench_batch.jsonl"
    plan = build_plan(compose([f"data.input={src}"]).data, str(src))
    assert plan.input_format == "openai_batch" and plan.batch_url == "/v1/chat/completions"
    assert plan.total_rows >= 10


def test_resume_of_a_batch_run_with_another_output_format_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "batch.jsonl", [batch_line(i) for i in range(3)])
    run_dir_of(tmp_path, src, "output.format=openai_batch")
    with pytest.raises(OrchestratorError, match="output.format"):
        run_dir_of(tmp_path, src, "output.format=jsonl")
