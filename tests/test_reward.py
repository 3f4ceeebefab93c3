"""Scoring with a reward model (model.attributes): NeMo-Aligner's reward_model contract (protocols/reward.py)
against the embedded engine's reward routes (simulator/routes_reward.py), the SteerLM sentences
(orchestrator/scoring.py), the result columns, the checks before submission, and engine=nemo_reward's render."""
import pandas as pd
import pytest
import requests
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.engines.base import adapter_for, check_engine
from orchestrator.errors import ConfigError, InputError, OrchestratorError
from orchestrator.frontend import run
from orchestrator.protocols import make_codec, ready
from orchestrator.protocols.base import EngineInfo, MalformedAnswer, RejectedError
from orchestrator.render import render
from orchestrator.scoring import sentence
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import EngineSettings
from orchestrator.simulator.routes_reward import reward_scores

REWARD = ["model=nemotron4_340b_reward"]
ATTRIBUTES = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity",
              "verbosity"]
SYSTEM = compose(REWARD).model.prompt.system


@pytest.fixture(scope="module")
def reward_server():
    with EngineThread(EngineSettings(routes="reward", triton_max_batch_size=4, max_model_len=256)) as engine:
        yield engine


def endpoint(url: str, *extra: str) -> list[str]:
    return [*REWARD, "engine=endpoint", f"engine.url={url}", "engine.protocol=reward", "engine.ready_timeout_s=20",
            *extra]


def test_the_model_card_lists_its_nine_attributes_and_the_card_layout():
    cfg = compose(REWARD)
    assert cfg.model.attributes == ATTRIBUTES
    assert (cfg.layout.nodes, cfg.layout.gpus_per_node, cfg.layout.tensor_parallel, cfg.layout.pipeline_parallel,
            cfg.model.architecture.max_seq_len) == (2, 8, 8, 2, 4096)


def test_the_sentence_is_the_steerlm_reward_format():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert sentence(turns, "SYS") == ("<extra_id_0>System\nSYS\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
                                      "Hello!\n<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n4\n<extra_id_2>")
    assert sentence([{"role": "system", "content": "own"}, *turns[:2]], "SYS").startswith("<extra_id_0>System\nown\n")


def test_codec_sends_only_the_sentences_and_reads_rewards_and_exceeded():
    cfg = compose(REWARD)
    info = EngineInfo("http://x", "reward", "reward_model", inputs={"sentences": "BYTES", "tokens": "INT64"},
                      max_batch_size=3)
    codec = make_codec(cfg, info)
    assert codec.path == "/v2/models/reward_model/infer" and codec.batch_size == 3
    body = codec.payload(["a", "b"])
    assert body["inputs"] == [{"name": "sentences", "datatype": "BYTES", "shape": [2, 1], "data": ["a", "b"]}]
    answer = {"outputs": [{"name": "rewards", "datatype": "FP32", "shape": [2, 9], "data": list(range(18))},
                          {"name": "exceeded", "datatype": "INT32", "shape": [2, 1], "data": [0, 1]}]}
    first, second = codec.parse(200, answer, ["a", "b"])
    assert first.scores == [float(v) for v in range(9)] and first.error is None
    assert second.scores is None and "longer than the reward model's context" in second.error
    assert not second.engine_fault and first.engine_fault  # the row's fault: retry_failed does not redo it
    assert "max_seq_len=4096" in second.error
    with pytest.raises(MalformedAnswer, match=r"returns 5 value\(s\) per sentence, but model.attributes names 9"):
        codec.parse(200, {"outputs": [{"name": "rewards", "shape": [1, 5], "data": [0.0] * 5}]}, ["a"])
    with pytest.raises(MalformedAnswer, match="no 'rewards' output"):
        codec.parse(200, {"outputs": [{"name": "outputs", "shape": [1, 1], "data": ["x"]}]}, ["a"])


def test_readiness_refuses_a_reward_vector_of_another_length(reward_server):
    with EngineThread(EngineSettings(routes="reward", reward_attributes=5)) as engine:
        cfg = compose(endpoint(engine.url))
        with pytest.raises(RejectedError, match=r"5 value\(s\).*model.attributes names 9"):
            ready(cfg, engine.url, "reward")
    cfg = compose([*REWARD, "engine=endpoint", f"engine.url={reward_server.url}"])  # no engine.protocol
    info = ready(cfg, reward_server.url, adapter_for(cfg).protocol_for(cfg))  # a scoring model: reward
    assert info.protocol == "reward" and info.max_batch_size == 4 and "sentences" in info.inputs


def write_scored(path, responses, prompts=None, **extra):
    n = len(responses)
    pd.DataFrame({"id": [f"r{i}" for i in range(n)], "prompt": prompts or [f"question {i}" for i in range(n)],
                  "response": responses, **extra}).to_parquet(path)
    return path


def test_a_scoring_run_keeps_its_columns_and_adds_one_float_per_attribute(reward_server, tmp_path):
    long_answer = "word " * 400  # over the simulator's 256-token context: exceeded
    responses = ["yes", "a longer answer than that", "the longest answer of them all by quite a margin", None,
                 long_answer, "x"]
    src = write_scored(tmp_path / "in.parquet", responses, rollout=[0, 1, 2, 3, 0, 0])
    cfg = compose(endpoint(reward_server.url, f"data.input={src}", f"run_dir={tmp_path / 'run'}",
                           "data.keep_columns=[prompt,response,rollout]", "data.unit_rows=4"))
    summary = run(cfg, show_progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").sort_values("id").reset_index(drop=True)
    assert summary["complete"] and summary["ok"] == 4 and summary["failed"] == 2
    assert summary["retryable"] == 0  # a null answer and a sentence too long are the rows' own faults
    assert list(df.columns[:4]) == ["id", "prompt", "response", "rollout"]
    assert all(df[name].dtype == "float64" for name in ATTRIBUTES)
    assert df["response"].tolist()[:3] == responses[:3]  # the input's answers, not the scores
    ok = df[df["status"] == "ok"]
    for _, row in ok.iterrows():  # the server scored exactly the SteerLM sentence of the row
        expected = sentence([{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["response"]}], SYSTEM)
        assert [row[name] for name in ATTRIBUTES] == pytest.approx(reward_scores(expected, 9), abs=1e-6)
    assert df["verbosity"][0] < df["verbosity"][1] < df["verbosity"][2]  # rises with the answer's length
    assert "data.response_column='response'" in df["error"][3] and "null" in df["error"][3]
    assert "longer than the reward model's context" in df["error"][4]
    assert df.loc[[3, 4], ATTRIBUTES].isna().all().all()


def test_a_scoring_run_scores_a_conversation_of_turns(reward_server, tmp_path):
    messages = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                 {"role": "user", "content": "And then?"}]]
    src = tmp_path / "conv.parquet"
    pd.DataFrame({"id": ["c0"], "conversation": messages, "answer": ["Then this."]}).to_parquet(src)
    cfg = compose(endpoint(reward_server.url, f"data.input={src}", f"run_dir={tmp_path / 'run'}",
                           "data.messages_column=conversation", "data.response_column=answer"))
    run(cfg, show_progress=False)
    row = pd.read_parquet(tmp_path / "run" / "results").iloc[0]
    expected = sentence(messages[0] + [{"role": "assistant", "content": "Then this."}], SYSTEM)
    assert row["status"] == "ok"
    assert [row[name] for name in ATTRIBUTES] == pytest.approx(reward_scores(expected, 9), abs=1e-6)


def test_retry_failed_keeps_the_scores_of_the_ok_rows(reward_server, tmp_path):
    src = write_scored(tmp_path / "in.parquet", ["one", None, "three"])
    base = endpoint(reward_server.url, f"data.input={src}", f"run_dir={tmp_path / 'run'}")
    run(compose(base), show_progress=False)
    first = pd.read_parquet(tmp_path / "run" / "results").sort_values("id").reset_index(drop=True)
    run(compose([*base, "retry_failed=true"]), show_progress=False)
    again = pd.read_parquet(tmp_path / "run" / "results").sort_values("id").reset_index(drop=True)
    assert again["status"].tolist() == ["ok", "error", "ok"]
    pd.testing.assert_frame_equal(first[ATTRIBUTES], again[ATTRIBUTES])


def test_the_embedded_engine_scores_too(tmp_path):
    src = write_scored(tmp_path / "in.parquet", ["short", "a somewhat longer answer"])
    cfg = compose([*REWARD, "engine=mock", "engine.protocol=reward", "layout.nodes=1", "layout.gpus_per_node=4",
                   "layout.tensor_parallel=4",
                   "layout.pipeline_parallel=1", "layout.gpu=h200_141gb",
                   "model.dtype=fp8", f"data.input={src}", f"run_dir={tmp_path / 'run'}"])
    summary = run(cfg, show_progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").sort_values("id")
    assert summary["ok"] == 2 and df["verbosity"].tolist()[0] < df["verbosity"].tolist()[1]


@pytest.mark.parametrize("engine", ["sglang", "trtllm", "nemo", "triton"])  # vllm scores: its pooling runner
def test_a_reward_model_on_a_generation_engine_is_refused(engine):
    cfg = compose([*REWARD, f"engine={engine}", "model.path=/m", "engine.checkpoint=/m.nemo"])
    with pytest.raises(ConfigError, match=f"reward model .* engine={engine} .*only generates; use engine=nemo_reward"):
        check_engine(cfg)


@pytest.mark.parametrize("extra, named", [(["sampling.rollouts=2"], "sampling.rollouts=2"),
                                          (["output.format=openai_batch"], "output.format=openai_batch"),
                                          (["+sampling.json_schema={type:object}"], "sampling.json_schema")])
def test_what_a_scoring_run_cannot_do_is_refused(extra, named):
    cfg = compose([*REWARD, "engine=nemo_reward", "engine.checkpoint=/m.nemo", *extra])
    with pytest.raises(ConfigError, match=named):
        check_engine(cfg)


def test_a_generation_model_on_the_reward_engine_is_refused(tmp_path):
    cfg = compose(["model=nemotron4_340b_instruct", "engine=nemo_reward", "engine.checkpoint=/m.nemo"])
    with pytest.raises(ConfigError, match="lists no model.attributes .*use model=nemotron4_340b_reward"):
        check_engine(cfg)
    cfg = compose(["engine=endpoint", "engine.url=http://127.0.0.1:1", "engine.protocol=reward"])
    with pytest.raises(ConfigError, match="lists no model.attributes"):
        check_engine(cfg)


def test_a_missing_or_wrong_response_column_is_refused_before_anything_runs(reward_server, tmp_path):
    src = tmp_path / "in.parquet"
    pd.DataFrame({"id": ["a"], "prompt": ["q"], "answer": ["r"], "n": [1]}).to_parquet(src)
    base = endpoint(reward_server.url, f"data.input={src}", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(InputError, match=r"no response column 'response' .*data.response_column.*'answer'"):
        run(compose(base), show_progress=False)
    with pytest.raises(InputError, match=r"response column 'n' \(data.response_column\) has type int64"):
        run(compose([*base, "data.response_column=n"]), show_progress=False)
    before = requests.get(reward_server.url + "/stats").json()["prompts"]
    with pytest.raises(OrchestratorError):
        run(compose(base), show_progress=False)
    assert requests.get(reward_server.url + "/stats").json()["prompts"] == before  # nothing was sent


def test_render_of_the_reward_card_launches_serve_reward_model(tmp_path):
    cfg = compose([*REWARD, "engine=nemo_reward", "cluster=slurm", "engine.checkpoint=/models/rm.nemo",
                   f"run_dir={tmp_path / 'run'}", "data.input=/lustre/prompts"])
    files = {p.name: p.read_text() for p in render(cfg)}
    line = ("python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/rm.nemo "
            "trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 "
            "++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port=")
    assert line in files["engine_ranks.sh"] and "--ntasks-per-node=8" in files["engine_ranks.sh"]
    assert "/v2/models/reward_model/ready" in files["engine_job.sbatch"]
    client = OmegaConf.create(files["client.yaml"])  # the plain template's client: engine=endpoint on the server
    assert client.engine.protocol == "reward" and list(client.model.attributes) == ATTRIBUTES
