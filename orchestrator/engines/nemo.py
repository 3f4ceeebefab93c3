"""engine=nemo: NeMo's megatron_gpt_eval.py text-generation server, the 340B card's recipe: one task per
GPU, all running the same line; global rank 0 serves `PUT /generate` on 0.0.0.0 (hard-coded by NeMo)."""
from __future__ import annotations

from ..config import Config
from .base import EngineAdapter, Rendezvous

SCRIPT = "/opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py"


class NemoAdapter(EngineAdapter):
    name = "nemo"
    protocol = "nemo"
    per_gpu_tasks = True
    default_command = ("python3",)
    binds_all_interfaces = True
    needs_nemo_checkpoint = True

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        e, layout = cfg.engine, cfg.layout
        return self.command(cfg) + [
            e.script or SCRIPT, f"gpt_model_file={e.checkpoint}", "pipeline_model_parallel_split_rank=0",
            "server=True", f"tensor_model_parallel_size={layout.tensor_parallel}",
            f"pipeline_model_parallel_size={layout.pipeline_parallel}", f"trainer.precision={e.precision}",
            f"trainer.devices={layout.gpus_per_node}", f"trainer.num_nodes={layout.nodes}",
            "web_server=False", f"port={rv.port}", *e.extra_args]

    def instance_env(self, rv: Rendezvous) -> dict[str, str]:
        # Lightning's Slurm rendezvous port is derived from the job id, one for every instance of the job: each
        # pinned instance gets its own
        return {"MASTER_PORT": str(rv.master_port)}


ADAPTER = NemoAdapter()
