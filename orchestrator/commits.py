"""The commit protocol: a unit is committed when its result file exists in results/ (written under work/tmp/ and
published whole by the run's sink, orchestrator.sinks: part-<unit>.parquet, or .jsonl with output.format=jsonl);
the ledgers, retry markers, progress records and the checked scan of what results/ holds."""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from . import fsops
from .plan import Plan, Units
from .rundir import RunPaths, atomic_write_text, write_error
from .sinks import sink_for, sink_of_file

log = logging.getLogger(__name__)


def done_units(paths: RunPaths) -> set[int]:
    """Units whose result file is committed (one directory listing), in the run's output.format."""
    try:
        return sink_for(paths).units_in(os.listdir(paths.results))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def write_retry_units(paths: RunPaths, attempt: str, units: list[int]) -> None:
    """retry_failed=true: the committed units whose error rows this attempt redoes, fixed by the front-end."""
    folder = paths.root / "work" / "retry"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{attempt}.json", json.dumps(sorted(units)))


def retry_units(paths: RunPaths, attempt: str) -> set[int]:
    try:
        return set(json.loads((paths.root / "work" / "retry" / f"{attempt}.json").read_text()))
    except FileNotFoundError:
        return set()


def _retried_marker(paths: RunPaths, attempt: str, unit: int) -> Path:
    return paths.root / "work" / "retry" / f"{attempt}.done" / f"{unit:08d}"


def mark_retried(paths: RunPaths, attempt: str, unit: int) -> None:
    marker = _retried_marker(paths, attempt, unit)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def retried_units(paths: RunPaths, attempt: str) -> set[int]:
    """The units retry_failed=true has redone in this attempt (one listing)."""
    return {int(name) for name in fsops.listdir(_retried_marker(paths, attempt, 0).parent) if name.isdigit()}


def retried(paths: RunPaths, attempt: str, unit: int) -> bool:
    return _retried_marker(paths, attempt, unit).exists()


def remaining_units(paths: RunPaths, plan: "Plan", attempt: str) -> int:
    """Units this attempt still has to commit: the uncommitted ones and, with retry_failed, the retried
    ones not yet redone."""
    done = done_units(paths)
    return sum(1 for u in range(len(plan.units)) if u not in done) + \
        sum(1 for u in retry_units(paths, attempt) if not retried(paths, attempt, u))


def kept_rows(paths: RunPaths, unit: int) -> dict | None:
    """A committed unit's columns (a retried unit keeps its ok rows); None when it cannot be read."""
    try:
        return sink_for(paths).read(unit).to_pydict()
    except (pa.ArrowException, OSError):
        return None


def is_committed(paths: RunPaths, unit: int) -> bool:
    return sink_for(paths).file(unit).exists()


class Ledger:
    """A replica's ledger, work/ledger/<owner>.jsonl: one line per unit it committed (its stats, the file's
    size and when), so totals and resume checks need no footer reads. Opened once, appended per commit."""

    def __init__(self, paths: RunPaths, owner: str):
        self.path = paths.root / "work" / "ledger" / f"{owner}.jsonl"
        self._fh = None

    def append(self, record: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = fsops.open_file(self.path, "a")
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


_ID_LIKE = re.compile(r"\b(?=[0-9a-fA-F-]*\d)[0-9a-fA-F]{6,}(?:-[0-9a-fA-F]{4,})*\b")
_NUMBER = re.compile(r"(?<!HTTP )(?<![\d.])\d+(?:\.\d+)?")
MAX_ERROR_GROUPS = 16  # per unit in its commit's stats; a unit with more is read by `status` instead


def error_reason(text: str | None) -> str:
    """An error text with its numbers and ids replaced, so errors that differ only in them group together
    (HTTP status codes are kept: they are the reason)."""
    first = (text or "").strip().splitlines()
    line = first[0] if first else "(no error text)"
    line = _NUMBER.sub("<n>", _ID_LIKE.sub("<id>", line))
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= 160 else line[:157] + "..."


def error_summary(errors: Iterable[str | None]) -> list | None:
    """The failed rows of a unit grouped by reason, [[reason, an example text, rows], ...], as its commit
    records them (so `orchestrator status` reads no result file for them); None past MAX_ERROR_GROUPS."""
    groups: dict[str, list] = {}
    for text in errors:
        reason = error_reason(text)
        group = groups.get(reason)
        if group is None:
            if len(groups) == MAX_ERROR_GROUPS:
                return None
            group = groups[reason] = [reason, (text or "")[:300], 0]
        group[2] += 1
    return list(groups.values())


def commit_unit(paths: RunPaths, unit: int, table: pa.Table, stats: dict, owner: str = "local",
                ledger: Ledger | None = None, replace: bool = False) -> bool:
    """Write a unit's results under work/tmp, then publish it in results/ (atomic on one filesystem),
    through the run's sink (output.format: orchestrator.sinks). The first commit of a unit wins: a backup
    copy or a late holder that finds the file there already gets False, and its rows are discarded
    (replace=True: a retried unit replaces its earlier commit). Its stats go with the file (a Parquet
    footer, a JSONL unit's sidecar), then in the owner's ledger. Four metadata operations for Parquet
    (open, link, unlink, and the ledger's append when it is not held open); JSONL adds its sidecar's
    open and rename."""
    size = sink_for(paths).publish(unit, table, stats, replace, write_error=write_error)
    if size is None:
        return False
    record = {"unit": unit, **stats, "bytes": size, "at": time.time()}  # bytes: what a resume checks the file against
    if ledger is not None:
        ledger.append(record)
    else:
        one = Ledger(paths, owner)
        try:
            one.append(record)
        finally:
            one.close()
    return True


def write_progress(paths: RunPaths, owner: str, record: dict, requests: list[dict] | None = None) -> None:
    """A replica's progress record (progress/<owner>.json, replaced whole), and the request records gathered
    since the last call appended to work/requests/<attempt>-<owner>.jsonl. Timing records are for
    following the run, not results: a failed append loses them with a warning and never stops the run."""
    if requests:
        path = paths.requests / f"{record.get('attempt')}-{owner}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in requests)
        try:
            try:
                fh = fsops.open_file(path, "a")
            except FileNotFoundError:  # the first write of a run made before work/requests/ existed
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = fsops.open_file(path, "a")
            with fh:
                fh.write(text)
        except OSError as exc:
            log.warning("could not append %d request record(s) to %s (%s); the run goes on without them",
                        len(requests), path, exc.strerror or exc)
    target = paths.progress / f"{owner}.json"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with fsops.open_file(tmp, "w") as fh:
            fh.write(json.dumps(record))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(target, exc) from None
    fsops.replace(tmp, target)


@dataclass
class UnitStats:
    """Stats that add: merging is sum(stats, start=UnitStats())."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    output_tokens: int = 0
    units: int = 0
    retryable: int = 0  # failed rows the engine is to blame for (gave up on 5xx/timeouts, malformed answers)
    invalid_structured: int = 0  # rows whose answer never matched their JSON schema (InvalidStructuredOutput)
    schema_retries: int = 0  # re-asks of answers that did not match their JSON schema
    failed_upstream: int = 0  # rows not sent: they failed in the run this one follows (data.follow)

    def __add__(self, other: "UnitStats") -> "UnitStats":
        return UnitStats(self.rows + other.rows, self.ok + other.ok, self.failed + other.failed,
                         self.output_tokens + other.output_tokens, self.units + other.units,
                         self.retryable + other.retryable, self.invalid_structured + other.invalid_structured,
                         self.schema_retries + other.schema_retries, self.failed_upstream + other.failed_upstream)

    @classmethod
    def of(cls, record: dict) -> "UnitStats":
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})


def _ledger(paths: RunPaths) -> dict[int, dict]:
    """The newest ledger record of each unit (a retried unit has several)."""
    entries: dict[int, dict] = {}
    folder = paths.root / "work" / "ledger"
    for path in folder.glob("*.jsonl") if folder.is_dir() else []:
        lines = path.read_text().splitlines()
        try:  # one parse for the whole file (fast); line by line when a crash cut a line
            records = json.loads("[" + ",".join(lines) + "]")
        except ValueError:
            records = []
            for line in lines:
                try:
                    records.append(json.loads(line))
                except ValueError:  # a line cut by a crash: that unit's footer is read instead
                    continue
        for record in records:
            unit = record.pop("unit", None) if isinstance(record, dict) else None
            if unit is None:
                continue
            if unit not in entries or record.get("at", 0) >= entries[unit].get("at", 0):
                entries[unit] = record
    return entries


@dataclass
class Committed:
    """What results/ holds, checked: each good unit's stats record, and the damaged files put aside."""

    stats: dict[int, dict]
    damaged: list[str]

    @property
    def units(self) -> set[int]:
        return set(self.stats)

    def total_of(self, units=None) -> UnitStats:
        records = self.stats.values() if units is None else [self.stats[u] for u in units if u in self.stats]
        keys = tuple(UnitStats.__dataclass_fields__)
        sums = dict.fromkeys(keys, 0)
        for record in records:  # one pass over the records (a run may have 100,000 units)
            for key in keys:
                value = record.get(key)
                if value:
                    sums[key] += value
        return UnitStats(**sums)

    @property
    def total(self) -> UnitStats:
        return self.total_of()


def _footer_stats(path: Path, rows: int | None) -> dict | str:
    """A result file's stats as its sink published them (a Parquet footer, a JSONL sidecar), or why the
    file cannot be trusted."""
    return sink_of_file(path).check_file(path, rows, UnitStats.of)


def scan_committed(paths: RunPaths, plan: "Plan | None" = None, put_aside: bool = False,
                   verify: bool = True) -> Committed:
    """Every committed unit, checked: a file whose size is what its commit wrote, and whose ledger record
    holds the plan's rows for the unit, is trusted with the ledger's stats (one stat call, no read); any other
    is trusted only when the stats its sink published with it read (a Parquet footer, a JSONL sidecar) and
    hold the unit's rows (a file of a unit outside the plan never is). A damaged file is moved to
    work/damaged/ when put_aside, so its unit is redone.
    verify=False trusts the ledger for every listed file (no stat per file: totals for a summary, where a
    resume's check, once per attempt, already ran)."""
    ledger = _ledger(paths)
    good: dict[int, dict] = {}
    damaged: list[str] = []
    if not paths.results.is_dir():
        return Committed(good, damaged)
    sink = sink_for(paths)
    for unit, entry in sink.entries():  # one listing: the run's output.format's files only
        name = entry.name
        try:
            record = ledger.get(unit)
            rows = plan.unit_answers(unit) if plan is not None and unit < len(plan.units) else None
            # the ledger vouches for a file only when it also holds the plan's rows for the unit
            fits = record is not None and (rows is None or record.get("rows") == rows)
            if fits and not verify:
                good[unit] = record
                continue
            size = entry.stat().st_size
        except (ValueError, OSError):
            continue
        if fits and record.get("bytes") == size:
            good[unit] = record
            continue
        if plan is not None and unit >= len(plan.units):
            found = f"is not in the plan ({len(plan.units)} units)"
        else:
            found = sink.check_file(Path(entry.path), rows, UnitStats.of)
        if isinstance(found, dict):
            good[unit] = found
            continue
        why = f"{entry.path} is damaged: {size} bytes" + (
            f" (its commit wrote {record['bytes']})" if record and "bytes" in record else "") + f", {found}"
        if put_aside:
            aside = paths.root / "work" / "damaged"
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(entry.path, aside / f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
            why += f"; moved to {aside}/ and the unit is redone"
        damaged.append(why)
    return Committed(good, damaged)


def committed_stats(paths: RunPaths, done: set[int] | None = None) -> UnitStats:
    """Totals over every committed unit that checks out (see scan_committed)."""
    return scan_committed(paths).total_of(done)


def committed_rows(plan: Plan, done: set[int]) -> int:
    """Rows of the committed units, from the plan alone (no file is opened)."""
    if isinstance(plan.units, Units):
        return plan.units.rows_of(done)
    return sum(plan.units[u][2] for u in done if u < len(plan.units))
