import pytest

from orchestrator.config import compose
from orchestrator.errors import LayoutError
from orchestrator.layout import GPUS, build_layout, parameter_count, problems, valid_layouts


def test_340b_bf16_is_valid_on_two_nodes_of_eight_h100():
    layout = build_layout(compose([]))
    assert layout.fits and layout.gpus == 16 and layout.world_size == 16
    assert 40 < layout.weights_gb < 45  # 341B params x 2 bytes / 16


def test_340b_bf16_is_invalid_on_one_node_and_says_why_and_what_works():
    cfg = compose(["layout.nodes=1", "layout.pipeline_parallel=1"])
    with pytest.raises(LayoutError) as err:
        build_layout(cfg)
    message = str(err.value)
    assert "exceeds" in message and "h100_80gb" in message
    assert "layout.nodes=2 layout.gpus_per_node=8 layout.tensor_parallel=8 layout.pipeline_parallel=2" in message


def test_340b_bf16_fits_one_node_of_h200():
    cfg = compose(["layout.nodes=1", "layout.pipeline_parallel=1", "layout.gpu=h200_141gb"])
    assert build_layout(cfg).fits


@pytest.mark.parametrize("model,billions", [("nemotron4_340b_instruct", 341), ("llama2_70b_steerlm_chat", 69),
                                            ("nemotron3_8b_base", 8.5), ("nemotron_mini_4b_instruct", 4.2)])
def test_parameter_counts_match_the_cards(model, billions):
    assert parameter_count(compose([f"model={model}"]).model.architecture) / 1e9 == pytest.approx(billions, rel=0.03)


def test_rule_tp_times_pp_equals_gpus():
    cfg = compose(["layout.pipeline_parallel=1", "layout.data_parallel=1"])
    assert any("TP x PP = 8 x 1 = 8 must equal nodes x GPUs per node = 2 x 8 = 16" in p
               for p in problems(cfg.model, cfg.layout))


def test_rule_heads_divisible_by_tp():
    cfg = compose(["model=nemotron_mini_4b_instruct", "layout.gpu=h100_80gb", "layout.gpus_per_node=16",
                   "layout.tensor_parallel=16"])
    found = problems(cfg.model, cfg.layout)
    assert any("24 attention heads are not divisible by TP=16" in p for p in found)


def test_rule_kv_groups_divisible_by_tp():
    cfg = compose(["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=1", "layout.nodes=3",
                   "layout.tensor_parallel=3"])
    found = problems(cfg.model, cfg.layout)
    assert any("8 KV groups are not divisible by TP=3" in p for p in found)


def test_rule_layers_divisible_by_pp():
    cfg = compose(["layout.nodes=5", "layout.pipeline_parallel=5"])  # 96 layers, 5 stages
    found = problems(cfg.model, cfg.layout)
    assert any("96 layers are not divisible by PP=5" in p for p in found)


def test_rule_memory_fits_with_headroom():
    cfg = compose(["layout.max_batch_size=4096"])
    found = problems(cfg.model, cfg.layout)
    assert any("KV cache" in p and "exceeds" in p for p in found)


def test_rule_tensor_parallel_stays_inside_a_node():
    cfg = compose(["layout.nodes=4", "layout.gpus_per_node=4", "layout.tensor_parallel=8"])
    assert any("span nodes" in p for p in problems(cfg.model, cfg.layout))


def test_rule_gpus_per_node_bounded_by_the_node():
    cfg = compose(["layout.nodes=1", "layout.gpus_per_node=16", "layout.tensor_parallel=8"])
    assert any("exceeds the 8" in p for p in problems(cfg.model, cfg.layout))


def test_unknown_gpu_lists_known_ones():
    cfg = compose(["layout.gpu=v100"])
    (message,) = problems(cfg.model, cfg.layout)
    assert all(name in message for name in GPUS)


def test_valid_layouts_are_all_valid_and_smallest_first():
    cfg = compose(["layout.gpu=a100_40gb"])
    options = valid_layouts(cfg.model, cfg.layout)
    assert options
    assert all(not problems(cfg.model, o) for o in options)
    sizes = [o.nodes * o.gpus_per_node for o in options]
    assert sizes == sorted(sizes) and sizes[0] > 16  # 40 GB GPUs need more than the 80 GB layout


@pytest.mark.parametrize("model", ["llama2_70b_steerlm_chat", "nemotron3_8b_chat_steerlm", "nemotron3_8b_base",
                                   "nemotron_mini_4b_instruct"])
def test_seed_models_default_layouts_are_valid(model):
    assert build_layout(compose([f"model={model}"])).fits


# --- layout.data_parallel: D instances of TP x PP GPUs each per replica (docs/layout.md "Data parallel")

MINI_DP8 = ["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=8", "layout.data_parallel=8"]


def test_data_parallel_is_checked_and_named():
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match=r"layout\.data_parallel=0 is out of range; it must be >= 1"):
        compose(["layout.data_parallel=0"])
    assert compose([]).layout.data_parallel == 1


def test_mini_4b_on_one_8_gpu_node_fills_it_with_instances_unless_data_parallel_is_set():
    """The issue's own example: `plan model=nemotron_mini_4b_instruct layout.gpus_per_node=8` was refused; its
    default layout now runs 8 instances of one GPU (layout.data_parallel unset: the instances that fill the node)."""
    filled = compose(["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=8"])
    assert filled.layout.data_parallel == 8 and not problems(filled.model, filled.layout)
    assert compose(["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=8",
                    "layout.tensor_parallel=8"]).layout.data_parallel == 1
    assert compose(["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=8",
                    "layout.tensor_parallel=2"]).layout.data_parallel == 4
    cfg = compose(["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=8", "layout.data_parallel=1"])
    (message,) = problems(cfg.model, cfg.layout)
    assert "TP x PP = 1 x 1 = 1 must equal nodes x GPUs per node = 1 x 8 = 8" in message
    assert "set layout.data_parallel=8" in message


def test_mini_4b_dp8_is_valid_with_the_memory_of_one_instance():
    single = build_layout(compose(["model=nemotron_mini_4b_instruct"]))
    dp8 = build_layout(compose(MINI_DP8))
    assert dp8.fits and dp8.gpus == 8 and dp8.world_size == 1 and dp8.data_parallel == 8
    assert (dp8.weights_gb, dp8.kv_cache_gb) == (single.weights_gb, single.kv_cache_gb)
    assert "TP=1 PP=1 DP=8" in dp8.describe()


def test_data_parallel_that_does_not_divide_the_gpus_names_the_key_and_the_fix():
    cfg = compose(["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=8", "layout.data_parallel=3"])
    with pytest.raises(LayoutError) as err:
        build_layout(cfg)
    message = str(err.value)
    assert "TP x PP x D = 1 x 1 x 3 = 3 must equal nodes x GPUs per node = 1 x 8 = 8" in message
    assert "set layout.data_parallel=8" in message and "DP=3" in message
    cfg = compose(["model=nemotron_mini_4b_instruct", "layout.gpus_per_node=8", "layout.tensor_parallel=4",
                   "layout.data_parallel=4"])
    assert any("TP x PP x D = 4 x 1 x 4 = 16" in p and "set layout.data_parallel=2" in p
               for p in problems(cfg.model, cfg.layout))


def test_an_instance_may_not_straddle_nodes():
    cfg = compose(["model=nemotron_mini_4b_instruct", "layout.nodes=3", "layout.gpus_per_node=8",
                   "layout.tensor_parallel=4", "layout.pipeline_parallel=3", "layout.data_parallel=2"])
    assert any("straddle" in p and "layout.data_parallel=2" in p for p in problems(cfg.model, cfg.layout))


def test_valid_layouts_include_data_parallel_after_one_instance_of_the_same_gpus():
    cfg = compose(["model=nemotron_mini_4b_instruct"])
    options = valid_layouts(cfg.model, cfg.layout, limit=100)
    assert all(not problems(cfg.model, o) for o in options)
    assert any(o.data_parallel == 8 and o.tensor_parallel == 1 and o.gpus_per_node == 8 for o in options)
    keys = [(o.nodes * o.gpus_per_node, o.data_parallel, o.pipeline_parallel) for o in options]
    assert keys == sorted(keys) and keys[0] == (1, 1, 1)
    # a model that needs 16 GPUs per instance gets data parallel only over more GPUs
    big = compose([])
    assert all(o.nodes * o.gpus_per_node >= 16 * o.data_parallel for o in valid_layouts(big.model, big.layout))


def test_throughput_estimate_prefers_one_gpu_instances_for_a_small_model():
    from orchestrator.layout import splits, throughput_estimate

    cfg = compose(MINI_DP8)
    ranked = sorted(splits(cfg.model, cfg.layout), key=lambda o: -throughput_estimate(cfg.model, o))
    shapes = [(o.tensor_parallel, o.pipeline_parallel, o.data_parallel) for o in ranked]
    assert shapes[0] == (1, 1, 8) and (8, 1, 1) in shapes
    assert throughput_estimate(cfg.model, ranked[0]) > 2 * throughput_estimate(cfg.model, ranked[-1])
    # the 340B needs all 8 GPUs of an H200 node for one instance: no data parallel there
    big = compose(["layout.gpu=h200_141gb", "layout.nodes=1", "layout.pipeline_parallel=1"])
    assert {o.data_parallel for o in splits(big.model, big.layout)} == {1}


def test_plan_prints_dp_and_marks_the_split_with_most_throughput_per_gpu(capsys):
    from orchestrator.cli import cmd_plan

    cfg = compose([*MINI_DP8, "engine=vllm", "model.path=/models/mini"])
    cmd_plan(cfg)
    out = capsys.readouterr().out
    assert "TP=1 PP=1 DP=8" in out and "fits:       yes" in out
    best = next(line for line in out.splitlines() if "<- most per GPU" in line)
    assert "layout.tensor_parallel=1 layout.pipeline_parallel=1 layout.data_parallel=8" in best
    listed = [float(line.split("~")[1].split()[0]) for line in out.splitlines()
              if line.startswith("  layout.") and "~" in line]
    assert len(listed) == 8 and listed == sorted(listed, reverse=True) and listed[0] > 5 * listed[-1]


def _argv(cfg, node=0):
    from orchestrator.engines.base import Rendezvous, check_engine

    return check_engine(cfg).node_argv(cfg, node, Rendezvous(port=8000, master_addr="n0", master_port=29500))


def test_vllm_and_sglang_serve_data_parallel_with_their_own_flag():
    vllm = _argv(compose([*MINI_DP8, "engine=vllm", "model.path=/m"]))
    assert vllm[vllm.index("--data-parallel-size") + 1] == "8" and vllm[vllm.index("--tensor-parallel-size") + 1] == "1"
    assert "--nnodes" not in vllm and "--headless" not in vllm
    sglang = _argv(compose([*MINI_DP8, "engine=sglang", "model.path=/m"]))
    assert sglang[sglang.index("--dp-size") + 1] == "8" and sglang[sglang.index("--tp-size") + 1] == "1"
    assert "--dp-size" not in _argv(compose(["model=nemotron_mini_4b_instruct", "engine=sglang", "model.path=/m"]))
    assert "--data-parallel-size" not in _argv(compose(["engine=vllm", "model.path=/m"]))


def test_vllm_data_parallel_over_nodes_runs_its_share_on_each():
    cfg = compose(["model=nemotron_mini_4b_instruct", "engine=vllm", "model.path=/m", "layout.nodes=2",
                   "layout.gpus_per_node=8", "layout.tensor_parallel=2", "layout.data_parallel=8"])
    first, second = _argv(cfg, 0), _argv(cfg, 1)
    for argv in (first, second):
        assert argv[argv.index("--data-parallel-size") + 1] == "8"
        assert argv[argv.index("--data-parallel-size-local") + 1] == "4"
        assert argv[argv.index("--data-parallel-address") + 1] == "n0" and "--nnodes" not in argv
    assert "--headless" not in first and "--data-parallel-start-rank" not in first
    assert "--headless" in second and second[second.index("--data-parallel-start-rank") + 1] == "4"


@pytest.mark.parametrize("engine,extra,why", [
    ("vllm", ["layout.nodes=4", "layout.tensor_parallel=8", "layout.pipeline_parallel=2", "layout.data_parallel=2"],
     "spans nodes"),
    ("sglang", ["model=nemotron_mini_4b_instruct", "layout.nodes=2", "layout.gpus_per_node=8",
                "layout.data_parallel=16"], "layout.nodes=2"),
])
def test_data_parallel_an_engine_cannot_serve_is_refused_before_submission(engine, extra, why):
    from orchestrator.engines.base import check_engine
    from orchestrator.errors import ConfigError

    cfg = compose([f"engine={engine}", "model.path=/m", *extra])
    with pytest.raises(ConfigError) as err:
        check_engine(cfg)
    message = str(err.value)
    assert f"layout.data_parallel={cfg.layout.data_parallel}: " in message and why in message
    assert "layout.data_parallel=1 replicas=" in message


@pytest.mark.parametrize("engine,extra", [
    ("nemo", ["engine.checkpoint=/m.nemo"]), ("trtllm", []),
    ("triton", ["engine.checkpoint=/m.nemo", "engine.options.model_type=nemotron"]), ("mock", [])])
def test_data_parallel_on_an_engine_without_its_own_runs_pinned_instances(engine, extra):
    """NeMo, TRT-LLM, Triton and the embedded engine: D servers per replica (instances.py), not a refusal."""
    from orchestrator.engines.base import check_engine
    from orchestrator.instances import instances, pinned

    cfg = compose([f"engine={engine}", "model.path=/m", *MINI_DP8, *extra])
    adapter = check_engine(cfg)
    assert pinned(cfg, adapter) and [i.gpus for i in instances(cfg, adapter)] == [str(k) for k in range(8)]
