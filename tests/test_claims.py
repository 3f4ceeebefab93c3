"""Claims at scale (issue 10): spread starts, O(1) failed claims, no polling of held units while free
ones are left, backup copies with first-commit-wins, lease takeover, one sacct per poll."""
import os
import stat

import pyarrow as pa

from orchestrator import fsops
from orchestrator.claims import WAIT, Claim, Scheduler, claim_name, parse_claim, spread
from orchestrator.commits import Ledger, commit_unit, scan_committed
from orchestrator.config import compose
from orchestrator.rundir import RunPaths

STATS = {"rows": 1, "ok": 1, "failed": 0, "output_tokens": 0, "units": 1}


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def make(tmp_path, owner, units=100, index=0, clock=None, **kw):
    paths = RunPaths(tmp_path)
    paths.make()
    return Scheduler(paths, "a1", owner, range(units), index=index, clock=clock or Clock(), seed=owner, **kw)


def test_spread_places_any_first_replicas_evenly():
    for count in (2, 8, 64, 1000):
        points = sorted(spread(i) for i in range(count))
        assert len(set(points)) == count
        gaps = [b - a for a, b in zip(points, points[1:] + [1.0])]
        assert max(gaps) <= 2.0 / count  # never more than twice the even gap


def test_claim_names_round_trip_and_other_files_are_ignored():
    assert parse_claim(claim_name(42)) == (42, 0)
    assert parse_claim(claim_name(42, 1)) == (42, 1)
    assert parse_claim(".00000042.r1.abc") is None


def test_replicas_start_apart_and_do_not_contend(tmp_path):
    scheds = [make(tmp_path, f"r{i}", units=64, index=i) for i in range(4)]
    firsts = [s.next().unit for s in scheds]
    assert sorted(firsts) == [0, 16, 32, 48]
    fsops.COUNTS.clear()
    for _ in range(15):
        for s in scheds:
            assert isinstance(s.next(), Claim)
    assert fsops.COUNTS == {"create": 60}  # one create per claim, nobody failed, nobody listed


def test_a_failed_claim_costs_one_listing_and_then_no_more_failures(tmp_path):
    a, b = make(tmp_path, "r0", units=50), make(tmp_path, "r1", units=50, index=0)  # same start: worst case
    for _ in range(20):
        a.next()
    fsops.COUNTS.clear()
    got = b.next()
    assert got.unit >= 20  # skipped all that a holds
    assert fsops.COUNTS["listdir"] == 1 and fsops.COUNTS["create"] == 2  # one failure, one listing, one success
    units = {got.unit}
    fsops.COUNTS.clear()
    for _ in range(10):
        units.add(b.next().unit)
    assert fsops.COUNTS["listdir"] == 0 and len(units) == 11


def test_every_unit_is_claimed_exactly_once_across_replicas(tmp_path):
    scheds = [make(tmp_path, f"r{i}", units=200, index=i) for i in range(7)]
    got = []
    active = list(scheds)
    while active:
        for s in list(active):
            c = s.next()
            if isinstance(c, Claim):
                got.append(c)
            else:
                active.remove(s)
    assert sorted(c.unit for c in got if c.copy == 0) == list(range(200))  # each once
    backups = [c.unit for c in got if c.copy]
    assert len(backups) == len(set(backups)) <= 7  # no unit committed here: the last ones get one backup each


def test_idle_replica_runs_a_backup_copy_and_first_commit_wins(tmp_path):
    clock = Clock()
    slow, fast = make(tmp_path, "r0", units=2, clock=clock), make(tmp_path, "r1", units=2, index=1, clock=clock)
    paths = slow.paths
    assert slow.next() == Claim(0) and fast.next() == Claim(1)
    table = pa.table({"x": [1]})
    assert commit_unit(paths, 1, table, STATS, "r1")
    fast.release(1)
    backup = fast.next()
    assert backup == Claim(0, copy=1)  # the straggler's unit, as its first backup copy
    assert commit_unit(paths, 0, pa.table({"x": [2]}), STATS, "r1")
    fast.release(0)
    # the straggler finishes later: its commit loses and changes nothing
    assert not commit_unit(paths, 0, pa.table({"x": [3]}), STATS, "r0")
    assert pa.parquet.read_table(paths.result_file(0)).column("x").to_pylist() == [2]
    assert scan_committed(paths).total.rows == 2  # the ledger counts the unit once
    assert slow.lost(lambda u: paths.result_file(u).exists()) == []  # not in its tail yet
    clock.now += 100
    assert slow.next() is None and slow.lost(lambda u: paths.result_file(u).exists()) == [0]


def test_backups_are_bounded(tmp_path):
    clock = Clock()
    holder = make(tmp_path, "r0", units=1, clock=clock, backups=1)
    assert holder.next() == Claim(0)
    first = make(tmp_path, "r1", units=1, clock=clock, backups=1)
    second = make(tmp_path, "r2", units=1, clock=clock, backups=1)
    assert first.next() == Claim(0, 1)
    assert second.next() is None  # one backup copy at most: nothing here for r2, it ends (frees its nodes)
    none = make(tmp_path, "r3", units=1, clock=clock, backups=0)
    assert none.next() == WAIT  # no copies at all: it stays, to take over a silent holder's claim


def test_idle_replicas_look_at_a_bounded_rate(tmp_path):
    clock = Clock()
    holder = make(tmp_path, "r0", units=1, clock=clock)
    holder.next()
    holder.beat()
    idle = make(tmp_path, "r1", units=1, clock=clock, backups=0, lease_s=120)
    fsops.COUNTS.clear()
    looks = 0
    for _ in range(600):  # ten minutes, asking every second
        before = fsops.COUNTS["listdir"]
        assert idle.next() == WAIT
        looks += fsops.COUNTS["listdir"] > before
        clock.now += 1
        holder.beat()
    assert fsops.COUNTS["listdir"] == 2 * looks + 1  # two per look, and the one after the failed claim
    assert looks <= 70  # 1, 2, 4, 8 s, then every lease/4 capped at 10 s: about 60 in ten minutes
    assert fsops.COUNTS["open"] + fsops.COUNTS["stat"] <= 2 * 10 + 2  # lease checks: twice a lease


def test_silent_holder_loses_its_claim_after_the_lease(tmp_path):
    clock = Clock()
    dead = make(tmp_path, "r0", units=1, clock=clock, lease_s=40)
    dead.beat_file.parent.mkdir(parents=True, exist_ok=True)
    dead.beat()
    assert dead.next() == Claim(0)
    other = make(tmp_path, "r1", units=1, clock=clock, lease_s=40, backups=0)
    clock.now += 20
    assert other.next() == WAIT
    clock.now += 30  # r0 silent for 50 s > lease
    assert other.next() == Claim(0)
    assert (other.folder / claim_name(0)).read_text() == "r1"
    assert other.takeovers == 1


def test_requeued_replica_takes_back_its_own_units_first(tmp_path):
    first = make(tmp_path, "r3", units=10, index=3)
    held = [first.next().unit, first.next().unit]
    again = make(tmp_path, "r3", units=10, index=3)
    again.resume(held)
    assert sorted([again.next().unit, again.next().unit]) == sorted(held)


def test_retried_units_replace_their_commit(tmp_path):
    paths = RunPaths(tmp_path)
    paths.make()
    assert commit_unit(paths, 0, pa.table({"x": [1]}), STATS)
    assert commit_unit(paths, 0, pa.table({"x": [2]}), STATS, replace=True)
    assert pa.parquet.read_table(paths.result_file(0)).column("x").to_pylist() == [2]


def test_ledger_is_opened_once(tmp_path):
    paths = RunPaths(tmp_path)
    paths.make()
    ledger = Ledger(paths, "r0")
    fsops.COUNTS.clear()
    for unit in range(5):
        commit_unit(paths, unit, pa.table({"x": [unit]}), STATS, "r0", ledger)
    ledger.close()
    assert fsops.COUNTS == {"open": 6, "link": 5, "unlink": 5}  # a file each, and the ledger once
    assert len((tmp_path / "work" / "ledger" / "r0.jsonl").read_text().splitlines()) == 5


def test_wait_reads_every_state_with_one_sacct_per_poll(tmp_path, monkeypatch):
    """50 jobs of an array: each poll is one sacct call, not 50."""
    import submitit

    from orchestrator.frontend import wait_for_jobs

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    sacct = bin_dir / "sacct"
    sacct.write_text(f"""#!/bin/bash
echo "$*" >> {calls}
n=$(wc -l < {calls})
state=RUNNING; [ "$n" -ge 3 ] && state=COMPLETED
echo "JobID|State|NodeList"
for i in $(seq 0 49); do echo "777_$i|$state|n1"; done
""")
    sacct.chmod(sacct.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    jobs = [submitit.SlurmJob(folder=tmp_path / "logs", job_id=f"777_{i}") for i in range(50)]
    cfg = compose(["cluster=slurm", "cluster.poll_interval_s=0.01", f"run_dir={tmp_path / 'r'}"])
    ticks = []
    assert wait_for_jobs(jobs, cfg, lambda: ticks.append(1)) == []
    lines = calls.read_text().splitlines()
    assert len(lines) == 3 == len(ticks)  # three polls, one sacct each
    assert lines[0].count("-j") == 1  # the array asked for once, by its id
