"""R replicas over U units in virtual time, through the project's own claim, heartbeat, lease and
commit code on a real directory: what a run of 1,000 replicas costs the filesystem, and how close to
ideal it finishes with slow and dying replicas.

Each simulated replica is a `claims.Scheduler` (its clock is the simulation's) that opens the unit's
journal (`journal.Journals`), commits with `commits.commit_unit`, removes the journal and writes progress
with `commits.write_progress`, as the client does, and beats every `lease_s / 4`. A unit's service time is
lognormal (mean --service-s); a fraction of the replicas is --slow-factor times slower; a fraction dies
at a random moment (its claims stay behind).
Every metadata operation is counted by `orchestrator.fsops` (the count is checked against strace on
real `orchestrator run` processes by `bench/strace_claims.py`).

Printed per R: metadata operations per unit (and by kind), makespan / ideal (ideal: the work divided
by the replicas' combined speed while alive), the tail (time from the 99th-percentile commit to the
last, as a share of the run), units run twice (backup copies and takeovers), units watched (a backup
claim whose copy did not start: the holder was expected to commit first) and rows discarded (every
unit has as many rows, so the units' share is the rows'), and a check that every unit was committed
exactly once. Each replica writes the progress record the client writes (units committed, [first
request, last commit]): the scheduler reads a holder's pace from it.

Run: python bench/scale.py [--replicas 1,10,100,1000] [--units 50000] [--slow 0.1] [--deaths 0.01]
     [--repeat N: N seeds per R, and their total]; 2 equal replicas as in issue 19.10:
     python bench/scale.py --replicas 2 --units 10 --slow 0 --deaths 0 --repeat 20
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from orchestrator import fsops
from orchestrator.claims import WAIT, Scheduler, claim_name, result_exists
from orchestrator.commits import Ledger, commit_unit, write_progress
from orchestrator.journal import Journals
from orchestrator.rundir import RunPaths


def simulate(R: int, U: int, args, root: Path) -> dict:
    rng = random.Random(args.seed * 1000 + R)
    paths = RunPaths(root)
    paths.make()
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    sigma = args.sigma
    mu = math.log(args.service_s) - sigma ** 2 / 2  # lognormal with mean service_s
    slow = set(rng.sample(range(R), int(round(args.slow * R))))
    factor = [args.slow_factor if r in slow else 1.0 for r in range(R)]
    ideal_guess = U * args.service_s / sum(1 / f for f in factor)
    dies = {r: rng.uniform(0.05, 0.9) * ideal_guess for r in rng.sample(range(R), int(round(args.deaths * R)))}
    todo = np.arange(U, dtype=np.int64)  # one array for every replica (each real replica has its own)
    scheds = [Scheduler(paths, "sim", f"r{r}", todo, index=r, lease_s=args.lease_s, backups=args.backups,
                        clock=clock, seed=rng.random()) for r in range(R)]
    ledgers = [Ledger(paths, f"r{r}") for r in range(R)]
    journals = [Journals(paths, f"r{r}", "sim", "digest") for r in range(R)]
    table = pa.table({"unit": pa.array([0], pa.int64())})
    events: list = []
    seq = [0]

    def at(t: float, kind: str, r: int, data=None) -> None:
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], kind, r, data))

    running: dict[int, tuple] = {}  # replica -> (unit, copy, token): what it works on
    commits: list[float] = []
    stats = Counter()
    fsops.COUNTS.clear()
    units_won = [0] * R  # units each replica committed, and when it claimed its first: in its progress record
    first, last_won = [None] * R, [None] * R

    def progress(r: int, t: float, requests=None) -> None:
        """The client's progress record: units committed, [first request, last commit], the time written."""
        segments = [[first[r], last_won[r]]] if units_won[r] else []
        write_progress(paths, f"r{r}", {"owner": f"r{r}", "attempt": "sim", "units": units_won[r],
                                        "segments": segments, "updated": t}, requests)
        # the rename that wrote it set its time to now, on the simulation's clock (not counted: no extra call)
        os.utime(paths.progress / f"r{r}.json", (t, t))
        scheds[r].wrote()

    for r in range(R):
        journals[r].scan()  # what the client does at its start
        progress(r, 0.0)
        at(0.0, "ask", r)
        at(scheds[r].beat_s, "beat", r)
        if r in dies:
            at(dies[r], "die", r)
    dead: set[int] = set()
    finished: set[int] = set()
    while events:
        t, _, kind, r, data = heapq.heappop(events)
        if r in dead or r in finished:
            continue
        now[0] = t
        sched = scheds[r]
        if kind == "die":
            dead.add(r)
            ledgers[r].close()
        elif kind == "beat":
            sched.beat()
            lost = sched.lost(result_exists(paths))
            if r in running and running[r][0] in lost:  # another copy won: drop this one, look for work
                stats["abandoned"] += 1
                Journals.remove(*running.pop(r)[3:])
                at(t, "ask", r)
            at(t + sched.beat_s, "beat", r)
        elif kind == "ask":
            got = sched.next()
            if got is None:
                finished.add(r)
                ledgers[r].close()
            elif got == WAIT:
                at(t + sched.poll_s, "ask", r)
            else:
                token = seq[0]
                first[r] = t if first[r] is None else first[r]
                claim = sched.folder / claim_name(got.unit, got.copy)
                if claim.exists():  # made now, on the simulation's clock (not counted: no extra call)
                    os.utime(claim, (t, t))
                journal, _, others = journals[r].start(got.unit, 1)  # replays what others journaled of it
                running[r] = (got.unit, got.copy, token, journal, others)
                service = rng.lognormvariate(mu, sigma) * factor[r]
                at(t + service, "done", r, token)
        elif kind == "done":
            if r not in running or running[r][2] != data:
                continue  # abandoned meanwhile
            unit, copy, _, journal, others = running.pop(r)
            won = commit_unit(paths, unit, table, {"rows": 1, "ok": 1, "failed": 0, "output_tokens": 0, "units": 1},
                              f"r{r}", ledgers[r])
            sched.release(unit)
            Journals.remove(journal, others)
            if won:
                units_won[r] += 1
                last_won[r] = t
            progress(r, t, [{"at": t, "prompts": 1}])
            if won:
                commits.append(t)
            else:
                stats["lost_commits"] += 1
            at(t, "ask", r)
    ops = Counter(fsops.COUNTS)
    for ledger in ledgers:
        ledger.close()
    files = len(list(paths.results.iterdir()))
    ledger_units = [json.loads(line)["unit"] for p in (root / "work" / "ledger").glob("*.jsonl")
                    for line in p.read_text().splitlines()]
    makespan = max(commits)
    commits.sort()
    p99 = commits[int(0.99 * len(commits)) - 1]
    # ideal: the work over the replicas' combined speed while alive (dead replicas count until they die)
    work = U * args.service_s
    lo, hi = 0.0, 10 * ideal_guess
    for _ in range(100):
        mid = (lo + hi) / 2
        done = sum(min(mid, dies.get(r, mid)) / factor[r] for r in range(R))
        lo, hi = (mid, hi) if done < work else (lo, mid)
    ideal = hi
    return {
        "R": R, "U": U, "ops_per_unit": sum(ops.values()) / U, "ops": dict(ops),
        "efficiency": ideal / makespan, "tail": (makespan - p99) / makespan,
        "backup_copies": sum(s.backup_copies for s in scheds), "takeovers": sum(s.takeovers for s in scheds),
        "watches": sum(getattr(s, "watches", 0) for s in scheds),  # getattr: the code before issue 19 runs too
        "lost_commits": stats["lost_commits"], "abandoned": stats["abandoned"],
        "exactly_once": files == U and sorted(ledger_units) == list(range(U)),
        "makespan_s": makespan, "ideal_s": ideal, "dead": len(dies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,10,100,1000")
    parser.add_argument("--units", type=int, default=50_000)
    parser.add_argument("--service-s", type=float, default=60.0, help="mean time of one unit (2,048 rows)")
    parser.add_argument("--sigma", type=float, default=0.25, help="lognormal spread of the service time")
    parser.add_argument("--slow", type=float, default=0.10, help="fraction of slow replicas")
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--deaths", type=float, default=0.01, help="fraction of replicas that die mid-run")
    parser.add_argument("--lease-s", type=float, default=120.0)
    parser.add_argument("--backups", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs per R, seeds --seed, --seed + 1, ...")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one ledger file held open per replica
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    print(f"U={args.units} units, service {args.service_s:g} s mean (sigma {args.sigma}), {args.slow:.0%} of "
          f"replicas {args.slow_factor:g}x slower, {args.deaths:.0%} die, lease {args.lease_s:g} s, "
          f"backups {args.backups}")
    print(f"{'R':>5} {'seed':>4} {'ops/unit':>8} {'makespan/ideal':>14} {'tail':>6} {'run twice':>9} {'watched':>7} "
          f"{'discarded':>15} {'dead':>4} {'once':>5} {'wall':>6}  ops by kind")
    for R in [int(x) for x in args.replicas.split(",")]:
        discarded = efficiency = 0.0
        for seed in range(args.seed, args.seed + args.repeat):
            root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=base))
            try:
                started = time.perf_counter()
                res = simulate(R, args.units, argparse.Namespace(**{**vars(args), "seed": seed}), root)
                wall = time.perf_counter() - started
            finally:
                shutil.rmtree(root, ignore_errors=True)
            kinds = " ".join(f"{k}={v / args.units:.2f}" for k, v in sorted(res["ops"].items()))
            # every unit has as many rows: the units' share is the rows' share
            lost = res["lost_commits"] + res["abandoned"]
            discarded += lost
            efficiency += res["efficiency"]
            print(f"{R:>5} {seed:>4} {res['ops_per_unit']:>8.2f} {res['efficiency']:>14.3f} {res['tail']:>6.1%} "
                  f"{res['backup_copies'] + res['takeovers']:>9} {res['watches']:>7} "
                  f"{f'{lost} ({lost / args.units:.1%})':>15} {res['dead']:>4} {str(res['exactly_once']):>5} "
                  f"{wall:>5.0f}s  {kinds}", flush=True)
            if not res["exactly_once"]:
                sys.exit(f"R={R}: results are not exactly once")
        if args.repeat > 1:
            print(f"{R:>5}  all: rows discarded {discarded / (args.units * args.repeat):.1%} "
                  f"({discarded:g} units of {args.units * args.repeat}), mean makespan/ideal "
                  f"{efficiency / args.repeat:.3f}, over seeds {args.seed}-{args.seed + args.repeat - 1}", flush=True)


if __name__ == "__main__":
    main()
