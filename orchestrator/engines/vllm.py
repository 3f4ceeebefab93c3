"""engine=vllm: `vllm serve` on the OpenAI API. Multi-node without Ray (vLLM >= 0.18): one task per node,
`--nnodes N --node-rank R --master-addr <node 0> --master-port P`, ranks >= 1 `--headless`.

A scoring model (model.attributes: a reward or sequence-classification checkpoint) is served by vLLM's pooling
runner, `--runner pooling`, and scored on its /pooling route (protocols/pooling.py).

layout.data_parallel=D: vLLM's own data parallelism, D engine cores (TP x PP GPUs each) behind one API server,
`--data-parallel-size D`. Over N nodes (each instance inside one node) every node runs D / N of them,
`--data-parallel-size-local D/N --data-parallel-address <node 0> --data-parallel-rpc-port P`, nodes >= 1
`--headless --data-parallel-start-rank R x D/N` (checked on the CPU build: shared/reference/VLLM_CPU.md)."""
from __future__ import annotations

from ..config import Config
from .base import DTYPES, EngineAdapter, Rendezvous, data_parallel_refusal


class VllmAdapter(EngineAdapter):
    name = "vllm"
    protocol = "openai"
    default_command = ("vllm", "serve")
    needs_hf_checkpoint = True
    honours_n = True
    native_data_parallel = True

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
        if layout.data_parallel > 1:
            argv += ["--data-parallel-size", str(layout.data_parallel)]
        if layout.data_parallel > 1 and layout.nodes > 1:  # D / N instances on each node (problems: no straddling)
            local = layout.data_parallel // layout.nodes
            argv += ["--data-parallel-size-local", str(local), "--data-parallel-address", rv.master_addr,
                     "--data-parallel-rpc-port", str(rv.master_port)]
            if node > 0:
                argv += ["--headless", "--data-parallel-start-rank", str(node * local)]
        elif layout.nodes > 1:
            argv += ["--nnodes", str(layout.nodes), "--node-rank", str(node),
                     "--master-addr", rv.master_addr, "--master-port", str(rv.master_port)]
            if node > 0:
                argv.append("--headless")
        return argv + list(e.extra_args)

    def problems(self, cfg: Config) -> list[str]:
        found = super().problems(cfg)
        layout = cfg.layout
        if layout.data_parallel > 1 and layout.nodes > 1 and \
                layout.tensor_parallel * layout.pipeline_parallel > layout.gpus_per_node:
            found.append(data_parallel_refusal(cfg, self.name, why=(
                f"engine={self.name} runs data-parallel instances each inside one node, and an instance of "
                f"TP x PP = {layout.tensor_parallel * layout.pipeline_parallel} GPUs spans nodes "
                f"(layout.gpus_per_node={layout.gpus_per_node})")))
        return found


ADAPTER = VllmAdapter()
