"""Any Hugging Face model directory: its architecture read from `config.json`, so `plan` can check
layouts for models that are not seed models (`model=hf model.path=DIR`)."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# architecture key -> the config.json keys that may hold it, first match wins
HF_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "ffn_hidden_size": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_query_groups": ("num_key_value_heads", "num_query_groups", "n_head_kv"),
    "vocab_size": ("vocab_size",),
    "max_seq_len": ("max_position_embeddings", "n_positions", "seq_length"),
    "tied_embeddings": ("tie_word_embeddings",),
}
HF_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
GATED_ACTIVATIONS = {"silu", "swiglu", "swish", "gelu_pytorch_tanh", "geglu"}


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model.path={str(model_dir)!r}: no {path.name} there; point model.path at a Hugging "
                          f"Face checkpoint directory (the folder holding config.json and the weights)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({exc}); check the checkpoint directory") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object; check the checkpoint directory")
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def architecture_from_hf(config: dict, source: str = "config.json") -> dict:
    """The architecture keys this project uses, from a Hugging Face config; names what is missing."""
    found: dict = {}
    for key, names in HF_KEYS.items():
        for name in names:
            if config.get(name) is not None:
                found[key] = config[name]
                break
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in found]
    if missing:
        raise ConfigError(f"{source} has no {', '.join(HF_KEYS[k][0] for k in missing)}; set "
                          f"{' '.join(f'model.architecture.{k}=N' for k in missing)} yourself")
    found.setdefault("ffn_hidden_size", 4 * found["hidden_size"])
    act = str(config.get("hidden_act") or config.get("activation_function") or "").lower()
    found["gated_mlp"] = act in GATED_ACTIVATIONS
    return found


def fill_architecture(model: DictConfig) -> None:
    """For a model with `path` set, fill every architecture key the config leaves MISSING (and dtype when
    `model.dtype` is unset) from its config.json. Seed models keep their card's numbers."""
    arch = model.architecture
    missing = [k for k in arch if OmegaConf.is_missing(arch, k)]
    if not missing:
        return
    if not model.get("path"):
        raise ConfigError(f"model={model.get('name')} needs its architecture ({', '.join(missing)} are unset): "
                          f"give model.path=DIR, a Hugging Face checkpoint directory with a config.json")
    config = read_hf_config(model.path)
    found = architecture_from_hf(config, str(Path(model.path) / "config.json"))
    for key in missing:
        if key in found:
            arch[key] = found[key]
    for key in ("num_query_groups", "max_seq_len", "gated_mlp", "tied_embeddings"):
        if key in found and key not in missing and model.get("name") == "hf":
            arch[key] = found[key]
    dtype = HF_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or ""))
    if dtype and model.get("name") == "hf":
        model.dtype = dtype
