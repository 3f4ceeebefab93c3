"""cluster=slurm: one job per replica through submitit's SlurmExecutor, one orchestrator task per node;
the task on node 0 starts the engine's tasks as an `srun --overlap` step across the allocation."""
from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

from ..config import Config, config_yaml
from ..errors import RunError
from ..instances import pinned
from ..protocols import make_codec
from ..rundir import RunPaths
from ..sbatch import PORT_PLACEHOLDER, engine_step_prefix, render_template, submitit_parameters
from .base import ClusterAdapter, submitit_folder


class SlurmCluster(ClusterAdapter):
    name = "slurm"

    def problems(self, cfg: Config, engine) -> list[str]:
        """The job must get engine.api_key_env's variable: sbatch's --export (cluster.sbatch_args.export)
        passes it only as ALL or by name."""
        key = cfg.engine.api_key_env
        if not key:
            return []
        export = str(cfg.cluster.sbatch_args.get("export", "ALL"))
        names = [n.split("=")[0] for n in export.split(",")]
        if names[0] != "ALL" and key not in names:
            return [f"cluster.sbatch_args.export={export} does not pass {key} (engine.api_key_env) to the job: add "
                    f"it (export=ALL, or export={export},{key})"]
        return []

    def executor(self, cfg: Config, paths: RunPaths):
        import submitit

        executor = submitit.SlurmExecutor(folder=submitit_folder(paths), max_num_timeout=cfg.cluster.max_requeues)
        executor.update_parameters(**submitit_parameters(cfg))
        return executor

    def array_key(self, cfg: Config) -> str | None:
        """Jobs asking for the same resources (nodes, GPUs, time, partition, ...) can share one array."""
        import json

        return json.dumps([submitit_parameters(cfg), cfg.cluster.max_requeues], sort_keys=True, default=str)

    def batch(self, executor, array: bool):
        import contextlib

        return executor.batch() if array else contextlib.nullcontext()

    def step_prefix(self, cfg: Config, engine, instance=None) -> list[str]:
        prefix = engine_step_prefix(cfg, engine.tasks_per_node(cfg), engine.step_args)
        # a pinned instance's step starts on its own node of the job (node indices relative to the job's)
        return prefix if instance is None else prefix[:2] + [f"--relative={instance.first_node}"] + prefix[2:]

    def state(self, job) -> str:
        try:
            return str(job.watcher.get_state(job.job_id, mode="force")).split()[0].upper()
        except Exception:  # noqa: BLE001 - any failure to read the state counts as unknown
            return "UNKNOWN"

    def states(self, jobs: list) -> list[str]:
        """One sacct call for all of them, however many (submitit's watcher asks for every job it knows)."""
        if not jobs:
            return []
        try:
            jobs[0].watcher.update()
        except Exception:  # noqa: BLE001 - states stay as last read; unreadable ones count as unknown
            pass
        return [self._cached_state(job) for job in jobs]

    @staticmethod
    def _cached_state(job) -> str:
        try:
            return str(job.watcher.get_state(job.job_id, mode="cache")).split()[0].upper()
        except Exception:  # noqa: BLE001
            return "UNKNOWN"

    def job_states(self, ids: list[str], host: str, paths: RunPaths | None = None) -> dict[str, str]:
        """The queue's state of each job, else accounting's (one squeue and at most one sacct for all)."""
        if not ids:
            return {}
        # the queue knows a job the moment it is submitted; accounting keeps it after it ends (and may lag)
        queued = _slurm_query(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(ids)])
        gone = [i for i in ids if queued is None or i not in queued]
        ended = _slurm_query(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(gone)]) if gone else {}
        if queued is None and ended is None:
            return {i: "UNKNOWN (Slurm cannot be reached from here)" for i in ids}
        return {i: (queued or {}).get(i) or (ended or {}).get(i) or ("ENDED" if queued is not None else "UNKNOWN")
                for i in ids}

    def cancel(self, ids: list[str], host: str, paths: RunPaths) -> None:
        """scancel; a job already ending or gone is no error."""
        try:
            out = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RunError(f"scancel {' '.join(ids)} failed ({exc}); is Slurm reachable from this host? Cancel "
                           f"them with scancel where it is") from None
        if out.returncode != 0 and not re.search(r"already completing or completed|Invalid job id", out.stderr):
            raise RunError(f"scancel {' '.join(ids)} failed: {out.stderr.strip() or out.returncode}; cancel them "
                           f"with scancel where Slurm answers")

    def _result(self, job):
        return job.task(0).result()

    def follow_hint(self, jobs: list, paths: RunPaths) -> str:
        ids = ",".join(str(j.job_id) for j in jobs)
        return f"follow with: squeue -j {ids}; sacct -j {ids}; tail -f {paths.logs}/submitit/*/*_0_log.out"

    def render(self, cfg: Config, paths: RunPaths, engine, write, out: Path, rv) -> None:
        executor = self.executor(cfg, paths)
        script = executor._make_submission_file_text(executor._submitit_command_str, "render")
        note = (f"# submitted as one job array of {cfg.replicas} tasks (--array=0-{cfg.replicas - 1}), "
                f"one per replica\n" if cfg.replicas > 1 else "")
        write("job.sbatch", script.replace("#!/bin/bash\n", "#!/bin/bash\n" + note, 1))
        # the plain template, for operators who submit with sbatch: its client is engine=endpoint
        protocol = make_codec(cfg, protocol=engine.protocol_for(cfg)).name
        e = cfg.engine
        pins = pinned(cfg, engine)  # D pinned instances: the script starts each, and its client has all their URLs
        client_cfg = replace(cfg, cluster=replace(cfg.cluster, name="local"), replicas=1,
                             engine=replace(e, name="endpoint", protocol=protocol),
                             layout=replace(cfg.layout, data_parallel=1) if pins else cfg.layout)
        write("client.yaml", config_yaml(client_cfg))
        template_rv = replace(rv, port=PORT_PLACEHOLDER, port_file=None, rank_dir=None)  # the script exports them
        write("engine_job.sbatch", render_template(
            "engine_job_instances.sbatch" if pins else "engine_job.sbatch", cfg, engine.tasks_per_node(cfg),
            engine.step_command(cfg, template_rv), out / "client.yaml", e.port or 1424, protocol, engine.step_args,
            engine=engine if pins else None, rv=template_rv))


def _slurm_query(argv: list[str]) -> dict[str, str] | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():  # a requeued job has a line per run: the last one is now
        job, _, state = line.strip().partition("|")
        if job and state:
            states[job] = state.split()[0].upper()
    return states


ADAPTER = SlurmCluster()
