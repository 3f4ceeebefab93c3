import subprocess

import pytest

from orchestrator.config import compose, to_config
from orchestrator.errors import ConfigError
from tests.conftest import orchestrator_cmd

MODELS = ["nemotron4_340b_instruct", "llama2_70b_steerlm_chat", "nemotron3_8b_chat_steerlm",
          "nemotron3_8b_base", "nemotron_mini_4b_instruct"]


def test_default_composition_is_the_340b_on_the_embedded_engine_locally():
    cfg = compose([])
    assert cfg.model.name == "nemotron4_340b_instruct"
    assert cfg.engine.name == "mock" and cfg.cluster.name == "local"
    layout = cfg.layout
    assert (layout.nodes, layout.gpus_per_node, layout.tensor_parallel, layout.pipeline_parallel) == (2, 8, 8, 2)
    assert cfg.data.prompt_column == "prompt" and cfg.data.id_column == "id"
    assert cfg.engine.host == "127.0.0.1"
    assert cfg.input_path.endswith("examples/mt_bench_prompts.parquet")
    # the card's sampling for the 340B
    assert cfg.sampling.greedy is True and cfg.sampling.tokens_to_generate == 1024
    assert cfg.end_strings == ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]


@pytest.mark.parametrize("model", MODELS)
def test_every_seed_model_composes_with_its_own_layout(model):
    cfg = compose([f"model={model}"])
    assert cfg.model.name == model
    assert cfg.layout.tensor_parallel * cfg.layout.pipeline_parallel == cfg.layout.nodes * cfg.layout.gpus_per_node


def test_public_keys_override():
    cfg = compose(["model=nemotron_mini_4b_instruct", "data.input=/x.parquet", "data.prompt_column=text",
                   "data.id_column=uid", "run_dir=/tmp/r", "layout.gpu=h200_141gb", "replicas=3",
                   "sampling.tokens_to_generate=7", "sampling.temperature=0.5", "sampling.top_p=0.8",
                   "sampling.top_k=4", "sampling.greedy=false", "client.max_in_flight=9",
                   "engine.simulator.capacity=32", "engine.simulator.request_latency_s=0.1",
                   "engine.simulator.token_latency_s=0.01", "engine.simulator.error_rate=0.2",
                   "engine.simulator.seed=5", "layout.nodes=1", "layout.gpus_per_node=1", "layout.tensor_parallel=1",
                   "layout.pipeline_parallel=1"])
    assert (cfg.data.input, cfg.data.prompt_column, cfg.data.id_column, cfg.run_dir) == \
        ("/x.parquet", "text", "uid", "/tmp/r")
    assert (cfg.layout.gpu, cfg.replicas, cfg.client.max_in_flight) == ("h200_141gb", 3, 9)
    s = cfg.sampling
    assert (s.tokens_to_generate, s.temperature, s.top_p, s.top_k, s.greedy) == (7, 0.5, 0.8, 4, False)
    e = cfg.engine.simulator
    assert (e.capacity, e.request_latency_s, e.token_latency_s, e.error_rate, e.seed) == (32, 0.1, 0.01, 0.2, 5)


def test_nemo_engine_exists_as_the_seed_engine():
    cfg = compose(["engine=nemo", "engine.checkpoint=/models/340b.nemo"])
    from orchestrator.engines.base import adapter_for

    adapter = adapter_for(cfg)
    # engine.port 0: a free port on node 0
    assert cfg.engine.name == "nemo" and adapter.protocol_for(cfg) == "nemo" and cfg.engine.port == 0
    assert adapter.tasks_per_node(cfg) == cfg.layout.gpus_per_node == 8  # one task per GPU


@pytest.mark.parametrize("override,needle", [
    ("sampling.temperature=0", "sampling.temperature"),
    ("sampling.top_p=1.5", "sampling.top_p"),
    ("sampling.tokens_to_generate=0", "sampling.tokens_to_generate"),
    ("engine.simulator.error_rate=2", "engine.simulator.error_rate"),
    ("client.batch_size=129", "client.batch_size"),
    ("engine.protocol=grpc", "nemo, openai, triton"),
    ("replicas=0", "replicas"),
])
def test_bad_values_name_the_key_and_the_fix(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        compose([override])


def test_cfg_job_prints_the_composed_config(cli_env):
    out = subprocess.run([*orchestrator_cmd(), "run", "--cfg", "job", "model=nemotron3_8b_base"],
                         capture_output=True, text=True, env=cli_env, check=True).stdout
    assert "name: nemotron3_8b_base" in out and "tensor_parallel: 1" in out and "prompt_column: prompt" in out


def test_unknown_model_lists_the_choices(cli_env):
    proc = subprocess.run([*orchestrator_cmd(), "plan", "model=gpt5"], capture_output=True, text=True, env=cli_env)
    assert proc.returncode != 0
    assert "nemotron4_340b_instruct" in proc.stderr + proc.stdout


def test_typo_in_a_key_is_rejected(cli_env):
    proc = subprocess.run([*orchestrator_cmd(), "plan", "sampling.temprature=0.5"], capture_output=True, text=True,
                          env=cli_env)
    assert proc.returncode != 0
    assert "temprature" in proc.stderr + proc.stdout


@pytest.mark.parametrize("override", ["engine.capacity=4", "+engine.capacity=4", "++engine.capacity=4"])
def test_an_old_simulator_key_is_refused_naming_its_new_key(override):
    """The embedded engine's knobs moved from engine.<knob> to engine.simulator.<knob>: the old key is a
    ConfigError that names the new one, from an override or from a dictionary."""
    with pytest.raises(ConfigError, match=r"engine\.capacity is now engine\.simulator\.capacity.*"
                                          r"write engine\.simulator\.capacity=4"):
        compose([override])
    with pytest.raises(ConfigError, match=r"engine\.slow_factor is now engine\.simulator\.slow_factor"):
        to_config({"engine": {"slow_factor": 2.0}})
    assert compose(["engine.simulator.capacity=4"]).engine.simulator.capacity == 4


def test_the_command_line_refuses_an_old_simulator_key_naming_its_new_key(cli_env):
    proc = subprocess.run([*orchestrator_cmd(), "plan", "engine.stall_s=5"], capture_output=True, text=True,
                          env=cli_env)
    assert proc.returncode == 1
    assert "engine.stall_s is now engine.simulator.stall_s" in proc.stderr
    assert "write engine.simulator.stall_s=5" in proc.stderr


def test_a_misspelled_key_added_with_plus_is_refused_with_the_closest_key():
    """Hydra's own hint for a misspelled key is `+key=value`, which used to be accepted and dropped."""
    with pytest.raises(ConfigError,
                       match=r"sampling.temprature is not a config key; did you mean sampling.temperature\?"):
        compose(["+sampling.temprature=0.5"])
    assert compose(["+engine.env.VLLM_HOST_IP=127.0.0.1"]).engine.env == {"VLLM_HOST_IP": "127.0.0.1"}


def test_closed_choices_are_literal_types_checked_in_one_place():
    """Each closed choice is an Annotated[str, Literal[...]] field whose choices the error lists; dtype's
    choices are the keys of the bytes-per-parameter table."""
    import typing

    from orchestrator import config as c

    hints = typing.get_type_hints(c.DataConfig, include_extras=True)
    assert c.literal_choices(hints["duplicate_ids"]) == ("error", "positional", "keep")
    assert c.literal_choices(typing.get_type_hints(c.EngineConfig, include_extras=True)["protocol"]) == c.PROTOCOLS
    assert c.literal_choices(hints["prompt_column"]) == ()
    assert set(c.literal_choices(c.Dtype)) == set(c.DTYPE_BYTES)
    for override, key in (("cluster.on_interrupt=stay", "cluster.on_interrupt"), ("output.format=csv", "output.format"),
                          ("engine.api=embeddings", "engine.api"), ("model.dtype=int3", "model.dtype")):
        with pytest.raises(ConfigError, match=rf"{key}=.* is not valid; choose one of: "):
            compose([override])
