"""engine=sglang: `python3 -m sglang.launch_server` on the OpenAI API; one task per node, each with
`--nnodes N --node-rank R --dist-init-addr <node 0>:P` (SGLang's own multi-node launch)."""
from __future__ import annotations

from ..config import Config
from .base import DTYPES, EngineAdapter, Rendezvous


class SglangAdapter(EngineAdapter):
    name = "sglang"
    protocol = "openai"
    default_command = ("python3", "-m", "sglang.launch_server")
    needs_hf_checkpoint = True

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        layout, e = cfg.layout, cfg.engine
        argv = self.command(cfg) + [
            "--model-path", self.model_source(cfg), "--host", e.host, "--port", str(rv.port),
            "--served-model-name", self.served_name(cfg),
            "--tp-size", str(layout.tensor_parallel), "--pp-size", str(layout.pipeline_parallel),
            "--context-length", str(cfg.model.architecture.max_seq_len),
            "--dtype", DTYPES[cfg.model.dtype]]
        if layout.nodes > 1:
            argv += ["--nnodes", str(layout.nodes), "--node-rank", str(node),
                     "--dist-init-addr", f"{rv.master_addr}:{rv.master_port}"]
        return argv + list(e.extra_args)


ADAPTER = SglangAdapter()
