"""engine=trtllm: `trtllm-serve` on the OpenAI API. Every rank in one MPI world, one task per GPU across
the nodes, wrapped by `trtllm-llmapi-launch` and started with `srun --mpi=pmix` (TRT-LLM's Slurm recipe);
rank 0 serves HTTP."""
from __future__ import annotations

from ..config import Config
from .base import EngineAdapter, Rendezvous


class TrtllmAdapter(EngineAdapter):
    name = "trtllm"
    protocol = "openai"
    per_gpu_tasks = True
    default_command = ("trtllm-llmapi-launch", "trtllm-serve")
    needs_hf_checkpoint = True
    step_args = ("--mpi=pmix",)

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        layout, e = cfg.layout, cfg.engine
        return self.command(cfg) + [
            self.model_source(cfg), "--host", e.host, "--port", str(rv.port),
            "--backend", str(e.options.get("backend", "pytorch")),
            "--tp_size", str(layout.tensor_parallel), "--pp_size", str(layout.pipeline_parallel),
            "--max_seq_len", str(cfg.model.architecture.max_seq_len), *e.extra_args]


ADAPTER = TrtllmAdapter()
