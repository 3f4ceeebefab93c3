"""model=hf model.path=DIR: the architecture from the checkpoint's config.json, checked like a seed model's."""
import json

import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError
from orchestrator.layout import build_layout, problems

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 8192, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "tie_word_embeddings": False}


def checkpoint(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_architecture_and_dtype_come_from_config_json(tmp_path):
    cfg = compose(["model=hf", f"model.path={checkpoint(tmp_path, LLAMA_8B)}", "engine=vllm"])
    arch = cfg.model.architecture
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads, arch.kv_heads,
            arch.vocab_size, arch.max_seq_len) == (32, 4096, 14336, 32, 8, 128256, 8192)
    assert arch.gated_mlp and cfg.model.dtype == "bf16" and cfg.model.prompt.format == "chat_template"
    layout = build_layout(cfg, check=False)
    assert 15.5 < layout.weights_gb < 16.5  # Llama-3-8B in BF16 is about 16 GB
    assert build_layout(compose(["model=hf", f"model.path={tmp_path}", "layout.max_batch_size=16"])).fits


def test_layout_rules_apply_to_any_model(tmp_path):
    odd = dict(LLAMA_8B, num_attention_heads=30, num_key_value_heads=6)
    cfg = compose(["model=hf", f"model.path={checkpoint(tmp_path, odd)}", "layout.gpus_per_node=4",
                   "layout.tensor_parallel=4"])
    found = problems(cfg.model, cfg.layout)
    assert any("30 attention heads are not divisible by TP=4" in p for p in found)


def test_a_missing_checkpoint_or_key_is_named_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="give model.path=DIR, a Hugging Face checkpoint directory"):
        compose(["model=hf"])
    with pytest.raises(ConfigError, match="no config.json there"):
        compose(["model=hf", f"model.path={tmp_path / 'nowhere'}"])
    broken = {k: v for k, v in LLAMA_8B.items() if k != "num_hidden_layers"}
    with pytest.raises(ConfigError, match="has no num_hidden_layers; set model.architecture.num_layers=N"):
        compose(["model=hf", f"model.path={checkpoint(tmp_path, broken)}"])


def test_a_seed_model_keeps_its_card_numbers_with_a_path(tmp_path):
    cfg = compose(["model=nemotron4_340b_instruct", f"model.path={checkpoint(tmp_path, LLAMA_8B)}", "engine=vllm"])
    assert cfg.model.architecture.num_layers == 96 and cfg.model.prompt.format == "nemotron4_chat"
