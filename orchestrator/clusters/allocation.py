"""cluster=allocation: inside the user's own Slurm job (`sbatch -N 4 ... orchestrator run`).

No job is submitted. The allocation's nodes are cut into replicas of `layout.nodes` nodes each, as
many as fit; each replica is one `srun` step on its own nodes running the same job code a submitted
replica runs (`NodeJob`, one task per node), and the front-end in the batch step drives them all. A
replica's step starts its engine as a step of its own on exactly its nodes, so one replica's engine
dying loses only that replica. Chosen automatically by `orchestrator run` inside a Slurm job.

A run may use a share of the allocation (`cluster.nodes`: its first N nodes; `cluster.nodelist`: exactly
these hostnames): a pipeline gives each of its run stages, which run at the same time, its own nodes so.
"""
from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import Config
from ..errors import RunError
from ..rundir import RunPaths
from ..sbatch import engine_step_prefix
from .base import ClusterAdapter
from .environment import job_environment


def allocation_nodes() -> list[str]:
    """The hostnames of this job's allocation, in Slurm's order."""
    return _hostnames(job_environment().get("nodelist", ""))


def _hostnames(nodelist: str) -> list[str]:
    """A Slurm node list (n[1-4],m2) as hostnames, in Slurm's order."""
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RunError(f"cannot expand the Slurm node list {nodelist!r} with scontrol ({exc}); is Slurm's "
                       f"scontrol on PATH inside the job?") from None
    return out.split()


def run_nodes(cfg: Config) -> list[str]:
    """The allocation's nodes this run uses: cluster.nodelist, else the first cluster.nodes, else all of them
    (problems() has checked that they are the allocation's)."""
    if cfg.cluster.nodelist:
        return list(cfg.cluster.nodelist)
    nodes = allocation_nodes()
    return nodes if cfg.cluster.nodes is None else nodes[:cfg.cluster.nodes]


def _share(cfg: Config) -> str:
    """The setting that chose this run's share of the allocation, for messages ("" when it uses all of it)."""
    if cfg.cluster.nodelist:
        return f"cluster.nodelist={','.join(cfg.cluster.nodelist)}"
    return "" if cfg.cluster.nodes is None else f"cluster.nodes={cfg.cluster.nodes}"


def _share_problem(cfg: Config, job: str, nodes: list[str]) -> str:
    """Why this run's share is not part of job's allocation of nodes ("" when it is)."""
    if cfg.cluster.nodelist:
        foreign = [n for n in cfg.cluster.nodelist if n not in nodes]
        if foreign:
            return (f"cluster.nodelist names {', '.join(foreign)}, not node(s) of job {job} (it holds "
                    f"{', '.join(nodes) or 'none'}): name only the job's nodes, or drop cluster.nodelist to use all "
                    f"of them")
    elif cfg.cluster.nodes is not None and cfg.cluster.nodes > len(nodes):
        return (f"cluster.nodes={cfg.cluster.nodes} but job {job} holds {len(nodes)} node(s): submit with sbatch -N "
                f"{cfg.cluster.nodes}, or lower cluster.nodes (null: all of the job's nodes)")
    return ""


def _gpus_per_node() -> int | None:
    """GPUs each node of the allocation holds, when the job says (`--gpus-per-node`, `--gres=gpu:N`)."""
    return job_environment().gpus_on_node


def nodes_per_replica(cfg: Config, engine) -> int:
    """A replica's share of the allocation: its layout's nodes, or one node for an engine it does not start."""
    return cfg.layout.nodes if engine.starts_process else 1


class AllocationCluster(ClusterAdapter):
    name = "allocation"
    jobs_outlive_front_end = False  # its steps end with the batch step that drives them

    def problems(self, cfg: Config, engine) -> list[str]:
        job = job_environment().job_id
        if not job:
            return ["cluster=allocation runs inside a Slurm job (SLURM_JOB_ID is not set): put `orchestrator run` "
                    "in a script you submit with sbatch, or use cluster=slurm to have jobs submitted for you"]
        if not cfg.wait:
            return [f"wait=false inside job {job} would end the job, and its replicas with it: leave wait=true "
                    f"(the batch step drives the replicas until the run ends)"]
        share = _share_problem(cfg, job, allocation_nodes())
        if share:
            return [share]
        nodes, per, chosen = run_nodes(cfg), nodes_per_replica(cfg, engine), _share(cfg)
        # the nodes counted: the job's, or this run's share of them (cluster.nodes / cluster.nodelist)
        holds = f"this run's share of job {job} ({chosen}) is" if chosen else f"job {job} holds"
        if len(nodes) < per:
            grow = (f"Give it cluster.nodes={per} (or a multiple of it)" if chosen else
                    f"Submit with sbatch -N {per} (or a multiple of it)")
            return [f"{holds} {len(nodes)} node(s), and one replica of {cfg.model.name} needs "
                    f"layout.nodes={per}: {len(nodes)} // {per} = 0 replicas fit. {grow}, or choose a layout on "
                    f"fewer nodes (orchestrator plan lists them)"]
        fit = len(nodes) // per
        if cfg.replicas > 1 and cfg.replicas > fit:
            where = f"this run's share of job {job} ({chosen})" if chosen else f"job {job}"
            grow = (f"Give it cluster.nodes={cfg.replicas * per}" if chosen else
                    f"Submit with sbatch -N {cfg.replicas * per}")
            return [f"replicas={cfg.replicas} does not fit {where}: {len(nodes)} node(s) // layout.nodes={per} = "
                    f"{fit} replica(s). {grow}, or leave replicas unset to use what fits"]
        cpus = job_environment().get("cpus_on_node", "")
        tasks = engine.tasks_per_node(cfg) if engine.starts_process else 1
        if cpus.isdigit() and int(cpus) < tasks:
            return [f"job {job} has {cpus} CPU(s) on this node, and {cfg.engine.name} runs {tasks} task(s) per node "
                    f"(one per GPU): submit with --exclusive, or --cpus-per-task={tasks}"]
        gpus = _gpus_per_node()
        if engine.starts_process and gpus is not None and gpus < cfg.layout.gpus_per_node:
            return [f"job {job} has {gpus} GPU(s) per node, and the layout needs layout.gpus_per_node="
                    f"{cfg.layout.gpus_per_node} (TP{cfg.layout.tensor_parallel} x PP{cfg.layout.pipeline_parallel} "
                    f"on {cfg.layout.nodes} node(s)): submit with --gpus-per-node={cfg.layout.gpus_per_node}"]
        return []

    def replicas(self, cfg: Config, engine) -> int:
        per = nodes_per_replica(cfg, engine)
        fit = len(run_nodes(cfg)) // per
        return cfg.replicas if cfg.replicas > 1 else fit

    def executor(self, cfg: Config, paths: RunPaths):
        return StepExecutor(cfg, paths)

    def step_prefix(self, cfg: Config, engine, instance=None) -> list[str]:
        """The engine's step, on exactly this replica's nodes (the step's own node list); a pinned instance's
        on its own nodes among them, with its share of each node's CPUs."""
        tasks = engine.tasks_per_node(cfg)
        prefix = engine_step_prefix(cfg, tasks, engine.step_args)
        env = job_environment()
        cpus = env.get("cpus_on_node", "")
        sharing = instance.per_node if instance is not None else 1
        if cpus.isdigit() and not cfg.cluster.cpus_per_task:  # the node's CPUs as the user's job holds them
            prefix = [f"--cpus-per-task={max(1, int(cpus) // (tasks * sharing))}" if a.startswith("--cpus-per-task=")
                      else a for a in prefix]
        nodes = env.get("step_nodelist")
        if nodes and instance is not None:
            hosts = _hostnames(nodes)
            nodes = ",".join(hosts[instance.first_node:instance.first_node + instance.nodes])
        return prefix + ([f"--nodelist={nodes}"] if nodes else [])

    def state(self, job) -> str:
        return job.state

    def stop(self, jobs: list, cfg: Config) -> list:
        """Every replica step at once: SIGTERM to its tasks, client.grace_s + 30 s, then SIGKILL (stop_steps);
        what happens goes to run.log."""
        from ..rundir import log_event

        paths = RunPaths(Path(cfg.run_dir))
        return stop_steps(jobs, cfg.client.grace_s + 30, log=lambda text: log_event(paths, f"front-end: {text}"))

    def _result(self, job):
        return job.result()

    # job_states and live_jobs: the base's (UNKNOWN; None): its steps end with the front-end that drives them,
    # so the front-end's pid decides; cancel: the base's (stop the batch step, or scancel the job, where it runs)

    def stopped_by(self, signal_name: str) -> str:
        """The time-limit warning (`--signal=B:USR2@N`): the replicas have committed; requeue the job, which
        runs the script again and resumes (a job submitted without --requeue says so)."""
        job = job_environment().job_id
        if signal_name != "SIGUSR2" or not job:
            return ""
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"; could not requeue job {job} ({exc}): submit the script again to resume"
        if done.returncode != 0:
            return f"; could not requeue job {job} ({done.stderr.strip()}): submit the script again to resume"
        return f"; requeued job {job}: it runs the script again and resumes"

    def follow_hint(self, jobs: list, paths: RunPaths) -> str:
        job = job_environment().get("job_id", "")
        return f"follow with: sacct -j {job} (one step per replica); tail -f {paths.logs}/allocation/*.out"


class StepExecutor:
    """Starts each replica as an srun step of the allocation (the replica's nodes, one task per node)."""

    def __init__(self, cfg: Config, paths: RunPaths):
        self.cfg, self.paths = cfg, paths
        self.nodes = run_nodes(cfg)  # this run's nodes of the allocation (all of them, or its share)
        self.folder = paths.logs / "allocation"
        self.folder.mkdir(parents=True, exist_ok=True)

    def submit(self, node_job) -> "StepJob":
        from ..engines.base import adapter_for

        cfg = self.cfg
        replica, attempt = node_job.args[4], node_job.args[2]
        per = nodes_per_replica(cfg, adapter_for(cfg))
        mine = self.nodes[replica * per:(replica + 1) * per]
        if len(mine) < per:
            raise RunError(f"replica {replica} needs {per} node(s); this run has {len(self.nodes)} of the allocation "
                           f"({', '.join(self.nodes)})")
        stem = self.folder / f"{attempt}-r{replica}"
        with open(f"{stem}.pkl", "wb") as fh:
            pickle.dump(node_job, fh)
        cmd = ["srun", "--overlap", f"--nodes={per}", f"--ntasks={per}", "--ntasks-per-node=1",
               f"--nodelist={','.join(mine)}", f"--job-name={cfg.cluster.job_name}-r{replica}", "--mem=0",
               "--kill-on-bad-exit=0", f"--output={stem}-%t.out", sys.executable, "-m", "orchestrator.step",
               f"{stem}.pkl"]
        with open(f"{stem}.srun.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return StepJob(proc, f"{job_environment().get('job_id', 'allocation')}.r{replica}", Path(stem),
                       cfg.client.grace_s + 30, f"{cfg.cluster.job_name}-r{replica}")


class StepJob:
    """One replica's step, owned by the front-end: it always stops it (SIGTERM to the step's tasks, then
    SIGKILL)."""

    def __init__(self, proc: subprocess.Popen, job_id: str, stem: Path, grace_s: float, name: str = ""):
        self.proc, self.job_id, self.stem, self.grace_s, self.name = proc, job_id, stem, grace_s, name

    @property
    def state(self) -> str:
        code = self.proc.poll()
        return "RUNNING" if code is None else ("COMPLETED" if code == 0 else "FAILED")

    def done(self) -> bool:
        return self.proc.poll() is not None

    def cancel(self, check: bool = False) -> None:
        """Stop this one step: see stop_steps."""
        stop_steps([self], self.grace_s)

    def terminate(self, steps: dict[str, str]) -> str:
        """SIGTERM to the step's tasks: `scancel --ctld --signal=TERM JOB.STEP` (steps: name -> JOB.STEP; through
        slurmctld, since slurmd's direct answer for a step of a multi-node job can be an error after the
        signal went out). Never to
        srun itself, which on SIGTERM kills its step at once ("forcing job termination"): its tasks would
        commit nothing. A step not registered yet (srun still starting) has no task to lose: srun is told.
        What was done, for the log."""
        step = steps.get(self.name)
        if step:
            try:
                done = subprocess.run(["scancel", "--ctld", "--signal=TERM", step], capture_output=True, text=True,
                                      timeout=60)
                if done.returncode == 0:
                    return f"scancel --ctld --signal=TERM {step}"
                failed = f"scancel --ctld --signal=TERM {step} failed ({done.stderr.strip() or done.returncode})"
            except (OSError, subprocess.SubprocessError) as exc:
                failed = f"scancel --ctld --signal=TERM {step} failed ({exc})"
            self.proc.send_signal(signal.SIGTERM)
            return f"{failed}; SIGTERM to its srun (pid {self.proc.pid})"
        self.proc.send_signal(signal.SIGTERM)
        return f"SIGTERM to its srun (pid {self.proc.pid})"

    def result(self):
        self.proc.wait()
        error = Path(f"{self.stem}.error")
        if self.proc.returncode != 0 or error.exists():
            said = error.read_text() if error.exists() else ""
            tail = "\n".join(Path(f"{self.stem}.srun.log").read_text(errors="replace").splitlines()[-8:]) \
                if Path(f"{self.stem}.srun.log").exists() else ""
            raise RuntimeError(said or f"the replica's step exited with status {self.proc.returncode}\n{tail}")
        found = Path(f"{self.stem}.result.json")
        return json.loads(found.read_text()) if found.exists() else None


ADAPTER = AllocationCluster()


def _steps() -> dict[str, str]:
    """This job's running steps: name -> JOB.STEP (squeue --steps)."""
    job = job_environment().job_id
    if not job:
        return {}
    try:
        out = subprocess.run(["squeue", "--steps", "-h", "-j", job, "-o", "%i|%j"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {name: step for step, _, name in (line.partition("|") for line in out.split()) if name}


def stop_steps(jobs: list, grace_s: float, log=None) -> list:
    """Stop replica steps together: SIGTERM to every step's tasks at once, then grace_s for all of them (their
    clients stop within client.grace_s and commit; a replica's engine step ends with its task), then SIGKILL
    to the srun of any step still running. Returns the steps that did not end."""
    live = [job for job in jobs if not job.done()]
    if not live:
        return []
    steps = _steps()
    said = [f"{job.job_id}: {job.terminate(steps)}" for job in live]
    if log:
        log(f"stopping replica step(s) {'; '.join(said)}; waiting up to {grace_s:.0f} s for them to commit")
    deadline = time.monotonic() + grace_s
    for job in live:
        try:
            job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    late = [job for job in live if not job.done()]
    for job in late:
        job.proc.kill()
    for job in late:
        try:
            job.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    if log:
        log("replica step(s) ended" + (f"; {' '.join(j.job_id for j in late)} killed after {grace_s:.0f} s"
                                       if late else " within their grace"))
    return [job for job in live if not job.done()]
