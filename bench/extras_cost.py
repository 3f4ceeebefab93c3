"""The cost of keeping what the engine knows: logprobs and structured (JSON-schema) answers against a plain run.

One embedded engine process on the OpenAI route (continuous batching like vLLM: `--capacity` sequences at
once, each busy request_latency_s + tokens x token_latency_s). P prompts; four `orchestrator run`s over
the same prompts, interleaved over the rounds (a b c d a b c d ...):

(a) plain: the text, finish_reason, token counts;
(b) `sampling.logprobs=5`: each token's logprob and its 5 best alternatives (two list columns);
(c) `sampling.json_schema=<file>` with `output.parse=columns`: the engine is asked for the schema (vLLM's
    structured_outputs field), every answer is parsed and validated (jsonschema) and stored as typed columns;
(d) both.

For each run: prompts/s from summary.json (over generate_s: first request to last commit), and the client's
own CPU time per 1,000 rows (the `orchestrator run` process and its children, from os.wait4's rusage:
the engine is another process, so its extra work for logprobs is not counted). The headline is, per
case, the median over the rounds of its prompts/s over the plain run's of the same round (adjacent runs:
a drift of this small shared VM's speed hits them alike). Target: within 10 % (>= 0.90).

    python bench/extras_cost.py [--prompts 10000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import (
    REPO,
    CpuWatch,
    Engine,
    cleanup,
    cpu_probe,
    hydra_quote,
    load,
    machine,
    tmpdir,
    write_prompts,
)

TOKENS = 16
CAPACITY = 256
REQUEST_LATENCY_S = 0.05  # per sequence (prefill and scheduling)
TOKEN_LATENCY_S = 0.002  # per generated token
TARGET = 0.90
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "integer"},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "score", "ok"]}
ENV = {"PYTHONPATH": str(REPO)}  # this checkout's code, whatever `pip install -e` points at


def run(url: str, data, run_dir, prompts: int, extra: list[str]) -> dict:
    """One `orchestrator run`; its summary, wall time and the CPU seconds it (and its children) used."""
    overrides = ["engine=endpoint", f"engine.url={url}", "engine.protocol=openai", "sampling.greedy=false",
                 f"sampling.tokens_to_generate={TOKENS}", f"engine.simulator.capacity={CAPACITY}",
                 "data.unit_rows=1000", f"data.input={hydra_quote(data)}", f"run_dir={hydra_quote(run_dir)}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(["orchestrator", "run", *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **ENV), cwd=REPO)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{run_dir.name} failed:\n{out[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["ok"] != prompts:
        raise RuntimeError(f"{run_dir.name}: {summary['ok']}/{prompts} rows ok")
    summary.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = tmpdir("bench-extras-")
    try:
        load_before, probe_before = load(), cpu_probe()
        cpu = CpuWatch()
        data = write_prompts(work / "prompts.parquet", args.prompts)
        schema = work / "answer.schema.json"
        schema.write_text(json.dumps(SCHEMA))
        structured = [f"sampling.json_schema={hydra_quote(schema)}", "output.parse=columns"]
        cases = {"a": ("plain", []), "b": ("logprobs=5", ["sampling.logprobs=5"]),
                 "c": ("json_schema, parse=columns", structured),
                 "d": ("logprobs=5 and json_schema", ["sampling.logprobs=5", *structured])}
        got: dict[str, list[dict]] = {key: [] for key in cases}
        with Engine(work, capacity=CAPACITY, request_latency_s=REQUEST_LATENCY_S,
                    token_latency_s=TOKEN_LATENCY_S) as engine:
            for r in range(args.rounds):
                for key, (_, extra) in cases.items():
                    got[key].append(run(engine.url, data, work / f"{key}{r}", args.prompts, extra))

        print(f"machine: {machine()}; {load_before}, {probe_before} (before); {load()}, {cpu_probe()} (after)")
        print(cpu.report())
        print(f"OpenAI route, {args.prompts} prompts a run, tokens_to_generate={TOKENS}, capacity {CAPACITY}, "
              f"{REQUEST_LATENCY_S} s + {TOKEN_LATENCY_S} s/token a sequence; {args.rounds} rounds a b c d")
        worst = None
        for key, (label, _) in cases.items():
            rates = [s["prompts_per_s"] for s in got[key]]
            cpu_k = [1000 * s["cpu_s"] / args.prompts for s in got[key]]
            line = (f"({key}) {label:28s} prompts/s per round {', '.join(f'{x:.0f}' for x in rates)}; client CPU "
                    f"s per 1,000 rows {', '.join(f'{x:.2f}' for x in cpu_k)}")
            if key != "a":
                ratios = [s["prompts_per_s"] / p["prompts_per_s"] for s, p in zip(got[key], got["a"])]
                cpu_ratio = statistics.median(s["cpu_s"] / p["cpu_s"] for s, p in zip(got[key], got["a"]))
                ratio = statistics.median(ratios)
                worst = ratio if worst is None else min(worst, ratio)
                line += (f"; prompts/s / plain per round {', '.join(f'{x:.3f}' for x in ratios)}, median "
                         f"{ratio:.3f}; client CPU / plain, median {cpu_ratio:.2f}")
            print(line)
        print(f"HEADLINE worst case's prompts/s / plain (median of rounds): {worst:.3f} (target >= {TARGET})")
        return 0
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
