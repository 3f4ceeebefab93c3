"""engine=triton: NeMo's deploy_triton.py (PyTriton), as the Llama2-70B-SteerLM card deploys it: one
process on one node using `--num_gpus` GPUs; KServe v2 over HTTP (`/v2/health/ready`,
`POST /v2/models/{name}/infer`)."""
from __future__ import annotations

from ..config import Config
from .base import EngineAdapter, Rendezvous

SCRIPT = "/opt/NeMo/scripts/deploy/nlp/deploy_triton.py"


class TritonAdapter(EngineAdapter):
    name = "triton"
    protocol = "triton"
    default_command = ("python3",)
    max_nodes = 1
    needs_nemo_checkpoint = True

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        e, o = cfg.engine, cfg.engine.options
        return self.command(cfg) + [
            e.script or SCRIPT, "--nemo_checkpoint", str(e.checkpoint),
            "--model_type", str(o.get("model_type", "llama")),
            "--triton_model_name", self.served_name(cfg), "--triton_http_address", e.host,
            "--triton_port", str(rv.port), "--num_gpus", str(cfg.layout.gpus_per_node),
            "--tensor_parallelism_size", str(cfg.layout.tensor_parallel),
            "--max_input_len",
            str(o.get("max_input_len", cfg.model.architecture.max_seq_len - cfg.sampling.tokens_to_generate)),
            "--max_output_len", str(o.get("max_output_len", cfg.sampling.tokens_to_generate)),
            "--max_batch_size", str(o.get("max_batch_size", cfg.layout.max_batch_size)), *e.extra_args]


ADAPTER = TritonAdapter()
