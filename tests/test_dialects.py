"""Each OpenAI-compatible server's own fields (orchestrator/simulator/dialects.py, protocols.openai.openai_dialect):
the embedded engine speaks vLLM's, SGLang's or trtllm-serve's dialect (--openai-dialect, engine.dialect), each read
from that server's request and response models; the codec of engine=vllm, sglang and trtllm (and of an endpoint
or the embedded engine with engine.dialect) sends what its server takes and reads what it answers.

The servers differ where it matters to a run: SGLang ignores fields it does not know (a vLLM
`structured_outputs` would go unguided), trtllm-serve refuses them (HTTP 400), and each names its stop string,
its errors and its schema field in its own way."""
import json

import pandas as pd
import pytest
import requests

from orchestrator.config import compose
from orchestrator.engines.base import check_engine
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.frontend import run
from orchestrator.protocols import make_codec
from orchestrator.protocols.base import EngineInfo, RejectedError
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import TURN_END, EngineSettings
from tests.conftest import write_prompts

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
VLLM_GUIDE = {"structured_outputs": {"json": SCHEMA}}
DIALECTS = ("vllm", "sglang", "trtllm")


@pytest.fixture(scope="module")
def servers():
    """One embedded engine per dialect, OpenAI routes only."""
    threads = {d: EngineThread(EngineSettings(routes="openai", openai_dialect=d)).start() for d in DIALECTS}
    yield threads
    for t in threads.values():
        t.stop()


def post(server, path, **body):
    return requests.post(server.url + path, json={"model": "mock", "max_tokens": 32, **body}, timeout=30)


def is_person(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"name", "age"} and isinstance(value["age"], int)


# ------------------------------------------------------------------------------------ the servers' request fields

def test_sglang_takes_the_schema_as_json_text_on_completions_and_ignores_vllms_field(servers):
    s = servers["sglang"]
    guided = post(s, "/v1/completions", prompt="Who?", json_schema=json.dumps(SCHEMA))
    assert guided.status_code == 200 and is_person(guided.json()["choices"][0]["text"])
    ignored = post(s, "/v1/completions", prompt="Who?", **VLLM_GUIDE)  # pydantic's default: extra fields ignored
    assert ignored.status_code == 200 and not is_person(ignored.json()["choices"][0]["text"])
    bad = post(s, "/v1/completions", prompt="Who?", json_schema={"type": "object"})  # Optional[str]
    assert bad.status_code == 400 and bad.json() == {"object": "error", "message": "json_schema: Input should be a "
                                                     "valid string", "type": "BadRequestError",
                                                     "param": "json_schema", "code": 400}


def test_sglang_takes_response_format_on_both_routes(servers):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    chat = post(servers["sglang"], "/v1/chat/completions", messages=[{"role": "user", "content": "Who?"}],
                response_format=rf)
    assert chat.status_code == 200 and is_person(chat.json()["choices"][0]["message"]["content"])
    completion = post(servers["sglang"], "/v1/completions", prompt="Who?", response_format=rf)
    assert completion.status_code == 200 and is_person(completion.json()["choices"][0]["text"])
    unnamed = post(servers["sglang"], "/v1/completions", prompt="Who?",
                   response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    assert unnamed.status_code == 400 and "name: Field required" in unnamed.json()["message"]


def test_trtllm_refuses_fields_it_does_not_know_with_its_validation_error(servers):
    t = servers["trtllm"]
    refused = post(t, "/v1/completions", prompt="Who?", **VLLM_GUIDE)
    assert refused.status_code == 400
    error = refused.json()["error"]  # trtllm-serve's RequestValidationError handler: {"error": str(exc)}
    assert error.startswith("1 validation error:") and "'extra_forbidden'" in error and "'structured_outputs'" in error
    ids = post(t, "/v1/completions", prompt="Who?", n=2, return_token_ids=True)
    assert ids.status_code == 400 and "'return_token_ids'" in ids.json()["error"]
    json_schema_text = post(t, "/v1/chat/completions", messages=[{"role": "user", "content": "Who?"}],
                            json_schema=json.dumps(SCHEMA))
    assert json_schema_text.status_code == 400 and "'json_schema'" in json_schema_text.json()["error"]
    # vLLM and SGLang take (or ignore) all three
    for d in ("vllm", "sglang"):
        assert post(servers[d], "/v1/completions", prompt="Who?", n=2, return_token_ids=True).status_code == 200


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_trtllm_takes_response_format_json_with_schema_on_both_routes(servers, api):
    route, prompt = (("/v1/completions", {"prompt": "Who?"}) if api == "completions" else
                     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Who?"}]}))
    answer = post(servers["trtllm"], route, **prompt, response_format={"type": "json", "schema": SCHEMA})
    choice = answer.json()["choices"][0]
    assert is_person(choice["text"] if api == "completions" else choice["message"]["content"])
    wrapped = post(servers["trtllm"], route, **prompt,  # the OpenAI form, unwrapped by trtllm-serve
                   response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
    choice = wrapped.json()["choices"][0]
    assert is_person(choice["text"] if api == "completions" else choice["message"]["content"])
    missing = post(servers["trtllm"], route, **prompt, response_format={"type": "json"})
    assert missing.status_code == 400 and missing.json()["message"] == (
        "response_format.schema is required for response_format.type == 'json', but got None.")


# ------------------------------------------------------------------------------------ the servers' answers

def test_each_server_names_the_stop_string_that_matched_in_its_own_field(servers):
    fields = {}
    for d, s in servers.items():
        body = post(s, "/v1/completions", prompt="Who?", stop=[" the"], max_tokens=200).json()
        (choice,) = body["choices"]
        fields[d] = {k for k in ("stop_reason", "matched_stop") if k in choice}
        assert choice.get("stop_reason", choice.get("matched_stop")) == " the" and choice["finish_reason"] == "stop"
    assert fields == {"vllm": {"stop_reason"}, "sglang": {"matched_stop"}, "trtllm": {"stop_reason"}}


def test_the_servers_chat_messages_models_tokenize_and_errors_are_their_own(servers):
    chat = {d: post(s, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}]).json()
            for d, s in servers.items()}
    assert "refusal" in chat["vllm"]["choices"][0]["message"]
    assert "reasoning_content" in chat["sglang"]["choices"][0]["message"]
    assert "refusal" not in chat["sglang"]["choices"][0]["message"]
    assert chat["trtllm"]["choices"][0]["message"]["tool_calls"] == []
    cards = {d: requests.get(s.url + "/v1/models", timeout=10).json()["data"][0] for d, s in servers.items()}
    assert "max_model_len" in cards["vllm"] and "max_model_len" in cards["sglang"]
    assert "max_model_len" not in cards["trtllm"]  # trtllm-serve's ModelCard: id, object, created, owned_by
    tokenize = {d: requests.post(s.url + "/tokenize", json={"prompt": "a b"}, timeout=10).status_code
                for d, s in servers.items()}
    assert tokenize == {"vllm": 200, "sglang": 404, "trtllm": 404}
    errors = {d: post(s, "/v1/completions", prompt="x", max_tokens=0).json() for d, s in servers.items()}
    assert set(errors["vllm"]) == {"error"} and errors["vllm"]["error"]["message"] == "max_tokens must be at least 1"
    for d in ("sglang", "trtllm"):
        assert errors[d]["object"] == "error" and errors[d]["message"] == "max_tokens must be at least 1"


# ------------------------------------------------------------------------------------ the codecs against them

def codec(engine: str, api: str, *overrides: str, dialect: str | None = None):
    extra = {"endpoint": ["engine.url=http://x"], "mock": []}.get(engine, ["model.path=/m"])
    cfg = compose([f"engine={engine}", "engine.protocol=openai", f"engine.api={api}", *extra,
                   *([f"engine.dialect={dialect}"] if dialect else []), *overrides])
    return make_codec(cfg, EngineInfo(url="http://x", protocol="openai", model_name="mock", api=api))


def ask(codec_, server, prompt="Who?", n=1, seed=None):
    prompts = [[{"role": "user", "content": prompt}]] if codec_.chat else [prompt]
    body = codec_.payload(prompts, n=n, seed=seed)
    resp = requests.post(server.url + codec_.path, json=body, timeout=30)
    return codec_.parse(resp.status_code, resp.json(), prompts, n=n)


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("engine", DIALECTS)
def test_each_engines_codec_gets_valid_structured_answers_from_its_own_server(servers, engine, api):
    c = codec(engine, api, f"sampling.json_schema='{json.dumps(SCHEMA)}'", "sampling.tokens_to_generate=64")
    answers = [ask(c, servers[engine], f"Who is number {i}?")[0] for i in range(5)]
    assert all(is_person(a.text) for a in answers), [a.text for a in answers]


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("engine", DIALECTS)
def test_each_engines_codec_reads_the_stop_string_logprobs_and_rollouts_of_its_own_server(servers, engine, api):
    c = codec(engine, api, f"model.end_strings=[{TURN_END!r}, ' the']", "sampling.logprobs=2",
              "sampling.greedy=false", "sampling.rollouts=3", "sampling.rollouts_in_one_request=true",
              "sampling.tokens_to_generate=200")
    answers = ask(c, servers[engine], n=3, seed=7)
    assert len(answers) == 3 and len({a.text for a in answers}) > 1
    for a in answers:
        assert a.finish_reason == "stop" and a.stop in (TURN_END, " the")  # the server's word for which fired
        assert len(a.token_logprobs) > 0 and all(len(alts) == 2 for alts in a.top_logprobs)
    # token counts from token_ids where the server returns them: not trtllm-serve, which takes no return_token_ids
    assert all((a.output_tokens is None) == (engine == "trtllm") for a in answers)


@pytest.mark.parametrize("body, message", [
    ({"error": {"message": "vllm says no", "type": "BadRequestError", "code": 400}}, "vllm says no"),
    ({"object": "error", "message": "sglang says no", "type": "BadRequestError", "code": 400}, "sglang says no"),
    ({"error": "1 validation error:\n  {'type': 'extra_forbidden'}"}, "1 validation error:"),
    ({"detail": "Not Found"}, "Not Found"),
])
def test_each_servers_error_answer_becomes_the_rows_error_with_its_message(body, message):
    with pytest.raises(RejectedError, match=message):
        codec("vllm", "completions").parse(400, body, ["p"])


def test_engine_dialect_names_the_server_behind_an_endpoint_and_cannot_contradict_an_engine():
    assert "return_token_ids" not in codec("endpoint", "completions", dialect="trtllm").payload(["p"], n=2)
    assert codec("endpoint", "completions", "sampling.json_schema={type: object}",
                 dialect="sglang").payload(["p"])["json_schema"] == '{"type": "object"}'
    with pytest.raises(ConfigError, match="engine.dialect=vllm: engine=sglang is sglang's own server"):
        check_engine(compose(["engine=sglang", "model.path=/m", "engine.dialect=vllm"]))
    with pytest.raises(ConfigError, match="engine.dialect"):
        compose(["engine.dialect=tgi"])


# ------------------------------------------------------------------------------------ whole runs

def results(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results").sort_values("id").reset_index(drop=True)


@pytest.mark.parametrize("dialect", ["sglang", "trtllm"])
def test_a_run_on_the_embedded_engine_in_each_dialect_parses_every_answer(tmp_path, dialect):
    src = write_prompts(tmp_path / "in.parquet", 12)
    run(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.unit_rows=6", "engine.protocol=openai",
                 f"engine.dialect={dialect}", f"sampling.json_schema='{json.dumps(SCHEMA)}'", "output.parse=columns",
                 "sampling.tokens_to_generate=64"]), show_progress=False)
    df = results(tmp_path / "run")
    assert len(df) == 12 and (df.status == "ok").all() and df.age.notna().all() and (df.schema_retries == 0).all()


def test_an_endpoint_of_another_dialect_is_found_out_and_engine_dialect_fixes_it(tmp_path, servers):
    """Against SGLang, vLLM's schema field goes unguided: every answer is invalid, as the run says; trtllm-serve
    refuses it at the readiness generation, before any row is sent, and the message names the field and the fix.
    With engine.dialect the same rows pass."""
    src = write_prompts(tmp_path / "in.parquet", 6)

    def go(name: str, server: str, *extra: str) -> pd.DataFrame:
        run(compose([f"data.input={src}", f"run_dir={tmp_path / name}", "engine=endpoint",
                     f"engine.url={servers[server].url}", "engine.protocol=openai", "client.invalid_retries=0",
                     f"sampling.json_schema='{json.dumps(SCHEMA)}'", "sampling.tokens_to_generate=64", *extra]),
            show_progress=False)
        return results(tmp_path / name)

    unguided = go("sglang-as-vllm", "sglang")
    assert (unguided.status == "error").all() and unguided.error.str.startswith("InvalidStructuredOutput").all()
    with pytest.raises(OrchestratorError, match=r"(?s)refused the readiness generation.*'structured_outputs'.*"
                                                r"set engine.dialect=trtllm"):
        go("trtllm-as-vllm", "trtllm")
    for server in ("sglang", "trtllm"):
        fixed = go(f"{server}-as-itself", server, f"engine.dialect={server}")
        assert (fixed.status == "ok").all() and fixed.response.map(is_person).all()
