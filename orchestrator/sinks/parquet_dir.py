"""The default sink: one Parquet file per unit, its stats in the file's footer metadata.

`results/part-<unit:08d>.parquet`, the unit's stats as JSON under the footer key `orchestrator.stats`:
the file is the whole commit, so `pandas.read_parquet(results/)` reads the dataset and a resume can check
any file by its footer alone. This is the layout of every run directory written before sinks existed.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import fsops
from .base import STATS_KEY, ResultSink


class ParquetDirSink(ResultSink):
    """results/ as a Parquet dataset, one file per unit (see the module)."""

    format = "parquet"
    suffix = ".parquet"

    def _write(self, tmp: Path, table: pa.Table, stats: dict) -> tuple[int, None]:
        meta = dict(table.schema.metadata or {})
        meta[STATS_KEY.encode()] = json.dumps(stats).encode()
        table = table.replace_schema_metadata(meta)
        with fsops.open_file(tmp, "wb") as fh:
            pq.write_table(table, fh)
            return fh.tell(), None

    def read_file(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        if columns is None:
            return pq.read_table(path)
        return pq.ParquetFile(path).read(columns=columns, use_threads=False)  # small: one thread

    def check_file(self, path: Path, rows: int | None = None,
                   valid: Callable[[dict], object] | None = None) -> dict | str:
        try:
            meta = pq.read_metadata(path)
        except (pa.ArrowInvalid, OSError) as exc:
            return f"unreadable ({str(exc).splitlines()[0][:120]})"
        if rows is not None and meta.num_rows != rows:
            return f"holds {meta.num_rows} rows, the unit has {rows}"
        raw = (meta.metadata or {}).get(STATS_KEY.encode())
        if not raw:
            return "has no orchestrator stats in its footer"
        try:
            record = json.loads(raw)
            if valid is not None:
                valid(record)
            return record
        except (ValueError, TypeError, KeyError, AttributeError):
            return "has unreadable stats in its footer"
