"""The unit-of-work plan over the input, reading a unit's rows, and the claim/commit protocol.

A unit is a row range of one input file. The plan is fixed when a run starts and stored in
`<run_dir>/plan.json`. A unit is committed when `results/part-<unit>.parquet` exists: it is written
under `work/tmp/` and renamed into place, so `results/` never shows a half-written file, and a
unit redone after a crash replaces nothing but its own file.
"""
from __future__ import annotations

import bisect
import errno
import glob
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import fsops
from .config import DataConfig
from .errors import InputError, RunError
from .sinks import RESULT_PREFIX, sink_for, sink_of_file  # noqa: F401 - RESULT_PREFIX re-exported

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("id", "response", "responses", "status", "error", "output_tokens", "latency_s", "attempts")


@dataclass
class InputFile:
    path: str
    name: str  # stable name used in positional ids: path relative to the input root
    rows: int
    size: int
    mtime_ns: int


class Units(Sequence):
    """The plan's units, each (file index, first row, row count), derived from the files' row counts and
    unit_rows (build_plan cuts every file into runs of unit_rows rows): nothing per unit is stored or
    built. len() is free, units[u] is a bisection over the files, iteration walks them in order."""

    __slots__ = ("rows", "unit_rows", "_first", "_len")

    def __init__(self, rows: list[int], unit_rows: int):
        self.rows, self.unit_rows = list(rows), int(unit_rows)
        self._first, n = [], 0  # the first unit of each file
        for count in self.rows:
            self._first.append(n)
            n += -(-count // self.unit_rows)
        self._len = n

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        i = index + self._len if index < 0 else index
        if not 0 <= i < self._len:
            raise IndexError(f"unit {index} is not in the plan ({self._len} units)")
        f = bisect.bisect_right(self._first, i) - 1  # a file without rows has no unit: the last file at or before i
        start = (i - self._first[f]) * self.unit_rows
        return f, start, min(self.unit_rows, self.rows[f] - start)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        step = self.unit_rows
        for f, count in enumerate(self.rows):
            for start in range(0, count, step):
                yield f, start, min(step, count - start)

    def __eq__(self, other) -> bool:
        if isinstance(other, Units) and other.rows == self.rows and other.unit_rows == self.unit_rows:
            return True
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == self._len and all(tuple(a) == tuple(b) for a, b in zip(self, other))

    __hash__ = None

    def rows_of(self, units) -> int:
        """Rows of the given units (a set of unit numbers; others are ignored) without a lookup per unit:
        every unit holds unit_rows rows but the last of a file, which may hold fewer."""
        done = units if isinstance(units, (set, frozenset, dict)) else set(units)
        total = self.unit_rows * sum(1 for u in done if 0 <= u < self._len)
        for f, count in enumerate(self.rows):
            short = count % self.unit_rows
            if short and self._first[f] + count // self.unit_rows in done:
                total -= self.unit_rows - short
        return total

    def __repr__(self) -> str:
        return f"Units({self._len} units of up to {self.unit_rows} rows over {len(self.rows)} files)"


def _files_json(files: list[InputFile]) -> dict:
    """The input files as columns; each path is one shared prefix + its name when it can be (the usual case)."""
    out = {"name": [f.name for f in files], "rows": [f.rows for f in files], "size": [f.size for f in files],
           "mtime_ns": [f.mtime_ns for f in files]}
    prefixes = {f.path[:len(f.path) - len(f.name)] if f.name and f.path.endswith(f.name) else None for f in files}
    if len(prefixes) == 1 and None not in prefixes:
        out["prefix"] = prefixes.pop()
    else:
        out["path"] = [f.path for f in files]
    return out


def _files_from_json(found) -> list[InputFile]:
    if isinstance(found, list):  # plan.json of the previous version: one object per file
        return [InputFile(**f) for f in found]
    paths = found["path"] if "path" in found else [found["prefix"] + name for name in found["name"]]
    return [InputFile(*row) for row in zip(paths, found["name"], found["rows"], found["size"], found["mtime_ns"])]


@dataclass
class Plan:
    files: list[InputFile]
    units: Sequence[tuple[int, int, int]]  # (file index, first row, row count): Units, or a list from an old plan
    prompt_column: str
    id_column: str | None  # None: ids are "<file>:<row>"
    id_type: str  # arrow type of the id column in results
    unit_rows: int
    messages_column: str | None = None  # conversations (README "Conversations and multi-turn")
    turns_column: str | None = None
    attributes_column: str | None = None
    keep_columns: list[str] = field(default_factory=list)
    keep_schema: str = ""  # the kept columns' arrow types (base64 IPC schema), the same in every file
    rollouts: int = 1  # answers per input row (sampling.rollouts): a unit's results are rows x rollouts

    @property
    def total_rows(self) -> int:
        """Input rows (prompts)."""
        return sum(f.rows for f in self.files)

    @property
    def total_answers(self) -> int:
        """Result rows: every input row's rollouts."""
        return self.total_rows * self.rollouts

    def unit_answers(self, unit: int) -> int:
        """Result rows of one unit: row 0's rollouts 0..N-1, then row 1's, ... (index row * N + rollout)."""
        return self.units[unit][2] * self.rollouts

    @property
    def conversational(self) -> bool:
        """Rows are conversations (messages and/or turns) instead of one prompt each."""
        return bool(self.messages_column or self.turns_column)

    @property
    def input_columns(self) -> list[str]:
        """The columns a unit's rows are read from, each once."""
        named = ([self.messages_column, self.turns_column, self.attributes_column] if self.conversational
                 else [self.prompt_column]) + list(self.keep_columns) + [self.id_column]
        return list(dict.fromkeys(c for c in named if c))

    def to_json(self) -> str:
        """plan.json: the files as columns and unit_rows, from which the units follow (format 2); a plan whose
        units are not those (none that build_plan makes) keeps its list of units."""
        d = {"format": 2, **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("files", "units")}}
        d["files"] = _files_json(self.files)
        if self.units != Units([f.rows for f in self.files], self.unit_rows):
            d["units"] = [list(u) for u in self.units]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """A plan of either format: this one, or the previous version's (files as objects, every unit listed)."""
        d = json.loads(text)
        d.pop("format", None)
        d["files"] = _files_from_json(d["files"])
        derived = Units([f.rows for f in d["files"]], d["unit_rows"])
        units = d.pop("units", None)
        d["units"] = derived if units is None or derived == units else [tuple(u) for u in units]
        return cls(**d)


def discover_inputs(spec: str) -> tuple[list[Path], Path]:
    """Files named by a Parquet file, a directory of Parquet files, or a glob; and the root for names."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"data.input={spec!r}: the glob matches no file; check the pattern")
        root = Path(os.path.commonpath([str(f.parent.resolve()) for f in files]))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise InputError(f"data.input={spec!r}: the directory holds no *.parquet file")
        root = path.resolve()
    elif path.is_file():
        files, root = [path], path.resolve().parent
    else:
        raise InputError(f"data.input={spec!r} does not exist; give a Parquet file, a directory or a glob")
    return [f.resolve() for f in files], root


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file ({exc}); convert it with "
                         f"pandas.read_*(...).to_parquet(...) or drop it from data.input") from None


def _id_type(kind: pa.DataType, path: Path, data: DataConfig) -> str:
    """The id column's type in results: text or integers. Dictionary-encoded ids (pandas categoricals) are
    their values; any other type is refused here, before anything is submitted."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_null(kind):  # no value at all (an empty file): its nulls, if any, are refused as null ids
        return "string"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind):
        return str(kind)
    raise InputError(f"{path}: id column {data.id_column!r} has type {kind}; ids must be text or integers. Cast "
                     f"it (e.g. df[{data.id_column!r}].astype(str)), or point data.id_column at another column (a name the "
                     f"files lack gives positional ids <file>:<row>)")


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def _list_value(kind: pa.DataType) -> pa.DataType | None:
    return kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None


def _column(path: Path, schema: pa.Schema, key: str, name: str) -> pa.DataType:
    if name not in schema.names:
        raise InputError(f"{path}: no column {name!r} ({key}); the columns are {schema.names}; "
                         f"set {key}=<one of them>")
    return schema.field(name).type


def _check_conversation_columns(path: Path, schema: pa.Schema, data: DataConfig) -> None:
    """The conversation columns' types, so that no row fails for a reason every row shares."""
    if data.messages_column:
        kind = _column(path, schema, "data.messages_column", data.messages_column)
        item = _list_value(kind)
        fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)} \
            if item is not None and pa.types.is_struct(item) else {}
        if not ("role" in fields and "content" in fields and _is_text(fields["role"]) and _is_text(fields["content"])):
            raise InputError(
                f"{path}: column {data.messages_column!r} (data.messages_column) has type {kind}; it must be a list "
                f"of {{role, content}} structs with text values, e.g. [{{'role': 'user', 'content': 'Hi'}}] per row. "
                f"Store the messages as lists of dicts (JSON text: df[col] = df[col].map(json.loads)), or point "
                f"data.messages_column at another column")
    if data.turns_column:
        kind = _column(path, schema, "data.turns_column", data.turns_column)
        item = _list_value(kind)
        if item is None or not _is_text(item):
            raise InputError(f"{path}: column {data.turns_column!r} (data.turns_column) has type {kind}; it must be "
                             f"a list of user turns (text), e.g. ['first question', 'follow-up'] per row. Store "
                             f"lists of strings, or point data.turns_column at another column")
    if data.attributes_column:
        kind = _column(path, schema, "data.attributes_column", data.attributes_column)
        if not _is_text(kind):
            raise InputError(f"{path}: column {data.attributes_column!r} (data.attributes_column) has type {kind}; "
                             f"it must hold one SteerLM attribute line (text) per row, e.g. "
                             f"'quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4'")


def _kept_types(path: Path, schema: pa.Schema, data: DataConfig, rollouts: int = 1) -> dict[str, pa.DataType]:
    """data.keep_columns in one file: they must exist, and not clash with a result column."""
    out = {}
    reserved = RESULT_COLUMNS + (("rollout",) if rollouts > 1 else ())
    for name in dict.fromkeys(data.keep_columns):
        if name in reserved:
            raise InputError(f"data.keep_columns names {name!r}, which is a result column ({', '.join(reserved)}); "
                             f"rename that input column, or drop it from data.keep_columns")
        if name not in schema.names:
            raise InputError(f"{path}: no column {name!r} to keep (data.keep_columns); the columns are "
                             f"{schema.names}; keep only columns every input file has")
        kind = schema.field(name).type
        out[name] = kind.value_type if pa.types.is_dictionary(kind) else kind  # categoricals are their values
    return out


def keep_schema(plan: Plan) -> pa.Schema:
    """The kept columns' fields, as the plan fixed them."""
    import base64

    if not plan.keep_schema:
        return pa.schema([])
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.keep_schema)))


def _footer(path: Path) -> tuple[pa.Schema, int, os.stat_result]:
    """A file's schema and row count (one read of its footer), and its size and time."""
    pf = _open(path)
    return pf.schema_arrow, pf.metadata.num_rows, path.stat()


def _footers(paths: list[Path], chunk: int = 64) -> Iterator[tuple[pa.Schema, int, os.stat_result]]:
    """Every file's footer, in order. Runs of files are read by a few threads at once (on a shared
    filesystem each read waits on the network; on a local disk it costs what one thread does), and the
    first file that cannot be read, in order, is the one named."""
    workers = min(8, os.cpu_count() or 1, -(-len(paths) // chunk))
    if workers < 2:
        yield from map(_footer, paths)
        return
    from concurrent.futures import ThreadPoolExecutor

    def run(part: list[Path]) -> list:
        return [_footer(path) for path in part]

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="footers") as pool:
        for part in pool.map(run, [paths[i:i + chunk] for i in range(0, len(paths), chunk)]):
            yield from part


def build_plan(data: DataConfig, input_spec: str, rollouts: int = 1) -> Plan:
    """Check every input file's schema (from its footer only, read once) and cut the rows into units
    (rollouts: answers per row, sampling.rollouts)."""
    import base64

    paths, root = discover_inputs(input_spec)
    files: list[InputFile] = []
    id_types: dict[str, str] = {}
    kept: dict[str, tuple[pa.DataType, Path]] = {}
    conversational = bool(data.messages_column or data.turns_column)
    for path, (schema, num_rows, stat) in zip(paths, _footers(paths)):
        names = schema.names
        if conversational:
            _check_conversation_columns(path, schema, data)
        elif data.prompt_column not in names:
            raise InputError(f"{path}: no prompt column {data.prompt_column!r}; the columns are "
                             f"{names}; set data.prompt_column=<one of them> (or data.messages_column, "
                             f"data.turns_column for conversations)")
        elif _list_value(ptype := schema.field(data.prompt_column).type) is not None or pa.types.is_struct(ptype):
            raise InputError(f"{path}: prompt column {data.prompt_column!r} has type {ptype}, not text; "
                             f"store one prompt string per row (a list of {{role, content}} per row is "
                             f"data.messages_column={data.prompt_column}; a list of user turns is "
                             f"data.turns_column={data.prompt_column})")
        for name, kind in _kept_types(path, schema, data, rollouts).items():
            first = kept.setdefault(name, (kind, path))
            if first[0] != kind:
                raise InputError(f"input files disagree on the type of kept column {name!r} ({first[1].name}: "
                                 f"{first[0]}, {path.name}: {kind}); give every file the same type, or drop it "
                                 f"from data.keep_columns")
        id_types[str(path)] = _id_type(schema.field(data.id_column).type, path, data) if data.id_column in names else ""
        files.append(InputFile(str(path), os.path.relpath(path, root), num_rows, stat.st_size, stat.st_mtime_ns))
    kinds = set(id_types.values())
    if len(kinds) > 1:
        detail = ", ".join(f"{Path(p).name}: {t or 'no id column'}" for p, t in list(id_types.items())[:6])
        raise InputError(f"input files disagree on the id column {data.id_column!r} ({detail}); "
                         f"give every file the same id column type, or none")
    id_type = kinds.pop() if kinds else ""
    kept_fields = pa.schema([(name, kind) for name, (kind, _) in kept.items()])
    return Plan(files, Units([f.rows for f in files], data.unit_rows), data.prompt_column,
                data.id_column if id_type else None,
                id_type or "string", data.unit_rows, data.messages_column, data.turns_column,
                data.attributes_column, list(kept),
                base64.b64encode(kept_fields.serialize().to_pybytes()).decode() if kept else "", rollouts)


def apply_duplicate_policy(plan: Plan, data: DataConfig, spill_dir: Path | None = None) -> Plan:
    """Refuse repeated ids (with examples), or apply the policy the user opted into. Reads every id once
    (twice when some repeat, for the examples); a big input's hashes spill under spill_dir (see
    find_duplicate_ids)."""
    if plan.id_column and data.duplicate_ids != "keep":
        count, examples, nulls = find_duplicate_ids(plan, data.read_batch_rows * 8, spill_dir=spill_dir)
        if nulls[0] and data.duplicate_ids == "error":
            raise InputError(f"{nulls[0]} row(s) have a null id in column {plan.id_column!r} (first at {nulls[1]}); "
                             f"ids must be set for exactly-once results. Fill them in, or opt in: "
                             f"data.duplicate_ids=positional (ids become <file>:<row>)")
        if count and data.duplicate_ids == "error":
            shown = "; ".join(f"{ident!r} at {', '.join(where)}" for ident, where in examples)
            raise InputError(f"{count} rows repeat an id of column {plan.id_column!r} (e.g. {shown}); ids must be "
                             f"unique for exactly-once results. Fix the input, or opt in: data.duplicate_ids=positional "
                             f"(ids become <file>:<row>) or data.duplicate_ids=keep (every row runs; ids repeat in results)")
        if count or nulls[0]:  # positional
            plan.id_column, plan.id_type = None, "string"
    return plan


def _id_batches(plan: Plan, batch_rows: int):
    for source in plan.files:
        pf = pq.ParquetFile(source.path)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[plan.id_column]):
            yield source, row, batch.column(0)
            row += batch.num_rows


# The duplicate-id scan holds at most this many 64-bit id hashes in memory at once (32 MiB); a bigger input's
# hashes go to bucket files on disk, each sorted alone. It is read when the scan starts (tests lower it).
DUPLICATE_SCAN_HASHES = 1 << 22
_SPILL_MAX_BITS = 8  # at most 256 bucket files open at once; a bucket still too big is split again


def find_duplicate_ids(plan: Plan, batch_rows: int = 65536, max_examples: int = 3, budget: int | None = None,
                       spill_dir: Path | None = None) -> tuple[int, list, tuple]:
    """Rows whose id repeats an earlier one, a few examples with where they are, and (null ids, where the
    first is). One 64-bit hash per row. Up to `budget` rows (DUPLICATE_SCAN_HASHES) the hashes are sorted
    in memory; above it they are written to 2^k bucket files by their top k bits (in a temporary folder
    under spill_dir, or the system's, removed afterwards), k chosen so that a bucket holds about `budget`
    hashes, and each bucket is read back and sorted alone: the memory is bounded by the budget, not the
    input, and the answer is the same."""
    import numpy as np
    import pandas as pd

    def hashes(column) -> "np.ndarray":
        return pd.util.hash_array(column.to_numpy(zero_copy_only=False).astype(object))

    budget = max(1, int(budget or DUPLICATE_SCAN_HASHES))
    expected = plan.total_rows
    nulls, first_null = 0, None
    wanted: list = []  # the smallest repeated hashes, ascending: the examples, as the in-memory sort finds them
    with _HashScratch(expected > budget, spill_dir) as scratch:
        store = _Buckets(scratch.folder, _bucket_bits(expected, budget), 0, budget) if scratch.folder \
            else _InMemoryHashes(expected)
        for source, row, column in _id_batches(plan, batch_rows):
            store.add(hashes(column))
            if column.null_count:
                nulls += column.null_count
                if first_null is None:
                    first_null = f"{source.name}:{row + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))}"
        extra = store.repeats(budget, max_examples, wanted)
    if not extra:
        return 0, [], (nulls, first_null)
    wanted_hashes = np.array(wanted, dtype=np.uint64)
    found: dict = {}
    for source, row, column in _id_batches(plan, batch_rows):
        for offset in np.nonzero(np.isin(hashes(column), wanted_hashes))[0]:
            where = found.setdefault(column[int(offset)].as_py(), [])
            if len(where) < 4:  # an id repeated a million times keeps four places, not a million
                where.append(f"{source.name}:{row + int(offset)}")
    return extra, list(found.items())[:max_examples], (nulls, first_null)


def _bucket_bits(count: int, budget: int) -> int:
    """Bits of hash that split `count` hashes into buckets of budget/2 or fewer on average, so that hardly
    any bucket (they vary by chance) outgrows the budget."""
    bits = 1
    while 2 * count > budget << bits and bits < _SPILL_MAX_BITS:
        bits += 1
    return bits


def _sorted_repeats(hashes, need: int, wanted: list) -> int:
    """Repeats in sorted hashes; the smallest repeated values are appended to wanted until it holds need."""
    import numpy as np

    if len(hashes) < 2:
        return 0
    repeats = hashes[1:] == hashes[:-1]
    extra = int(np.count_nonzero(repeats))
    step = 1 << 20  # found a slice at a time: a bucket of repeats never doubles the memory
    for lo in range(0, len(repeats) if extra else 0, step):
        if len(wanted) >= need:
            break
        for value in np.unique(hashes[1 + lo:1 + lo + step][repeats[lo:lo + step]]):
            if len(wanted) >= need:
                break
            if not wanted or value != wanted[-1]:
                wanted.append(value)
    return extra


class _HashScratch:
    """A temporary folder for the spilled hashes under spill_dir (or the system's), removed on the way out;
    none when the scan stays in memory."""

    def __init__(self, spill: bool, spill_dir: Path | None):
        self.spill, self.spill_dir, self.folder = spill, spill_dir, None

    def __enter__(self) -> "_HashScratch":
        import tempfile

        if self.spill:
            base = Path(self.spill_dir) if self.spill_dir is not None else None
            try:
                if base is not None:
                    base.mkdir(parents=True, exist_ok=True)
                self.folder = Path(tempfile.mkdtemp(prefix="duplicate-ids-", dir=base))
            except OSError as exc:
                raise write_error(base or Path(tempfile.gettempdir()), exc) from None
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _InMemoryHashes:
    def __init__(self, expected: int):
        import numpy as np

        self.every, self.filled = np.empty(expected, dtype=np.uint64), 0

    def add(self, hashes) -> None:
        import numpy as np

        end = self.filled + len(hashes)
        if end > len(self.every):  # a file grew since its footer was read
            grown = np.empty(max(end, 2 * len(self.every)), dtype=np.uint64)
            grown[:self.filled] = self.every[:self.filled]
            self.every = grown
        self.every[self.filled:end] = hashes
        self.filled = end

    def repeats(self, budget: int, need: int, wanted: list) -> int:
        every = self.every[:self.filled]
        every.sort()
        try:
            return _sorted_repeats(every, need, wanted)
        finally:
            self.every = every = None


class _Buckets:
    """Hashes that share their top `skip` bits, written to 2^bits files by the next `bits` bits; staged in
    memory and written a slice per bucket, so the writes are large."""

    def __init__(self, folder: Path, bits: int, skip: int, budget: int):
        import numpy as np

        self.folder, self.bits, self.skip = folder, min(bits, 64 - skip), skip
        self.shift, self.mask = 64 - skip - self.bits, (1 << self.bits) - 1
        self.counts = [0] * (1 << self.bits)
        self.files: list = [None] * (1 << self.bits)
        self.stage, self.staged = np.empty(min(budget, 1 << 20), dtype=np.uint64), 0

    def path(self, bucket: int) -> Path:
        return self.folder / f"{self.skip:02d}-{bucket:04d}.u64"

    def add(self, hashes) -> None:
        while len(hashes):
            take = min(len(hashes), len(self.stage) - self.staged)
            self.stage[self.staged:self.staged + take] = hashes[:take]
            self.staged += take
            hashes = hashes[take:]
            if self.staged == len(self.stage):
                self._flush()

    def _flush(self) -> None:
        import numpy as np

        staged, self.staged = self.stage[:self.staged], 0
        keys = ((staged >> np.uint64(self.shift)) & np.uint64(self.mask)).astype(np.uint16)
        order = np.argsort(keys, kind="stable")  # a radix sort on 16-bit keys: linear
        sizes = np.bincount(keys, minlength=len(self.counts))
        grouped, at = staged[order], 0
        for bucket in np.flatnonzero(sizes):
            n = int(sizes[bucket])
            if self.files[bucket] is None:
                self.files[bucket] = open(self.path(bucket), "wb")
            try:
                self.files[bucket].write(grouped[at:at + n].tobytes())
            except OSError as exc:
                raise write_error(self.path(bucket), exc) from None
            self.counts[bucket] += n
            at += n

    def _close(self) -> None:
        try:
            self._flush()
        finally:
            for fh in self.files:
                if fh is not None:
                    try:
                        fh.close()
                    except OSError as exc:
                        raise write_error(Path(fh.name), exc) from None

    def repeats(self, budget: int, need: int, wanted: list) -> int:
        """Every bucket in order of its bits (so the examples come out as the in-memory sort has them)."""
        import numpy as np

        self._close()
        extra = 0
        for bucket, count in enumerate(self.counts):
            if not count:
                continue
            path = self.path(bucket)
            if count <= budget:
                hashes = np.fromfile(path, dtype=np.uint64)
                hashes.sort()
                extra += _sorted_repeats(hashes, need, wanted)
                del hashes
            else:  # more than its share: many repeats of a few ids, or an unlucky split
                extra += self._split(path, count, budget, need, wanted)
            path.unlink(missing_ok=True)
        return extra

    def _split(self, path: Path, count: int, budget: int, need: int, wanted: list) -> int:
        """An oversized bucket: one value throughout, or split again below the bits its values share."""
        import numpy as np

        low = high = None
        for chunk in _chunks(path, budget):
            low = chunk.min() if low is None else min(low, chunk.min())
            high = chunk.max() if high is None else max(high, chunk.max())
        if low == high:  # one id (or one hash) repeated throughout
            if len(wanted) < need and (not wanted or low != wanted[-1]):
                wanted.append(low)
            return count - 1
        shared = 64 - (int(low) ^ int(high)).bit_length()  # leading bits every value here has in common
        sub = _Buckets(self.folder, _bucket_bits(count, budget), shared, budget)
        for chunk in _chunks(path, budget):
            sub.add(chunk)
        path.unlink()
        return sub.repeats(budget, need, wanted)


def _chunks(path: Path, size: int):
    import numpy as np

    with open(path, "rb") as fh:
        while True:
            chunk = np.fromfile(fh, dtype=np.uint64, count=size)
            if not len(chunk):
                return
            yield chunk


class UnitReader:
    """Reads units' rows as record batches. Consecutive units of one file continue one sequential pass
    (each row group is decoded once); a unit elsewhere starts at the row group holding its first row."""

    def __init__(self, plan: Plan, batch_rows: int):
        self.plan, self.batch_rows = plan, batch_rows
        self._file: int | None = None
        self._batches: Iterator | None = None
        self._pending = None  # a batch whose rows run past the last unit read
        self._position = 0  # row of the file where the pending (or next) batch starts
        self._group_starts: list[int] = []

    def _open(self, file_index: int, start: int) -> None:
        pf = pq.ParquetFile(self.plan.files[file_index].path)
        starts, offset = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(offset)
            offset += pf.metadata.row_group(g).num_rows
        first = max(0, bisect.bisect_right(starts, start) - 1)
        columns = self.plan.input_columns
        self._batches = pf.iter_batches(batch_size=self.batch_rows, row_groups=list(range(first, len(starts))),
                                        columns=columns)
        self._file, self._group_starts, self._pending = file_index, starts, None
        self._position = starts[first] if starts else 0

    def read(self, unit: int) -> Iterator[tuple[list, list]]:
        """Yield (ids, prompts) for one unit's rows, in order; a file that cannot be decoded is named."""
        for ids, part in self.read_parts(unit):
            yield ids, part.column(self.plan.prompt_column).to_pylist()

    def read_parts(self, unit: int) -> Iterator[tuple[list, pa.RecordBatch]]:
        """Yield (ids, record batch of plan.input_columns) for one unit's rows, in order."""
        file_index, start, count = self.plan.units[unit]
        try:
            yield from self._read(unit)
        except (pa.ArrowException, OSError) as exc:
            self._file = None  # start afresh at the next unit
            path = self.plan.files[file_index].path
            raise InputError(f"{path}: rows {start}-{start + count - 1} cannot be read ({str(exc).splitlines()[0][:200]}); "
                             f"the file is damaged. Rewrite it from its source (the run's plan fixed its size, so "
                             f"start a new run_dir=), or drop it from data.input") from None

    def _read(self, unit: int) -> Iterator[tuple[list, list]]:
        file_index, start, count = self.plan.units[unit]
        group_start = self._group_starts[max(0, bisect.bisect_right(self._group_starts, start) - 1)] \
            if self._file == file_index and self._group_starts else 0
        if self._file != file_index or start < self._position or group_start > self._position:
            self._open(file_index, start)
        source, end = self.plan.files[file_index], start + count
        while self._position < end:
            batch, self._pending = self._pending, None
            if batch is None:
                batch = next(self._batches, None)
                if batch is None:
                    return
            lo, hi = max(start, self._position), min(end, self._position + batch.num_rows)
            if lo < hi:
                part = batch.slice(lo - self._position, hi - lo)
                ids = part.column(self.plan.id_column).to_pylist() if self.plan.id_column else \
                    [f"{source.name}:{row}" for row in range(lo, hi)]
                yield ids, part
            if self._position + batch.num_rows > end:
                self._pending = batch  # the next unit starts inside this batch
                return
            self._position += batch.num_rows


SEED_SPAN = 2 ** 31 - 1024  # a row's base seed; base + rollout stays below 2**31 (sampling.rollouts <= 1024)


def rollout_seed(seed: int | None, row_id) -> int:
    """The base seed of a row's rollouts (sampling.rollouts > 1): rollout k is sampled with base + k. A pure
    function of sampling.seed (None counts as 0) and the row's id, so a rerun asks for the same answers;
    base + k is what vLLM gives choice k of one request with n and seed=base."""
    import hashlib

    key = json.dumps([int(seed or 0), row_id if isinstance(row_id, (int, str)) else str(row_id)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % SEED_SPAN


def read_unit(plan: Plan, unit: int, batch_rows: int) -> Iterator[tuple[list, list]]:
    """Yield (ids, prompts) record batches for one unit (a one-off reader)."""
    return UnitReader(plan, batch_rows).read(unit)


def result_schema(plan: Plan) -> pa.Schema:
    """id, rollout (with sampling.rollouts > 1: (id, rollout) is the key), the kept input columns,
    response (the last turn's answer), responses (every turn's, with data.turns_column), then the outcome."""
    return pa.schema([
        ("id", pa.type_for_alias(plan.id_type) if plan.id_type else pa.string()),
        *([("rollout", pa.int32())] if plan.rollouts > 1 else []),
        *keep_schema(plan),
        ("response", pa.string()),
        *([("responses", pa.list_(pa.string()))] if plan.turns_column else []),
        ("status", pa.string()),
        ("error", pa.string()),
        ("output_tokens", pa.int64()),
        ("latency_s", pa.float64()),
        ("attempts", pa.int32()),
    ])


@dataclass
class RunPaths:
    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def tmp(self) -> Path:
        return self.root / "work" / "tmp"

    @property
    def claims(self) -> Path:
        return self.root / "work" / "claims"

    @property
    def progress(self) -> Path:
        return self.root / "work" / "progress"

    @property
    def requests(self) -> Path:
        """One JSON line per HTTP request: <attempt>-<owner>.jsonl (what `orchestrator status` and `report` read)."""
        return self.root / "work" / "requests"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def result_file(self, unit: int) -> Path:
        return sink_for(self).file(unit)  # the run's output.format names the file

    def make(self) -> None:
        for d in (self.results, self.tmp, self.claims, self.progress, self.requests, self.logs):
            d.mkdir(parents=True, exist_ok=True)


def _write_tmp(path: Path, text: str) -> Path:
    """text in a temporary file beside path; nothing is left behind when the write fails (a full disk)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    return tmp


def write_error(path: Path, exc: OSError) -> RunError:
    """A failed write as a sentence: which file, why, and what to do."""
    fix = "free some space there, or choose another run_dir=" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "check the run directory's permissions, or choose another run_dir="
    return RunError(f"cannot write {path} ({exc.strerror or exc}); {fix}. What was committed before is kept")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _write_tmp(path, text)
    os.replace(tmp, path)


def publish_once(path: Path, text: str) -> bool:
    """Write path whole if nobody has (link is atomic and refuses to replace); False when another process
    published it first."""
    tmp = _write_tmp(path, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


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


def log_event(paths: RunPaths, message: str) -> None:
    """One line in <run_dir>/run.log: what happened to the run, for the person reading it later."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
    with open(paths.root / "run.log", "a") as fh:
        fh.write(line)


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

    def __add__(self, other: "UnitStats") -> "UnitStats":
        return UnitStats(self.rows + other.rows, self.ok + other.ok, self.failed + other.failed,
                         self.output_tokens + other.output_tokens, self.units + other.units,
                         self.retryable + other.retryable)

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
    """Every committed unit, checked: a file whose size is what its commit wrote is trusted with the
    ledger's stats (one stat call, no read); any other is trusted only when the stats its sink published
    with it read (a Parquet footer, a JSONL sidecar) and hold the unit's rows. A damaged file is moved to work/damaged/ when put_aside, so its unit is redone.
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
            if record is not None and not verify:
                good[unit] = record
                continue
            size = entry.stat().st_size
        except (ValueError, OSError):
            continue
        if record is not None and record.get("bytes") == size:
            good[unit] = record
            continue
        rows = plan.unit_answers(unit) if plan is not None and unit < len(plan.units) else None
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
