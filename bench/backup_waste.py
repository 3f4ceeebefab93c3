"""Rows answered and thrown away by backup copies, on a real local run (issue 19, item 10).

`orchestrator run` (cluster=local, the embedded engine) with R equal replicas over N rows in U units,
the engine failing a share of requests with HTTP 500 (retried by the client): the run's summary.json
says how many backup copies ran and how many answered rows they discarded. Printed per round: the
copies, the rows discarded and their share of the input, and the wall time; then the mean share.

    python bench/backup_waste.py [--rows 20000] [--units 10] [--replicas 2] [--error-rate 0.02] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_prompts  # noqa: E402

EXE = shutil.which("orchestrator") or "orchestrator"


def one_round(work: Path, args, k: int) -> dict:
    src = write_prompts(work / "in.parquet", args.rows)
    run_dir = work / f"run{k}"
    started = time.monotonic()
    proc = subprocess.run([EXE, "run", f"data.input={src}", f"run_dir={run_dir}", f"replicas={args.replicas}",
                           f"data.unit_rows={args.rows // args.units}", "client.batch_size=16",
                           f"engine.simulator.error_rate={args.error_rate}", f"engine.simulator.seed={k}",
                           "engine.simulator.request_latency_s=0.05", "sampling.tokens_to_generate=4"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"copies": summary.get("backup_copies", 0), "discarded": summary.get("discarded_rows", 0),
            "wall_s": time.monotonic() - started, "complete": summary["complete"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--units", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--error-rate", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            got = one_round(Path(tmp), args, k)
            share = got["discarded"] / args.rows
            shares.append(share)
            print(f"round {k}: {got['copies']} backup copies, {got['discarded']} rows discarded "
                  f"({share:.1%} of {args.rows}), complete={got['complete']}, {got['wall_s']:.0f} s", flush=True)
    print(f"mean share discarded: {sum(shares) / len(shares):.1%} ({args.replicas} equal replicas, {args.units} "
          f"units, {args.error_rate:.0%} injected 500s)")


if __name__ == "__main__":
    main()
