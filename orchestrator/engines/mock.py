"""engine=mock: the embedded engine (tests and local runs only), in the same multi-rank shape as NeMo:
one task per GPU, every rank waits for all ranks to join, rank 0 serves HTTP."""
from __future__ import annotations

import sys

from ..config import Config
from .base import EngineAdapter, Rendezvous


class MockAdapter(EngineAdapter):
    name = "mock"
    protocol = "nemo"
    per_gpu_tasks = True
    reports_port = True
    simulated = True
    honours_n = True

    def protocol_for(self, cfg: Config) -> str:
        return cfg.engine.protocol or self.protocol

    def answer_settings(self, cfg: Config) -> dict:
        return {"engine.seed": cfg.engine.seed}  # the simulated text is a function of prompt and seed

    def command(self, cfg: Config) -> list[str]:
        return list(cfg.engine.command or [sys.executable, "-m", "orchestrator.simulator"])

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        e = cfg.engine
        slow = e.slow_factor if rv.replica in e.slow_replicas else 1.0  # tests of stragglers
        cmd = self.command(cfg) + [
            "--host", e.host, "--port", str(rv.port),
            "--request-latency-s", str(e.request_latency_s * slow), "--token-latency-s", str(e.token_latency_s * slow),
            "--capacity", str(e.capacity), "--error-rate", str(e.error_rate), "--seed", str(e.seed),
            "--max-natural-tokens", str(e.max_natural_tokens), "--model-name", self.served_name(cfg),
            "--max-model-len", str(cfg.model.architecture.max_seq_len),
            "--stall-rate", str(e.stall_rate), "--stall-s", str(e.stall_s)]
        if rv.port_file is not None:
            cmd += ["--port-file", rv.port_file]
        if rv.rank_dir is not None:
            cmd += ["--rank-dir", rv.rank_dir]
        if e.fail_rank >= 0:
            cmd += ["--fail-rank", str(e.fail_rank)]
        if e.require_key_env:  # the variable's name: the engine reads the key from its environment
            cmd += ["--require-key-env", e.require_key_env]
        return cmd + list(e.extra_args)


ADAPTER = MockAdapter()
