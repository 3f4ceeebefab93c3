"""Build a tiny random-weight reward (sequence-classification) model for `vllm serve --runner pooling`, offline.

Usage: <vllm-venv>/bin/python scripts/build_tiny_reward_model.py OUT_DIR [--force]

It holds a LlamaForSequenceClassification (2 layers, hidden 128, 4 heads, 2 KV heads, head_dim 32, 1024
context) with a linear head of 2 labels, helpfulness and correctness (conf/model/tiny_reward.yaml names them
in that order), and seeded random bf16 weights; vLLM's pooling runner serves it on POST /pooling (the head's
raw outputs) and POST /classify (their softmax). Its tokenizer is the tiny model's (scripts/build_tiny_model.py:
a byte-level BPE trained on the bundled prompts, with the Nemotron-4 special tokens, so the SteerLM reward
sentences' <extra_id_N> tags are single tokens). The scores mean nothing: it exists to run the scoring path
against a real vLLM.

Run it with the vLLM venv's python (scripts/install_vllm.sh). Idempotent like build_tiny_model.py: when OUT_DIR
already holds this model it only says so; otherwise it builds beside OUT_DIR and renames into place. A
non-empty OUT_DIR that is not a model from this script is replaced only with --force. It prints OUT_DIR.
"""
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tiny_model as tiny  # noqa: E402 - the tiny model's tokenizer, built the same way

SEED = 1
STAMP = "tiny_reward_model.json"  # written last; its presence marks a complete build
BUILD_VERSION = 1  # bump whenever the model or its tokenizer changes
LABELS = ["helpfulness", "correctness"]  # the head's outputs, in order: conf/model/tiny_reward.yaml's attributes
ARCHITECTURE = "LlamaForSequenceClassification"

CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    hidden_act="silu",
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=False,
)


def stamp_contents():
    return {"build_version": BUILD_VERSION, "tokenizer_build": tiny.BUILD_VERSION, "seed": SEED, "config": CONFIG,
            "labels": LABELS}


def is_built(out: Path) -> bool:
    """True when out holds a complete model of this version (json reads only: fast)."""
    try:
        stamp = json.loads((out / STAMP).read_text())
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if stamp != json.loads(json.dumps(stamp_contents())) or config.get("architectures") != [ARCHITECTURE]:
        return False
    if [config.get("id2label", {}).get(str(i)) for i in range(len(LABELS))] != LABELS:
        return False
    needed = ["model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    return all((out / name).is_file() for name in needed)


def build_model(out: Path, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (tiny.BOS, tiny.EOS, tiny.PAD)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=ids[tiny.BOS],
        eos_token_id=ids[tiny.EOS],
        pad_token_id=ids[tiny.PAD],  # sequence classification pools the last token before the padding
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        architectures=[ARCHITECTURE],
        **CONFIG,
    )
    torch.manual_seed(SEED)
    model = LlamaForSequenceClassification(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # a head of the default init's scale gives scores too close to tell apart
        model.score.weight.normal_(0.0, 1.0)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)


def main():
    out, force = tiny.parse_args()
    tiny.build_into(out, force, "build_tiny_reward_model", "a tiny reward model", is_built, STAMP, stamp_contents,
                    build_model, lambda tokenizer: f"{ARCHITECTURE}, labels {', '.join(LABELS)}, vocab "
                                                   f"{len(tokenizer)}")


if __name__ == "__main__":
    main()
