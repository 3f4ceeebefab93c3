"""A real Triton server (tritonserver 2.51.0 from PyTriton, scripts/install_triton.sh) serving NeMo-Aligner's
`reward_model` tensors (tests/reward_model_server.py, a stand-in for serve_reward_model.py launched with
engine=nemo_reward's own command line by the orchestrator's engine owner), scored through the reward protocol.

One server for the module. Under CI=true a missing PyTriton venv fails these tests instead of skipping them.
"""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.config import compose
from orchestrator.engines.server import EngineServer
from orchestrator.errors import OrchestratorError
from orchestrator.frontend import run
from orchestrator.scoring import sentence
from tests.conftest import triton_venv_python

pytestmark = pytest.mark.triton

SERVER = Path(__file__).resolve().parent / "reward_model_server.py"
CONTEXT = 60  # the stand-in's context, in words: a longer sentence is `exceeded`
# the reward card on one CPU "GPU": its layout shrunk to one task, its architecture to one that fits it
SMALL = ["model=nemotron4_340b_reward", "layout.nodes=1", "layout.gpus_per_node=1", "layout.tensor_parallel=1",
         "layout.pipeline_parallel=1", "model.architecture.num_layers=2", "model.architecture.hidden_size=64",
         "model.architecture.ffn_hidden_size=128", "model.architecture.num_attention_heads=4",
         "model.architecture.num_query_groups=2", "model.architecture.vocab_size=1000"]
ATTRIBUTES = compose(["model=nemotron4_340b_reward"]).model.attributes


@pytest.fixture(scope="module")
def reward_python() -> Path:
    return triton_venv_python()  # the stand-in needs PyTriton only


def nemo_reward(python: Path, *extra: str) -> list[str]:
    """engine=nemo_reward launching the stand-in (the adapter's argv; only the program differs)."""
    return [*SMALL, "engine=nemo_reward", f"engine.command=[{python}]", f"engine.script={SERVER}",
            "engine.checkpoint=/models/Nemotron-4-340B-Reward.nemo", "engine.ready_timeout_s=120",
            f"+engine.env.REWARD_TEST_CONTEXT={CONTEXT}", *extra]


@pytest.fixture(scope="module")
def server(reward_python, tmp_path_factory):
    """serve_reward_model.py's stand-in, started by engine=nemo_reward's adapter; its model records every call."""
    tmp = tmp_path_factory.mktemp("reward")
    record = tmp / "calls.jsonl"
    cfg = compose(nemo_reward(reward_python, f"+engine.env.REWARD_TEST_RECORD={record}"))
    with EngineServer(cfg, tmp / "engine.log", tmp / "engine.port") as engine:
        info = engine.wait_ready()
        engine.record, engine.log = record, tmp / "engine.log"
        yield engine, info


def test_the_reward_engine_starts_from_its_own_command_line(server):
    engine, info = server
    log = engine.log.read_text()
    launched = log.splitlines()[0]  # the engine owner logs the command it runs
    assert f"{SERVER} rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=1 trainer.devices=1 " \
           f"++model.tensor_model_parallel_size=1 ++model.pipeline_model_parallel_size=1 " \
           f"inference.micro_batch_size=2 inference.port={engine.port}" in launched
    assert info.protocol == "reward" and info.model_name == "reward_model"
    assert info.max_batch_size == 2  # inference.micro_batch_size=2 x one data-parallel rank
    assert set(info.inputs) == {"sentences", "tokens", "sequence_lengths", "add_EOS"}
    assert "reward_model on 127.0.0.1" in log


def test_scores_from_the_real_server_are_rows_of_floats(server, tmp_path):
    engine, _ = server
    answers = ["Yes.", "Yes, because two and two make four.", "word " * CONTEXT, None,
               "Four: two plus two is four, as anyone can count on their fingers."]
    src = tmp_path / "in.parquet"
    pd.DataFrame({"id": [f"r{i}" for i in range(5)], "prompt": ["What is 2+2?"] * 5, "response": answers,
                  "rollout": range(5)}).to_parquet(src)
    cfg = compose([*SMALL, "engine=endpoint", f"engine.url={engine.url}", "engine.protocol=reward",
                   f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.keep_columns=[prompt,response,rollout]"])
    summary = run(cfg, show_progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").sort_values("id").reset_index(drop=True)
    assert summary["complete"] and df["status"].tolist() == ["ok", "ok", "error", "error", "ok"]
    assert "longer than the reward model's context" in df["error"][2]
    assert "not text: nothing to score" in df["error"][3]
    ok = df[df["status"] == "ok"]
    assert ok[ATTRIBUTES].notna().all().all() and all(df[a].dtype == "float64" for a in ATTRIBUTES)
    # the stand-in's verbosity is 4 (1 - exp(-words / 16)) of the answer it was sent: the sentence reached it whole
    for _, row in ok.iterrows():
        assert row["verbosity"] == pytest.approx(4 * (1 - math.exp(-len(row["response"].split()) / 16)), abs=1e-5)
    assert df["verbosity"][0] < df["verbosity"][1] < df["verbosity"][4]
    calls = [json.loads(line) for line in engine.record.read_text().splitlines()]
    assert all(c["inputs"] == ["sentences"] for c in calls) and max(c["rows"] for c in calls) <= 2
    expected = sentence([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Yes."}],
                        cfg.model.prompt.system)
    assert expected.endswith("<extra_id_1>Assistant\nYes.\n<extra_id_2>")


def test_a_model_config_with_other_attribute_names_is_refused_at_readiness(server, tmp_path):
    engine, _ = server
    src = tmp_path / "in.parquet"
    pd.DataFrame({"id": ["a"], "prompt": ["q"], "response": ["r"]}).to_parquet(src)
    cfg = compose([*SMALL, "engine=endpoint", f"engine.url={engine.url}", "engine.protocol=reward",
                   "model.attributes=[helpfulness,correctness,coherence]", f"data.input={src}",
                   f"run_dir={tmp_path / 'run'}", "engine.ready_timeout_s=20"])
    with pytest.raises(OrchestratorError, match=r"returns 9 value\(s\) per sentence, but model.attributes names 3"):
        run(cfg, show_progress=False)


def test_a_run_on_engine_nemo_reward_starts_scores_and_stops_its_server(reward_python, tmp_path):
    src = tmp_path / "in.parquet"
    pd.DataFrame({"id": ["a", "b", "c"], "prompt": ["q"] * 3, "response": ["one", "one two three", "w " * 80]}
                 ).to_parquet(src)
    summary = run(compose(nemo_reward(reward_python, f"data.input={src}", f"run_dir={tmp_path / 'run'}")),
                  show_progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").sort_values("id").reset_index(drop=True)
    assert summary["complete"] and df["status"].tolist() == ["ok", "ok", "error"]
    assert df["verbosity"][0] < df["verbosity"][1] and "exceeded" in df["error"][2]
    assert "protocol reward" in (tmp_path / "run" / "run.log").read_text()
