"""Scoring on vLLM's pooling runner (protocols/pooling.py) against the embedded engine's pooling routes
(simulator/routes_pooling.py): the codec, batching, a refused batch resent one sentence a request so only the bad
sentence fails, the width check at readiness, a whole run, the checks before submission, engine=vllm's
`--runner pooling`, and a generate -> score -> pairs pipeline on engine=mock. The same against a real vLLM:
test_pooling_real.py."""
import json
from pathlib import Path

import pandas as pd
import pytest
import requests
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.engines.base import Rendezvous, adapter_for, check_engine
from orchestrator.errors import ConfigError
from orchestrator.frontend import run
from orchestrator.pipeline import run_pipeline
from orchestrator.pipeline_config import load_pipeline
from orchestrator.protocols import make_codec, ready
from orchestrator.protocols.base import EngineInfo, MalformedAnswer, RejectedError
from orchestrator.render import render
from orchestrator.scoring import sentence
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import EngineSettings
from orchestrator.simulator.routes_pooling import softmax
from orchestrator.simulator.routes_reward import reward_scores
from tests.conftest import write_prompts

MODEL = ["model=tiny_reward"]
ATTRIBUTES = ["helpfulness", "correctness"]
SYSTEM = compose(MODEL).model.prompt.system
CONTEXT = 64  # the embedded engine's max_model_len: a long answer is over it


@pytest.fixture(scope="module")
def server():
    with EngineThread(EngineSettings(routes="openai", reward_attributes=2, max_model_len=CONTEXT,
                                     model_name="tiny_reward")) as engine:
        yield engine


def endpoint(url: str, *extra: str) -> list[str]:
    return [*MODEL, "engine=endpoint", f"engine.url={url}", "engine.protocol=pooling", "engine.ready_timeout_s=20",
            *extra]


def stats(engine) -> dict:
    return requests.get(engine.url + "/stats", timeout=10).json()


def test_the_codec_sends_the_sentences_in_one_request_and_reads_one_value_per_attribute():
    cfg = compose(endpoint("http://x", "client.batch_size=8"))
    codec = make_codec(cfg, EngineInfo("http://x", "pooling", "served", max_model_len=512))
    assert (codec.path, codec.batch_size, codec.takes_seed) == ("/pooling", 8, False)
    assert codec.payload(["a", "b"]) == {"model": "served", "input": ["a", "b"], "use_activation": False}
    answer = {"data": [{"index": 1, "object": "pooling", "data": [3, 4.5]},
                       {"index": 0, "object": "pooling", "data": [[1.0, -2.0]]}]}  # out of order; nested
    first, second = codec.parse(200, answer, ["a", "b"])
    assert (first.scores, second.scores) == ([1.0, -2.0], [3.0, 4.5])
    bad = codec.parse(200, {"data": [{"index": 0, "data": [1.0, None]}, {"index": 1, "data": [1.0, 2.0]}]}, ["a", "b"])
    assert "not numbers" in bad[0].error and bad[1].scores == [1.0, 2.0]  # one bad element: its row only
    with pytest.raises(MalformedAnswer, match=r"returns 3 value\(s\) per sentence, but model.attributes names 2 "
                                              r"\(helpfulness, correctness\)"):
        codec.parse(200, {"data": [{"index": 0, "data": [1.0, 2.0, 3.0]}]}, ["a"])
    with pytest.raises(MalformedAnswer, match="1 sentence"):
        codec.parse(200, {"data": []}, ["a"])
    with pytest.raises(RejectedError, match="maximum context length"):
        codec.parse(400, {"error": {"message": "This model's maximum context length is 512 tokens."}}, ["a"])
    classify = make_codec(compose(endpoint("http://x", "+engine.options.pooling_route=classify")))
    assert classify.path == "/classify" and "use_activation" not in classify.payload(["a"])
    assert classify.parse(200, {"data": [{"index": 0, "probs": [0.25, 0.75]}]}, ["a"])[0].scores == [0.25, 0.75]
    with pytest.raises(RejectedError, match="does not serve /classify; start vLLM with --runner pooling .*"
                                            "pooling_route=pooling"):
        classify.parse(404, {"detail": "Not Found"}, ["a"])


def test_the_embedded_engine_answers_as_vllms_pooling_runner(server):
    text = sentence([{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}], SYSTEM)
    raw = requests.post(server.url + "/pooling", json={"model": "tiny_reward", "input": [text, "x"],
                                                       "use_activation": False}, timeout=10).json()
    assert [d["index"] for d in raw["data"]] == [0, 1] and raw["data"][0]["data"] == reward_scores(text, 2)
    default = requests.post(server.url + "/pooling", json={"input": text}, timeout=10).json()  # the activation
    assert default["data"][0]["data"] == pytest.approx(softmax(reward_scores(text, 2)))
    probs = requests.post(server.url + "/classify", json={"input": [text]}, timeout=10).json()["data"][0]
    assert probs["probs"] == pytest.approx(softmax(reward_scores(text, 2))) and probs["num_classes"] == 2
    refused = requests.post(server.url + "/pooling", json={"input": ["fine", "word " * 100]}, timeout=10)
    assert refused.status_code == 400 and "maximum context length is 64 tokens" in refused.json()["error"]["message"]
    assert requests.post(server.url + "/pooling", json={"model": "other", "input": ["x"]}, timeout=10).status_code \
        == 404


def test_readiness_finds_the_context_and_refuses_a_head_of_another_width(server):
    cfg = compose(endpoint(server.url))
    info = ready(cfg, server.url, adapter_for(cfg).protocol_for(cfg))
    assert (info.protocol, info.model_name, info.max_model_len) == ("pooling", "tiny_reward", CONTEXT)
    with EngineThread(EngineSettings(routes="openai", reward_attributes=5)) as other:
        with pytest.raises(RejectedError, match=r"returns 5 value\(s\) per sentence, but model.attributes names 2 "
                                                r"\(helpfulness, correctness\); list the model's labels"):
            ready(compose(endpoint(other.url)), other.url, "pooling")


def write_scored(path: Path, responses: list, prompts: list | None = None) -> Path:
    n = len(responses)
    pd.DataFrame({"id": [f"r{i}" for i in range(n)], "prompt": prompts or [f"question {i}" for i in range(n)],
                  "response": responses}).to_parquet(path)
    return path


def request_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((run_dir / "work" / "requests").glob("*")) for line in
            p.read_text().splitlines() if line.strip()]


def test_a_run_batches_its_sentences_and_a_refused_batch_fails_only_its_bad_sentence(server, tmp_path):
    """Ten answers, four a request; the second batch holds one answer over the context: vLLM refuses that whole
    request, so its four sentences are sent again one a request, and only the long one is an error."""
    responses = [f"answer {i}" for i in range(10)]
    responses[5] = "word " * 100
    src = write_scored(tmp_path / "in.parquet", responses)
    cfg = compose(endpoint(server.url, f"data.input={src}", f"run_dir={tmp_path / 'run'}", "client.batch_size=4",
                           "client.max_in_flight=1", "data.keep_columns=[prompt,response]"))
    before = stats(server)
    summary = run(cfg, show_progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").sort_values("id", key=lambda s: s.str[1:].astype(int))
    assert summary["ok"] == 9 and summary["failed"] == 1 and summary["retryable"] == 0  # the sentence's own fault
    assert df["status"].tolist() == ["ok"] * 5 + ["error"] + ["ok"] * 4
    assert "maximum context length is 64 tokens" in df["error"].iloc[5]
    assert df[ATTRIBUTES].iloc[5].isna().all() and all(df[name].dtype == "float64" for name in ATTRIBUTES)
    for row in df[df.status == "ok"].itertuples():  # the server scored exactly the row's SteerLM sentence
        expected = sentence([{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.response}],
                            SYSTEM)
        assert [row.helpfulness, row.correctness] == pytest.approx(reward_scores(expected, 2), abs=1e-9)
    sizes = [(r["prompts"], r["ok"], r["failed"], r["error"] is not None) for r in request_records(tmp_path / "run")]
    assert sizes == [(4, 4, 0, False), (4, 0, 0, True), (1, 1, 0, False), (1, 0, 1, True), (1, 1, 0, False),
                     (1, 1, 0, False), (2, 2, 0, False)]
    after = stats(server)
    assert after["requests"] - before["requests"] == 1 + 7  # readiness's one sentence, then the run's
    assert after["bad_requests"] - before["bad_requests"] == 2


def test_the_classify_route_stores_the_label_probabilities(server, tmp_path):
    src = write_scored(tmp_path / "in.parquet", ["short", "a longer answer"])
    cfg = compose(endpoint(server.url, f"data.input={src}", f"run_dir={tmp_path / 'run'}",
                           "+engine.options.pooling_route=classify"))
    run(cfg, show_progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").sort_values("id")
    assert (df["status"] == "ok").all()
    assert (df["helpfulness"] + df["correctness"]).tolist() == pytest.approx([1.0, 1.0])  # probabilities


@pytest.mark.parametrize("engine", ["sglang", "trtllm", "nemo", "triton"])
def test_a_scoring_model_on_a_generation_only_engine_is_refused_and_vllm_is_named(engine):
    cfg = compose([*MODEL, f"engine={engine}", "model.path=/m", "engine.checkpoint=/m.nemo"])
    with pytest.raises(ConfigError, match=f"reward model .*engine={engine} .*only generates; use engine=nemo_reward "
                                          f".* or engine=vllm \\(vLLM's pooling runner"):
        check_engine(cfg)


@pytest.mark.parametrize("extra, named", [
    (["engine=endpoint", "engine.url=http://h:1", "engine.protocol=pooling", "model=hf", "model.path=/m",
      "model.architecture.num_layers=1", "model.architecture.hidden_size=8", "model.architecture.ffn_hidden_size=8",
      "model.architecture.num_attention_heads=1", "model.architecture.vocab_size=8"],
     r"protocol pooling\) scores answers .* lists no model.attributes"),
    ([*MODEL, "engine=endpoint", "engine.url=http://h:1", "engine.protocol=pooling",
      "+engine.options.pooling_route=embed"], r"engine.options.pooling_route='embed' is not a pooling route; choose "
                                              r"one of: pooling, classify"),
    ([*MODEL, "engine=vllm", "model.path=/m", "sampling.rollouts=2"], "sampling.rollouts=2"),
    ([*MODEL, "engine=vllm"], "loads a Hugging Face checkpoint: set model.path")])
def test_what_a_pooling_run_cannot_do_is_refused_before_submission(extra, named):
    with pytest.raises(ConfigError, match=named):
        check_engine(compose(extra))


def test_engine_vllm_serves_a_scoring_model_with_the_pooling_runner():
    cfg = compose([*MODEL, "model.path=/models/rm", "engine=vllm"])
    adapter = check_engine(cfg)
    argv = adapter.node_argv(cfg, 0, Rendezvous(8000, "node0", 29500))
    assert adapter.protocol_for(cfg) == "pooling" and argv[argv.index("--runner") + 1] == "pooling"
    assert argv[argv.index("--max-model-len") + 1] == "1024"
    generate = compose(["model=nemotron_mini_4b_instruct", "model.path=/models/mini", "engine=vllm"])
    assert adapter.protocol_for(generate) == "openai"
    assert "--runner" not in adapter.node_argv(generate, 0, Rendezvous(8000, "node0", 29500))


def test_render_of_a_pooling_run_polls_v1_models_and_its_client_speaks_pooling(tmp_path):
    cfg = compose([*MODEL, "model.path=/models/rm", "engine=vllm", "cluster=slurm", f"run_dir={tmp_path / 'run'}",
                   "data.input=/lustre/answers"])
    files = {p.name: p.read_text() for p in render(cfg)}
    assert "--runner pooling" in files["engine_ranks.sh"]
    assert "/v1/models" in files["engine_job.sbatch"]
    client = OmegaConf.create(files["client.yaml"])  # the plain template's client: engine=endpoint on the server
    assert client.engine.protocol == "pooling" and list(client.model.attributes) == ATTRIBUTES


def test_a_pipeline_generates_scores_with_pooling_and_pairs_on_the_embedded_engine(tmp_path):
    """generate (3 rollouts) -> score (engine=mock engine.protocol=pooling: its /pooling route, two labels) ->
    pairs by helpfulness: every (id, rollout) scored once, each score the engine's for that answer's sentence,
    and the pairs right for the scores stored."""
    src = write_prompts(tmp_path / "in.parquet", 9)
    file = tmp_path / "p.yaml"
    file.write_text(json.dumps({"stages": [
        {"name": "generate", "overrides": [f"data.input={src}", "engine=mock", "sampling.rollouts=3",
                                           "sampling.greedy=false", "data.keep_columns=[prompt]", "data.unit_rows=3",
                                           "sampling.tokens_to_generate=40"]},
        {"name": "score", "from": "generate", "overrides": [*MODEL, "engine=mock", "engine.protocol=pooling",
                                                            "client.batch_size=4",
                                                            "data.keep_columns=[rollout,prompt,response]"]},
        {"name": "pairs", "from": "score", "pairs": {"by": "helpfulness", "min_margin": 0}}]}))
    run_pipeline(load_pipeline(file, [f"run_dir={tmp_path / 'p'}"]), show_progress=False)
    gen, score = (pd.read_parquet(tmp_path / "p" / name / "results") for name in ("generate", "score"))
    assert len(score) == len(gen) == 27 and not score.duplicated(["id", "rollout"]).any()
    assert sorted(zip(score.id, score.rollout)) == sorted(zip(gen.id, gen.rollout))
    assert (score.status == "ok").all() and set(ATTRIBUTES) <= set(score.columns)
    for row in score.itertuples():
        expected = sentence([{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.response}],
                            SYSTEM)
        assert [row.helpfulness, row.correctness] == pytest.approx(reward_scores(expected, 2), abs=1e-9)
    pairs = pd.read_parquet(tmp_path / "p" / "pairs" / "results")
    assert set(pairs.id) == set(score.id)  # min_margin 0: a pair for every prompt
    for pair in pairs.itertuples():
        mine = score[score.id == pair.id]
        best, worst = mine.loc[mine.helpfulness.idxmax()], mine.loc[mine.helpfulness.idxmin()]
        assert (pair.chosen, pair.rejected) == (best.response, worst.response)
        assert (pair.chosen_score, pair.rejected_score) == (best.helpfulness, worst.helpfulness)
