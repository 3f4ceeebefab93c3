"""Engine utilisation: how close the full pipeline keeps a continuous-batching engine to its ideal.

The embedded engine runs as its own process on the OpenAI route with capacity 256 and a per-request
service time of request_latency + generated_tokens * token_latency = 0.2 s .. ~2.0 s (a prompt's
natural answer length, 1..512 tokens, decides it). `orchestrator run` sends it 20,000 prompts.

    utilisation = delta(engine busy_s) / generate_s

where busy_s (GET /stats) is the ideal engine time consumed: the sum of service times / capacity, and
generate_s (summary.json) is first request sent to last result committed. Target: >= 0.97.

    python bench/engine_utilisation.py [--prompts 20000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import pyarrow.parquet as pq
from _common import (
    CpuWatch,
    Engine,
    cleanup,
    cpu_probe,
    hydra_quote,
    load,
    machine,
    run_orchestrator,
    tmpdir,
    write_prompts,
)

CAPACITY = 256
REQUEST_LATENCY_S = 0.2
TOKEN_LATENCY_S = 0.0035
MAX_TOKENS = 512
TARGET = 0.97


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20000)
    ap.add_argument("--timeout-s", type=float, default=220.0)
    args = ap.parse_args()

    work = tmpdir("bench-util-")
    try:
        t0 = time.perf_counter()
        load_before, probe_before = load(), cpu_probe()
        cpu = CpuWatch()
        data = write_prompts(work / "prompts.parquet", args.prompts)
        run_dir = work / "run"
        with Engine(work, capacity=CAPACITY, request_latency_s=REQUEST_LATENCY_S, token_latency_s=TOKEN_LATENCY_S,
                    max_natural_tokens=MAX_TOKENS) as engine:
            before = engine.stats()
            overrides = ["engine=endpoint", f"engine.url={engine.url}", "engine.protocol=openai",
                         f"engine.simulator.capacity={CAPACITY}",
                         f"sampling.tokens_to_generate={MAX_TOKENS}", f"data.input={hydra_quote(data)}",
                         f"run_dir={hydra_quote(run_dir)}"]
            wall, _ = run_orchestrator(overrides, timeout_s=args.timeout_s)
            after = engine.stats()
        summary = json.loads((run_dir / "summary.json").read_text())
        results = pq.read_table(run_dir / "results", columns=["status", "latency_s", "output_tokens"])
        status = results.column("status").to_pylist()
        latency = results.column("latency_s").to_pylist()
        tokens = results.column("output_tokens").to_pylist()

        rows, ok = len(status), sum(1 for s in status if s == "ok")
        busy = after["busy_s"] - before["busy_s"]
        prompts_served = after["prompts"] - before["prompts"]
        gen_s = summary["generate_s"]
        utilisation = busy / gen_s if gen_s > 0 else float("nan")
        achieved = rows / gen_s if gen_s > 0 else float("nan")
        ideal = prompts_served / busy if busy > 0 else float("nan")
        lat = sorted(x for x in latency if x is not None)

        print(f"machine: {machine()}; {load_before}, {probe_before} (before); {load()}, {cpu_probe()} (after)")
        print(cpu.report())
        print(f"engine: capacity={CAPACITY} request_latency_s={REQUEST_LATENCY_S} token_latency_s={TOKEN_LATENCY_S} "
              f"max_natural_tokens={MAX_TOKENS} (OpenAI route)")
        print(f"rows: {rows} (expected {args.prompts}), ok: {ok}, "
              f"summary ok/failed: {summary['ok']}/{summary['failed']}")
        print(f"engine prompts served during the run: {prompts_served} (incl. the 1-token readiness probe)")
        print(f"request latency_s (client-side, per row): min {lat[0]:.3f}  median {statistics.median(lat):.3f}  "
              f"max {lat[-1]:.3f}  p05 {lat[len(lat) // 20]:.3f}  p95 {lat[len(lat) * 19 // 20]:.3f}")
        service = sorted(REQUEST_LATENCY_S + t * TOKEN_LATENCY_S for t in tokens)
        print(f"output_tokens: min {min(tokens)}  median {statistics.median(tokens)}  max {max(tokens)}; "
              f"engine service time they imply (0.2 s + tokens x 3.5 ms): min {service[0]:.3f}  "
              f"median {statistics.median(service):.3f}  max {service[-1]:.3f} s")
        print("  (client latency_s adds the wait in the engine's FIFO queue: the client keeps "
              f"2 x {CAPACITY} requests in flight)")
        print(f"generate_s: {gen_s:.3f}   whole command wall: {wall:.1f} s   "
              f"(bench total {time.perf_counter() - t0:.1f} s)")
        print(f"engine busy_s delta (ideal engine time): {busy:.3f}")
        print(f"achieved: {achieved:.1f} prompts/s   ideal: {ideal:.1f} prompts/s")
        print(f"peak engine active/waiting (since start): {after['peak_active']}/{after['peak_waiting']}")
        print(f"utilisation = busy_s / generate_s = {utilisation:.4f}   (target >= {TARGET}: "
              f"{'met' if utilisation >= TARGET else 'MISSED'})")
        ok_all = rows == args.prompts and ok == rows
        if not ok_all:
            print("WARNING: results incomplete or with errors", file=sys.stderr)
        return 0 if ok_all else 1
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
