"""The duplicate-id scan over the input's id column: one 64-bit hash per row, sorted in memory or, for a big
input, spilled to bucket files on disk and sorted a bucket at a time."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .rundir import write_error


def _id_batches(plan: Plan, batch_rows: int):  # noqa: F821 (a plan.Plan; plan imports this module)
    if plan.input_format != "parquet":  # JSONL: unit by unit (orchestrator.jsonl_input)
        from .jsonl_input import unit_table

        for unit, (f, start, _) in enumerate(plan.units):
            yield plan.files[f], start, unit_table(plan, unit).column(plan.id_column).combine_chunks()
        return
    for source in plan.files:
        pf = pq.ParquetFile(source.path)
        row = 0
        batches = pf.iter_batches(batch_size=batch_rows, columns=[plan.id_column])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:  # a damaged page: the file, not a bug of ours
                raise InputError(f"{source.path}: the id column {plan.id_column!r} cannot be read from row {row} "
                                 f"on ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                                 f": the file is damaged. Rewrite it from its source, or drop it from data.input; "
                                 f"nothing was submitted") from None
            yield source, row, batch.column(0)
            row += batch.num_rows


# The duplicate-id scan holds at most this many 64-bit id hashes in memory at once (32 MiB); a bigger input's
# hashes go to bucket files on disk, each sorted alone. It is read when the scan starts (tests lower it).
DUPLICATE_SCAN_HASHES = 1 << 22
_SPILL_MAX_BITS = 8  # at most 256 bucket files open at once; a bucket still too big is split again


def find_duplicate_ids(plan: Plan, batch_rows: int = 65536, max_examples: int = 3,  # noqa: F821 (a plan.Plan)
                       budget: int | None = None, spill_dir: Path | None = None) -> tuple[int, list, tuple]:
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
                    first_null = (f"{source.name}:"
                                  f"{row + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))}")
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
