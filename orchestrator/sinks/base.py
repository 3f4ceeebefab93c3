"""ResultSink: where a run's committed units live, and the one place that knows their files.

A sink publishes a unit's result table exactly once (the first publisher wins; a retried unit replaces
its own earlier commit), says which units are published, reads a unit's columns back, and gives the
stats published with it. Everything else (the ledger, claims, status, the report) asks the sink instead
of naming a file suffix. `orchestrator.sinks.sink_for` picks the sink of a run directory.
"""
from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from .. import fsops

RESULT_PREFIX = "part-"
STATS_KEY = "orchestrator.stats"  # the unit's stats record: in a Parquet footer, in a JSONL unit's sidecar


class ResultSink(ABC):
    """A run directory's results/: one file `part-<unit:08d><suffix>` per committed unit.

    The file's appearance under its final name is the commit point: it is written under work/tmp/ and
    linked into place (link never replaces, so of two publishers exactly one wins), or replaced into place
    for a retried unit. results/ never shows a half-written file."""

    format: str = ""
    suffix: str = ""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def tmp(self) -> Path:
        return self.root / "work" / "tmp"

    def name(self, unit: int) -> str:
        return f"{RESULT_PREFIX}{unit:08d}{self.suffix}"

    def file(self, unit: int) -> Path:
        """Where a unit's committed results are (whether or not it is committed)."""
        return self.results / self.name(unit)

    def unit_of(self, name: str) -> int | None:
        """The unit of a name in results/, or None for anything that is not one of this sink's files."""
        if not (name.startswith(RESULT_PREFIX) and name.endswith(self.suffix)):
            return None
        digits = name[len(RESULT_PREFIX):len(name) - len(self.suffix)]
        return int(digits) if digits.isdigit() else None

    def units_in(self, names: Iterable[str]) -> set[int]:
        """The committed units among a listing of results/."""
        found = set()
        for name in names:
            unit = self.unit_of(name)
            if unit is not None:
                found.add(unit)
        return found

    def done_units(self) -> set[int]:
        """Units whose result file is committed (one directory listing)."""
        return self.units_in(fsops.listdir(self.results))

    def is_done(self, unit: int) -> bool:
        """Whether a unit is committed (one stat)."""
        return fsops.exists(self.file(unit))

    def entries(self) -> Iterator[tuple[int, os.DirEntry]]:
        """(unit, directory entry) of every committed unit (one listing; entry.stat() is one more call)."""
        if not self.results.is_dir():
            return
        with os.scandir(self.results) as found:
            for entry in found:
                unit = self.unit_of(entry.name)
                if unit is not None:
                    yield unit, entry

    def publish(self, unit: int, table: pa.Table, stats: dict, replace: bool = False,
                write_error: Callable[[Path, OSError], Exception] | None = None) -> int | None:
        """Publish a unit's table with its stats: the bytes of the file published, or None when another
        publisher's file was there first (this one's rows are discarded). replace=True: a retried unit
        replaces its earlier commit. A failed write (a full disk) leaves nothing behind and raises its
        OSError, or write_error(the unit's file, the OSError) when given."""
        final = self.file(unit)
        tmp = self.tmp / f"{unit:08d}.{uuid.uuid4().hex}{self.suffix}"
        try:
            size, written = self._write(tmp, table, stats)
            self._before_link(unit, table, stats, written)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if write_error is None:
                raise
            raise write_error(final, exc) from None
        if replace:
            fsops.replace(tmp, final)
            return size
        try:
            won = fsops.link(tmp, final)
        except OSError:  # a filesystem without hard links: check, then rename (a narrow window, no worse)
            won = not fsops.exists(final)
            if won:
                fsops.replace(tmp, final)
        fsops.unlink(tmp)
        if not won:
            return None
        return size

    def _before_link(self, unit: int, table: pa.Table, stats: dict, written) -> None:  # noqa: B027 (an optional hook)
        """What must be in place before the unit's file appears (a JSONL unit's stats sidecar); written is
        what _write said about the file."""

    @abstractmethod
    def _write(self, tmp: Path, table: pa.Table, stats: dict) -> tuple[int, object]:
        """Write the unit's file at tmp (stats included where the format keeps them): its size in bytes, and
        what _before_link needs to know of it."""

    @abstractmethod
    def read_file(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        """One of this sink's result files as a table (only the columns asked for)."""

    def read(self, unit: int, columns: list[str] | None = None) -> pa.Table:
        """A committed unit's columns. Raises OSError or pa.ArrowException when it cannot be read."""
        return self.read_file(self.file(unit), columns)

    @abstractmethod
    def check_file(self, path: Path, rows: int | None = None,
                   valid: Callable[[dict], object] | None = None) -> dict | str:
        """The stats published with a result file, or why it cannot be trusted (unreadable, not `rows` rows,
        no stats, stats that `valid` raises TypeError, ValueError, KeyError or AttributeError on)."""

    def check(self, unit: int, rows: int | None = None,
              valid: Callable[[dict], object] | None = None) -> dict | str:
        """check_file of a committed unit: what a resume checks a file against when the ledger cannot vouch
        for it."""
        return self.check_file(self.file(unit), rows, valid)

    def finish(self) -> list[Path]:
        """What the format assembles once the run is complete (after summary.json): the files written
        (none for one file per unit; openai_batch: output.jsonl and errors.jsonl)."""
        return []

    def stats(self, unit: int) -> dict | None:
        """The stats published with a committed unit; None when it has none that can be read."""
        found = self.check(unit)
        return found if isinstance(found, dict) else None
