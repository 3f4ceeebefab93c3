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
        return cfg.engine.protocol or ("reward" if cfg.model.attributes else self.protocol)  # it serves both

    def answer_settings(self, cfg: Config) -> dict:
        # the simulated text is a function of prompt and seed; "engine.seed", its key before it moved to
        # engine.simulator.seed, so that run dirs started before resume
        return {"engine.seed": cfg.engine.simulator.seed}

    def command(self, cfg: Config) -> list[str]:
        return list(cfg.engine.command or [sys.executable, "-m", "orchestrator.simulator"])

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        e, sim = cfg.engine, cfg.engine.simulator
        slow = sim.slow_factor if rv.replica in sim.slow_replicas else 1.0  # tests of stragglers
        cmd = self.command(cfg) + [
            "--host", e.host, "--port", str(rv.port),
            "--request-latency-s", str(sim.request_latency_s * slow),
            "--token-latency-s", str(sim.token_latency_s * slow),
            "--capacity", str(sim.capacity), "--error-rate", str(sim.error_rate), "--seed", str(sim.seed),
            "--max-natural-tokens", str(sim.max_natural_tokens), "--model-name", self.served_name(cfg),
            "--max-model-len", str(cfg.model.architecture.max_seq_len),
            "--stall-rate", str(sim.stall_rate), "--stall-s", str(sim.stall_s)]
        if e.dialect:  # whose OpenAI server its OpenAI routes imitate (simulator.dialects)
            cmd += ["--openai-dialect", e.dialect]
        if cfg.model.attributes:  # a scoring model: one score per attribute (its reward and pooling routes)
            cmd += ["--reward-attributes", str(len(cfg.model.attributes))]
        if sim.invalid_json_rate:  # structured answers that break their schema (tests of the re-asks)
            cmd += ["--invalid-json-rate", str(sim.invalid_json_rate)]
        if rv.port_file is not None:
            cmd += ["--port-file", rv.port_file]
        if rv.rank_dir is not None:
            cmd += ["--rank-dir", rv.rank_dir]
        if sim.fail_rank >= 0:
            cmd += ["--fail-rank", str(sim.fail_rank)]
        if sim.require_key_env:  # the variable's name: the engine reads the key from its environment
            cmd += ["--require-key-env", sim.require_key_env]
        return cmd + list(e.extra_args)


ADAPTER = MockAdapter()
