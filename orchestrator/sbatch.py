"""Pure rendering of what reaches Slurm: submitit parameters, the engine's srun step, per-rank command
lines, and the plain sbatch templates of `slurm_templates/` (for operators who submit themselves).

Every config value reaches a script through `shlex.quote` or an argv list, never raw.
"""
from __future__ import annotations

import shlex
import string
import sys
from pathlib import Path
from typing import Any

from .config import Config, bundled
from .errors import ConfigError
from .protocols.auth import env_name_problem

TEMPLATES_DIR = bundled("slurm_templates")
# values known only when the job runs: rendered as the shell variables the scripts set
PORT_PLACEHOLDER = "__ORCHESTRATOR_PORT__"
MASTER_PORT_PLACEHOLDER = "__ORCHESTRATOR_MASTER_PORT__"
MASTER_ADDR_PLACEHOLDER = "__ORCHESTRATOR_MASTER_ADDR__"


def with_placeholders(text: str) -> str:
    """Rendered text with each placeholder as its shell variable (after quoting, so it expands)."""
    return (text.replace(PORT_PLACEHOLDER, '"$PORT"').replace(MASTER_PORT_PLACEHOLDER, '"$MASTER_PORT"')
            .replace(MASTER_ADDR_PLACEHOLDER, '"$MASTER_ADDR"'))


def submitit_parameters(cfg: Config) -> dict[str, Any]:
    """SlurmExecutor parameters for one replica: one orchestrator task per node, the node's GPUs."""
    c, layout = cfg.cluster, cfg.layout
    params: dict[str, Any] = {
        "job_name": c.job_name,
        "nodes": layout.nodes,
        "ntasks_per_node": 1,
        "gpus_per_node": layout.gpus_per_node,
        "time": c.timeout_min,
        "signal_delay_s": c.signal_delay_s,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "cpus_per_task": task_cpus(cfg),
        "mem": c.mem,
        "exclusive": True if c.exclusive else None,
        "setup": list(c.setup) or None,
        "additional_parameters": {"requeue": True, **dict(c.sbatch_args)},  # scontrol requeue and preemption resume
    }
    return {k: v for k, v in params.items() if v is not None}


def task_cpus(cfg: Config) -> int:
    """CPUs of the orchestrator's task on each node: at least one per engine rank the node will run."""
    return cfg.cluster.cpus_per_task or cfg.layout.gpus_per_node


def container_flags(cfg: Config) -> list[str]:
    c = cfg.cluster
    flags = []
    if c.container_image:
        flags.append(f"--container-image={c.container_image}")
    if c.container_mounts:
        flags.append("--container-mounts=" + ",".join(c.container_mounts))
    if c.container_workdir:
        flags.append(f"--container-workdir={c.container_workdir}")
    return flags


def engine_step_prefix(cfg: Config, tasks_per_node: int, step_args: tuple[str, ...] = ()) -> list[str]:
    """The srun step that starts the engine's tasks across the allocation, from node 0's task
    (`tasks_per_node`: one per GPU for NeMo and TRT-LLM, one per node for vLLM and SGLang).

    --ntasks: otherwise the step inherits the job's SLURM_NTASKS (one per node);
    --distribution=block: otherwise a tensor-parallel group may straddle nodes;
    --cpus-per-task: otherwise each rank inherits the job task's SLURM_CPUS_PER_TASK;
    --mem=0: the step may use all of the job's memory (the orchestrator's own step already holds it);
    --kill-on-bad-exit: one rank dying ends the step, so readiness fails fast instead of hanging.
    """
    layout = cfg.layout
    return ["srun", "--overlap", f"--nodes={layout.nodes}", f"--ntasks={layout.nodes * tasks_per_node}",
            f"--ntasks-per-node={tasks_per_node}", f"--cpus-per-task={max(1, task_cpus(cfg) // tasks_per_node)}",
            "--mem=0", "--distribution=block", "--kill-on-bad-exit=1", *step_args,
            *container_flags(cfg), *cfg.cluster.srun_args]


def rank_lines(cfg: Config, tasks_per_node: int, node_lines: list[list[str]], instance=None) -> list[str]:
    """One line per engine task: where it runs, the environment srun gives it, its command. instance: the pinned
    instance (instances.Instance) whose step it is: its nodes and GPUs are named as the replica's."""
    world = cfg.layout.nodes * tasks_per_node
    gpus = instance.gpus.split(",") if instance is not None and instance.gpus else None
    first = instance.first_node if instance is not None else 0
    lines = []
    for rank in range(world):
        node, local = divmod(rank, tasks_per_node)
        role = "serves HTTP" if rank == 0 else "worker"
        where = f"GPU {gpus[local] if gpus else local}" if tasks_per_node == cfg.layout.gpus_per_node else \
            f"{cfg.layout.gpus_per_node} GPU(s)" + (f" ({','.join(gpus)})" if gpus else "")
        lines.append(f"# rank {rank} on node {first + node}, {where} ({role})\n"
                     f"SLURM_PROCID={rank} SLURM_LOCALID={local} SLURM_NODEID={node} SLURM_NTASKS={world} "
                     f"{shlex.join(node_lines[node])}")
    return lines


def _sbatch_option_lines(cfg: Config, tasks_per_node: int) -> list[str]:
    params = submitit_parameters(cfg)
    params.pop("setup", None)
    params.pop("signal_delay_s", None)
    extra = params.pop("additional_parameters", {})
    params["ntasks_per_node"] = tasks_per_node  # the plain recipe: the engine's tasks are the job's
    params.pop("cpus_per_task", None)
    params.update(extra)
    lines = []
    for key in sorted(params):
        value = params[key]
        flag = key.replace("_", "-")
        lines.append(f"#SBATCH --{flag}" if value is True else f"#SBATCH --{flag}={shlex.quote(str(value))}")
    return lines


# Where the plain template polls until the server answers (the client then proves a real generation)
READY_ROUTES = {"nemo": ("/generate", "-X PUT -H 'Content-Type: application/json' -d '{\"sentences\": [\"Hello\"], "
                                       "\"tokens_to_generate\": 1}'"),
                "openai": ("/v1/models", "-f"), "triton": ("/v2/health/ready", "-f"),
                "reward": ("/v2/models/reward_model/ready", "-f"), "pooling": ("/v1/models", "-f")}


def instance_steps(cfg: Config, engine, rv, flags: list[str]) -> str:
    """The plain template's lines that start each pinned instance (instances.py) in the background on its own
    node(s), GPUs and port (BASE_PORT + k; MASTER_PORT: BASE_MASTER_PORT + k), and record its pid and URL."""
    from .instances import instance_config, instance_place, instances

    blocks = []
    for inst in instances(cfg, engine):
        icfg = instance_config(cfg, inst)
        tasks = engine.tasks_per_node(icfg)
        srun = ["srun", "--overlap", f"--relative={inst.first_node}", f"--nodes={inst.nodes}",
                f"--ntasks={inst.nodes * tasks}", f"--ntasks-per-node={tasks}", "--distribution=block",
                "--kill-on-bad-exit=1", *flags]
        blocks.append(f"# instance {inst.index}: {instance_place(inst)}\n"
                      f"PORT=$((BASE_PORT + {inst.index})) MASTER_PORT=$((BASE_MASTER_PORT + {inst.index}))\n"
                      f"{shlex.join(srun)} \\\n    {shlex.join(engine.step_command(icfg, rv))} &\n"
                      f"SERVERS+=($!) URLS+=(\"http://${{HOSTS[{inst.first_node}]}}:$PORT\")")
    return "\n".join(blocks)


def render_template(name: str, cfg: Config, tasks_per_node: int, engine_cmd: list[str], client_config: Path,
                    port: int, protocol: str, step_args: tuple[str, ...] = (), engine=None, rv=None) -> str:
    """Fill `slurm_templates/<name>` from the config; values are shell-quoted, `$$` is a literal `$`. engine and
    rv: the adapter and rendezvous, for the template of pinned instances (its instance_steps)."""
    template = string.Template((TEMPLATES_DIR / name).read_text())
    layout = cfg.layout
    client = [sys.executable, "-m", "orchestrator.cli", "run", "--config-path", str(client_config.parent),
              "--config-name", client_config.stem, "hydra.run.dir=.", "hydra.output_subdir=null",
              "hydra/job_logging=stdout"]
    return template.substitute(
        sbatch_options="\n".join(_sbatch_option_lines(cfg, tasks_per_node)),
        setup="\n".join(cfg.cluster.setup),
        nodes=layout.nodes,
        ntasks=layout.nodes * tasks_per_node,
        tasks_per_node=tasks_per_node,
        step_flags=" ".join(shlex.quote(f) for f in [*step_args, *container_flags(cfg), *cfg.cluster.srun_args]),
        instance_steps=instance_steps(cfg, engine, rv, [*step_args, *container_flags(cfg), *cfg.cluster.srun_args])
        if engine is not None else "",
        engine_command=shlex.join(engine_cmd),
        port=shlex.quote(str(port)),
        ready_timeout_s=int(cfg.engine.ready_timeout_s),
        client_command=shlex.join(client),
        ready_path=READY_ROUTES[protocol][0],
        ready_curl=READY_ROUTES[protocol][1] + ready_auth(cfg),
    )


def ready_auth(cfg: Config) -> str:
    """curl's header for engine.api_key_env, by the variable's name: the job expands it from the environment
    it inherits (sbatch --export=ALL), and printf (a bash builtin) keeps the key out of every process's argv."""
    name = cfg.engine.api_key_env
    problem = env_name_problem("engine.api_key_env", name)
    if problem:  # only a variable's name may reach the script
        raise ConfigError(problem)
    return f" -H @<(printf 'Authorization: Bearer %s\\n' \"${name}\")" if name else ""
