"""`orchestrator render`: what `run` would submit, written out, and nothing submitted."""
from __future__ import annotations

import shlex
from pathlib import Path

from .clusters.base import cluster_for
from .config import Config, config_yaml
from .layout import build_layout
from .node import engine_server
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
    server = engine_server(cfg, paths, "<attempt>", 0)
    engine = server.adapter
    if not engine.starts_process:
        return written
    e = cfg.engine
    rv = Rendezvous(port=e.port or (0 if engine.reports_port else PORT_PLACEHOLDER),
                    master_addr=e.master_addr or MASTER_ADDR_PLACEHOLDER,
                    master_port=e.master_port or MASTER_PORT_PLACEHOLDER,
                    port_file=server.rendezvous.port_file, rank_dir=server.rendezvous.rank_dir)
    step = server.launcher + engine.step_command(cfg, rv)
    tasks = engine.tasks_per_node(cfg)
    notes = ["PORT: " + ("a free port chosen on node 0 when the job starts" if not e.port else str(e.port))]
    if cfg.layout.nodes > 1 and (e.master_port or e.master_addr or MASTER_PORT_PLACEHOLDER in " ".join(step)):
        notes.append("MASTER_ADDR: node 0's hostname; MASTER_PORT: a free port on node 0")
    env = engine.env(cfg)
    env_line = f"# environment of the engine tasks: {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())}\n" \
        if env else ""
    ranks = "\n".join(rank_lines(cfg, tasks, [engine.node_env_prefix(cfg, n) + engine.node_argv(cfg, n, rv)
                                             for n in range(cfg.layout.nodes)]))
    write("engine_ranks.sh",
          f"# The engine step started by the orchestrator's task on node 0 ({'; '.join(notes)}):\n{env_line}"
          f"{shlex.join(step)}\n\n# What each rank runs, with the environment srun gives it:\n{ranks}\n")
    cluster.render(cfg, paths, engine, write, out, rv)
    return written
