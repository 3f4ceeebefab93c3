"""sampling.logprobs=K: each answer's token logprobs and per token its K best alternatives, as typed list
columns, from OpenAI engines (the completions and the chat API); other protocols are refused before any GPU
is asked for. The embedded engine's OpenAI routes answer in vLLM's two forms."""
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.frontend import run
from orchestrator.plan import TOP_LOGPROB
from orchestrator.protocols import make_codec
from orchestrator.protocols.base import EngineInfo, MalformedAnswer
from tests.conftest import write_prompts


def run_rows(tmp_path, *overrides, rows=30, name="run"):
    src = tmp_path / f"{name}.parquet"
    if not src.exists():
        write_prompts(src, rows)
    run(compose([f"data.input={src}", f"run_dir={tmp_path / name}", "data.unit_rows=10", "engine.protocol=openai",
                 "sampling.tokens_to_generate=6", *overrides]), show_progress=False)
    return pd.read_parquet(tmp_path / name / "results").sort_values("id").reset_index(drop=True)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_logprobs_are_typed_columns_one_entry_per_output_token(tmp_path, api):
    df = run_rows(tmp_path, "sampling.logprobs=3", f"engine.api={api}")
    assert (df["status"] == "ok").all()
    assert (df["token_logprobs"].map(len) == df["output_tokens"]).all()
    assert (df["top_logprobs"].map(len) == df["output_tokens"]).all()
    for tops, chosen in zip(df["top_logprobs"], df["token_logprobs"]):
        for alternatives, logprob in zip(tops, chosen):
            assert len(alternatives) == 3
            values = [a["logprob"] for a in alternatives]
            assert values == sorted(values, reverse=True) and values[0] == logprob  # the sampled token is the best
    schema = pq.read_schema(next((tmp_path / "run" / "results").glob("*.parquet")))
    assert schema.field("token_logprobs").type.value_type == "double"
    assert schema.field("top_logprobs").type.value_type.value_type == TOP_LOGPROB


def test_without_logprobs_there_are_no_logprob_columns(tmp_path):
    df = run_rows(tmp_path)
    assert "token_logprobs" not in df.columns and "top_logprobs" not in df.columns


def test_the_completions_apis_extra_sampled_token_is_left_out():
    """vLLM's completions top_logprobs dict holds the K best and the sampled token when it is not among them."""
    codec = make_codec(compose(["engine.protocol=openai", "sampling.logprobs=2", "engine.api=completions"]),
                       EngineInfo(url="http://x", protocol="openai", model_name="m", api="completions"))
    body = {"choices": [{"index": 0, "text": " a", "finish_reason": "length",
                         "logprobs": {"tokens": [" a"], "token_logprobs": [-3.0],
                                      "top_logprobs": [{" b": -0.5, " a": -3.0, " c": -1.0}]}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    (answer,) = codec.parse(200, body, ["p"])
    assert answer.token_logprobs == [-3.0]
    assert answer.top_logprobs == [[{"token": " b", "logprob": -0.5}, {"token": " c", "logprob": -1.0}]]
    body["choices"][0]["logprobs"] = None  # asked for and not sent: that answer is unusable (its row's error)
    with pytest.raises(MalformedAnswer, match=r"choices\[0\].logprobs"):
        codec.parse(200, body, ["p"])


def test_logprobs_on_an_engine_that_cannot_return_them_are_refused_before_submission(tmp_path):
    from orchestrator.engines.base import check_engine

    for engine in (["engine=mock"], ["engine=nemo", "engine.checkpoint=/m.nemo"]):  # NeMo: the chosen tokens' only
        with pytest.raises(ConfigError, match=r"sampling.logprobs=2: engine=\w+ \(nemo\) returns the chosen tokens' "
                                              r"logprobs but not the 2 best alternatives .* set sampling.logprobs=0"):
            check_engine(compose([*engine, "sampling.logprobs=2"]))
        check_engine(compose([*engine, "sampling.logprobs=0"]))
    for k in (0, 2):  # NeMo's deploy_triton.py model has no logprob output at all
        with pytest.raises(ConfigError, match=rf"sampling.logprobs={k}: engine=triton speaks the triton protocol "
                                              r"\(NeMo deploy_triton.py model\), whose answers carry no logprobs"):
            check_engine(compose(["engine=triton", "engine.checkpoint=/m.nemo", f"sampling.logprobs={k}"]))
    with pytest.raises(ConfigError, match="sampling.logprobs"):
        compose(["sampling.logprobs=21"])


def test_an_endpoint_found_to_speak_nemo_is_refused_at_readiness(tmp_path):
    from tests.test_endpoint import faithful_server

    with faithful_server(tmp_path, "nemo") as url:
        src = write_prompts(tmp_path / "in.parquet", 10)
        with pytest.raises(OrchestratorError, match=r"sampling.logprobs=1: engine=endpoint \(nemo\) returns the "
                                                    r"chosen tokens' logprobs but not the 1 best"):
            run(compose(["engine=endpoint", f"engine.url={url}", f"data.input={src}", f"run_dir={tmp_path / 'r'}",
                         "sampling.logprobs=1", "engine.ready_timeout_s=30"]), show_progress=False)


def test_nemo_logprobs_are_the_generated_tokens_of_compute_logprob(tmp_path):
    """sampling.logprobs=0 on NeMo: compute_logprob=true, whose logprob list covers the echoed prompt's tokens
    (after the first) and the generation; the generated tokens' are kept, no alternatives."""
    from orchestrator.simulator.model import _logprob

    df = run_rows(tmp_path, "engine.protocol=nemo", "sampling.logprobs=0", "sampling.greedy=true")
    assert (df["status"] == "ok").all() and (df["output_tokens"] > 0).all()
    assert (df["token_logprobs"].map(len) == df["output_tokens"]).all()
    assert df["top_logprobs"].map(lambda tops: all(len(t) == 0 for t in tops)).all()
    codec = make_codec(compose(["engine.protocol=nemo", "sampling.logprobs=0"]),
                       EngineInfo(url="http://x", protocol="nemo", model_name="m"))
    tokens = ["He", "llo", " wor", "ld"]  # the prompt "Hello" echoed, then two generated tokens
    body = {"sentences": ["Hello world"], "tokens": [tokens], "logprob": [[-1.0, -2.0, -3.0]]}
    (answer,) = codec.parse(200, body, ["Hello"])
    assert answer.output_tokens == 2 and answer.token_logprobs == [-2.0, -3.0]
    assert codec.payload(["Hello"])["compute_logprob"] is True
    body["logprob"] = [[-1.0, -2.0]]  # not one per token after the first: that row's error
    (bad,) = codec.parse(200, body, ["Hello"])
    assert bad.error and "logprob[0]" in bad.error
    assert _logprob(" wor") < 0  # the simulator's values are logprobs


def test_a_tensorrt_llm_ensemble_on_the_generate_route_returns_its_output_log_probs(tmp_path):
    """Triton's generate route on a TRT-LLM ensemble: return_log_probs=true, output_log_probs read (a lone
    token's unwrapped to a number); NeMo's own Triton model has none, which readiness refuses."""
    from tests.test_endpoint import endpoint_run, faithful_server

    with faithful_server(tmp_path, "triton", "--triton-model", "trtllm") as url:
        summary, df = endpoint_run(tmp_path, url, "engine.served_model_name=served-model", "sampling.logprobs=0")
    assert summary["complete"] and (df["status"] == "ok").all()
    assert df["token_logprobs"].map(len).gt(0).all() and df["token_logprobs"].map(lambda v: all(x < 0 for x in v)).all()
    codec = make_codec(compose(["engine.protocol=triton", "sampling.logprobs=0"]),
                       EngineInfo(url="http://x", protocol="triton", model_name="m", api="generate",
                                  inputs={"text_input": "BYTES"}))
    assert codec.payload(["p"])["return_log_probs"] is True
    (one,) = codec.parse(200, {"text_output": " a", "output_log_probs": -0.25}, ["p"])
    assert one.token_logprobs == [-0.25] and one.top_logprobs == [[]]
    with pytest.raises(ConfigError, match="NeMo deploy_triton.py model"):
        make_codec(compose(["engine.protocol=triton", "sampling.logprobs=0"]),
                   EngineInfo(url="http://x", protocol="triton", model_name="m", api="infer"))


def test_changing_logprobs_on_a_run_dir_is_refused_and_a_resume_keeps_them(tmp_path):
    first = run_rows(tmp_path, "sampling.logprobs=2")
    with pytest.raises(OrchestratorError, match="logprobs"):
        run_rows(tmp_path, "sampling.logprobs=3")
    again = run_rows(tmp_path, "sampling.logprobs=2")  # nothing left to do: the same rows
    def plain(column):
        return [json.dumps([[dict(a) for a in token] for token in row]) for row in column]

    assert plain(first["top_logprobs"]) == plain(again["top_logprobs"])
