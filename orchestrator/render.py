"""`orchestrator render`: what `run` would submit, written out, and nothing submitted."""
from __future__ import annotations

import shlex
from pathlib import Path

from .clusters.base import cluster_for
from .config import Config, config_yaml
from .instances import instance_place, instances, pinned
from .layout import build_layout
from .node import engine_servers
from .preflight import check_launch
from .rundir import RunPaths, atomic_write_text


def render(cfg: Config, out_dir: Path | None = None) -> list[Path]:
    """Write what `run` would submit, and submit nothing: the cluster's job script, the engine's step and
    per-task command lines, the resolved config, and the plain sbatch template filled from the config."""

    from .engines.base import Rendezvous
    from .sbatch import (
        MASTER_ADDR_PLACEHOLDER,
        MASTER_PORT_PLACEHOLDER,
        PORT_PLACEHOLDER,
        rank_lines,
        with_placeholders,
    )

    build_layout(cfg)
    check_launch(cfg)
    cluster = cluster_for(cfg)
    paths = RunPaths(Path(cfg.run_dir).expanduser().resolve())
    out = Path(out_dir) if out_dir else paths.root / "render"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name: str, text: str) -> None:
        atomic_write_text(out / name, with_placeholders(text))
        written.append(out / name)

    write("config.yaml", config_yaml(cfg))
    servers = engine_servers(cfg, paths, "<attempt>", 0)
    engine = servers[0].adapter
    if not engine.starts_process:
        return written
    e = cfg.engine
    pins = pinned(cfg, engine)
    blocks = []
    for k, server in enumerate(servers):  # one, or each pinned instance's (instances.py)
        icfg = server.cfg
        rv = Rendezvous(port=icfg.engine.port or (0 if engine.reports_port else PORT_PLACEHOLDER),
                        master_addr=e.master_addr or MASTER_ADDR_PLACEHOLDER,
                        master_port=icfg.engine.master_port or MASTER_PORT_PLACEHOLDER,
                        port_file=server.rendezvous.port_file, rank_dir=server.rendezvous.rank_dir)
        step = server.launcher + engine.step_command(icfg, rv)
        tasks = engine.tasks_per_node(icfg)
        env = {**engine.env(icfg), **(engine.instance_env(rv) if pins else {})}
        env_line = f"# environment of the engine tasks: {' '.join(f'{n}={shlex.quote(v)}' for n, v in env.items())}\n" \
            if env else ""
        inst = instances(cfg, engine)[k] if pins else None
        ranks = "\n".join(rank_lines(icfg, tasks, [engine.node_env_prefix(icfg, n) + engine.node_argv(icfg, n, rv)
                                                   for n in range(icfg.layout.nodes)], inst))
        head = f"# instance {k} of {len(servers)}, {instance_place(inst)}:\n" if inst is not None else ""
        blocks.append(f"{head}{env_line}{shlex.join(step)}\n\n# What each rank runs, with the environment srun "
                      f"gives it:\n{ranks}\n")
    port = ("a free port chosen on node 0 when the job starts" + (", one per instance" if pins else "")
            if not e.port else str(e.port) + (" + the instance's number" if pins else ""))
    notes = ["PORT: " + port]
    if cfg.layout.nodes > 1 and (e.master_port or e.master_addr or MASTER_PORT_PLACEHOLDER in "".join(blocks)):
        notes.append("MASTER_ADDR: node 0's hostname; MASTER_PORT: a free port on node 0")
    elif pins and MASTER_PORT_PLACEHOLDER in "".join(blocks):
        notes.append("MASTER_PORT: a free port, one per instance")
    steps = f"The {len(servers)} engine steps" if pins else "The engine step"
    write("engine_ranks.sh", f"# {steps} started by the orchestrator's task on node 0 ({'; '.join(notes)}):\n"
                             + "\n".join(blocks))
    cluster.render(cfg, paths, engine, write, out, rv)
    return written
