"""engine=vllm: `vllm serve` on the OpenAI API. Multi-node without Ray (vLLM >= 0.18): one task per node,
`--nnodes N --node-rank R --master-addr <node 0> --master-port P`, ranks >= 1 `--headless`.

A scoring model (model.attributes: a reward or sequence-classification checkpoint) is served by vLLM's pooling
runner, `--runner pooling`, and scored on its /pooling route (protocols/pooling.py)."""
from __future__ import annotations

from ..config import Config
from .base import DTYPES, EngineAdapter, Rendezvous


class VllmAdapter(EngineAdapter):
    name = "vllm"
    protocol = "openai"
    default_command = ("vllm", "serve")
    needs_hf_checkpoint = True
    honours_n = True

    def protocol_for(self, cfg: Config) -> str:
        return "pooling" if cfg.model.attributes else self.protocol  # a scoring model: the pooling runner

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        layout, e = cfg.layout, cfg.engine
        argv = self.command(cfg) + [
            self.model_source(cfg), "--host", e.host, "--port", str(rv.port),
            "--served-model-name", self.served_name(cfg),
            "--tensor-parallel-size", str(layout.tensor_parallel),
            "--pipeline-parallel-size", str(layout.pipeline_parallel),
            "--max-model-len", str(cfg.model.architecture.max_seq_len),
            "--dtype", DTYPES[cfg.model.dtype]]
        if cfg.model.attributes:
            argv += ["--runner", "pooling"]
        if cfg.model.dtype == "fp8":
            argv += ["--quantization", "fp8"]
        if layout.nodes > 1:
            argv += ["--nnodes", str(layout.nodes), "--node-rank", str(node),
                     "--master-addr", rv.master_addr, "--master-port", str(rv.master_port)]
            if node > 0:
                argv.append("--headless")
        return argv + list(e.extra_args)


ADAPTER = VllmAdapter()
