"""Pipeline overhead: the full `orchestrator run` against a zero-latency engine, relative to a bare HTTP loop.

One zero-latency embedded engine process (NeMo route, PUT /generate). 100,000 prompts.

(a) bare loop: aiohttp, the same prompts already formatted with the default model's prompt template,
    128 sentences per request, 2 requests in flight (NeMo strategy), the same body the pipeline sends
    (NemoCodec.payload, tokens_to_generate=16); each response is JSON-decoded and nothing else.
(b) `orchestrator run engine.url=... sampling.tokens_to_generate=16 ...`; prompts_per_s from
    summary.json (over generate_s: first request to last commit).

The order is a b a b ... a (--rounds 5): every pipeline run sits between two bare runs, and each
round's ratio is its pipeline prompts/s over the mean of those two bare runs. On a small shared VM
whose speed drifts, adjacent runs are what compare; the headline is the median of the rounds' ratios
(best/best is printed too). Target: >= 0.80.

    python bench/pipeline_overhead.py [--prompts 100000] [--rounds 5] [--override client.journal_sync_s=0.1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp
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

from orchestrator.config import compose
from orchestrator.prompts import format_prompt
from orchestrator.protocols.nemo import NemoCodec

TOKENS = 16
BATCH = 128
IN_FLIGHT = 2
TARGET = 0.80


async def bare_loop(url: str, bodies: list[dict]) -> tuple[float, int]:
    """Send every body with IN_FLIGHT requests in flight; returns (seconds, sentences answered)."""
    it = iter(bodies)
    answered = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        for body in it:  # shared iterator: each worker takes the next batch when its request is done
            async with session.put(url + "/generate", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200 or len(data["sentences"]) != len(body["sentences"]):
                    raise RuntimeError(f"bad answer: HTTP {resp.status}")
                answered += len(data["sentences"])

    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))
        return time.perf_counter() - t0, answered


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=5, help="pipeline runs, each between two bare-loop runs")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="per pipeline run")
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE for every pipeline run (diagnosis)")
    args = ap.parse_args()

    work = tmpdir("bench-overhead-")
    try:
        t_all = time.perf_counter()
        load_before, probe_before = load(), cpu_probe()
        cpu = CpuWatch()
        data = write_prompts(work / "prompts.parquet", args.prompts)
        cfg = compose([f"sampling.tokens_to_generate={TOKENS}"])
        protocol = NemoCodec(cfg)
        prompts = pq.read_table(data, columns=["prompt"]).column("prompt").to_pylist()
        formatted = [format_prompt(p, cfg.model.prompt) for p in prompts]
        bodies = [protocol.payload(formatted[i:i + BATCH]) for i in range(0, len(formatted), BATCH)]
        del prompts, formatted

        with Engine(work) as engine:  # zero latency: every knob at its default (0)
            bare, pipe, walls = [], [], []
            secs, n = asyncio.run(bare_loop(engine.url, bodies))
            bare.append(n / secs)
            for r in range(args.rounds):  # a b a b ... a: each pipeline run between two bare runs
                run_dir = work / f"run{r}"
                # engine.protocol=nemo: the bare loop's route
                overrides = ["engine=endpoint", f"engine.url={engine.url}", "engine.protocol=nemo",
                             f"sampling.tokens_to_generate={TOKENS}",
                             f"data.input={hydra_quote(data)}", f"run_dir={hydra_quote(run_dir)}", *args.override]
                wall, _ = run_orchestrator(overrides, timeout_s=args.timeout_s)
                summary = json.loads((run_dir / "summary.json").read_text())
                if summary["ok"] != args.prompts:
                    raise RuntimeError(f"round {r}: {summary['ok']}/{args.prompts} rows ok")
                pipe.append(summary["prompts_per_s"])
                walls.append((wall, summary["generate_s"]))
                secs, n = asyncio.run(bare_loop(engine.url, bodies))
                bare.append(n / secs)

        print(f"machine: {machine()}; {load_before}, {probe_before} (before); {load()}, {cpu_probe()} (after)")
        print(cpu.report())
        print(f"prompts: {args.prompts}, {BATCH} per request, {IN_FLIGHT} in flight, tokens_to_generate={TOKENS}, "
              f"model={cfg.model.name} ({cfg.model.prompt.format}); {args.rounds} rounds a b a b ... a"
              + (f"; overrides {' '.join(args.override)}" if args.override else ""))
        ratios = []
        for r in range(args.rounds):
            around = (bare[r] + bare[r + 1]) / 2
            ratios.append(pipe[r] / around)
            print(f"round {r}: (a) bare {bare[r]:.0f} | (b) orchestrator run {pipe[r]:.0f} prompts/s "
                  f"(generate_s {walls[r][1]:.2f} s, whole command wall {walls[r][0]:.2f} s) "
                  f"| (a) bare {bare[r + 1]:.0f}"
                  f"  -> ratio vs the bare runs around it {pipe[r] / around:.3f}")
        ratio = statistics.median(ratios)
        print(f"bare loop prompts/s: best {max(bare):.0f}, median {statistics.median(bare):.0f}; "
              f"orchestrator run prompts/s: best {max(pipe):.0f}, median {statistics.median(pipe):.0f}; "
              f"best/best {max(pipe) / max(bare):.3f}")
        print(f"ratio = median over rounds of (pipeline / mean of the bare runs around it) = {ratio:.3f}   "
              f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)}; target >= {TARGET}: "
              f"{'met' if ratio >= TARGET else 'MISSED'})")
        print(f"bench total {time.perf_counter() - t_all:.1f} s")
        return 0
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
