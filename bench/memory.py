"""Client memory: peak RSS of the client for 100,000 vs 2,000,000 input rows.

Two Parquet inputs (row groups of 65,536 rows, prompts of ~100-200 characters), one zero-latency
embedded engine process (NeMo route), and for each input the client in its own subprocess:
`orchestrator.config.compose([...])` with engine.url set, the stored plan loaded as the job does
(`Plan.from_json`), then `asyncio.run(orchestrator.client.Client(cfg, plan, paths, url, "bench", "r0").run())`.
`prepare()` (the CLI's step before submitting: footers, fingerprint, the duplicate-id scan) runs first
in a separate, unmeasured subprocess, as it runs in the CLI process and not in the job. The child's peak
RSS comes from `os.wait4` (ru_maxrss, KiB on Linux): the client alone, not the engine.
sampling.tokens_to_generate=4. ratio = peak(2M) / peak(100k). Target: <= 1.2.

Linux caveat, handled here: a child's ru_maxrss starts at the *spawning* process's RSS high-water
mark (Python spawns with vfork, and exec records the old mm's hiwater_rss in the child's maxrss), so
a client spawned from this script after it wrote a 2M-row input would report this script's peak, not
its own. The clients are therefore spawned (and reaped with wait4) by a tiny launcher process that
this script starts first, before it imports pyarrow or allocates anything; its own peak is printed.

The child's peak before the client loop starts (imports + the stored plan) is printed as
"after imports+plan".

    python bench/memory.py [--small 100000] [--large 2000000] [--override data.duplicate_ids=keep]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOKENS = 4
TARGET = 1.2


def child(url: str, data: str, run_dir: str, out: str, *overrides: str) -> None:
    """Runs in the measured subprocess: the client only."""
    import asyncio
    import resource

    from _common import hydra_quote

    from orchestrator.client import Client
    from orchestrator.config import compose
    from orchestrator.plan import Plan
    from orchestrator.preflight import prepare
    from orchestrator.rundir import RunPaths

    cfg = compose(["engine=endpoint", f"engine.url={url}", f"sampling.tokens_to_generate={TOKENS}",
                   f"data.input={hydra_quote(data)}", f"run_dir={hydra_quote(run_dir)}", *overrides])
    if out == "--prepare":  # the CLI's step, in its own unmeasured process
        prepare(cfg)
        return
    paths = RunPaths(Path(run_dir).resolve())
    plan = Plan.from_json(paths.plan.read_text())
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stats = asyncio.run(Client(cfg, plan, paths, url, "bench", "r0").run())
    secs = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"rows": stats.rows.rows, "ok": stats.rows.ok, "units": stats.rows.units,
                                     "client_s": secs, "generate_s": stats.generate_s,
                                     "maxrss_before_client_kib": base_kib}))


def launcher() -> None:
    """Runs in the small launcher process: for each JSON line {cmd, timeout_s} on stdin, spawn cmd,
    reap it with os.wait4 and answer one JSON line {rc, maxrss_kib, wall_s}; EOF ends it."""
    import resource

    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.perf_counter()
        proc = subprocess.Popen(job["cmd"], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + job["timeout_s"]
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
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"rc": rc, "maxrss_kib": usage.ru_maxrss, "wall_s": time.perf_counter() - t0,
                          "cpu_s": usage.ru_utime + usage.ru_stime, "launcher_maxrss_kib": own}), flush=True)


class Launcher:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--launcher"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, cmd: list[str], timeout_s: float) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "timeout_s": timeout_s}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def measure(launch: Launcher, url: str, data: Path, work: Path, tag: str, timeout_s: float,
            overrides: list[str]) -> dict:
    out = work / f"{tag}.json"
    run_dir = str(work / f"run-{tag}")
    subprocess.run([sys.executable, __file__, "--child", url, str(data), run_dir, "--prepare", *overrides], check=True)
    cmd = [sys.executable, __file__, "--child", url, str(data), run_dir, str(out), *overrides]
    answer = launch.run(cmd, timeout_s)
    if answer["rc"] != 0:
        raise RuntimeError(f"{tag}: client ended with {answer['rc']} (timeout {timeout_s:.0f} s)")
    result = json.loads(out.read_text())
    result.update(peak_rss_kib=answer["maxrss_kib"], wall_s=answer["wall_s"], cpu_s=answer["cpu_s"],
                  launcher_maxrss_kib=answer["launcher_maxrss_kib"])
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--launcher":
        launcher()
        return 0
    launch = Launcher()  # first, while this process is still small
    try:
        return bench(launch)
    finally:
        launch.close()


def bench(launch: Launcher) -> int:
    from _common import CpuWatch, Engine, cleanup, cpu_probe, load, machine, tmpdir, write_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=2_000_000)
    ap.add_argument("--timeout-s", type=float, default=200.0, help="per client run")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for both clients (diagnosis), e.g. data.duplicate_ids=keep")
    args = ap.parse_args()

    work = tmpdir("bench-memory-")
    try:
        t_all = time.perf_counter()
        cpu = CpuWatch()
        small = write_prompts(work / "small.parquet", args.small)
        large = write_prompts(work / "large.parquet", args.large)
        print(f"machine: {machine()}; {load()}, {cpu_probe()}")
        if args.override:
            print(f"extra overrides: {' '.join(args.override)}")
        print(f"inputs written in {time.perf_counter() - t_all:.1f} s: {small.stat().st_size / 2**20:.1f} MiB, "
              f"{large.stat().st_size / 2**20:.1f} MiB", flush=True)
        results = {}
        with Engine(work) as engine:
            for tag, data, n in (("small", small, args.small), ("large", large, args.large)):
                r = results[tag] = measure(launch, engine.url, data, work, tag, args.timeout_s, args.override)
                print(f"{n:>9} rows: peak RSS {r['peak_rss_kib'] / 1024:.1f} MiB (after imports+plan "
                      f"{r['maxrss_before_client_kib'] / 1024:.1f} MiB); rows {r['rows']}, ok {r['ok']}, "
                      f"units {r['units']}; client {r['client_s']:.1f} s ({r['rows'] / r['client_s']:.0f} rows/s), "
                      f"subprocess wall {r['wall_s']:.1f} s (launcher's own peak "
                      f"{r['launcher_maxrss_kib'] / 1024:.1f} MiB)", flush=True)
        ratio = results["large"]["peak_rss_kib"] / results["small"]["peak_rss_kib"]
        print(f"ratio = peak({args.large}) / peak({args.small}) = {ratio:.3f}   (target <= {TARGET}: "
              f"{'met' if ratio <= TARGET else 'MISSED'})")
        print(f"bench total {time.perf_counter() - t_all:.1f} s; {load()}")
        print(cpu.report(extra_own_s=sum(r["cpu_s"] for r in results.values())))
        complete = all(results[t]["ok"] == n for t, n in (("small", args.small), ("large", args.large)))
        return 0 if complete else 1
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
