"""A stand-in for NeMo's scripts/deploy/nlp/deploy_triton.py: the same command line, the same PyTriton
binding (a real `tritonserver`, KServe v2), NeMo's deploy tensors, and a real generator behind them (the
tiny model built by scripts/build_tiny_model.py, run through `transformers` on the CPU), not an echo.

Run with the PyTriton venv's python (scripts/install_triton.sh). `--nemo_checkpoint` is the Hugging Face
directory of the tiny model here (the one thing that differs from the card: there is no .nemo to export).

What it binds, read from NeMo's sources (nemo/export/tensorrt_llm.py, TensorRTLLM.get_triton_input and
triton_infer_fn; nemo/deploy/deploy_pytriton.py, DeployPyTriton):
- inputs `prompts` (BYTES) and the optional `max_output_len` (INT64; `max_output_token` in the 2023
  containers), `top_k` (INT64), `top_p`, `temperature` (FP32), `random_seed` (INT64), `stop_words_list`,
  `bad_words_list` (BYTES), `no_repeat_ngram_size` (FP32), `task_id`, `lora_uids` (BYTES), every one of
  shape (-1,) after the batch dimension; output `outputs` (BYTES);
- `ModelConfig(max_batch_size=--max_batch_size)`, PyTriton's dynamic batcher;
- the infer function reads each sampling input from the batch's first row (`inputs.pop(name)[0][0]`), reads
  `stop_words_list` with NeMo's `str_ndarray2list` (which squeezes the last axis: one stop word a row), and
  answers an exception with one output row "An error occurred: ..." (HTTP 200), as NeMo's does.

Test-only knobs, in the environment (so the command line stays deploy_triton.py's):
- TRITON_TEST_MODEL=nemo (default) or trtllm: the TensorRT-LLM backend ensemble's tensors instead
  (`text_input`, `max_tokens`, ... -> `text_output`), the model Triton's generate extension is used with;
- TRITON_TEST_MAX_LEN_INPUT: the name of the length input (default max_output_len);
- TRITON_TEST_REJECT: prompts holding this text make the model raise PyTriton's bad-parameter error
  (a deployable that checks its input and does not catch its own errors), so Triton answers an error;
- TRITON_TEST_RECORD: a file that gets one JSON line per model call (rows, input names, first-row values).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def nemo_inputs(max_len_input: str) -> tuple[Tensor, ...]:
    """TensorRTLLM.get_triton_input (NeMo's TensorRT-LLM exporter, which deploy_triton.py binds)."""
    return (
        Tensor(name="prompts", shape=(-1,), dtype=bytes),
        Tensor(name=max_len_input, shape=(-1,), dtype=np.int_, optional=True),
        Tensor(name="top_k", shape=(-1,), dtype=np.int_, optional=True),
        Tensor(name="top_p", shape=(-1,), dtype=np.single, optional=True),
        Tensor(name="temperature", shape=(-1,), dtype=np.single, optional=True),
        Tensor(name="random_seed", shape=(-1,), dtype=np.int_, optional=True),
        Tensor(name="stop_words_list", shape=(-1,), dtype=bytes, optional=True),
        Tensor(name="bad_words_list", shape=(-1,), dtype=bytes, optional=True),
        Tensor(name="no_repeat_ngram_size", shape=(-1,), dtype=np.single, optional=True),
        Tensor(name="task_id", shape=(-1,), dtype=bytes, optional=True),
        Tensor(name="lora_uids", shape=(-1,), dtype=bytes, optional=True),
    )


def trtllm_inputs() -> tuple[Tensor, ...]:
    """The text inputs of tensorrtllm_backend's inflight_batcher_llm ensemble (all_models/.../ensemble)."""
    one = (1,)
    return (
        Tensor(name="text_input", shape=one, dtype=bytes),
        Tensor(name="max_tokens", shape=one, dtype=np.int32),
        Tensor(name="bad_words", shape=(-1,), dtype=bytes, optional=True),
        Tensor(name="stop_words", shape=(-1,), dtype=bytes, optional=True),
        Tensor(name="end_id", shape=one, dtype=np.int32, optional=True),
        Tensor(name="pad_id", shape=one, dtype=np.int32, optional=True),
        Tensor(name="top_k", shape=one, dtype=np.int32, optional=True),
        Tensor(name="top_p", shape=one, dtype=np.single, optional=True),
        Tensor(name="temperature", shape=one, dtype=np.single, optional=True),
        Tensor(name="length_penalty", shape=one, dtype=np.single, optional=True),
        Tensor(name="repetition_penalty", shape=one, dtype=np.single, optional=True),
        Tensor(name="min_length", shape=one, dtype=np.int32, optional=True),
        Tensor(name="presence_penalty", shape=one, dtype=np.single, optional=True),
        Tensor(name="frequency_penalty", shape=one, dtype=np.single, optional=True),
        Tensor(name="random_seed", shape=one, dtype=np.uint64, optional=True),
        Tensor(name="return_log_probs", shape=one, dtype=np.bool_, optional=True),
        Tensor(name="beam_width", shape=one, dtype=np.int32, optional=True),
        Tensor(name="stream", shape=one, dtype=np.bool_, optional=True),
    )


def str_ndarray2list(array: np.ndarray) -> list[str]:
    """NeMo's nemo/deploy/utils.py str_ndarray2list: decode, squeeze the last axis, to a list."""
    array = np.char.decode(array.astype("bytes"), encoding="utf-8")
    return array.squeeze(axis=-1).tolist()


class Generator:
    """The tiny model through transformers: what TensorRT-LLM's runner does for deploy_triton.py (the answer
    without the prompt, special tokens kept, the end-of-sequence token dropped, generation stopped after a
    stop word, which stays in the text)."""

    def __init__(self, checkpoint: str, max_input_len: int, max_output_len: int):
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.max_input_len, self.max_output_len = max_input_len, max_output_len
        torch.set_num_threads(1)

    def __call__(self, prompts: list[str], max_tokens: int, top_k: int, top_p: float, temperature: float,
                 seed: int | None, stop_words: list[list[str]]) -> list[str]:
        if max_tokens > self.max_output_len:
            raise ValueError(f"max_output_len {max_tokens} is larger than the engine's {self.max_output_len}")
        greedy = top_k == 1 or (top_k == 0 and top_p == 0.0)
        texts = []
        for row, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            if ids.shape[1] > self.max_input_len:
                raise ValueError(f"the prompt has {ids.shape[1]} tokens, more than max_input_len "
                                 f"{self.max_input_len}")
            if seed is not None:
                torch.manual_seed(int(seed) + row)
            sampling = {} if greedy else {"do_sample": True, "top_k": int(top_k) or None,
                                          "top_p": float(top_p) if 0.0 < top_p <= 1.0 else 1.0,
                                          "temperature": max(float(temperature), 1e-3)}
            stops = [w for w in (stop_words[row] if row < len(stop_words) else []) if w]
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_tokens),
                                          do_sample=not greedy, eos_token_id=self.tokenizer.eos_token_id,
                                          pad_token_id=self.tokenizer.eos_token_id,
                                          stop_strings=stops or None, tokenizer=self.tokenizer if stops else None,
                                          **sampling)
            new = out[0, ids.shape[1]:].tolist()
            if new and new[-1] == self.tokenizer.eos_token_id:
                new = new[:-1]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=False))
        return texts


def record(values: dict) -> None:
    path = os.environ.get("TRITON_TEST_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(values) + "\n")


def check_rejected(prompts: list[str]) -> None:
    marker = os.environ.get("TRITON_TEST_REJECT")
    bad = [i for i, p in enumerate(prompts) if marker and marker in p]
    if bad:
        raise PyTritonBadParameterError(f"prompt {bad[0]} of the batch is refused by the model (TRITON_TEST_REJECT)")


def nemo_infer_fn(generate: Generator, max_len_input: str):
    @batch
    def infer(**inputs: np.ndarray):
        """TensorRTLLM.triton_infer_fn: sampling values from the first row, NeMo's error answer."""
        prompts = str_ndarray2list(inputs.pop("prompts"))
        record({"rows": len(prompts), "inputs": sorted(["prompts", *inputs]),
                "first": {k: v[0].tolist() if v.dtype.kind != "S" and v.dtype.kind != "O" else
                          [x.decode() if isinstance(x, bytes) else x for x in v[0].tolist()]
                          for k, v in inputs.items()}})
        check_rejected(prompts)
        try:
            args = {"max_tokens": 256, "top_k": 1, "top_p": 0.0, "temperature": 1.0, "seed": None,
                    "stop_words": []}
            if max_len_input in inputs:
                args["max_tokens"] = inputs.pop(max_len_input)[0][0]
            for name, key in (("top_k", "top_k"), ("top_p", "top_p"), ("temperature", "temperature"),
                              ("random_seed", "seed")):
                if name in inputs:
                    args[key] = inputs.pop(name)[0][0]
            if "stop_words_list" in inputs:
                stop_words_list = str_ndarray2list(inputs.pop("stop_words_list"))
                args["stop_words"] = [[stop_word] for stop_word in stop_words_list]
            output = generate(prompts, **args)
            output = np.char.encode(np.array(output)[..., np.newaxis], "utf-8")
        except Exception as error:  # NeMo's catch-all: one row, the error's text
            output = np.char.encode(np.array([f"An error occurred: {error}"])[..., np.newaxis], "utf-8")
        return {"outputs": output}

    return infer


def trtllm_infer_fn(generate: Generator):
    @batch
    def infer(**inputs: np.ndarray):
        """The ensemble: one text per row, each row's own sampling values; errors are Triton errors."""
        prompts = str_ndarray2list(inputs.pop("text_input"))
        record({"rows": len(prompts), "inputs": sorted(["text_input", *inputs])})
        check_rejected(prompts)
        texts = []
        for row, prompt in enumerate(prompts):
            def value(name, default, row=row):
                return inputs[name][row][0] if name in inputs else default
            stops = [w.decode() for w in inputs["stop_words"][row]] if "stop_words" in inputs else []
            seed = value("random_seed", None)
            texts += generate([prompt], int(value("max_tokens", 16)), int(value("top_k", 1)),
                              float(value("top_p", 0.0)), float(value("temperature", 1.0)),
                              None if seed is None else int(seed), [stops])
        return {"text_output": np.char.encode(np.array(texts)[..., np.newaxis], "utf-8")}

    return infer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # deploy_triton.py's flags, as engine=triton passes them (orchestrator/engines/triton.py)
    parser.add_argument("--nemo_checkpoint", required=True)
    parser.add_argument("--model_type", default="llama")
    parser.add_argument("--triton_model_name", required=True)
    parser.add_argument("--triton_model_version", type=int, default=1)
    parser.add_argument("--triton_http_address", default="0.0.0.0")
    parser.add_argument("--triton_port", type=int, default=8000)
    parser.add_argument("--num_gpus", type=int, default=1)
    parser.add_argument("--tensor_parallelism_size", type=int, default=1)
    parser.add_argument("--max_input_len", type=int, default=256)
    parser.add_argument("--max_output_len", type=int, default=256)
    parser.add_argument("--max_batch_size", type=int, default=8)
    args = parser.parse_args(argv)

    kind = os.environ.get("TRITON_TEST_MODEL", "nemo")
    max_len_input = os.environ.get("TRITON_TEST_MAX_LEN_INPUT", "max_output_len")
    generate = Generator(args.nemo_checkpoint, args.max_input_len, args.max_output_len)
    if kind == "nemo":
        inputs, outputs = nemo_inputs(max_len_input), (Tensor(name="outputs", shape=(-1,), dtype=bytes),)
        infer = nemo_infer_fn(generate, max_len_input)
    elif kind == "trtllm":
        inputs, outputs = trtllm_inputs(), (Tensor(name="text_output", shape=(-1,), dtype=bytes),)
        infer = trtllm_infer_fn(generate)
    else:
        parser.error(f"TRITON_TEST_MODEL must be nemo or trtllm, not {kind!r}")
    # gRPC and metrics on free ports of their own: several replicas share this one host in the tests
    config = TritonConfig(http_address=args.triton_http_address, http_port=args.triton_port,
                          grpc_address="127.0.0.1", grpc_port=free_port(), metrics_port=free_port(),
                          log_verbose=0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave the `with` below: it stops tritonserver
    with Triton(config=config) as triton:
        triton.bind(model_name=args.triton_model_name, model_version=args.triton_model_version, infer_func=infer,
                    inputs=inputs, outputs=outputs, config=ModelConfig(max_batch_size=args.max_batch_size))
        print(f"deploy_triton (test stand-in): {kind} model {args.triton_model_name!r} on "
              f"{args.triton_http_address}:{args.triton_port}, max_batch_size {args.max_batch_size}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
