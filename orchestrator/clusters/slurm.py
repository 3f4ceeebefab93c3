"""cluster=slurm: one job per replica through submitit's SlurmExecutor, one orchestrator task per node;
the task on node 0 starts the engine's tasks as an `srun --overlap` step across the allocation."""
from __future__ import annotations

from ..config import Config
from ..sbatch import engine_step_prefix, submitit_parameters
from ..work import RunPaths
from .base import ClusterAdapter, submitit_folder


class SlurmCluster(ClusterAdapter):
    name = "slurm"

    def executor(self, cfg: Config, paths: RunPaths):
        import submitit

        executor = submitit.SlurmExecutor(folder=submitit_folder(paths), max_num_timeout=cfg.cluster.max_requeues)
        executor.update_parameters(**submitit_parameters(cfg))
        return executor

    def step_prefix(self, cfg: Config, engine) -> list[str]:
        return engine_step_prefix(cfg, engine.tasks_per_node(cfg), engine.step_args)

    def state(self, job) -> str:
        try:
            return str(job.watcher.get_state(job.job_id, mode="force")).split()[0].upper()
        except Exception:  # noqa: BLE001 - any failure to read the state counts as unknown
            return "UNKNOWN"

    def _result(self, job):
        return job.task(0).result()

    def follow_hint(self, jobs: list, paths: RunPaths) -> str:
        ids = ",".join(str(j.job_id) for j in jobs)
        return f"follow with: squeue -j {ids}; sacct -j {ids}; tail -f {paths.logs}/submitit/*/*_0_log.out"

    def render(self, cfg: Config, paths: RunPaths, engine, write) -> None:
        executor = self.executor(cfg, paths)
        script = executor._make_submission_file_text(executor._submitit_command_str, "render")
        note = f"# submitted {cfg.replicas} time(s), once per replica\n" if cfg.replicas > 1 else ""
        write("job.sbatch", script.replace("#!/bin/bash\n", "#!/bin/bash\n" + note, 1))


ADAPTER = SlurmCluster()
