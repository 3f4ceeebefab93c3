"""A run reading another run's results as they commit (data.follow, orchestrator/follow.py): claims gated on
the upstream's commits, a plan of one unit per upstream unit made before the upstream ends, exactly once, the
end when the upstream ends without committing everything, and clear refusals."""
import os
import threading
import time

import pandas as pd
import pyarrow as pa
import pytest

from orchestrator import follow
from orchestrator.claims import WAIT, Claim, Scheduler
from orchestrator.commits import commit_unit
from orchestrator.config import compose
from orchestrator.errors import ConfigError, RunError
from orchestrator.frontend import run
from orchestrator.rundir import RunPaths
from tests.conftest import write_prompts

STATS = {"rows": 1, "ok": 1, "failed": 0, "output_tokens": 0, "units": 1}


class FakeGate:
    def __init__(self):
        self.committed, self.alive = set(), True

    def ready(self):
        return set(self.committed)

    def live(self):
        return self.alive


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def test_a_replica_claims_only_units_the_upstream_committed_and_waits_while_it_is_live(tmp_path):
    gate, clock = FakeGate(), Clock()
    paths = RunPaths(tmp_path)
    paths.make()
    gate.committed = {2}
    sched = Scheduler(paths, "a1", "r0", range(4), clock=clock, gate=gate, backups=1)
    assert sched.next() == Claim(2)
    assert sched.next() == WAIT and sched.poll_s <= Scheduler.UPSTREAM_POLL_S  # nothing else committed upstream
    commit_unit(paths, 2, pa.table({"x": [1]}), STATS, "r0")
    sched.release(2)
    gate.committed |= {0, 3}
    clock.now += 5
    got = {sched.next().unit, sched.next().unit}
    assert got == {0, 3}
    for unit in got:
        commit_unit(paths, unit, pa.table({"x": [1]}), STATS, "r0")
        sched.release(unit)
    clock.now += 5
    assert sched.next() == WAIT  # unit 1 is still to come: no backup copy of a unit nobody can run yet
    assert not any(".b" in name for name in os.listdir(paths.claims / "a1"))
    gate.alive = False  # the upstream ended without unit 1: it never comes, so this replica ends
    clock.now += 5
    assert sched.next() is None


def slow_run(src, root, *extra):
    return compose([f"data.input={src}", "engine=mock", "data.unit_rows=5", "sampling.rollouts=2",
                    "sampling.greedy=false", "engine.simulator.token_latency_s=0.01", "client.max_in_flight=2",
                    "sampling.tokens_to_generate=24", f"run_dir={root}", *extra])


def follower(up, root, *extra):
    return compose([f"data.follow={up}", "engine=mock", "data.prompt_template='Judge {{ response }}'",
                    "data.keep_columns=[rollout]", "data.duplicate_ids=keep", "sampling.tokens_to_generate=8",
                    f"run_dir={root}", *extra])


def in_thread(cfg):
    box = {}

    def target():
        try:
            box["summary"] = run(cfg, show_progress=False)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def commit_times(root):
    return [os.stat(p).st_mtime for p in (root / "results").glob("part-*.parquet")]


def test_a_follower_answers_every_upstream_answer_once_while_the_upstream_runs(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 40)
    up, down = tmp_path / "up", tmp_path / "down"
    down_cfg = follower(up, down)
    thread, box = in_thread(slow_run(src, up))
    summary = run(down_cfg, show_progress=False)
    thread.join(120)
    assert "error" not in box and box["summary"]["complete"] and summary["complete"]
    gen, judged = pd.read_parquet(up / "results"), pd.read_parquet(down / "results")
    assert len(judged) == len(gen) == 80 and not judged.duplicated(["id", "rollout"]).any()
    assert sorted(zip(judged.id, judged.rollout)) == sorted(zip(gen.id, gen.rollout))
    # one unit here per unit upstream, with the same rows
    for unit in range(8):
        a = pd.read_parquet(up / "results" / f"part-{unit:08d}.parquet")
        b = pd.read_parquet(down / "results" / f"part-{unit:08d}.parquet")
        assert list(zip(a.id, a.rollout)) == list(zip(b.id, b.rollout))
    assert min(commit_times(down)) < max(commit_times(up))  # streamed: judged before generation ended
    again = run(follower(up, down), show_progress=False)  # a rerun: nothing left, the same plan
    assert again["complete"] and len(pd.read_parquet(down / "results")) == 80


def test_a_follower_of_an_upstream_that_stops_early_consumes_what_it_committed_and_names_it(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 40)
    up, down = tmp_path / "up", tmp_path / "down"
    stop = threading.Event()
    box = {}
    up_cfg, down_cfg = slow_run(src, up), follower(up, down)  # Hydra composes in one thread only

    def upstream():
        try:
            run(up_cfg, show_progress=False, stop=stop)
        except RunError as exc:
            box["error"] = exc

    thread = threading.Thread(target=upstream, daemon=True)
    thread.start()
    results = up / "results"
    watcher = threading.Thread(target=lambda: (_wait_for(lambda: len(list(results.glob("part-*"))) >= 2),
                                               stop.set()), daemon=True)
    watcher.start()
    with pytest.raises(RunError) as caught:
        run(down_cfg, show_progress=False)
    thread.join(120)
    assert "interrupted" in str(box["error"])
    committed_up = {p.name for p in results.glob("part-*")}
    assert 2 <= len(committed_up) < 8
    assert {p.name for p in (down / "results").glob("part-*")} == committed_up  # all of it, and nothing else
    assert f"because the run it follows, {up.resolve()}, ended without committing them" in str(caught.value)


def _wait_for(condition, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_follower_of_a_run_that_never_starts_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(follow, "START_GRACE_S", 0.5)
    with pytest.raises(RunError, match="has not started, so there is nothing to read"):
        run(follower(tmp_path / "nothing", tmp_path / "down"), show_progress=False)


def test_follow_and_input_together_or_a_bad_share_are_refused():
    with pytest.raises(ConfigError, match="set one of them"):
        compose(["data.follow=/x", "data.input=/y"])
    with pytest.raises(ConfigError, match="data.follow_after"):
        compose(["data.follow=/x", "data.follow_after=1.5"])


def test_following_its_own_run_dir_is_refused(tmp_path):
    with pytest.raises(Exception, match="this run's own run_dir"):
        run(follower(tmp_path / "d", tmp_path / "d"), show_progress=False)


def test_a_row_that_failed_upstream_is_not_sent_and_is_counted(tmp_path):
    """A row whose answer failed upstream (here: its prompt is null) has nothing to judge: the follower does not
    send it, records it as FailedUpstream naming the upstream's error, and counts it; the other rows are judged."""
    prompts = [None if i in (3, 7) else f"Question {i}: what is {i} + {i}?" for i in range(10)]
    src = write_prompts(tmp_path / "in.parquet", 10, prompts=prompts)
    up, down = tmp_path / "up", tmp_path / "down"
    up_cfg, down_cfg = slow_run(src, up), follower(up, down)
    run(up_cfg, show_progress=False)
    gen = pd.read_parquet(up / "results")
    failed_up = gen[gen.status != "ok"]
    assert sorted(set(failed_up.id)) == ["q3", "q7"] and len(failed_up) == 4  # 2 rows x 2 rollouts
    summary = run(down_cfg, show_progress=False)
    judged = pd.read_parquet(down / "results").set_index(["id", "rollout"])
    assert len(judged) == len(gen) and summary["failed_upstream"] == 4 and summary["failed"] == 4
    for row in failed_up.itertuples():
        mine = judged.loc[(row.id, row.rollout)]
        assert mine.status == "error" and pd.isna(mine.response) and mine.attempts == 0
        assert mine.error == f"FailedUpstream: the row failed in {up.resolve()}, which this run follows: {row.error}"
    assert (judged.drop(index=[(r.id, r.rollout) for r in failed_up.itertuples()]).status == "ok").all()
    assert summary["retryable"] == 0  # not the engine's fault: retry_failed does not redo them
