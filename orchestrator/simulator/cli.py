"""The simulator's command line: ``python -m orchestrator.simulator``."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import fields
from pathlib import Path

from .app import parse_routes, required_key, serve, tls_context
from .dialects import dialect
from .model import EngineSettings
from .triton_tensors import _triton_model


def _write_rank(folder: Path, rank: int) -> None:
    env = os.environ
    record = {"rank": rank, "local_rank": int(env.get("SLURM_LOCALID", "0")),
              "node_rank": int(env.get("SLURM_NODEID", "0")),
              "world_size": int(env.get("SLURM_NTASKS", "1")), "node": env.get("SLURMD_NODENAME", socket.gethostname()),
              "gpus": env.get("CUDA_VISIBLE_DEVICES", env.get("SLURM_STEP_GPUS", "")), "pid": os.getpid()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank-{rank}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"rank-{rank}.json")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m orchestrator.simulator --port 0 --port-file F ...``."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.simulator",
                                     description="Simulated LLM inference engine (NeMo, vLLM and Triton protocols).")
    defaults = EngineSettings()
    for f in fields(EngineSettings):
        value = getattr(defaults, f.name)
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--port-file", help="write the bound port number here (atomically)")
    parser.add_argument("--rank-dir", help="each rank writes rank-<SLURM_PROCID>.json (its Slurm placement) here")
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank exits with status 1 at once (tests)")
    args = vars(parser.parse_args(argv))
    port_file = args.pop("port_file")
    rank_dir, fail_rank = args.pop("rank_dir"), args.pop("fail_rank")
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # Slurm's time-limit warning is for the orchestrator, not us
    if rank == fail_rank:
        print(f"rank {rank}: simulated failure (--fail-rank)", file=sys.stderr, flush=True)
        return 1
    if rank_dir:
        _write_rank(Path(rank_dir), rank)
        world = int(os.environ.get("SLURM_NTASKS", "1"))
        while rank == 0 and len(list(Path(rank_dir).glob("rank-*.json"))) < world:
            time.sleep(0.05)  # like torch.distributed's rendezvous: no rank serves until all have joined
    if rank != 0:  # like NeMo's non-zero ranks: no HTTP, stay up and join generations until stopped
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return 0
    settings = EngineSettings(**args)
    if min(settings.capacity, settings.max_natural_tokens, settings.max_model_len, settings.triton_max_batch_size) < 1:
        parser.error("--capacity, --max-natural-tokens, --max-model-len and --triton-max-batch-size must be at least 1")
    try:
        parse_routes(settings.routes)
        _triton_model(settings)
        dialect(settings.openai_dialect)
        required_key(settings)
        tls_context(settings)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if not 0.0 <= settings.error_rate <= 1.0 or min(settings.request_latency_s, settings.token_latency_s) < 0:
        parser.error("--error-rate must be in [0, 1] and latencies non-negative")
    try:
        asyncio.run(serve(settings, port_file))
    except KeyboardInterrupt:
        pass
    return 0
