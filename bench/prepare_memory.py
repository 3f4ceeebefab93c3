"""Big inputs: peak RSS of `prepare()` at 10M and 20M input rows (100M with --rows), plan.json's size, and
`orchestrator status` / the summary at 50,000 committed units.

Input: N rows (`id`: string `id-<n>`, `prompt`: string) spread over --files Parquet files (default 1,000),
written by a subprocess into a temporary directory. Each prepare runs in its own subprocess:
`orchestrator.config.compose([data.input=..., run_dir=...])` then `orchestrator.preflight.prepare(cfg)`, the
CLI's step before anything is submitted (footers, plan.json, fingerprint, the duplicate-id scan over every
id). Its peak RSS is the child's ru_maxrss from os.wait4 (KiB on Linux), read per child rather than
getrusage(RUSAGE_CHILDREN), which would also count the input writer. On Linux a child's ru_maxrss starts at
its spawner's high-water mark (vfork + exec, see memory.py); this process writes nothing big itself and
prints its own peak, below every child's figure. Target: <= 1 GiB at 100M rows, flat from 10M to 20M.
--duplicates makes the last file repeat ten ids of the first: prepare then refuses the input after the
second pass that finds the examples (the figure covers both passes).

Status: a run directory whose plan has --units units (one row each), every unit committed with
`orchestrator.commits.commit_unit`, one in ten holding a failed row (5,000 units to group errors from), each
with its error groups in its stats as the client records them (--ungrouped: without, as before). Timed:
`python -m orchestrator.cli status RUN_DIR` as a command, twice (with --ungrouped the first reads the failed
units' error columns, the second finds them in work/status-errors.json), and in one process
`status.collect` and `report.build_summary`. Target: each well under 2 s.

    python bench/prepare_memory.py [--rows 10000000 20000000] [--files 1000] [--units 50000] [--duplicates]
    python bench/prepare_memory.py --rows 100000000 --files 10000 --units 0
    python bench/prepare_memory.py --rows 1000 --files 1 [--ungrouped]   # the status part alone, in effect
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, CpuWatch, cleanup, cpu_probe, hydra_quote, load, machine, tmpdir

TARGET_MIB = 1024


def child_env() -> dict:
    """The children import orchestrator from this checkout (or from PYTHONPATH when it is set)."""
    return dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH") or str(REPO))


def generate(folder: str, rows: str, files: str, duplicates: str) -> None:
    """Runs in a subprocess: the input, file by file (bounded memory)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows, files = int(rows), int(files)
    per = -(-rows // files)
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        if lo >= hi:
            break
        numbers = pc.cast(pa.array(np.arange(lo, hi)), pa.string())
        if duplicates == "1" and hi == rows:  # the last file repeats ten ids of the first
            numbers = pa.concat_arrays([pc.cast(pa.array(np.arange(10)), pa.string()), numbers[10:]])
        table = pa.table({"id": pc.binary_join_element_wise("id-", numbers, ""),
                          "prompt": pc.binary_join_element_wise("Question ", numbers, ": what comes after it?", "")})
        shard = Path(folder) / f"shard-{f // 100:03d}"
        shard.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, shard / f"part-{f:05d}.parquet")


def prepare_child(data: str, run_dir: str, out: str) -> None:
    """Runs in the measured subprocess: prepare() only."""
    import resource

    from orchestrator.config import compose
    from orchestrator.errors import InputError
    from orchestrator.preflight import prepare

    cfg = compose([f"data.input={hydra_quote(data)}", f"run_dir={hydra_quote(run_dir)}"])
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result: dict = {"maxrss_after_imports_kib": base_kib}
    try:
        plan, paths = prepare(cfg)
        result.update(rows=plan.total_rows, files=len(plan.files), units=len(plan.units),
                      plan_bytes=paths.plan.stat().st_size)
    except InputError as exc:
        result.update(refused=str(exc)[:300])
    result["prepare_s"] = time.perf_counter() - t0
    result["spill_left"] = [p.name for p in (Path(run_dir) / "work").glob("duplicate-ids-*")]
    Path(out).write_text(json.dumps(result))


def fabricate(folder: str, units: str, out: str, grouped: str = "1") -> None:
    """Runs in a subprocess: a run directory with every one of `units` units committed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.commits import commit_unit, error_summary
    from orchestrator.config import compose
    from orchestrator.plan import result_schema
    from orchestrator.preflight import prepare

    units, grouped = int(units), grouped == "1"
    src = Path(folder) / "status-input.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(units)], "prompt": ["hello"] * units}), src)
    cfg = compose([f"data.input={hydra_quote(src)}", f"run_dir={hydra_quote(Path(folder) / 'status-run')}",
                   "data.unit_rows=1"])
    plan, paths = prepare(cfg)
    schema = result_schema(plan)
    t0 = time.perf_counter()
    for unit in range(units):
        bad = unit % 10 == 0
        table = pa.table({"id": [f"q{unit}"], "response": [None if bad else "an answer"],
                          "status": ["error" if bad else "ok"],
                          "error": [f"gave up after {1 + unit % 5} attempts: HTTP 500 from replica {unit % 3}" if bad
                                    else None],
                          "finish_reason": [None if bad else "stop"], "stop": [None],
                          "prompt_tokens": [None if bad else 2], "reasoning": [None],
                          "output_tokens": [None if bad else 3], "latency_s": [0.25],
                          "attempts": pa.array([1], pa.int32())}, schema=schema)
        stats = {"rows": 1, "ok": 0 if bad else 1, "failed": int(bad), "output_tokens": 0 if bad else 3, "units": 1,
                 "retryable": int(bad)}
        if bad and grouped:  # what the client's commit records (status then reads no result file)
            stats["errors"] = error_summary(table.column("error").to_pylist())
        commit_unit(paths, unit, table, stats, "r0")
    Path(out).write_text(json.dumps({"run_dir": str(paths.root), "commit_s": time.perf_counter() - t0}))


def summary_child(run_dir: str, out: str) -> None:
    """Runs in a subprocess: status.collect and report.build_summary, timed after the imports."""
    from orchestrator.report import build_summary
    from orchestrator.status import collect, open_run

    t0 = time.perf_counter()
    found = collect(run_dir)
    collect_s = time.perf_counter() - t0
    paths, plan = open_run(run_dir)
    t0 = time.perf_counter()
    summary = build_summary(paths, plan, "bench", time.time())
    summary_s = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"collect_s": collect_s, "summary_s": summary_s,
                                     "units_done": summary["units_done"], "failed": summary["failed"],
                                     "groups": len(found["errors"])}))


def spawn(args: list[str], timeout_s: float) -> dict:
    """This script as a child with args; reaped with os.wait4 for its own peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], env=child_env(), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:  # bounded: poll wait4 until the child ends or the deadline passes
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            rc = "timeout"
            break
        time.sleep(0.05)
    proc.returncode = rc if isinstance(rc, int) else -9  # reaped by wait4 already
    if rc != 0:
        raise RuntimeError(f"{' '.join(args[:2])}: the child ended with {rc} (timeout {timeout_s:.0f} s)")
    return {"maxrss_kib": usage.ru_maxrss, "wall_s": time.perf_counter() - t0,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def status_command(run_dir: str) -> float:
    t0 = time.perf_counter()
    # run outside the checkout, so that the orchestrator imported is child_env's (`-m` puts the cwd first)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", run_dir], env=child_env(),
                          capture_output=True, text=True, timeout=600, cwd=Path(run_dir).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator status failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> int:
    modes = {"--generate": generate, "--prepare": prepare_child, "--fabricate": fabricate, "--summary": summary_child}
    if len(sys.argv) > 1 and sys.argv[1] in modes:
        modes[sys.argv[1]](*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 20_000_000])
    ap.add_argument("--files", type=int, default=1000, help="input files per input")
    ap.add_argument("--units", type=int, default=50_000, help="committed units for the status timing (0: skip)")
    ap.add_argument("--duplicates", action="store_true", help="the last file repeats ten ids of the first")
    ap.add_argument("--ungrouped", action="store_true",
                    help="commits without their error groups (as before they were recorded): status reads the files")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per child")
    args = ap.parse_args()

    import resource

    work = tmpdir("bench-prepare-memory-")
    try:
        t_all = time.perf_counter()
        cpu = CpuWatch()
        print(f"machine: {machine()}; {load()}, {cpu_probe()}", flush=True)
        rows_out = []
        for n in args.rows:
            data, run_dir, out = work / f"in-{n}", work / f"run-{n}", work / f"prepare-{n}.json"
            gen = spawn(["--generate", str(data), str(n), str(args.files), "1" if args.duplicates else "0"],
                        args.timeout_s)
            size = sum(p.stat().st_size for p in data.rglob("*.parquet"))
            print(f"{n:>11,} rows: input written in {gen['wall_s']:.1f} s ({size / 2**20:.0f} MiB)", flush=True)
            measured = spawn(["--prepare", str(data), str(run_dir), str(out)], args.timeout_s)
            result = {**json.loads(out.read_text()), **measured, "n": n}
            rows_out.append(result)
            what = (f"refused as expected: {result['refused'][:90]}..." if "refused" in result else
                    f"{result['files']} files, {result['units']:,} units, "
                    f"plan.json {result['plan_bytes'] / 1024:.1f} KiB")
            print(f"{n:>11,} rows: prepare {result['prepare_s']:.1f} s, peak RSS {result['maxrss_kib'] / 1024:.1f} MiB "
                  f"(after imports {result['maxrss_after_imports_kib'] / 1024:.1f} MiB); {what}; spill files left: "
                  f"{len(result['spill_left'])}", flush=True)
            cleanup(data)
            cleanup(run_dir)
        status = None
        if args.units:
            fab_out, sum_out = work / "fabricate.json", work / "summary.json"
            spawn(["--fabricate", str(work), str(args.units), str(fab_out), "0" if args.ungrouped else "1"],
                  args.timeout_s)
            fab = json.loads(fab_out.read_text())
            cold, warm = status_command(fab["run_dir"]), status_command(fab["run_dir"])
            spawn(["--summary", fab["run_dir"], str(sum_out)], args.timeout_s)
            status = {**fab, **json.loads(sum_out.read_text()), "cold_s": cold, "warm_s": warm}
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"\nthis process's own peak RSS {own / 1024:.1f} MiB (a child's ru_maxrss starts at it)")
        print("\n| rows | files | units | prepare | peak RSS of prepare | after imports | plan.json |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows_out:
            print(f"| {r['n']:,} | {r.get('files', '-')} | {r.get('units', 0):,} | {r['prepare_s']:.1f} s | "
                  f"{r['maxrss_kib'] / 1024:.1f} MiB | {r['maxrss_after_imports_kib'] / 1024:.1f} MiB | "
                  + (f"{r['plan_bytes'] / 1024:.1f} KiB |" if "plan_bytes" in r else "refused (duplicates) |"))
        peaks = [r["maxrss_kib"] for r in rows_out]
        if len(peaks) > 1:
            print(f"\npeak({rows_out[-1]['n']:,}) / peak({rows_out[0]['n']:,}) = {peaks[-1] / peaks[0]:.3f}")
        print(f"largest peak {max(peaks) / 1024:.1f} MiB (target <= {TARGET_MIB} MiB: "
              f"{'met' if max(peaks) <= TARGET_MIB * 1024 else 'MISSED'})")
        if status:
            print(f"\n{args.units:,} committed units ({status['failed']:,} with a failed row; commits took "
                  f"{status['commit_s']:.0f} s to write):")
            print(f"  `orchestrator status RUN_DIR` command, first: {status['cold_s']:.2f} s; again: "
                  f"{status['warm_s']:.2f} s (each including Python start-up and imports)")
            print(f"  in one process: status.collect {status['collect_s']:.2f} s, report.build_summary "
                  f"{status['summary_s']:.2f} s (units_done {status['units_done']:,}, "
                  f"{status['groups']} error group(s))")
        print(f"\nbench total {time.perf_counter() - t_all:.1f} s; {load()}")
        print(cpu.report())
        return 0 if max(peaks) <= TARGET_MIB * 1024 else 1
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
