"""Lose only what is in flight (issue 11): rows answered in a unit that is not committed yet survive a
kill -9, a torn journal and a graceful stop; a rerun asks the engine only for the rows it lacks.

The engine here counts, per input row, how often it was asked (the row's number is in its prompt); it
runs in this process, so it outlives the killed job and counts across the kill and the rerun."""
import asyncio
import collections
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import fsops
from orchestrator.client import Client
from orchestrator.commits import write_retry_units
from orchestrator.config import compose
from orchestrator.journal import Journals, header, journal_name, parse, settings_digest
from orchestrator.preflight import prepare
from orchestrator.rundir import RunPaths
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.engine import _Engine
from orchestrator.simulator.model import EngineSettings
from tests.conftest import committed, journaled, kill_jobs_when, write_prompts

EXE = shutil.which("orchestrator")
ROWS, UNIT, BATCH, IN_FLIGHT = 600, 100, 10, 2
BOUND = IN_FLIGHT * BATCH  # prompts in flight at once: what a kill may cost at most
ARGS = ["engine=endpoint", "engine.protocol=nemo", f"data.unit_rows={UNIT}", f"client.batch_size={BATCH}",
        f"client.max_in_flight={IN_FLIGHT}", "sampling.tokens_to_generate=6", "engine.ready_timeout_s=30"]
QUESTION = re.compile(r"Question number (\d+):")


@pytest.fixture
def counting_engine(monkeypatch):
    """(url, asked): the embedded engine (NeMo route, 50 ms a request), counting how often each row was asked."""
    asked: collections.Counter = collections.Counter()
    generate = _Engine.generate

    async def counted(self, request):
        body = await request.json()
        for sentence in body.get("sentences") or []:
            found = QUESTION.search(sentence)
            if found:
                asked[int(found.group(1))] += 1
        return await generate(self, request)

    monkeypatch.setattr(_Engine, "generate", counted)
    with EngineThread(EngineSettings(request_latency_s=0.05)) as engine:
        yield engine.url, asked


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The input, and its results from a run nothing interrupted (the same client, in this process)."""
    base = tmp_path_factory.mktemp("base")
    src = write_prompts(base / "in.parquet", ROWS)
    with EngineThread(EngineSettings()) as engine:
        cfg = compose([*ARGS, f"engine.url={engine.url}", f"data.input={src}", f"run_dir={base / 'run'}"])
        plan, paths = prepare(cfg)
        asyncio.run(Client(cfg, plan, paths, engine.url, "a1", "r0").run())
    return src, answers(base / "run")


def cli(*args, timeout=120):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def answers(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results").sort_values("id").reset_index(drop=True)


def start_and_stop(args: list[str], run_dir: Path, units: int, records: int, sig=signal.SIGKILL) -> int:
    """Start a run, wait for `units` commits and `records` journal records of the unit after them, then send
    sig to the job. Returns the number of units committed before the rerun."""
    first = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # SIGKILL: the whole machine, front-end included (it would take submitit's ~15 s to notice)
    kill_jobs_when(first, run_dir, lambda: committed(run_dir) >= units and len(journaled(run_dir)) >= records,
                   sig, front_end=sig == signal.SIGKILL)
    assert first.returncode != 0
    return committed(run_dir)


def assert_same_results(run_dir: Path, expected: pd.DataFrame) -> None:
    got = answers(run_dir)
    assert list(got["id"]) == list(expected["id"])  # every id, exactly once
    assert list(got["response"]) == list(expected["response"])  # and no answer differs
    assert (got["status"] == "ok").all()
    assert not list((run_dir / "work" / "journal").glob("*.jsonl"))  # removed with their commits


def test_kill_9_at_several_moments_then_rerun_asks_again_only_what_was_in_flight(tmp_path, uninterrupted,
                                                                                 counting_engine):
    """kill -9 of the job inside the first unit, mid-run (then the journal's last record is torn, as a kill
    in the middle of a write leaves it) and late; each rerun replays the journals. The engine shows every
    row answered at most once more than needed, and no more extra rows than were in flight at the kills."""
    src, expected = uninterrupted
    url, asked = counting_engine
    run_dir = tmp_path / "run"
    args = ["run", *ARGS, f"engine.url={url}", f"data.input={src}", f"run_dir={run_dir}"]

    def extra() -> int:  # asks beyond the first of each row
        return sum(asked.values()) - len(asked)

    allowed = 0
    for kills, (units, records) in enumerate([(0, 3), (2, 1), (4, 6)], start=1):
        done_before = start_and_stop(args, run_dir, units, records)
        in_journal = journaled(run_dir)
        assert done_before < ROWS // UNIT and len(in_journal) >= records  # killed inside a unit, with answered rows
        assert extra() <= allowed  # the rerun just killed asked again only what the kill before had in flight
        allowed += BOUND
        if kills == 2:  # the last record cut in the middle: dropped, so its rows are asked again
            (journal,) = [p for p in (run_dir / "work" / "journal").glob("*.jsonl")
                          if not (run_dir / "results" / f"part-{int(p.name[:8]):08d}.parquet").exists()]
            data = journal.read_bytes()
            last = data.rstrip(b"\n").rfind(b"\n") + 1
            torn = [int(ident[1:]) for ident in json.loads(data[last:])["id"]]
            journal.write_bytes(data[:last + (len(data) - last) // 2])
            allowed += len(torn)
    kept = sum(len(record["i"]) for record in journaled(run_dir))
    final = cli(*args)
    assert final.returncode == 0, final.stderr
    assert_same_results(run_dir, expected)
    assert set(asked) == set(range(ROWS))
    assert max(asked.values()) <= 2  # a row is answered at most once more than needed...
    assert extra() <= allowed  # ...and only the rows in flight at a kill (and those of the torn record) are
    assert [asked[i] for i in torn] == [2] * len(torn)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["journal_rows"] == kept  # what the last kill left in the journals was not asked again


def test_a_graceful_stop_keeps_the_answered_rows_of_its_unfinished_unit(tmp_path, uninterrupted, counting_engine):
    """SIGTERM (preemption, scancel, orchestrator cancel): in-flight requests finish within client.grace_s
    and are journaled with the rest, so the resume asks the engine for no row twice."""
    src, expected = uninterrupted
    url, asked = counting_engine
    run_dir = tmp_path / "run"
    args = ["run", *ARGS, f"engine.url={url}", f"data.input={src}", f"run_dir={run_dir}"]
    start_and_stop(args, run_dir, 1, 3, sig=signal.SIGTERM)
    assert "the rows answered in its unfinished units are kept in their journals" in (run_dir / "run.log").read_text()
    kept = sum(len(record["i"]) for record in journaled(run_dir))
    assert kept >= 3 * BATCH
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert_same_results(run_dir, expected)
    assert sorted(asked.values()) == [1] * ROWS  # nothing asked twice
    assert json.loads((run_dir / "summary.json").read_text())["journal_rows"] == kept


def run_client(cfg, url: str, attempt: str = "a1", owner: str = "r0"):
    plan, paths = prepare(cfg)
    stats = asyncio.run(Client(cfg, plan, paths, url, attempt, owner).run())
    return paths, stats


def journal_file(paths: RunPaths, unit: int, owner: str, rows: list, digest: str | None = None,
                 unit_rows: int = 10, attempt: str = "a0") -> Path:
    path = paths.root / "work" / "journal" / journal_name(unit, owner)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = digest or settings_digest(paths)
    path.write_bytes(header(digest, unit, unit_rows, owner) + json.dumps({"attempt": attempt}).encode() + b"\n" +
                     json.dumps(record(rows)).encode() + b"\n")
    return path


def record(rows: list) -> dict:
    """A journal record (columns) of rows given as [i, id, status, response, error, tokens, latency, attempts,
    blamed]."""
    names = ("i", "id", "status", "response", "error", "tokens", "latency", "attempts")
    out = {name: [row[k] for row in rows] for k, name in enumerate(names)}
    out["blamed"] = [row[0] for row in rows if row[8]]
    return out


def test_replay_takes_only_rows_whose_id_matches_and_keeps_journaled_errors(tmp_path, counting_engine):
    """Another replica's journal of unit 0 (it was killed): a row whose id matches is taken as it is, an
    error stays that error, a row whose id does not match is asked. A journal of other settings is
    ignored and removed."""
    url, asked = counting_engine
    src = write_prompts(tmp_path / "in.parquet", 20)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.unit_rows=10", "client.batch_size=5",
                   "sampling.tokens_to_generate=4"])
    _, paths = prepare(cfg)
    journal_file(paths, 0, "r7", [[0, "q0", "ok", "from the journal", None, 3, 0.5, 1, 0],
                                  [1, "q1", "error", None, "gave up after 5 attempts: HTTP 500", None, 9.0, 5, 1],
                                  [2, "not-q2", "ok", "another row's answer", None, 3, 0.5, 1, 0]])
    foreign = journal_file(paths, 1, "r7", [[0, "q10", "ok", "other settings", None, 3, 0.5, 1, 0]],
                           digest="0" * 16)
    paths, stats = run_client(cfg, url)
    df = pd.read_parquet(paths.results).set_index("id")
    assert df.loc["q0", "response"] == "from the journal" and df.loc["q0", "latency_s"] == 0.5
    assert df.loc["q1", "status"] == "error" and df.loc["q1", "error"] == "gave up after 5 attempts: HTTP 500"
    assert df.loc["q2", "response"] != "another row's answer" and df.loc["q2", "status"] == "ok"
    assert df.loc["q10", "response"] != "other settings"
    assert sorted(asked) == [i for i in range(20) if i not in (0, 1)] and max(asked.values()) == 1
    assert stats.journal_rows == 2 and stats.rows.retryable == 1  # the replayed error is still the engine's fault
    assert not foreign.exists() and not list((paths.root / "work" / "journal").iterdir())


def test_a_retried_unit_redoes_the_errors_of_an_earlier_journal_and_keeps_its_answers(tmp_path, counting_engine):
    """retry_failed=true on a committed unit whose journal was left behind (by a retry that was killed, or
    a crash between a commit and the journal's removal): the journal's errors are the ones being retried,
    so they are asked again; its answers are kept. The journal of a committed unit that this attempt does
    not retry is removed when a replica starts, never replayed."""
    url, asked = counting_engine
    src = write_prompts(tmp_path / "in.parquet", 20)
    base = [f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.unit_rows=10", "sampling.tokens_to_generate=4",
            "client.max_retries=0"]
    with EngineThread(EngineSettings(error_rate=1.0)) as failing:  # every request answered HTTP 500
        paths, _ = run_client(compose(base), failing.url)
    assert (pd.read_parquet(paths.results)["status"] == "error").all()
    asked.clear()
    cfg = compose(base + ["retry_failed=true"])
    plan, paths = prepare(cfg)
    left = journal_file(paths, 0, "r0", [[3, "q3", "error", None, "gave up after 1 attempts: HTTP 500", None, 0.1, 1,
                                          1], [5, "q5", "ok", "from the retry", None, 2, 0.1, 1, 0]], attempt="a1")
    stale = journal_file(paths, 1, "r5", [[3, "q13", "ok", "not retried now", None, 2, 0.1, 1, 0]], attempt="a1")
    write_retry_units(paths, "a2", [0])  # unit 1 is not retried in this attempt
    stats = asyncio.run(Client(cfg, plan, paths, url, "a2", "r0").run())
    df = pd.read_parquet(paths.results).set_index("id")
    assert (df.loc[[f"q{i}" for i in range(10)], "status"] == "ok").all()
    assert df.loc["q5", "response"] == "from the retry" and df.loc["q3", "response"].startswith("[simulated]")
    assert (df.loc[[f"q{i}" for i in range(10, 20)], "status"] == "error").all()
    assert sorted(asked) == [0, 1, 2, 3, 4, 6, 7, 8, 9] and max(asked.values()) == 1
    assert stats.journal_rows == 1
    assert not stale.exists() and not left.exists()


def test_a_conversation_is_journaled_once_its_last_turn_is_answered_and_replayed_whole(tmp_path, counting_engine):
    """data.turns_column: a row goes to the journal after its last turn, with every turn's answer (the rows
    that complete the unit go straight to its commit); a rerun of the unit asks only for the others, and
    commits the same answers."""
    url, asked = counting_engine
    src = tmp_path / "in.parquet"
    turns = [[f"Question number {i}: pick a word.", "Why that one?"] for i in range(6)]
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(6)], "turns": turns}), src)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.turns_column=turns", "data.unit_rows=6",
                   "client.batch_size=2", "sampling.tokens_to_generate=4"])
    with pytest.MonkeyPatch.context() as patch:  # the journal stays after the commit, to be read here
        patch.setattr(Journals, "remove", staticmethod(lambda journal, others: journal and journal.close()))
        paths, _ = run_client(cfg, url)
    first = pd.read_parquet(paths.results)
    (journal,) = (paths.root / "work" / "journal").glob("*.jsonl")
    records = [r for r in map(json.loads, journal.read_bytes().splitlines()) if isinstance(r.get("i"), list)]
    journaled = [i for r in records for i in r["i"]]
    assert len(journaled) == len(set(journaled)) >= 4  # each row once, when it is complete: not per turn
    assert all(len(turns) == 2 and last == turns[-1]  # with every turn's answer
               for r in records for last, turns in zip(r["response"], r["responses"]))
    assert sorted(asked.values()) == [2] * 6  # two turns a row
    shutil.rmtree(paths.results)  # as if the unit had never been committed
    shutil.rmtree(paths.root / "work" / "ledger")
    paths, stats = run_client(cfg, url, attempt="a2")
    again = pd.read_parquet(paths.results)
    assert stats.journal_rows == len(journaled)
    assert dict(asked) == {i: 2 if i in journaled else 4 for i in range(6)}  # only the others asked again
    assert again["responses"].map(list).tolist() == first["responses"].map(list).tolist()
    assert again["response"].tolist() == first["response"].tolist() and again["id"].tolist() == first["id"].tolist()
    assert not journal.exists()


def test_parse_drops_a_torn_last_record_and_an_append_after_it_starts_a_whole_line(tmp_path):
    paths = RunPaths(tmp_path)
    journals = Journals(paths, "r0", "a1", "d" * 16)
    journal, entries, _ = journals.start(4, 10)
    assert entries == {}
    journal.append(record([[0, "q0", "ok", "zero", None, 1, 0.1, 1, 0], [1, "q1", "ok", "one", None, 1, 0.1, 1, 0]]))
    journal.append(record([[2, "q2", "ok", "two", None, 1, 0.1, 1, 0]]))
    journal.close()
    data = journal.path.read_bytes()
    journal.path.write_bytes(data[:-7])  # the kill cut the last record
    got, end = parse(journal.path.read_bytes(), "d" * 16, 4, 10)
    assert sorted(got) == [0, 1] and end == data.rstrip(b"\n").rfind(b"\n") + 1
    fsops.COUNTS.clear()
    again, entries, _ = Journals(paths, "r0", "a2", "d" * 16).start(4, 10)
    assert fsops.COUNTS == {"open": 1}  # one open per unit: no listing, no create beside it
    assert sorted(entries) == [0, 1] and entries[1].response == "one" and entries[1].attempt == "a1"
    again.append(record([[2, "q2", "ok", "two again", None, 1, 0.1, 1, 0]]))
    again.close()
    got, end = parse(again.path.read_bytes(), "d" * 16, 4, 10)
    assert sorted(got) == [0, 1, 2] and got[2].response == "two again" and got[2].attempt == "a2"
    assert end == len(again.path.read_bytes())
    assert parse(again.path.read_bytes(), "e" * 16, 4, 10)[0] is None  # other settings: not this run's
    assert parse(again.path.read_bytes(), "d" * 16, 5, 10)[0] is None  # another unit's
    fresh, entries, _ = Journals(paths, "r0", "a3", "e" * 16).start(4, 10)  # its own, of other settings: restarted
    fresh.close()
    assert entries == {} and parse(fresh.path.read_bytes(), "e" * 16, 4, 10)[0] == {}


@pytest.mark.parametrize("bad", [{"blamed": 5}, {"blamed": [[0]]}, {"id": ["q0"]}, {"status": ["ok", "maybe"]},
                                 {"i": "01"}, {"responses": "x"}])
def test_parse_skips_a_record_whose_columns_are_malformed_and_keeps_the_others(bad):
    """A record that does not line up (a column of another length or type, blamed not a list of row numbers)
    is skipped whole; a row with an unknown status is skipped alone; the records around it are replayed."""
    good = record([[0, "q0", "ok", "zero", None, 1, 0.1, 1, 0], [1, "q1", "error", None, "boom", None, 0.1, 2, 1]])
    data = header("d" * 16, 4, 10, "r0") + b"".join(
        json.dumps(r).encode() + b"\n"
        for r in (good, {**record([[2, "q2", "ok", "two", None, 1, 0.1, 1, 0],
                                   [3, "q3", "ok", "three", None, 1, 0.1, 1, 0]]), **bad},
                  record([[4, "q4", "ok", "four", None, 1, 0.1, 1, 0]])))
    got, end = parse(data, "d" * 16, 4, 10)
    assert end == len(data)
    assert got[1].status == "error" and got[1].blamed and not got[0].blamed and got[4].response == "four"
    expected = {0, 1, 2, 4} if "status" in bad else {0, 1, 4}  # only the row whose status is unknown is dropped
    assert set(got) == expected


@pytest.mark.parametrize("bad", [{"response": [42, "two"]}, {"error": [None, 7]}, {"tokens": ["3", 1]},
                                 {"latency": [[], 0.1]}, {"attempts": [True, 1]}, {"responses": [["a", 5], None]},
                                 {"i": [True, 2]}])
def test_a_record_of_the_wrong_type_is_skipped_counted_and_its_rows_asked_again(tmp_path, counting_engine, caplog,
                                                                                 bad):
    """A well-formed journal record whose fields have the wrong type (a number as the response) would make
    every rerun of the unit fail building its commit: its rows are skipped on replay, counted and logged,
    and asked again; the rows of the records around it are replayed."""
    url, asked = counting_engine
    src = write_prompts(tmp_path / "in.parquet", 20)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.unit_rows=10", "client.batch_size=5",
                   "sampling.tokens_to_generate=4"])
    _, paths = prepare(cfg)
    path = journal_file(paths, 0, "r7", [[0, "q0", "ok", "from the journal", None, 3, 0.5, 1, 0]])
    wrong = {**record([[1, "q1", "ok", "one", None, 3, 0.5, 1, 0], [2, "q2", "ok", "two", None, 3, 0.5, 1, 0]]),
             **bad}
    with path.open("ab") as fh:
        fh.write(json.dumps(wrong).encode() + b"\n" + b"{not json\n" +
                 json.dumps(record([[3, "q3", "ok", "three", None, 3, 0.5, 1, 0]])).encode() + b"\n")
    with caplog.at_level("WARNING", logger="orchestrator.journal"):
        paths, stats = run_client(cfg, url)
    df = pd.read_parquet(paths.results)
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(20))  # every row, exactly once
    assert (df["status"] == "ok").all()
    df = df.set_index("id")
    assert df.loc["q0", "response"] == "from the journal" and df.loc["q3", "response"] == "three"
    assert not df.loc[["q1", "q2"], "response"].isin(["one", "two"]).any()  # the wrong record's rows: asked again
    assert sorted(asked) == [i for i in range(20) if i not in (0, 3)] and max(asked.values()) == 1
    assert stats.journal_rows == 2
    warned = [r.getMessage() for r in caplog.records if "could not be replayed" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0] and "2 record(s)" in warned[0], caplog.text


def test_a_finished_run_keeps_no_journal_of_a_copy_killed_after_the_winner_replayed(tmp_path, counting_engine,
                                                                                    monkeypatch):
    """A backup copy of unit 1 starts journaling after the holder replayed that unit's journals, and is killed
    before it can remove its own: the holder's commit removes only what it replayed. Once the run is complete
    no journal can be replayed, so none is left, and run.log says how many went (issue 19, item 12)."""
    from orchestrator.node import NodeJob

    url, _ = counting_engine
    src = write_prompts(tmp_path / "in.parquet", 300)
    cfg = compose([*ARGS, f"engine.url={url}", f"data.input={src}", f"run_dir={tmp_path / 'run'}"])
    plan, paths = prepare(cfg)
    start, planted = Journals.start, []

    def a_copy_begins_after_the_replay(self, unit, rows):
        got = start(self, unit, rows)
        if unit == 1 and not planted:
            path = self.folder / journal_name(1, "r7")
            path.write_bytes(header(self.digest, 1, rows, "r7"))
            planted.append(path)
        return got

    monkeypatch.setattr(Journals, "start", a_copy_begins_after_the_replay)
    summary = NodeJob(cfg, str(paths.root), "20261203-000000-abcdef", time.time(), 0).run_node0()
    assert summary["complete"] and summary["committed"] == 300 and planted
    assert not list((tmp_path / "run" / "work" / "journal").glob("*.jsonl"))
    assert "removed 1 journal(s) left by stopped copies" in (tmp_path / "run" / "run.log").read_text()
