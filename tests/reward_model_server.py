"""A stand-in for NeMo-Aligner's examples/nlp/gpt/serve_reward_model.py: the same command line (Hydra-style
`rm_model_file=... trainer.num_nodes=... ++model.tensor_model_parallel_size=... inference.port=...`), the same
PyTriton binding (a real `tritonserver`, KServe v2) and NeMo-Aligner's `reward_model` tensors
(nemo_aligner/servers/server_callables.py, RewardModelCallable): optional inputs `sentences` (bytes, (-1,)),
`tokens`, `sequence_lengths` (int64, (-1,)), `add_EOS` (bool, (1,)); outputs `rewards` (float32) and `exceeded`
(int32, one per sentence), declared (1,) as NeMo-Aligner declares them. Behind them, scores that are a pure
function of the text: attribute k is a hash of (sentence, k) in [0, 4); the last rises with the length of the
answer (the text after the last `<extra_id_1>Assistant\\n`), so a ranking can be checked.

Run with the PyTriton venv's python (scripts/install_triton.sh). Only global rank 0 (SLURM_PROCID) serves, as in
NeMo-Aligner; the others wait to be stopped. Test-only knobs, in the environment (the command line stays the
card's): REWARD_TEST_ATTRIBUTES (values per sentence, default 9), REWARD_TEST_CONTEXT (a sentence of more
whitespace-separated words than this is `exceeded`, default 4096), REWARD_TEST_RECORD (a file that gets one
JSON line per model call: its rows and input names).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

ASSISTANT, LABEL = "<extra_id_1>Assistant\n", "<extra_id_2>"


def scores(sentence: str, attributes: int) -> list[float]:
    out = [int.from_bytes(hashlib.blake2b(f"{k}\0{sentence}".encode(), digest_size=4).digest(), "big") / 2 ** 32 * 4
           for k in range(attributes)]
    answer = sentence.rsplit(ASSISTANT, 1)[-1].removesuffix(LABEL)
    out[-1] = 4 * (1 - math.exp(-len(answer.split()) / 16))
    return out


def make_infer(attributes: int, context: int):
    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        record = os.environ.get("REWARD_TEST_RECORD")
        sentences = [bytes(row[0]).decode("utf-8") for row in inputs["sentences"]]  # one a row, as NeMo-Aligner
        if record:
            with open(record, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"rows": len(sentences), "inputs": sorted(inputs)}) + "\n")
        exceeded = [int(len(s.split()) > context) for s in sentences]
        rewards = [[0.0] * attributes if over else scores(s, attributes) for s, over in zip(sentences, exceeded)]
        return {"rewards": np.array(rewards, dtype=np.float32),
                "exceeded": np.array(exceeded, dtype=np.int32).reshape(-1, 1)}

    return infer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = {}
    for arg in sys.argv[1:] if argv is None else argv:  # Hydra overrides: key=value, ++key=value
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq:
            print(f"serve_reward_model (stand-in): not a key=value override: {arg!r}", file=sys.stderr)
            return 2
        args[key] = value
    for key in ("rm_model_file", "trainer.num_nodes", "trainer.devices", "model.tensor_model_parallel_size",
                "model.pipeline_model_parallel_size", "inference.micro_batch_size", "inference.port"):
        if key not in args:
            print(f"serve_reward_model (stand-in): missing {key}=", file=sys.stderr)
            return 2
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:  # NeMo-Aligner: only rank 0 serves
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return 0
    world = int(args["trainer.num_nodes"]) * int(args["trainer.devices"])
    data_parallel = max(1, world // (int(args["model.tensor_model_parallel_size"]) *
                                     int(args["model.pipeline_model_parallel_size"])))
    max_batch = int(args["inference.micro_batch_size"]) * data_parallel
    attributes = int(os.environ.get("REWARD_TEST_ATTRIBUTES", "9"))
    context = int(os.environ.get("REWARD_TEST_CONTEXT", "4096"))
    inputs = (Tensor(name="sentences", shape=(-1,), dtype=bytes, optional=True),
              Tensor(name="tokens", shape=(-1,), dtype=np.int64, optional=True),
              Tensor(name="sequence_lengths", shape=(-1,), dtype=np.int64, optional=True),
              Tensor(name="add_EOS", shape=(1,), dtype=np.bool_, optional=True))
    outputs = (Tensor(name="rewards", shape=(1,), dtype=np.float32),
               Tensor(name="exceeded", shape=(1,), dtype=np.int32))
    config = TritonConfig(http_address="127.0.0.1", http_port=int(args["inference.port"]), grpc_address="127.0.0.1",
                          grpc_port=free_port(), metrics_port=free_port(), log_verbose=0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave the `with` below: it stops tritonserver
    with Triton(config=config) as triton:
        triton.bind(model_name="reward_model", infer_func=make_infer(attributes, context), inputs=inputs,
                    outputs=outputs, config=ModelConfig(max_batch_size=max_batch))
        print(f"serve_reward_model (test stand-in): reward_model on 127.0.0.1:{args['inference.port']}, "
              f"max_batch_size {max_batch}, {attributes} attributes", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
