"""Metadata operations per unit, counted on real processes with strace: `orchestrator run` (local
replicas, the embedded engine) under `strace -f -e trace=%file`, every call naming a path inside the
run directory counted (front-end, jobs and engines together), divided by the number of units.

This is the method of issue 10's table (4,000 rows, data.unit_rows=10, so 400 units), and the check
that `bench/scale.py`'s counts (from `orchestrator.fsops`) are what the processes really do.
Run: python bench/strace_claims.py [--replicas 1,8,32] [--rows 4000] [--unit-rows 10]
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_prompts  # noqa: E402

DETAIL: collections.Counter | None = None
CALL = re.compile(r"^(?:\[pid\s+)?\d*\]?\s*(\w+)\(")


def measure(replicas: int, rows: int, unit_rows: int, root: Path) -> tuple[int, collections.Counter, float]:
    src = write_prompts(root / "in.parquet", rows)
    run_dir = root / f"run-{replicas}"
    trace = root / f"trace-{replicas}.txt"
    exe = shutil.which("orchestrator") or "orchestrator"
    cmd = ["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace), exe, "run", f"data.input={src}",
           f"run_dir={run_dir}", f"data.unit_rows={unit_rows}", f"replicas={replicas}",
           "engine.simulator.request_latency_s=0.05"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"replicas={replicas} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    kinds: collections.Counter = collections.Counter()
    needle = str(run_dir)
    with open(trace) as fh:
        for line in fh:
            if needle in line:
                match = CALL.match(line.split(" ", 1)[1] if line[0].isdigit() else line)
                kinds[match.group(1) if match else "?"] += 1
                if DETAIL is not None:  # which files: numbers and hashes folded, so that kinds of path add up
                    path = re.sub(r"[0-9a-f]{32}|\d+", "N", line[line.find(needle) + len(needle):].split('"')[0])
                    DETAIL[(match.group(1) if match else "?", path)] += 1
    units = -(-rows // unit_rows)
    return units, kinds, sum(kinds.values()) / units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,8,32")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--unit-rows", type=int, default=10)
    parser.add_argument("--detail", action="store_true", help="also print the most frequent (call, path) pairs")
    args = parser.parse_args()
    global DETAIL
    if args.detail:
        DETAIL = collections.Counter()
    if not shutil.which("strace"):
        sys.exit("strace is not installed (apt-get install strace)")
    root = Path(tempfile.mkdtemp(prefix="bench-strace-"))
    try:
        print(f"{args.rows} rows, data.unit_rows={args.unit_rows}; calls on the run directory (all processes)")
        print(f"{'replicas':>8} {'calls/unit':>10}  by call")
        for replicas in [int(x) for x in args.replicas.split(",")]:
            units, kinds, per_unit = measure(replicas, args.rows, args.unit_rows, root)
            top = " ".join(f"{k}={v / units:.2f}" for k, v in kinds.most_common(8))
            print(f"{replicas:>8} {per_unit:>10.2f}  {top}", flush=True)
            if DETAIL is not None:
                for (call, path), n in DETAIL.most_common(12):
                    print(f"{'':>10} {n / units:>8.2f}  {call} {path}")
                DETAIL.clear()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
