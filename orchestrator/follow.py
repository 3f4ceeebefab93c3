"""data.follow=DIR: a run that reads another run's results while that run goes on (streaming between stages).

- **One unit per upstream unit.** The plan is made from the upstream run's plan, not from files on disk: file
  u is the upstream's `results/part-<u>.parquet`, whether committed yet or not, with the upstream unit's result
  rows (its rows x rollouts); unit_rows is the largest of those, so unit u here reads exactly upstream unit u.
  The columns are the upstream's result schema, read from its first committed file (all its units share it).
  Sizes and times are 0 in the plan and the fingerprint (the files come later); data.follow is fingerprinted.
- **Submission waits** until the upstream has a plan and has committed its first unit (data.follow_after: a
  share of its units), so an engine loads while the upstream runs but no GPU waits on nothing for long.
- **Claims are gated** (claims.Scheduler's gate): a replica claims only units whose upstream file is
  committed; while none is ready and the upstream is live it waits and looks again each second; once the
  upstream has ended (its front-end's lock gone or silent, and its replicas silent), a unit that will never
  come is not waited for: the replica ends, and the run is incomplete with the upstream named.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from . import fsops
from .errors import InputError, RunError
from .plan import Plan, plan_of
from .rundir import RunPaths
from .sinks.parquet_dir import ParquetDirSink

LIVE_S = 120.0  # a front-end's lock or a replica's progress file touched this recently: the upstream may commit more
START_GRACE_S = 60.0  # how long a follower waits for an upstream that has not started yet (no lock, no plan)
LOOK_S = 0.5  # how often the front-end looks for the upstream's first commits


class StatStub:
    """The (size, mtime) of a file still to come: 0, so the plan and the fingerprint do not change as it lands."""
    st_size = 0
    st_mtime_ns = 0


class Upstream:
    """The run a follower reads: which of its units are committed (one listing), and whether it is live."""

    def __init__(self, run_dir):
        self.paths = RunPaths(Path(run_dir).expanduser().resolve())
        self.sink = ParquetDirSink(self.paths.root)

    @property
    def root(self) -> Path:
        return self.paths.root

    def committed(self) -> set[int]:
        return self.sink.done_units()

    def live(self, now: float | None = None) -> bool:
        """Its front-end holds the run_dir and beat lately, or (wait=false) one of its replicas did."""
        now = time.time() if now is None else now
        lock = fsops.mtime(self.paths.root / "work" / "frontend.json")
        if lock is None:
            return False
        if now - lock < LIVE_S:
            return True
        try:
            with os.scandir(self.paths.progress) as found:
                return any(now - entry.stat().st_mtime < LIVE_S for entry in found)
        except OSError:
            return False

    def plan(self) -> Plan | None:
        try:
            return Plan.from_json(self.paths.plan.read_text())
        except FileNotFoundError:
            return None


def _check_upstream(up: Upstream, here: Path) -> None:
    if up.root == here:
        raise InputError(f"data.follow={up.root} is this run's own run_dir; name the run whose results it reads")
    config = up.root / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        found = OmegaConf.select(OmegaConf.load(config), "output.format", default="parquet")
        if found != "parquet":
            raise InputError(f"data.follow={up.root}: that run writes output.format={found}; a run follows Parquet "
                             f"results only: drop output.format there")


def wait_for_upstream(cfg, stop: threading.Event | None = None, say=print) -> tuple[Upstream, Plan, set[int]]:
    """Wait until the upstream run (data.follow) has a plan and has committed data.follow_after of its units (at
    least one), or has ended with some committed; its plan and committed units. Raises RunError when it ends
    with nothing committed, or never starts, and when stop is set (a pipeline stopping)."""
    up = Upstream(cfg.data.follow)
    _check_upstream(up, Path(cfg.run_dir).expanduser().resolve())
    started, said, quiet_since = time.monotonic(), False, None
    while True:
        plan = up.plan()
        done = up.committed() if plan is not None else set()
        live = up.live()
        if plan is not None:
            need = max(1, math.ceil(cfg.data.follow_after * len(plan.units)))
            if len(done) >= min(need, len(plan.units)) or (done and not live):
                return up, plan, done
        if live or plan is None and time.monotonic() - started < START_GRACE_S:
            quiet_since = None
        else:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > min(START_GRACE_S, 10.0):
                what = "has not started" if plan is None else "has ended without committing a unit"
                raise RunError(f"data.follow={up.root}: that run {what}, so there is nothing to read; start it (or "
                               f"rerun it to resume), then this run")
        if not said:
            say(f"waiting for {up.root} to commit its first unit" if cfg.data.follow_after == 0 else
                f"waiting for {up.root} to commit {cfg.data.follow_after:.0%} of its units (data.follow_after)")
            said = True
        stopped = stop.wait(LOOK_S) if stop is not None else time.sleep(LOOK_S)
        if stopped:
            raise RunError(f"stopped while waiting for {up.root} to commit")


def follow_plan(cfg, stop: threading.Event | None = None) -> Plan:
    """The plan of a run with data.follow: one unit per upstream unit (see the module doc); waits for the upstream
    (wait_for_upstream) when this run_dir has no plan yet."""
    up, upstream, done = wait_for_upstream(cfg, stop)
    first = up.sink.file(min(done))
    schema = pq.read_schema(first).remove_metadata()
    rows = [upstream.unit_answers(u) for u in range(len(upstream.units))]
    paths = [up.sink.file(u) for u in range(len(rows))]
    data = replace(cfg.data, unit_rows=max(rows, default=1), follow=None, input=None)
    plan = plan_of(data, "parquet", paths, up.paths.results, [(schema, n, StatStub) for n in rows], {},
                   cfg.sampling.rollouts, score=bool(cfg.model.attributes))
    plan.follow = str(up.root)
    return plan


def fingerprint(cfg) -> dict:
    """The fingerprint's entry for data.follow (absent when unset, as before it existed)."""
    if cfg.data.follow is None:
        return {}
    return {"data.follow": str(Path(cfg.data.follow).expanduser().resolve())}


class Gate:
    """claims.Scheduler's view of the upstream: the units a replica may claim, and whether to wait for more."""

    def __init__(self, upstream_dir: str):
        self.upstream = Upstream(upstream_dir)

    def ready(self) -> set[int]:
        return self.upstream.committed()

    def live(self) -> bool:
        return self.upstream.live()

    def __repr__(self) -> str:
        return f"Gate({str(self.upstream.root)!r})"


def gate_for(plan: Plan) -> Gate | None:
    return Gate(plan.follow) if plan.follow else None
