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
    assert fsops.COUNTS["listdir"] == 2 * looks  # two per look (the first uses the listing after the failed claim)
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


def drive(tmp_path, unit_s: list[float], units: int, start_s: list[float] | None = None, lease_s: float = 120.0):
    """Replicas taking unit_s[r] seconds a unit, in virtual time (as bench/scale.py does): each claims, commits
    with commit_unit, writes its progress record as the client does (units committed, [first request, last
    commit], updated) and beats every lease_s / 4. Returns the schedulers, the copies discarded (a lost commit
    or a copy dropped because another committed first) and the makespan."""
    import heapq
    import json

    from orchestrator.commits import write_progress

    clock = Clock()
    t0 = clock.now
    paths = RunPaths(tmp_path)
    paths.make()
    scheds = [Scheduler(paths, "a1", f"r{r}", range(units), index=r, clock=clock, seed=f"r{r}", lease_s=lease_s)
              for r in range(len(unit_s))]
    won = [0] * len(scheds)
    first = [None] * len(scheds)
    events, seq, running, discarded, last = [], [0], {}, [0], [t0]

    def at(t, kind, r, data=None):
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], kind, r, data))

    def progress(r, t):
        segments = [[first[r], t]] if won[r] else []
        write_progress(paths, f"r{r}", {"owner": f"r{r}", "attempt": "a1", "units": won[r], "segments": segments,
                                        "holding": sorted(scheds[r].held), "updated": t})
        os.utime(paths.progress / f"r{r}.json", (t, t))  # written at t (virtual time)
        scheds[r].wrote()
        assert json.loads((paths.progress / f"r{r}.json").read_text())["units"] == won[r]

    for r, s in enumerate(scheds):
        t = t0 + (start_s[r] if start_s else 0.0)
        clock.now = t
        progress(r, t)
        at(t, "ask", r)
        at(t + s.beat_s, "beat", r)
    ended = set()
    while events:
        t, _, kind, r, data = heapq.heappop(events)
        if r in ended:
            continue
        clock.now, s = t, scheds[r]
        if kind == "beat":
            s.beat()
            gone = s.lost(lambda u: paths.result_file(u).exists())
            if r in running and running[r][0] in gone:
                discarded[0] += 1
                del running[r]
                at(t, "ask", r)
            at(t + s.beat_s, "beat", r)
        elif kind == "ask" and r not in running:
            got = s.next()
            if got is None:
                ended.add(r)
            elif got == WAIT:
                at(t + s.poll_s, "ask", r)
            else:
                first[r] = t if first[r] is None else first[r]
                os.utime(s.folder / claim_name(got.unit, got.copy), (t, t))  # claimed at t (virtual time)
                seq[0] += 1
                running[r] = (got.unit, seq[0])
                at(t + unit_s[r], "done", r, seq[0])
        elif kind == "done" and running.get(r, (None, None))[1] == data:
            unit = running.pop(r)[0]
            if commit_unit(paths, unit, pa.table({"x": [unit]}), STATS, f"r{r}"):
                won[r] += 1
                last[0] = t
            else:
                discarded[0] += 1
            s.release(unit)
            progress(r, t)
            at(t, "ask", r)
    assert sorted(scan_committed(paths).units) == list(range(units))
    return scheds, discarded[0], last[0] - t0


def test_no_backup_copy_when_the_holder_runs_as_fast(tmp_path):
    """Two equal replicas (60 s a unit), the second started 30 s later: when the first runs out of units, the
    second is half-way through its last one; a copy (60 s) could never commit first, so none is started."""
    scheds, discarded, makespan = drive(tmp_path, [60.0, 60.0], units=10, start_s=[0.0, 30.0])
    assert sum(s.backup_copies for s in scheds) == 0
    assert discarded == 0
    assert makespan == 330.0


def test_a_straggler_gets_a_backup_copy_that_commits_first(tmp_path):
    """The second replica is 5x slower (300 s a unit): once the first runs out of units, copying the straggler's
    unit beats waiting for it."""
    scheds, discarded, makespan = drive(tmp_path, [60.0, 300.0], units=10)
    assert scheds[0].backup_copies == 1 and scheds[0].watches == 0  # started at once, from the straggler's pace
    assert discarded == 1  # the straggler's own run of it
    assert makespan == 540.0  # without the copy the straggler's second unit ends at 600 s


def holder_and_idle(tmp_path, lease_s: float, holder_unit_s: float, holder_last_s: float):
    """Two replicas over two units: r0 holds unit 0; r1 committed unit 1 30 s on and is idle. r0's progress
    record says it took holder_unit_s for one unit, its last commit holder_last_s before the start (its file's
    time is that commit); r0 beats now. (clock, paths, holder, idle)."""
    from orchestrator.commits import write_progress

    clock = Clock()
    paths = RunPaths(tmp_path)
    paths.make()
    holder = Scheduler(paths, "a1", "r0", range(2), index=0, clock=clock, lease_s=lease_s)
    idle = Scheduler(paths, "a1", "r1", range(2), index=1, clock=clock, lease_s=lease_s)
    start = clock.now
    assert holder.next() == Claim(0) and idle.next() == Claim(1)
    clock.now += 30
    assert commit_unit(paths, 1, pa.table({"x": [1]}), STATS, "r1")
    idle.release(1)
    last = start - holder_last_s
    write_progress(paths, "r0", {"owner": "r0", "units": 1, "segments": [[last - holder_unit_s, last]]})
    os.utime(paths.progress / "r0.json", (last, last))
    holder.beat()
    return clock, paths, holder, idle


def test_a_holder_that_goes_silent_has_its_watched_unit_copied(tmp_path):
    """A unit on watch (its holder expected to commit first) is copied once its holder has missed two heartbeats."""
    # 300 s a unit, the last commit 280 s ago: due in 20 s
    clock, paths, holder, idle = holder_and_idle(tmp_path, lease_s=40, holder_unit_s=300, holder_last_s=280)
    assert idle.next() == WAIT and idle.watching and idle.backup_copies == 0  # on watch: a copy would lose
    clock.now += 10
    holder.beat()  # its last heartbeat
    clock.now += 15
    assert idle.next() == WAIT and idle.watching  # late, but it beat 15 s ago (< lease / 2), not twice its pace late
    clock.now += 10  # silent for 25 s: two heartbeats (every lease / 4 = 10 s) missed
    assert idle.next() == Claim(0, copy=1)
    assert idle.backup_copies == 1 and not idle.watching


def test_many_replicas_on_a_small_input_cost_a_bounded_number_of_calls(tmp_path):
    """32 replicas over 100 units (about 3 each): what a replica does once, at its start and in the tail (failed
    claims, the tail's listings, lease checks, looks at the holders), is spread over few units. Every call on the
    run directory, commits and progress records included, is counted (orchestrator.fsops)."""
    fsops.COUNTS.clear()
    scheds, discarded, _ = drive(tmp_path, [60.0 + r % 3 for r in range(32)], units=100)
    calls = fsops.total()
    # 15.1 a unit before the tail stopped running copies that commit second, reused the listing made after a failed
    # claim and stopped looking at the copies of units whose holder is alive (1,507 calls); 13.1 now
    assert calls <= 1350, dict(fsops.COUNTS)
    # stats: a watcher asks once a second, from when the holder is expected to commit, whether it did (108 here)
    assert fsops.COUNTS["listdir"] <= 100 and fsops.COUNTS["stat"] <= 120, dict(fsops.COUNTS)
    assert discarded == 0


def test_a_unit_watched_by_a_slow_replica_is_still_copied_by_a_fast_one(tmp_path):
    """A watch takes no copy slot: its name says when the holder is expected to commit, so a faster idle replica
    that would commit first copies the unit, reading nothing but the listing."""
    from orchestrator.claims import parse_watch
    from orchestrator.commits import write_progress

    clock = Clock()
    t0 = clock.now
    holder, slow, fast = (make(tmp_path, f"r{i}", units=3, index=i, clock=clock) for i in range(3))
    paths = holder.paths
    assert holder.next() == Claim(0) and slow.next() == Claim(1) and fast.next() == Claim(2)
    write_progress(paths, "r0", {"owner": "r0", "units": 1, "segments": [[t0 - 1000, t0]]})  # 1,000 s a unit
    for sched, unit, took in ((fast, 2, 60), (slow, 1, 600)):
        clock.now = t0 + took
        assert commit_unit(paths, unit, pa.table({"x": [unit]}), STATS, sched.owner)
        sched.release(unit)
    holder.beat()
    # 600 s a unit: its copy would commit at t0 + 1,350 at the earliest, after the holder (t0 + 1,000)
    assert slow.next() == WAIT and slow.watches == 1 and slow.backup_copies == 0
    watches = [parse_watch(name) for name in os.listdir(slow.folder) if parse_watch(name)]
    assert watches == [(0, int(t0 + 1000))]
    fsops.COUNTS.clear()
    assert fast.next() == Claim(0, copy=1)  # 60 s a unit: commits at about t0 + 660
    assert fsops.COUNTS == {"listdir": 2, "create": 1}  # the claims and the results listed, the copy claimed


def test_a_watcher_whose_unit_is_committed_ends_soon_after_not_at_the_copy_due_time(tmp_path):
    """A watcher is told by nobody when the unit it watches commits: it used to wait until the copy's due time
    (twice the holder's pace late), holding its engine and the run's end (15 s of a 36 s local run). From the
    holder's expected commit on it asks, one stat at a time, whether the unit is committed, and then ends."""
    clock, paths, holder, idle = holder_and_idle(tmp_path, lease_s=400, holder_unit_s=55, holder_last_s=5)
    assert idle.next() == WAIT and idle.watching  # on watch: the holder commits first
    due = idle.watching[0]
    clock.now += 25  # the holder commits unit 0 when expected, long before the copy would be due
    assert commit_unit(paths, 0, pa.table({"x": [0]}), STATS, "r0")
    holder.release(0)
    clock.now += 5
    assert clock.now < due
    assert idle.next() is None, "the watcher waits for a unit already committed"
    assert idle.backup_copies == 0
