"""Thin entry points: `orchestrator run|plan|render|serve-engine [key=value ...]` (Hydra overrides),
`orchestrator status|report|cancel RUN_DIR` (a run's or a pipeline's directory) and
`orchestrator pipeline FILE [key=value ...]`."""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: orchestrator COMMAND [key=value ...] [hydra flags such as --cfg job]

commands:
  run            run the whole pipeline (default: local executor, embedded engine, example prompts)
  plan           print the model's layout, memory per GPU and whether it fits
  render         write the sbatch script(s), engine rank command lines and config; submit nothing
  serve-engine   run the embedded engine on its own (engine.port=..., engine.host=...)
  status RUN_DIR [--json]   where a run stands: rows, errors by reason, rates, ETA, jobs, log tail
  report RUN_DIR            write RUN_DIR/report/report.html (plots, config, summary)
  cancel RUN_DIR            cancel the run's jobs; what is committed is kept (rerun to resume)
  pipeline FILE [--render] [key=value ...]   run a pipeline's stages (docs/pipelines.md); key=value applies
                 to every run stage, run_dir=DIR is the pipeline's directory (status, report and cancel take it);
                 --render writes every run stage's scripts instead
  run|plan|render pipeline=NAME [key=value ...]   the same for a pipeline: NAME is a file, or a seed pipeline
                 (examples/pipeline_NAME.yaml: sdg_340b, sdg_local, local, judge); plan shows every stage

examples:
  orchestrator run
  orchestrator run data.input=prompts.parquet run_dir=runs/a model=nemotron_mini_4b_instruct
  orchestrator plan model=nemotron4_340b_instruct layout.gpu=h200_141gb layout.nodes=1 layout.pipeline_parallel=1
  orchestrator status runs/a
  orchestrator run pipeline=sdg_local run_dir=runs/sdg
  orchestrator plan pipeline=sdg_340b
"""


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def cmd_run(cfg) -> None:
    from .frontend import run

    run(cfg)


def cmd_plan(cfg) -> None:
    from .engines.base import adapter_for
    from .instances import instance_config, instance_place, instances, pinned
    from .layout import GPUS, build_layout, format_layout, problems, valid_layouts

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
    if engine.starts_process and pinned(cfg, engine):  # D servers, each its own step (instances.py)
        first = instance_config(cfg, instances(cfg, engine)[0])
        tasks = engine.tasks_per_node(first)
        print(f"engine:     {cfg.engine.name}, {cfg.layout.data_parallel} pinned instances per replica, each its own "
              f"server, port and client: {tasks * first.layout.nodes} task(s) each on "
              f"{instance_place(instances(cfg, engine)[0])} for instance 0")
    elif engine.starts_process:
        tasks = engine.tasks_per_node(cfg)
        print(f"engine:     {cfg.engine.name}, {tasks} task(s) per node "
              f"({'one per GPU' if tasks == cfg.layout.gpus_per_node and tasks > 1 else 'one per node'}), "
              f"{tasks * cfg.layout.nodes} in all")
    print(f"memory/GPU: weights {layout.weights_gb:.1f} GB + KV cache {layout.kv_cache_gb:.1f} GB "
          f"(batch {cfg.layout.max_batch_size} x {cfg.layout.max_seq_len or arch.max_seq_len} tokens) = "
          f"{layout.total_gb:.1f} GB of {layout.usable_gb:.1f} GB usable")
    for p in engine_problems:
        print(f"engine:     {p}")
    if cfg.layout.gpu in GPUS:
        _print_splits(cfg)
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


def _print_splits(cfg) -> None:
    """The valid TP x PP x D splits of the layout's GPUs, best estimated throughput per GPU first
    (layout.throughput_estimate: KV-cache room per instance x instances / GPUs, less the cost of exchanges)."""
    from .layout import TP_COST, format_layout, splits, throughput_estimate

    ranked = sorted(((throughput_estimate(cfg.model, o), o) for o in splits(cfg.model, cfg.layout)),
                    key=lambda pair: -pair[0])
    if not ranked:
        return
    print(f"splits of these {cfg.layout.nodes * cfg.layout.gpus_per_node} GPU(s), by estimated throughput per GPU "
          f"(sequences: KV-cache room per instance x instances / GPUs, less {TP_COST:.0%} per extra GPU in an "
          f"instance):")
    for rank, (estimate, o) in enumerate(ranked[:8]):
        print(f"  {format_layout(o)}  ~{estimate:.1f}{'  <- most per GPU' if rank == 0 else ''}")


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
    from .render import render

    for path in render(cfg):
        print(path)


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "render": cmd_render, "serve-engine": cmd_serve_engine}


def cmd_status(args) -> None:
    from .pipeline import is_pipeline_dir, status_lines
    from .status import collect, format_status
    from .sweep import is_sweep_dir, rows, table

    if is_pipeline_dir(args.run_dir):  # a pipeline's directory: one line (or one object) per stage
        if args.json:
            import json

            from .pipeline import pipeline_status

            print(json.dumps(pipeline_status(args.run_dir), indent=1))
        else:
            print(status_lines(args.run_dir))
        return
    if is_sweep_dir(args.run_dir):  # a sweep's directory: one line per member
        if args.json:
            import json

            print(json.dumps({"sweep": str(args.run_dir), "members": rows(args.run_dir)}, indent=1))
        else:
            print(table(args.run_dir))
        return
    found = collect(args.run_dir)
    if args.json:
        import json

        print(json.dumps(found, indent=1))
    else:
        print(format_status(found))


def _run_stages(run_dir) -> list[Path]:
    """A pipeline directory's run stages that have started (a run directory: itself)."""
    from .pipeline import is_pipeline_dir, stages_of

    if not is_pipeline_dir(run_dir):
        return [Path(run_dir)]
    return [Path(s["run_dir"]) for s in stages_of(run_dir)
            if s["kind"] == "run" and (Path(s["run_dir"]) / "plan.json").exists()]


def cmd_report(args) -> None:
    from .html_report import write_report

    for root in _run_stages(args.run_dir):
        print(write_report(root))


def cmd_cancel(args) -> None:
    from .cancel import cancel

    for root in _run_stages(args.run_dir):
        print(cancel(root))


def cmd_pipeline(argv: list[str], mode: str = "run") -> None:
    """`orchestrator pipeline FILE [--render] ...`, and `orchestrator run|plan|render pipeline=NAME ...` (mode)."""
    from .errors import OrchestratorError

    if "--render" in argv:
        mode = "render"
    argv = [a for a in argv if a != "--render"]
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        _fail("usage: orchestrator pipeline FILE [--render] [key=value ...] (FILE: a pipeline YAML, e.g. "
              "examples/pipeline_local.yaml; --render writes each run stage's scripts and submits nothing)")
    from .config import register_configs
    from .pipeline import render_pipeline, run_pipeline
    from .pipeline_config import load_pipeline

    register_configs()
    try:
        pipeline = load_pipeline(argv[0], pipeline_inside_allocation(argv[0], argv[1:]))
        if mode == "render":
            for path in render_pipeline(pipeline):
                print(path)
        elif mode == "plan":
            _plan_pipeline(pipeline)
        else:
            run_pipeline(pipeline)
    except OrchestratorError as exc:
        _fail(str(exc), 1)


def _plan_pipeline(pipeline) -> None:
    """`orchestrator plan pipeline=NAME`: every stage in order, a run stage's layout as `orchestrator plan` prints
    it; exits 1 when a run stage does not fit."""
    code = 0
    for stage in pipeline.stages:
        print(f"stage {stage.name} ({stage.kind}{', from ' + stage.source if stage.source else ''}; "
              f"{stage.run_dir})")
        if stage.kind != "run":
            print(f"  {stage.kind}: {_selection_text(stage)}\n")
            continue
        try:
            cmd_plan(stage.config)
        except SystemExit as exc:
            code = max(code, int(exc.code or 0))
        print()
    if code:
        sys.exit(code)


def _selection_text(stage) -> str:
    spec = stage.spec
    if spec.kind == "filter":
        return spec.filter.text
    if spec.kind == "best":
        return f"by {spec.by}, k {spec.k}, order {spec.order}"
    return f"by {spec.by}, min_margin {spec.min_margin}"


def pipeline_file(value: str) -> str:
    """pipeline=VALUE: a pipeline file, or the name of a seed pipeline (examples/pipeline_<name>.yaml)."""
    from .config import bundled

    path = Path(value).expanduser()
    if path.is_file():
        return str(path)
    seeds = bundled("examples")
    seed = seeds / f"pipeline_{value}.yaml"
    if seed.is_file():
        return str(seed)
    names = sorted(p.stem[len("pipeline_"):] for p in seeds.glob("pipeline_*.yaml"))
    _fail(f"pipeline={value}: no such file, and no seed pipeline of that name (examples/pipeline_{value}.yaml); "
          f"give a pipeline file's path, or one of: {', '.join(names)}")


def _pipeline_override(args: list[str]) -> tuple[str | None, list[str]]:
    """run/plan/render's `pipeline=NAME` (its file), and the other arguments (every run stage's overrides)."""
    chosen = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "pipeline"]
    if not chosen:
        return None, args
    return pipeline_file(chosen[-1]), [a for a in args if a.split("=", 1)[0] != "pipeline"]


def pipeline_inside_allocation(path: str, overrides: list[str]) -> list[str]:
    """`orchestrator pipeline` inside a Slurm job runs its run stages in that job's allocation
    (cluster=allocation), as `orchestrator run` does, unless cluster= is given on the command line or in a
    stage's own overrides."""
    import os

    import yaml

    from .clusters.environment import job_environment

    job = job_environment().job_id
    if not job or os.environ.get("SUBMITIT_EXECUTOR") or any(_key(a) == "cluster" for a in overrides):
        return overrides
    try:
        stages = (yaml.safe_load(Path(path).read_text()) or {}).get("stages") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return overrides  # load_pipeline says what is wrong with the file
    own = [o for s in stages if isinstance(s, dict) for o in (s.get("overrides") or []) if isinstance(o, str)]
    if any(_key(o) == "cluster" for o in own):
        return overrides
    print(f"inside Slurm job {job}: running the pipeline's run stages in its allocation (cluster=allocation)",
          flush=True)
    return [*overrides, "cluster=allocation"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# these take a run directory, not Hydra overrides: they read what a run wrote, from any machine
RUN_DIR_COMMANDS = {"status": cmd_status, "report": cmd_report, "cancel": cmd_cancel}


def _run_dir_main(command: str, args: list[str]) -> None:
    import argparse

    from .errors import OrchestratorError

    parser = argparse.ArgumentParser(prog=f"orchestrator {command}")
    parser.add_argument("run_dir", help="the run_dir= of an `orchestrator run`")
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print the status as one JSON object")
    try:
        RUN_DIR_COMMANDS[command](parser.parse_args(args))
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    except BrokenPipeError:  # `orchestrator status RUN_DIR | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = argv[0]
    if command == "pipeline":
        cmd_pipeline(argv[1:])
        return
    if command in RUN_DIR_COMMANDS:
        _run_dir_main(command, argv[1:])
        return
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; choose one of: {', '.join([*COMMANDS, *RUN_DIR_COMMANDS, 'pipeline'])}"
              f"\n\n{USAGE}")
    if command in ("run", "plan", "render"):
        file, rest = _pipeline_override(argv[1:])
        if file is not None:  # `orchestrator run pipeline=sdg_local ...`: the pipeline, every stage
            cmd_pipeline([file, *rest], mode=command)
            return
    _hydra_main(command, argv[1:])


def inside_allocation(command: str, args: list[str]) -> list[str]:
    """`orchestrator run` inside a Slurm job uses that job's allocation (cluster=allocation) instead of
    submitting jobs from within it, unless cluster= or another config is given."""
    import os

    from .clusters.environment import job_environment

    chosen = any(a.split("=")[0].lstrip("+~") in ("cluster", "--config-name", "-cn") or a in ("--config-name", "-cn")
                 for a in args)
    job = job_environment().job_id
    if command == "run" and job and not os.environ.get("SUBMITIT_EXECUTOR") and not chosen:
        print(f"inside Slurm job {job}: running in its allocation (cluster=allocation)", flush=True)
        return [*args, "cluster=allocation"]
    return args


def _hydra_main(command: str, args: list[str]) -> None:
    import hydra

    from .config import CONF_DIR, check_moved_overrides, register_configs, to_config
    from .errors import OrchestratorError

    register_configs()
    args = inside_allocation(command, args)
    try:
        check_moved_overrides(args)  # engine.capacity=4: name engine.simulator.capacity, not Hydra's "+"
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    sweep = None
    if command == "run" and ("-m" in args or "--multirun" in args):
        from .sweep import Sweep, screen, sweep_overrides

        try:
            args = [*args, *sweep_overrides(args)]
            args, refused = screen(args)
        except OrchestratorError as exc:
            _fail(str(exc), 1)
        sweep = Sweep(refused)

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(dict_cfg) -> None:
        if sweep is not None:  # one member: submitted now, followed with the others at the end
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            name = str(Path(hc.runtime.output_dir).relative_to(hc.sweep.dir)) if hc.sweep.subdir else ""
            try:
                cfg = to_config(dict_cfg)
            except OrchestratorError as exc:  # this member's settings: recorded, the others run
                sweep.add_refused(name, list(hc.overrides.task), hc.sweep.dir, str(exc))
                return
            cfg.run_dir = str(Path(hc.runtime.output_dir).resolve())
            sweep.add(cfg, name, list(hc.overrides.task), hc.sweep.dir)
            return
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
    if sweep is not None and (sweep.members or sweep.in_use):
        try:
            code = sweep.finish(wait=sweep.wait)
        except OrchestratorError as exc:
            _fail(str(exc), 1)
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
