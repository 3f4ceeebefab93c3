"""engine=nemo_reward: NeMo-Aligner's serve_reward_model.py, as the Nemotron-4-340B-Reward card launches it: one
task per GPU, all running the same line; PyTriton serves the `reward_model` (KServe v2, `sentences` in,
`rewards` and `exceeded` out) on 0.0.0.0:inference.port (NeMo-Aligner's bind address). It scores: the model
must list its outputs (model.attributes)."""
from __future__ import annotations

from ..config import Config
from .base import EngineAdapter, Rendezvous

SCRIPT = "/opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py"


class NemoRewardAdapter(EngineAdapter):
    name = "nemo_reward"
    protocol = "reward"
    per_gpu_tasks = True
    default_command = ("python3",)
    binds_all_interfaces = True
    needs_nemo_checkpoint = True

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        e, layout = cfg.engine, cfg.layout
        return self.command(cfg) + [
            e.script or SCRIPT, f"rm_model_file={e.checkpoint}", f"trainer.num_nodes={layout.nodes}",
            f"trainer.devices={layout.gpus_per_node}", f"++model.tensor_model_parallel_size={layout.tensor_parallel}",
            f"++model.pipeline_model_parallel_size={layout.pipeline_parallel}",
            f"inference.micro_batch_size={e.options.get('micro_batch_size', 2)}", f"inference.port={rv.port}",
            *e.extra_args]


ADAPTER = NemoRewardAdapter()
