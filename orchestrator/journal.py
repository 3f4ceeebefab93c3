"""Per-row durability inside a unit of work: a journal beside each unit that is not committed yet.

A unit commits whole (`commits.commit_unit`: one Parquet file, published by a link), so readers of
`results/` never see part of one. Until it commits, every row of it that has an outcome (an answer,
or the error it would be committed with; a conversation once its last turn is answered) is appended
to `work/journal/<unit>.<owner>.jsonl` as soon as its request is answered: one write on a file held
open (no metadata operation), the answers of one turn of the client's event loop together, and always
before the worker that got them sends its next request. So a
killed process (`kill -9`, the OOM killer) loses only the requests in flight: what was written is in
the operating system's page cache. Each journal is fsynced every `client.journal_sync_s` seconds and
when the client stops, so a node crash loses at most that window on top. When a unit is claimed
again (a rerun after a crash, a requeued job, a backup copy, a takeover), every journal of it is
replayed into it and only the rows they lack are sent. The journals of a unit are removed once it
commits.

Format, JSON lines:

    {"journal": 1, "settings": D, "unit": U, "rows": N, "owner": O}   the first line, written once
    {"attempt": A}                                                     each time a client opens it
    {"i": [...], "id": [...], "response": [...], "tokens": [...], "latency": [...], "attempts": [...]}
        the rows answered since the last record, a list per column, one item per row; a record with a
        failed row also has "status", "error" and "blamed" (the failed rows the engine is to blame for),
        one of a multi-turn unit "responses" (every turn's answer), and one where the engine said how its
        answers ended "finish", "stop", "ptokens" and "reasoning" (finish_reason, the end string,
        prompt_tokens, the reasoning text), and with sampling.logprobs "logprobs" and "top"; with a JSON
        schema, "sretries" (the re-asks each row took) and "seed" (the kept answer's seed) when any is set

A row is its index in the unit (`i`), checked against its id when replayed. Columns, not a list per
row: the record of 128 answers is encoded in about half the time. The last line without its
newline (a write cut by the kill) is dropped, and cut off before the next append; a line that does
not parse, or a record whose fields have the wrong type (a number as the response), is skipped:
counted, logged, and its rows asked again. D is a digest of the run's `fingerprint.json` (the settings
that decide the answers): a journal of other settings, another unit or another row count is ignored and removed.

Metadata operations per unit: one open when it is claimed and one unlink when it commits. Other
replicas' journals are found by one listing when a replica starts and one per claim it makes once no
unit is free (backup copies, takeovers); each costs one open, only for the units that have one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from . import fsops
from .rundir import RunPaths

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".jsonl"


class Details(NamedTuple):
    """What the engine said about an answer beyond its text: the result columns finish_reason, stop,
    prompt_tokens and reasoning."""

    finish_reason: str | None = None
    stop: str | None = None
    prompt_tokens: int | None = None
    reasoning: str | None = None
    token_logprobs: list | None = None  # sampling.logprobs: a logprob per output token
    top_logprobs: list | None = None  # and per token its K best alternatives, [{token, logprob}, ...]


DETAILS = Details._fields  # their result columns
NO_DETAILS = Details()
_DETAIL_KEYS = ("finish", "stop", "ptokens", "reasoning", "logprobs", "top")  # their journal keys


@dataclass
class Entry:
    """One row's outcome as a journal holds it."""

    id: object
    status: str  # "ok" or "error"
    response: str | None
    error: str | None
    output_tokens: int | None
    latency_s: float | None
    attempts: int
    blamed: bool  # a failed row the engine is to blame for (retry_failed=true redoes it)
    responses: list | None  # every turn's answer (data.turns_column)
    attempt: str | None  # the attempt of the run that journaled it
    details: Details = NO_DETAILS
    schema_retries: int = 0  # structured answers: re-asks of an answer that did not match its schema
    seed: int | None = None  # the seed the kept answer was asked with (None: the config's)


def folder(paths: RunPaths) -> Path:
    return paths.root / "work" / "journal"


def journal_name(unit: int, owner: str) -> str:
    return f"{unit:08d}.{owner}{SUFFIX}"


def parse_name(name: str) -> tuple[int, str] | None:
    """(unit, owner) of a journal's file name; None for anything else."""
    if not name.endswith(SUFFIX):
        return None
    unit, _, owner = name[:-len(SUFFIX)].partition(".")
    if not unit.isdigit() or not owner:
        return None
    return int(unit), owner


def settings_digest(paths: RunPaths, fallback: Callable[[], str] = str) -> str:
    """A digest of the run's settings fingerprint (`<run_dir>/fingerprint.json`, published once at the
    first start; a resume is checked against it before anything runs); of fallback() where there is none."""
    data = fsops.read_bytes(paths.root / "fingerprint.json")
    return hashlib.sha256(data if data else fallback().encode()).hexdigest()[:16]


def header(digest: str, unit: int, rows: int, owner: str) -> bytes:
    return _line({"journal": FORMAT, "settings": digest, "unit": unit, "rows": rows, "owner": owner,
                  "at": round(time.time(), 3)})


def _line(record: dict) -> bytes:
    # ASCII JSON: a lone surrogate in an answer cannot break the encoding
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _int(value, top: int) -> bool:
    """A whole number in [0, top) (JSON true/false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < top


def _text(value) -> bool:
    return value is None or isinstance(value, str)


def _typed(response, error, tokens, latency, attempts, responses) -> bool:
    """Whether a row's fields have the types its commit stores them as (a number as the response would
    make building the unit's Parquet file fail on every rerun)."""
    return _text(response) and _text(error) and (tokens is None or _int(tokens, 2 ** 63)) and \
        (latency is None or isinstance(latency, (int, float)) and not isinstance(latency, bool)) and \
        _int(attempts, 2 ** 31) and (responses is None or isinstance(responses, list) and all(map(_text, responses)))


def _entries(record: dict, rows: int, attempt) -> list[tuple[int, Entry]] | None:
    """The rows of one record; None for a record skipped whole: its columns do not line up, or a field of
    one of its rows has the wrong type (its rows are asked again)."""
    index = record.get("i")
    if not isinstance(index, list):
        return None
    n = len(index)
    names = ("id", "response", "tokens", "latency", "attempts")
    columns = [record.get(name) for name in names]
    status, error, responses = record.get("status"), record.get("error"), record.get("responses")
    details = [record.get(key) for key in _DETAIL_KEYS]
    retries, seeds = record.get("sretries"), record.get("seed")  # structured answers (absent: 0 and None)
    if any(not isinstance(c, list) or len(c) != n for c in columns) or \
            any(c is not None and (not isinstance(c, list) or len(c) != n)
                for c in (status, error, responses, retries, seeds, *details)):
        return None
    try:
        blamed = set(record.get("blamed") or ())
    except TypeError:  # not a list of row numbers
        return None
    attempt = attempt if isinstance(attempt, str) else None
    found = []
    for k, (i, ident, response, tokens, latency, attempts) in enumerate(zip(index, *columns)):
        state = status[k] if status is not None else "ok"
        turns = responses[k] if responses is not None else None
        message = error[k] if error is not None else None
        said = Details(*(c[k] if c is not None else None for c in details))
        retried = retries[k] if retries is not None else 0
        seed = seeds[k] if seeds is not None else None
        if not _int(i, 2 ** 63) or not _typed(response, message, tokens, latency, attempts, turns) or \
                not (_text(said.finish_reason) and _text(said.stop) and _text(said.reasoning) and
                     (said.prompt_tokens is None or _int(said.prompt_tokens, 2 ** 63)) and
                     all(v is None or isinstance(v, list) for v in (said.token_logprobs, said.top_logprobs))) or \
                not _int(retried, 2 ** 31) or not (seed is None or _int(seed, 2 ** 63)):
            return None
        if i >= rows or state not in ("ok", "error"):
            continue
        found.append((i, Entry(ident, state, response, message, tokens, latency, attempts, i in blamed, turns,
                               attempt, said, retried, seed)))
    return found


def parse_counted(data: bytes, digest: str, unit: int, rows: int) -> tuple[dict[int, Entry] | None, int, int]:
    """parse(), and how many records in the middle were skipped: a line that does not parse (damaged by a
    node crash) or a record whose columns do not line up or whose fields have the wrong type."""
    end = data.rfind(b"\n") + 1  # what follows the last newline is a record cut by a kill: dropped
    lines = data[:end].split(b"\n")[:-1]
    try:
        first = json.loads(lines[0]) if lines else None
    except ValueError:
        first = None
    if not isinstance(first, dict) or first.get("journal") != FORMAT or first.get("settings") != digest \
            or first.get("unit") != unit or first.get("rows") != rows:
        return None, end, 0
    entries: dict[int, Entry] = {}
    attempt = None
    skipped = 0
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:  # damaged in the middle (a node crash can leave zeros): skipped
            skipped += 1
            continue
        if not isinstance(record, dict):
            skipped += 1
            continue
        if "attempt" in record:
            attempt = record["attempt"]
            continue
        found = _entries(record, rows, attempt)
        if found is None:
            skipped += 1
            continue
        entries.update(found)
    return entries, end, skipped


def parse(data: bytes, digest: str, unit: int, rows: int) -> tuple[dict[int, Entry] | None, int]:
    """A journal's rows (the last record of a row wins), and the length of its whole lines. None when it
    is not this unit's under these settings (or its first line never made it to the file)."""
    entries, end, _ = parse_counted(data, digest, unit, rows)
    return entries, end


class UnitJournal:
    """One unit's journal, open for appends by this replica. append() runs on the client's event loop;
    sync() and close() may run in a worker thread."""

    def __init__(self, path: Path, fh):
        self.path, self.fh = path, fh
        self.unsynced = False
        self.closed = False
        self.lock = threading.Lock()

    def append(self, record: dict) -> None:
        """One write (the rows of one or more answered requests, as columns), handed to the OS at once."""
        self.fh.write(_line(record))
        self.fh.flush()
        self.unsynced = True

    def sync(self) -> None:
        with self.lock:
            if self.closed or not self.unsynced:
                return
            self.unsynced = False
            os.fsync(self.fh.fileno())

    def close(self, sync: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                if sync and self.unsynced:
                    os.fsync(self.fh.fileno())
            finally:
                self.fh.close()


def remove_leftovers(paths: RunPaths) -> int:
    """Once every unit is committed, no journal can be replayed: those left by copies stopped before they
    could remove theirs (a backup killed after the winner replayed and committed) go. One listing; how many."""
    removed = 0
    for name in fsops.listdir(folder(paths)):
        if parse_name(name) is not None:
            fsops.unlink(folder(paths) / name)
            removed += 1
    return removed


class Journals:
    """This replica's journals, and what it knows of the others' (unit -> owners, from a listing)."""

    def __init__(self, paths: RunPaths, owner: str, attempt: str, digest: str):
        self.folder = folder(paths)
        self.owner, self.attempt, self.digest = owner, attempt, digest
        self.found: dict[int, set[str]] = {}
        self.open: set[UnitJournal] = set()  # changed on the client's event loop only
        self.skipped = 0  # journal records that could not be replayed (see parse_counted)

    def scan(self, stale: Callable[[int], bool] | None = None) -> int:
        """One listing: which units have journals. Those of units `stale` says are done (committed and not
        redone) are removed; how many were."""
        found: dict[int, set[str]] = {}
        removed = 0
        for name in fsops.listdir(self.folder):
            parsed = parse_name(name)
            if parsed is None:
                continue
            unit, owner = parsed
            if stale is not None and stale(unit):
                fsops.unlink(self.folder / name)
                removed += 1
                continue
            found.setdefault(unit, set()).add(owner)
        self.found = found
        return removed

    def start(self, unit: int, rows: int) -> tuple[UnitJournal | None, dict[int, Entry], list[Path]]:
        """Replay every journal of a unit just claimed and open this replica's own for appends (blocking:
        run it in a thread). Returns the open journal (None when it cannot be written: the unit runs
        without one), the rows replayed (this replica's own journal wins) and the other owners' journals
        replayed, which are removed when the unit commits."""
        entries: dict[int, Entry] = {}
        others: list[Path] = []
        for owner in sorted(self.found.get(unit, ())):
            if owner == self.owner:
                continue
            path = self.folder / journal_name(unit, owner)
            data = fsops.read_bytes(path)
            if data is None:
                continue
            got, _, skipped = parse_counted(data, self.digest, unit, rows)
            self._skipped(path, skipped)
            if got is None:  # another run's settings (or unit): never mixed in
                fsops.unlink(path)
                continue
            entries.update(got)
            others.append(path)
        try:
            journal, own = self._open_own(unit, rows)
        except OSError as exc:
            log.warning("cannot write the journal of unit %d in %s (%s); the unit runs without one (a crash "
                        "before its commit redoes it whole)", unit, self.folder, exc.strerror or exc)
            return None, entries, others
        entries.update(own)
        return journal, entries, others

    def _open_own(self, unit: int, rows: int) -> tuple[UnitJournal, dict[int, Entry]]:
        path = self.folder / journal_name(unit, self.owner)
        try:
            fh = fsops.open_file(path, "a+b")
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            fh = fsops.open_file(path, "a+b")
        try:
            fh.seek(0)
            data = fh.read()
            entries, end, skipped = parse_counted(data, self.digest, unit, rows) if data else (None, 0, 0)
            self._skipped(path, skipped)
            if entries is None:  # new, or another run's: start it afresh
                fh.truncate(0)
                fh.write(header(self.digest, unit, rows, self.owner))
                entries = {}
            elif end < len(data):  # a record cut by a kill: gone, so the next append starts a whole line
                fh.truncate(end)
            fh.write(_line({"attempt": self.attempt}))
            fh.flush()
        except BaseException:
            fh.close()
            raise
        return UnitJournal(path, fh), entries

    def _skipped(self, path: Path, skipped: int) -> None:
        """Count and log the records of a journal that could not be replayed (their rows are asked again)."""
        if skipped:
            self.skipped += skipped
            log.warning("%d record(s) of the journal %s could not be replayed (damaged, or fields of the wrong "
                        "type); their rows are asked again", skipped, path)

    @staticmethod
    def remove(journal: UnitJournal | None, others: list[Path]) -> None:
        """The unit is committed (by this replica or another copy): its journals go (blocking)."""
        if journal is not None:
            journal.close()
            fsops.unlink(journal.path)
        for path in others:
            fsops.unlink(path)

    @staticmethod
    def sync(journals: list[UnitJournal]) -> None:
        for journal in journals:
            try:
                journal.sync()
            except OSError as exc:
                log.warning("fsync of %s failed (%s)", journal.path, exc.strerror or exc)

    def close_all(self, sync: bool = True) -> None:
        """The client stops: what its journals hold stays for the next run of their units (fsynced first)."""
        journals, self.open = list(self.open), set()
        for journal in journals:
            try:
                journal.close(sync)
            except OSError as exc:
                log.warning("closing %s failed (%s)", journal.path, exc.strerror or exc)
