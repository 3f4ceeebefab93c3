"""output.format=jsonl: one JSON Lines file per unit, its stats in a sidecar published before it.

`results/part-<unit:08d>.jsonl` holds one JSON object per result row and nothing else, so
`pandas.read_json(path, lines=True)` gives exactly the rows. A JSON line cannot carry the unit's stats
the way a Parquet footer does, so they go in a sidecar, `work/stats/part-<unit:08d>.<digest>.json`
(the stats, the row count, the byte count and the Arrow result schema), named by the SHA-256 of the data
file it describes and published before that file is linked into results/. The data file's link stays the
commit point: a crash before it leaves at most an unreferenced sidecar and no visible unit; of two
publishers of a unit, the sidecar that describes the winner's bytes is the one whose digest matches, so
the stats read back are always those published with the data (a loser's sidecar is left unreferenced).
A retried unit (replace) publishes its new sidecar, then replaces the data file.

Values JSON has no type for are written as text (timestamps and dates in ISO 8601, decimals as strings,
bytes as base64) and read back into the result schema's types by `read`, which uses the sidecar's schema.
"""
from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from .. import fsops
from .base import STATS_KEY, ResultSink


def _jsonable(value):
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    raise TypeError(f"a result value of type {type(value).__name__} has no JSON form")


def encode_rows(table: pa.Table) -> bytes:
    """The table as JSON Lines: one object per row, columns in the table's order."""
    return "".join(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n"
                   for row in table.to_pylist()).encode()


def decode_rows(data: bytes, schema: pa.Schema | None) -> pa.Table:
    """JSON Lines back into a table: into `schema` when given (as `encode_rows` wrote it), else pyarrow's
    inferred types."""
    import pyarrow.json as pj

    if not data.strip():
        return (schema or pa.schema([])).empty_table()
    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore") if schema is not None \
        else pj.ParseOptions()
    try:
        table = pj.read_json(io.BytesIO(data), parse_options=parse)
    except pa.ArrowInvalid:
        if schema is None:
            raise
        # what pyarrow's JSON reader cannot parse into the schema (binary, NaN): Python's parser, then Arrow's
        try:
            rows = [json.loads(line) for line in data.splitlines() if line.strip()]
            binary = {f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
            for row in rows:
                for name in binary:
                    if row.get(name) is not None:
                        row[name] = base64.b64decode(row[name])
            return pa.Table.from_pylist(rows, schema=schema)
        except (ValueError, TypeError, AttributeError) as exc:  # a cut line, a value of another type
            raise pa.ArrowInvalid(f"cannot read its JSON lines into the result schema ({exc})") from None
    if schema is not None:
        table = table.select(schema.names).replace_schema_metadata(schema.metadata)
    return table


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class JsonlDirSink(ResultSink):
    """results/ as JSON Lines files, one per unit, stats in work/stats/ (see the module)."""

    format = "jsonl"
    suffix = ".jsonl"

    @property
    def sidecars(self) -> Path:
        return self.root / "work" / "stats"

    def sidecar(self, unit: int, digest: str) -> Path:
        return self.sidecars / f"{self.name(unit)[:-len(self.suffix)]}.{digest}.json"

    def _write(self, tmp: Path, table: pa.Table, stats: dict) -> tuple[int, tuple[str, int, int]]:
        data = encode_rows(table)
        with fsops.open_file(tmp, "wb") as fh:
            fh.write(data)
        return len(data), (_digest(data), table.num_rows, len(data))

    def _before_link(self, unit: int, table: pa.Table, stats: dict, written: tuple[str, int, int]) -> None:
        digest, rows, size = written
        schema = base64.b64encode(table.schema.serialize().to_pybytes()).decode()
        text = json.dumps({STATS_KEY: stats, "rows": rows, "bytes": size, "schema": schema})
        target = self.sidecar(unit, digest)
        staged = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with fsops.open_file(staged, "w") as fh:
                fh.write(text)
        except FileNotFoundError:  # the first sidecar of the run: work/stats/ does not exist yet
            self.sidecars.mkdir(parents=True, exist_ok=True)
            with fsops.open_file(staged, "w") as fh:
                fh.write(text)
        except OSError:
            staged.unlink(missing_ok=True)
            raise
        fsops.replace(staged, target)

    def _load(self, path: Path) -> tuple[bytes, dict | None]:
        """A result file's bytes and the sidecar that describes exactly them (None when there is none)."""
        data = fsops.read_bytes(path)
        if data is None:
            raise FileNotFoundError(os.strerror(2), str(path))
        unit = self.unit_of(path.name)
        if unit is None:
            return data, None
        text = fsops.read_text(self.sidecar(unit, _digest(data)))
        try:
            return data, json.loads(text) if text is not None else None
        except ValueError:
            return data, None

    def read_file(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        data, side = self._load(path)
        schema = None
        if isinstance(side, dict) and isinstance(side.get("schema"), str):
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(side["schema"])))
        table = decode_rows(data, schema)
        return table.select(columns) if columns is not None else table

    def check_file(self, path: Path, rows: int | None = None,
                   valid: Callable[[dict], object] | None = None) -> dict | str:
        try:
            _, side = self._load(path)
        except OSError as exc:
            return f"unreadable ({str(exc).splitlines()[0][:120]})"
        if side is None:
            return f"has no stats sidecar in {self.sidecars} for its contents (cut, changed, or not published whole)"
        if rows is not None and side.get("rows") != rows:
            return f"holds {side.get('rows')} rows, the unit has {rows}"
        try:
            record = side[STATS_KEY]
            if not isinstance(record, dict):
                raise TypeError(record)
            if valid is not None:
                valid(record)
            return record
        except (ValueError, TypeError, KeyError, AttributeError):
            return "has unreadable stats in its sidecar"
