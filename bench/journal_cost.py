"""What the journal (issue 11) costs the client, measured on its own: 100,352 rows answered in 784
batches of 128 (units of 2,048), each batch turned into one journal record (`UnitBuffer.journal_record`)
and appended (`UnitJournal.append`), then each unit's journal fsynced once and removed, as at a commit.
Prints the CPU time per 100,000 rows, per append, a unit's journal size and the fsync times.

    python bench/journal_cost.py
"""
from __future__ import annotations

import statistics
import time

from _common import cleanup, cpu_probe, load, machine, tmpdir

from orchestrator.journal import Journals
from orchestrator.rundir import RunPaths
from orchestrator.unit_source import UnitBuffer

UNITS, UNIT_ROWS, BATCH = 49, 2048, 128
TEXT = "[simulated] " + "word " * 16  # an answer of 16 tokens


def main() -> None:
    root = tmpdir("bench-journal-")
    try:
        print(f"machine: {machine()}; {load()}, {cpu_probe()}")
        paths = RunPaths(root)
        build = write = 0.0
        syncs, size = [], 0
        for unit in range(UNITS):
            buf = UnitBuffer(unit, UNIT_ROWS)
            buf.ids = [f"q{unit * UNIT_ROWS + i}" for i in range(UNIT_ROWS)]
            journal, _, _ = Journals(paths, "r0", "a1", "d" * 16).start(unit, UNIT_ROWS)
            for start in range(0, UNIT_ROWS, BATCH):
                for i in range(start, start + BATCH):
                    buf.succeed(i, TEXT, 16, 0.0123, 1)
                t0 = time.perf_counter()
                record = buf.journal_record(buf.fresh)
                buf.fresh = []
                t1 = time.perf_counter()
                journal.append(record)
                t2 = time.perf_counter()
                build, write = build + t1 - t0, write + t2 - t1
            journal.unsynced = True
            t0 = time.perf_counter()
            journal.sync()
            syncs.append(time.perf_counter() - t0)
            size = journal.path.stat().st_size
            Journals.remove(journal, [])
        rows, appends = UNITS * UNIT_ROWS, UNITS * UNIT_ROWS // BATCH
        print(f"{rows} rows in {appends} appends: records {build * 1e3:.1f} ms, json + write {write * 1e3:.1f} ms; "
              f"{(build + write) * 1e5 / rows * 1e3:.0f} ms per 100,000 rows, {(build + write) / appends * 1e6:.0f} us "
              f"per append; a unit's journal {size / 1e6:.2f} MB")
        print(f"fsync of a unit's whole journal: median {statistics.median(syncs) * 1e3:.2f} ms, "
              f"max {max(syncs) * 1e3:.2f} ms ({len(syncs)} units)")
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
