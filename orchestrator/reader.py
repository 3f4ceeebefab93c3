"""Reading a unit's rows from its input file, as record batches, in order: Parquet files by row group,
JSONL and OpenAI Batch API files from the byte offset the plan recorded for the unit (orchestrator.jsonl_input)."""
from __future__ import annotations

import bisect
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .plan import Plan
from .templates import row_prompts


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
        """Yield (ids, prompts) for one unit's rows, in order; a file that cannot be decoded is named. With
        data.prompt_template the prompts are the rendered ones (None where a row cannot be rendered)."""
        for ids, part in self.read_parts(unit):
            yield ids, [prompt for prompt, _, _ in row_prompts(part, self.plan)]

    def read_parts(self, unit: int) -> Iterator[tuple[list, pa.RecordBatch]]:
        """Yield (ids, record batch of plan.input_columns) for one unit's rows, in order."""
        file_index, start, count = self.plan.units[unit]
        if self.plan.input_format != "parquet":
            yield from self._read_jsonl(unit)
            return
        try:
            yield from self._read(unit)
        except (pa.ArrowException, OSError) as exc:
            self._file = None  # start afresh at the next unit
            path = self.plan.files[file_index].path
            raise InputError(f"{path}: rows {start}-{start + count - 1} cannot be read "
                             f"({str(exc).splitlines()[0][:200]}); "
                             f"the file is damaged. Rewrite it from its source (the run's plan fixed its size, so "
                             f"start a new run_dir=), or drop it from data.input") from None

    def _read_jsonl(self, unit: int) -> Iterator[tuple[list, pa.RecordBatch]]:
        """A JSONL unit: its lines from the offset the plan recorded, parsed once, in batches of batch_rows."""
        from . import jsonl_input

        plan = self.plan
        file_index, start, count = plan.units[unit]
        source = plan.files[file_index]
        table = jsonl_input.unit_table(plan, unit)
        columns = [c for c in plan.input_columns if c in table.schema.names]
        table = table.select(columns).combine_chunks()
        for lo in range(0, count, self.batch_rows):
            part = table.slice(lo, self.batch_rows).to_batches()
            part = part[0] if part else pa.RecordBatch.from_pylist([], schema=table.schema)
            ids = part.column(plan.id_column).to_pylist() if plan.id_column else \
                [f"{source.name}:{row}" for row in range(start + lo, start + lo + part.num_rows)]
            yield ids, part

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


def read_unit(plan: Plan, unit: int, batch_rows: int) -> Iterator[tuple[list, list]]:
    """Yield (ids, prompts) record batches for one unit (a one-off reader)."""
    return UnitReader(plan, batch_rows).read(unit)
