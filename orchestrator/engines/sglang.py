"""engine=sglang: `python3 -m sglang.launch_server` on the OpenAI API; one task per node, each with
`--nnodes N --node-rank R --dist-init-addr <node 0>:P` (SGLang's own multi-node launch).

layout.data_parallel=D: SGLang's own data parallelism, `--dp-size D` (D workers of TP x PP GPUs behind one server,
its router spreading the requests), on one node per replica; over nodes it is refused before submission."""
from __future__ import annotations

from ..config import Config
from .base import DTYPES, EngineAdapter, Rendezvous, data_parallel_refusal


class SglangAdapter(EngineAdapter):
    name = "sglang"
    protocol = "openai"
    default_command = ("python3", "-m", "sglang.launch_server")
    needs_hf_checkpoint = True
    native_data_parallel = True

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        layout, e = cfg.layout, cfg.engine
        argv = self.command(cfg) + [
            "--model-path", self.model_source(cfg), "--host", e.host, "--port", str(rv.port),
            "--served-model-name", self.served_name(cfg),
            "--tp-size", str(layout.tensor_parallel), "--pp-size", str(layout.pipeline_parallel),
            "--context-length", str(cfg.model.architecture.max_seq_len),
            "--dtype", DTYPES[cfg.model.dtype]]
        if layout.data_parallel > 1:
            argv += ["--dp-size", str(layout.data_parallel)]
        if layout.nodes > 1:
            argv += ["--nnodes", str(layout.nodes), "--node-rank", str(node),
                     "--dist-init-addr", f"{rv.master_addr}:{rv.master_port}"]
        return argv + list(e.extra_args)

    def problems(self, cfg: Config) -> list[str]:
        found = super().problems(cfg)
        if cfg.layout.data_parallel > 1 and cfg.layout.nodes > 1:
            found.append(data_parallel_refusal(cfg, self.name, why=(
                f"engine={self.name} serves --dp-size on one node per replica here, and layout.nodes="
                f"{cfg.layout.nodes}")))
        return found


ADAPTER = SglangAdapter()
