"""Build a tiny random-weight Nemotron-4-family model for vLLM, fully offline.

Usage: <vllm-venv>/bin/python scripts/build_tiny_model.py OUT_DIR [--force]

Operators can use it to smoke-test a cluster setup (vLLM install, Slurm templates,
multi-node launch, the orchestrator's client) before downloading any real weights:
the directory loads in `vllm serve` like a real checkpoint. It holds a
NemotronForCausalLM (2 layers, hidden 128, 4 heads, 2 KV heads, head_dim 32, relu2,
partial rotary 0.5, 4096 context) with seeded random bf16 weights, and a byte-level
BPE tokenizer trained on the bundled prompts (examples/mt_bench_prompts.parquet)
with the Nemotron-4 special tokens and chat template; `<|endoftext|>` is the EOS.
That text is small, so the trained vocabulary stops short of the 8192 target (about
3.8k tokens); the model's vocab_size is set to the tokenizer's exact size.
The text it generates is gibberish.

Run it with the vLLM venv's python (scripts/install_vllm.sh), which has torch,
transformers, tokenizers and pyarrow. It is idempotent: when OUT_DIR already holds
this model it only says so. Otherwise it builds into a temporary directory beside
OUT_DIR and renames it into place. A non-empty OUT_DIR that is not a model from
this script is replaced only with --force. It prints OUT_DIR at the end.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "mt_bench_prompts.parquet"
SEED = 0
VOCAB_TARGET = 8192
STAMP = "tiny_model.json"  # written last; its presence marks a complete build
BUILD_VERSION = 1  # bump whenever the model or tokenizer below changes

# Special tokens get the first ids in this order: <s>=0 </s>=1 <pad>=2 <unk>=3
# <extra_id_0>=4 <extra_id_1>=5 <|endoftext|>=6 <extra_id_2>=7.
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_1>", "<|endoftext|>", "<extra_id_2>"]
BOS, EOS, PAD, UNK = "<s>", "<|endoftext|>", "<pad>", "<unk>"

CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    hidden_act="relu2",
    partial_rotary_factor=0.5,
    rope_theta=10000.0,
    norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=False,
)

# Nemotron-4 chat format:
#   <extra_id_0>System\n{system}\n
#   <extra_id_1>User\n{user}\n<extra_id_1>Assistant\n{assistant}\n ...
# The system text is empty when there is no system message; with
# add_generation_prompt the prompt ends with "<extra_id_1>Assistant\n".
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{ '<extra_id_0>System\\n' + system + '\\n' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<extra_id_1>User\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<extra_id_1>Assistant\\n' + message['content'] + '\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('Only system, user and assistant roles are supported') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<extra_id_1>Assistant\\n' }}"
    "{%- endif -%}"
)


def stamp_contents():
    return {"build_version": BUILD_VERSION, "seed": SEED, "config": CONFIG, "special_tokens": SPECIAL_TOKENS}


def is_built(out: Path) -> bool:
    """True when out holds a complete model of this version (json reads only: fast)."""
    try:
        stamp = json.loads((out / STAMP).read_text())
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if stamp != json.loads(json.dumps(stamp_contents())):
        return False
    if config.get("architectures") != ["NemotronForCausalLM"]:
        return False
    # transformers 5 moves rope_theta into rope_parameters; compare the rest
    if any(config.get(key) != value for key, value in CONFIG.items() if key != "rope_theta"):
        return False
    needed = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    return all((out / name).is_file() for name in needed)


def corpus():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("build_tiny_model: pyarrow is missing; run it with the venv from scripts/install_vllm.sh")
    prompts = [p for p in pq.read_table(PROMPTS, columns=["prompt"]).column("prompt").to_pylist() if p]
    if not prompts:
        sys.exit(f"build_tiny_model: no prompts in {PROMPTS}")
    return prompts


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD, UNK)],
        model_max_length=CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # Name the class explicitly so AutoTokenizer (and vLLM) load it without guessing.
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return fast


def build_model(out: Path, tokenizer):
    import torch
    from transformers import GenerationConfig, NemotronConfig, NemotronForCausalLM

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)}
    # The model's vocabulary is exactly the tokenizer's, so every id it samples decodes.
    config = NemotronConfig(
        vocab_size=len(tokenizer),
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        **CONFIG,
    )
    torch.manual_seed(SEED)
    model = NemotronForCausalLM(config).to(torch.bfloat16).eval()
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    model.save_pretrained(out, safe_serialization=True)


def parse_args():
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even when OUT_DIR already holds the model")
    args = parser.parse_args()
    return args.out_dir.resolve(), args.force


def build_into(out: Path, force: bool, script: str, kind: str, built, stamp: str, contents, build, describe):
    """Idempotent build of a model directory: `built(out)` true (and no force) only says so; otherwise
    `build(tmp, tokenizer)` fills a directory beside out with the tokenizer written first, the stamp file
    `stamp` (contents()) is written last, and it is renamed into place. A non-empty out without the stamp
    (not `kind`) is replaced only with force. describe(tokenizer): what the build line says. Prints out."""
    if not force and built(out):
        print(f"{script}: {out} is already built", file=sys.stderr)
        print(out)
        return
    if out.exists() and not out.is_dir():
        sys.exit(f"{script}: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / stamp).is_file() and not force:
        sys.exit(f"{script}: {out} is not empty and not {kind}; pass --force to replace it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = build_tokenizer(tmp)
        build(tmp, tokenizer)
        (tmp / stamp).write_text(json.dumps(contents(), indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; cluster jobs may run as other users
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "model")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{script}: built {out} ({describe(tokenizer)})", file=sys.stderr)
    print(out)


def main():
    out, force = parse_args()
    build_into(out, force, "build_tiny_model", "a tiny model", is_built, STAMP, stamp_contents, build_model,
               lambda tokenizer: f"vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
