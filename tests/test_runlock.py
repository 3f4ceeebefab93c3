"""RunLock (work/frontend.json): one front-end per run_dir, also when several starts race to take over a
stale lock (issue 19, item 4)."""
import json
import socket
import subprocess
import threading

import pytest

from orchestrator import runlock
from orchestrator.errors import RunError
from orchestrator.rundir import RunPaths
from orchestrator.runlock import RunLock

STARTS, TRIALS = 6, 60


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def race(cfg, run_dir, monkeypatch) -> list:
    """STARTS starts acquire the run_dir's lock, left by a dead front-end, at once: each judges it stale
    before any of them acts on that (a barrier), the widest window of the race. What each start got: True
    (it holds the lock) or the RunError that refused it."""
    work = run_dir / "work"
    work.mkdir(parents=True)
    (work / "frontend.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                    "cluster": cfg.cluster.name, "jobs": []}))
    barrier, local = threading.Barrier(STARTS), threading.local()
    still_running = RunLock._still_running

    def judged(self, other):
        verdict = still_running(self, other)
        if not getattr(local, "waited", False):  # the first verdict of each start: all at once
            local.waited = True
            barrier.wait(timeout=30)
        return verdict

    monkeypatch.setattr(RunLock, "_still_running", judged)
    got: list = [None] * STARTS

    def start(k):
        try:
            RunLock(cfg, RunPaths(run_dir)).acquire()
            got[k] = True
        except RunError as exc:
            got[k] = exc

    threads = [threading.Thread(target=start, args=(k,)) for k in range(STARTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "an acquire of work/frontend.json never returned"
    return got


def test_racing_takeovers_of_a_stale_lock_leave_exactly_one_holder(make_cfg, tmp_path, monkeypatch):
    """Stale-lock takeover is a compare and swap: a start removes only the stale record it judged, never
    a fresh lock another start has just published, so exactly one start holds the run_dir and the others
    are refused naming it."""
    cfg = make_cfg()
    doubles = []
    for trial in range(TRIALS):
        with monkeypatch.context() as patch:
            got = race(cfg, tmp_path / f"t{trial}", patch)
        holders = [g for g in got if g is True]
        if len(holders) != 1:
            doubles.append(len(holders))
            continue
        for refused in (g for g in got if g is not True):
            assert "is in use by the orchestrator front-end" in str(refused), refused
        lock = json.loads((tmp_path / f"t{trial}" / "work" / "frontend.json").read_text())
        assert lock["pid"] == runlock.os.getpid()
        assert not [p.name for p in (tmp_path / f"t{trial}" / "work").iterdir() if p.name != "frontend.json"]
    assert not doubles, f"{len(doubles)} of {TRIALS} trials did not end with exactly one holder of " \
                        f"work/frontend.json (holders: {doubles})"


def test_a_lock_whose_front_end_is_alive_is_not_taken(make_cfg, tmp_path):
    """A lock held by a live front-end (this process) refuses the next start; once released it is free."""
    cfg = make_cfg()
    (tmp_path / "work").mkdir()
    first = RunLock(cfg, RunPaths(tmp_path))
    first.acquire()
    with pytest.raises(RunError, match="is in use by the orchestrator front-end"):
        RunLock(cfg, RunPaths(tmp_path)).acquire()
    first.release(keep_for_jobs=False)
    RunLock(cfg, RunPaths(tmp_path)).acquire()


def test_a_takeover_gate_left_by_a_start_that_died_does_not_block_the_takeover(make_cfg, tmp_path):
    """A start killed while it held the gate of a stale lock's takeover leaves the gate behind; once it is
    older than a takeover can take, the next start removes it and takes the lock over."""
    cfg = make_cfg()
    work = tmp_path / "work"
    work.mkdir()
    stale = json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "cluster": cfg.cluster.name, "jobs": []})
    (work / "frontend.json").write_text(stale)
    gate = work / f".frontend.takeover-{runlock.hashlib.sha256(stale.encode()).hexdigest()[:16]}"
    gate.write_text("{}")
    aged = runlock.time.time() - 2 * runlock.TAKEOVER_S
    runlock.os.utime(gate, (aged, aged))
    lock = RunLock(cfg, RunPaths(tmp_path))
    lock.acquire()
    assert lock.held and json.loads((work / "frontend.json").read_text())["nonce"] == lock.record["nonce"]
    assert sorted(p.name for p in work.iterdir()) == ["frontend.json"]


@pytest.mark.parametrize("content", [b"", b"{\"host\": \"n1\", \"pi", b"[1, 2]", b"{\"jobs\": []}"],
                         ids=["empty", "cut", "not-an-object", "no-host-or-pid"])
def test_a_garbled_lock_is_named_with_the_fix(make_cfg, tmp_path, content):
    """A lock file that is not a front-end's record (hand-edited, cut by a full disk) cannot be judged live
    or gone: the start is refused naming the file and the fix, not with "pid None on None", and the file is
    left as it was (issue 19, item 12)."""
    cfg = make_cfg()
    work = tmp_path / "work"
    work.mkdir()
    (work / "frontend.json").write_bytes(content)
    with pytest.raises(RunError) as err:
        RunLock(cfg, RunPaths(tmp_path)).acquire()
    message = str(err.value)
    assert f"the lock file {work / 'frontend.json'} is unreadable" in message
    assert f"delete {work / 'frontend.json'} and start again" in message and "None" not in message
    assert (work / "frontend.json").read_bytes() == content
