"""Launching with submitit (local executor here; the Slurm executor differs only in the executor), and
`node_main`, which runs inside the job: engine up, proven, client, engine down, stats."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from .config import Config
from .engines.server import EngineServer
from .layout import build_layout
from .report import build_summary, one_line, write_replica_stats, write_summary
from .work import InputError, Plan, RunPaths, atomic_write_text, build_plan


class RunError(RuntimeError):
    """The run could not start or did not finish; the message says why."""


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"run_dir={str(root)!r} is not writable ({exc.strerror}); choose another run_dir=") from None


def prepare(cfg: Config) -> tuple[Plan, RunPaths]:
    """Everything checked before a job is submitted: layout, input, run directory. Writes plan and config."""
    build_layout(cfg)
    plan = build_plan(cfg.data, cfg.input_path)
    paths = RunPaths(Path(cfg.run_dir).expanduser().resolve())
    check_writable(paths.root)
    if paths.plan.exists():
        stored = Plan.from_json(paths.plan.read_text())
        if [f.path for f in stored.files] != [f.path for f in plan.files] or stored.units != plan.units:
            raise InputError(f"run_dir {paths.root} holds a run over other input (or another data.unit_rows); "
                             f"rerun with its original data.input, or choose a new run_dir=")
        plan = stored
    paths.make()
    atomic_write_text(paths.plan, plan.to_json())
    atomic_write_text(paths.root / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return plan, paths


def node_main(cfg: Config, run_dir: str, attempt: str, started_at: float, replica: int = 0) -> dict:
    """Runs in the job: start the engine, wait for a real generation, run the client, stop the engine."""
    from .client import Client

    paths = RunPaths(Path(run_dir))
    plan = Plan.from_json(paths.plan.read_text())
    owner = f"r{replica}-{socket.gethostname()}-{os.getpid()}"
    server = EngineServer(cfg, paths.logs / f"engine-{attempt}-r{replica}.log",
                          paths.root / "work" / f"engine-{attempt}-r{replica}.port")
    server.start()
    try:
        url = server.wait_ready()
        print(f"engine ready at {url} ({cfg.engine.name}, protocol {cfg.engine.protocol})", flush=True)
        client = Client(cfg, plan, paths, url, attempt, owner, server.model_name)
        stats = asyncio.run(client.run())
    finally:
        server.stop()
    record = {"owner": owner, "rows": asdict(stats.rows), "first_request_at": stats.first_request_at,
              "last_commit_at": stats.last_commit_at}
    write_replica_stats(paths, attempt, owner, record)
    summary = build_summary(paths, plan, attempt, started_at,
                            {"model": cfg.model.name, "engine": cfg.engine.name, "run_dir": str(paths.root)})
    write_summary(paths, summary)
    return summary


def make_executor(cfg: Config, paths: RunPaths):
    import submitit

    executor = submitit.LocalExecutor(folder=str(paths.logs / "submitit"))
    executor.update_parameters(timeout_min=cfg.cluster.timeout_min)
    return executor


def _rows_done(paths: RunPaths, attempt: str) -> int:
    done = 0
    for p in paths.progress.glob("*.json"):
        try:
            record = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if record.get("attempt") == attempt:
            done += record.get("rows", 0)
    return done


def run(cfg: Config, show_progress: bool = True) -> dict:
    """Plan, submit through submitit, follow progress until the job ends, return the summary."""
    started_at = time.time()
    plan, paths = prepare(cfg)
    attempt = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    from .work import committed_stats

    already = committed_stats(paths).rows
    if already:
        print(f"resuming {paths.root}: {already}/{plan.total_rows} rows already committed", flush=True)
    if already == plan.total_rows:
        summary = build_summary(paths, plan, attempt, started_at,
                                {"model": cfg.model.name, "engine": cfg.engine.name, "run_dir": str(paths.root)})
        write_summary(paths, summary)
        print(f"nothing left to do\nresults: {paths.results}\nsummary: {one_line(summary)}")
        return summary
    executor = make_executor(cfg, paths)
    job = executor.submit(node_main, cfg, str(paths.root), attempt, started_at, 0)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total_rows, initial=already, unit="prompt", file=sys.stderr,
                   disable=not sys.stderr.isatty() and os.environ.get("ORCHESTRATOR_PROGRESS") != "1")
    try:
        while not job.done():
            if bar is not None:
                bar.n = already + _rows_done(paths, attempt)
                bar.refresh()
            time.sleep(cfg.client.progress_interval_s)
        try:
            summary = job.result()
        except Exception as exc:  # submitit re-raises the job's failure with its traceback
            message = str(exc).strip().splitlines()
            tail = "\n".join(message[-12:])
            raise RunError(f"the job failed; logs in {paths.logs}\n{tail}") from None
    except KeyboardInterrupt:
        job.cancel()
        raise
    finally:
        if bar is not None:
            bar.n = already + _rows_done(paths, attempt)
            bar.close()
    summary["duration_s"] = round(time.time() - started_at, 3)
    write_summary(paths, summary)
    print(f"results: {paths.results}")
    print(f"summary: {one_line(summary)}")
    if not summary["complete"]:
        raise RunError(f"{summary['committed']}/{summary['total']} rows committed; rerun the same command to resume")
    return summary
