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
    cfg = compose(["layout.pipeline_parallel=1"])
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
