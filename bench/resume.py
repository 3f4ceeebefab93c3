"""How long a resume takes to find what is done, for 100,000 committed units (target: under 2 s).

Builds a run directory whose plan has 100,000 units (one row each), commits every unit (a real
result file per unit and the ledger lines, as the client writes them), then times what a rerun does
before submitting anything: `prepare()` (input footers, fingerprint check, stored plan) and counting
the committed rows (each result file's size checked against the ledger), and separately the summary's
totals over all units.
Run: python bench/resume.py [units]
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.commits import committed_rows, committed_stats, scan_committed
from orchestrator.config import compose
from orchestrator.preflight import prepare
from orchestrator.rundir import RunPaths

units = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
root = Path(tempfile.mkdtemp(prefix="bench-resume-"))
try:
    src = root / "in.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(units)], "prompt": ["hello"] * units}), src,
                   row_group_size=65536)
    cfg = compose([f"data.input={src}", f"run_dir={root / 'run'}", "data.unit_rows=1"])
    started = time.perf_counter()
    plan, paths = prepare(cfg)
    first_prepare = time.perf_counter() - started
    sample = root / "sample.parquet"
    pq.write_table(pa.table({"id": ["q0"], "response": ["x"], "status": ["ok"]}), sample)
    data = sample.read_bytes()
    ledger = []
    started = time.perf_counter()
    for unit in range(units):
        paths.result_file(unit).write_bytes(data)
        ledger.append(json.dumps({"unit": unit, "rows": 1, "ok": 1, "failed": 0, "output_tokens": 3, "units": 1,
                                  "bytes": len(data), "at": time.time()}))
    (paths.root / "work" / "ledger").mkdir(parents=True, exist_ok=True)
    (paths.root / "work" / "ledger" / "r0.jsonl").write_text("\n".join(ledger) + "\n")
    setup = time.perf_counter() - started

    started = time.perf_counter()
    plan, paths = prepare(cfg)
    done = scan_committed(RunPaths(paths.root), plan, put_aside=True).units  # what `run` does: every file checked
    already = committed_rows(plan, done)
    find_done = time.perf_counter() - started
    started = time.perf_counter()
    totals = committed_stats(paths, done)
    summary_s = time.perf_counter() - started
    assert already == units and len(done) == units and totals.rows == units
    print(f"units committed:              {units}")
    print(f"first start (plan + id scan): {first_prepare:.2f} s")
    print(f"writing the commits (setup):  {setup:.2f} s")
    print(f"resume finds what is done:    {find_done:.2f} s  (target < 2 s)")
    print(f"summary totals over all units: {summary_s:.2f} s")
finally:
    shutil.rmtree(root, ignore_errors=True)
