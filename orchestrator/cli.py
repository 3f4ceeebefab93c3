"""Thin entry points: `orchestrator run|plan|serve-engine [key=value ...]` (Hydra overrides)."""
from __future__ import annotations

import sys

USAGE = """usage: orchestrator COMMAND [key=value ...] [hydra flags such as --cfg job]

commands:
  run            run the whole pipeline (default: local executor, embedded engine, example prompts)
  plan           print the model's layout, memory per GPU and whether it fits
  render         write the sbatch script(s), engine rank command lines and config; submit nothing
  serve-engine   run the embedded engine on its own (engine.port=..., engine.host=...)

examples:
  orchestrator run
  orchestrator run data.input=prompts.parquet run_dir=runs/a model=nemotron_mini_4b_instruct
  orchestrator plan model=nemotron4_340b_instruct layout.gpu=h200_141gb layout.nodes=1 layout.pipeline_parallel=1
"""


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def cmd_run(cfg) -> None:
    from .launch import run

    run(cfg)


def cmd_plan(cfg) -> None:
    from .layout import GPUS, build_layout, format_layout, problems, valid_layouts

    from .engines.base import adapter_for

    layout = build_layout(cfg, check=False)
    found = problems(cfg.model, cfg.layout)
    engine_problems = adapter_for(cfg).problems(cfg)
    arch = cfg.model.architecture
    print(f"model:      {cfg.model.name} ({cfg.model.card}), {cfg.model.dtype}")
    print(f"            {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} heads, "
          f"{arch.kv_heads} KV groups")
    print(f"layout:     {layout.describe()}")
    print(f"            {layout.gpus} GPUs per replica, {layout.gpus * cfg.replicas} in all")
    engine = adapter_for(cfg)
    if engine.starts_process:
        tasks = engine.tasks_per_node(cfg)
        print(f"engine:     {cfg.engine.name}, {tasks} task(s) per node "
              f"({'one per GPU' if tasks == cfg.layout.gpus_per_node and tasks > 1 else 'one per node'}), "
              f"{tasks * cfg.layout.nodes} in all")
    print(f"memory/GPU: weights {layout.weights_gb:.1f} GB + KV cache {layout.kv_cache_gb:.1f} GB "
          f"(batch {cfg.layout.max_batch_size} x {cfg.layout.max_seq_len or arch.max_seq_len} tokens) = "
          f"{layout.total_gb:.1f} GB of {layout.usable_gb:.1f} GB usable")
    for p in engine_problems:
        print(f"engine:     {p}")
    if not found:
        print("fits:       yes")
        if engine_problems:
            sys.exit(1)
        return
    print("fits:       no")
    for p in found:
        print(f"  - {p}")
    options = valid_layouts(cfg.model, cfg.layout) if cfg.layout.gpu in GPUS else []
    if options:
        print(f"valid layouts for {cfg.model.name} on {cfg.layout.gpu}:")
        for o in options:
            print(f"  {format_layout(o)}")
    sys.exit(1)


def cmd_serve_engine(cfg) -> None:
    import os

    from .engines.base import Rendezvous, adapter_for
    from .engines.mock import ADAPTER

    if not adapter_for(cfg).simulated:
        _fail("serve-engine runs the embedded engine only (engine=mock)")
    cmd = ADAPTER.node_argv(cfg, 0, Rendezvous(port=cfg.engine.port, master_addr="", master_port=0))
    print(f"embedded engine on http://{cfg.engine.host}:{cfg.engine.port} (Ctrl-C to stop)", flush=True)
    os.execv(cmd[0], cmd)  # the engine replaces this process: signals reach it, nothing is left behind


def cmd_render(cfg) -> None:
    from .launch import render

    for path in render(cfg):
        print(path)


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "render": cmd_render, "serve-engine": cmd_serve_engine}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = argv[0]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}\n\n{USAGE}")
    _hydra_main(command, argv[1:])


def _hydra_main(command: str, args: list[str]) -> None:
    import hydra

    from .config import CONF_DIR, register_configs, to_config
    from .errors import OrchestratorError

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(dict_cfg) -> None:
        try:
            COMMANDS[command](to_config(dict_cfg))
        except OrchestratorError as exc:
            _fail(str(exc), 1)

    saved = sys.argv
    sys.argv = [f"orchestrator {command}", *args]
    try:
        task()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
