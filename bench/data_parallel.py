"""Data parallel on the embedded engine: one replica of D = 4 pinned instances against one instance.

The same P prompts, cluster=local, the embedded engine on the OpenAI route with slow instances (capacity C
requests at once, request_latency_s + tokens x token_latency_s each), one unit of work per U rows. Two layouts
of TP2, interleaved over the rounds (a b a b ...), each its own `orchestrator run` process in a fresh directory:

(a) one instance: `layout.gpus_per_node=2 layout.tensor_parallel=2` (D = 1);
(b) D = 4: `layout.gpus_per_node=8 layout.tensor_parallel=2` (D unset fills the node: 4 pinned servers, each on
    its own GPUs and port, each with its own client: orchestrator/instances.py).

The figure is summary.json's prompts_per_s (input rows over the seconds of generation: start-up excluded), and
the wall time of the process is printed beside it. The headline is (b) / (a), the median over the rounds
(ideal: 4, target >= 3.6). Every run's results are checked: every id once.

    python bench/data_parallel.py [--prompts 800] [--rounds 3] [--capacity 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq
from _common import CpuWatch, cleanup, cpu_probe, load, machine, run_orchestrator, tmpdir, write_prompts

LAYOUTS = {"one instance": ["layout.gpus_per_node=2"], "DP=4": ["layout.gpus_per_node=8"]}


def run(src: Path, run_dir: Path, layout: list[str], args) -> tuple[float, float]:
    overrides = [f"data.input={src}", f"run_dir={run_dir}", "model=nemotron_mini_4b_instruct", "layout.nodes=1",
                 "layout.tensor_parallel=2", "layout.pipeline_parallel=1", *layout, "engine=mock",
                 "engine.protocol=openai", f"engine.simulator.capacity={args.capacity}",
                 f"engine.simulator.request_latency_s={args.request_latency}",
                 f"engine.simulator.token_latency_s={args.token_latency}",
                 f"engine.simulator.max_natural_tokens={args.tokens}", f"sampling.tokens_to_generate={args.tokens}",
                 f"data.unit_rows={args.unit_rows}"]
    wall, _ = run_orchestrator(overrides, args.timeout)
    table = pq.read_table(run_dir / "results", columns=["id"]).to_pandas()
    if len(table) != args.prompts or table.id.duplicated().any():
        sys.exit(f"{run_dir}: {len(table)} rows, {table.id.duplicated().sum()} duplicated ids; {args.prompts} expected")
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["prompts_per_s"], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--request-latency", type=float, default=0.2)
    ap.add_argument("--token-latency", type=float, default=0.02)
    ap.add_argument("--unit-rows", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    work = tmpdir("bench-dp-")
    try:
        src = write_prompts(work / "prompts.parquet", args.prompts)
        per_request = args.request_latency + args.tokens * args.token_latency
        print(f"machine: {machine()}; {load()}; {cpu_probe()}")
        print(f"{args.prompts} prompts, TP2 instances of capacity {args.capacity}, {per_request:.2f} s a request "
              f"(one instance at most {args.capacity / per_request:.0f} prompts/s), units of {args.unit_rows} rows")
        rates: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        watch = CpuWatch()
        for r in range(args.rounds):
            for name, layout in LAYOUTS.items():
                run_dir = work / f"run-{r}-{name.replace(' ', '-').replace('=', '')}"
                rate, wall = run(src, run_dir, layout, args)
                rates[name].append(rate)
                print(f"round {r + 1} {name:>12}: {rate:7.1f} prompts/s of generation; {wall:6.1f} s wall", flush=True)
                cleanup(run_dir)
        ratios = [b / a for a, b in zip(rates["one instance"], rates["DP=4"])]
        print(f"other processes' CPU while it ran: {watch.report()}")
        print(f"one instance: median {statistics.median(rates['one instance']):.1f} prompts/s; DP=4: median "
              f"{statistics.median(rates['DP=4']):.1f} prompts/s")
        print(f"speed-up (DP=4 / one instance), per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f} (ideal 4, target >= 3.6)")
    finally:
        cleanup(work)


if __name__ == "__main__":
    main()
