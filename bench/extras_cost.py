"""The cost of keeping what the engine knows: the pipeline overhead with logprobs and structured (JSON-schema)
answers on, against the plain run's, on the same engine.

One embedded engine process on the OpenAI route (continuous batching like vLLM: `--capacity` sequences at
once, each busy request_latency_s + tokens x token_latency_s). P prompts; four cases, each the same prompts:

(a) plain: the text, finish_reason, token counts;
(b) `sampling.logprobs=5`: each token's logprob and its 5 best alternatives (two list columns);
(c) `sampling.json_schema=<file>` with `output.parse=columns`: the engine is asked for the schema (vLLM's
    structured_outputs field), every answer is parsed and validated (jsonschema) and stored as typed columns;
(d) both.

A case's answers differ in length (a schema's answer is a short JSON object), so cases are not compared by
their rates: each is compared with a bare loop of the same requests. Per case and round, a bare aiohttp loop
sends exactly the bodies the pipeline sends (OpenAICodec.payload), as many in flight, and decodes each JSON
answer (nothing else); then `orchestrator run` runs the case (prompts/s from summary.json, over generate_s).
The case's overhead ratio is pipeline / bare. The headline, per case, is the median over the rounds of its
ratio over the plain case's ratio of the same round (adjacent runs: a drift of this small shared VM's speed
hits them alike). Target: >= 0.90 (the overhead with logprobs and parsing on within 10 % of the plain run's).
The client's own CPU per 1,000 rows is printed too (the `orchestrator run` process and its children, from
os.wait4's rusage, start-up included; the engine is another process).

    python bench/extras_cost.py [--prompts 4000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pyarrow.parquet as pq
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

from orchestrator.config import compose
from orchestrator.prompts import format_prompt
from orchestrator.protocols.base import EngineInfo
from orchestrator.protocols.openai import OpenAICodec

TOKENS = 16
CAPACITY = 128
REQUEST_LATENCY_S = 0.2  # per sequence (prefill and scheduling)
TOKEN_LATENCY_S = 0.01  # per generated token
TARGET = 0.90
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "integer"},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "score", "ok"]}
ENV = {"PYTHONPATH": str(REPO)}  # this checkout's code, whatever `pip install -e` points at
COMMON = ["engine.protocol=openai", "engine.api=completions", "sampling.greedy=false",
          f"sampling.tokens_to_generate={TOKENS}", f"engine.simulator.capacity={CAPACITY}"]


async def bare_loop(url: str, bodies: list[dict], in_flight: int) -> float:
    """Send every body with `in_flight` requests in flight, decode each answer; prompts/s."""
    it = iter(bodies)

    async def worker(session: aiohttp.ClientSession) -> None:
        for body in it:  # shared iterator: each worker takes the next body when its request is done
            async with session.post(url + "/v1/completions", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200 or not data.get("choices"):
                    raise RuntimeError(f"bad answer: HTTP {resp.status}: {str(data)[:200]}")

    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))
        return len(bodies) / (time.perf_counter() - t0)


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def run(url: str, data, run_dir, prompts: int, extra: list[str]) -> dict:
    """One `orchestrator run`; its summary, wall time and the CPU seconds it (and its children) used."""
    overrides = ["engine=endpoint", f"engine.url={url}", *COMMON, "data.unit_rows=1000",
                 f"data.input={hydra_quote(data)}", f"run_dir={hydra_quote(run_dir)}", *extra]
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
    ap.add_argument("--prompts", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = tmpdir("bench-extras-")
    try:
        t_all = time.perf_counter()
        load_before, probe_before = load(), cpu_probe()
        cpu = CpuWatch()
        data = write_prompts(work / "prompts.parquet", args.prompts)
        schema = work / "answer.schema.json"
        schema.write_text(json.dumps(SCHEMA))
        structured = [f"sampling.json_schema={hydra_quote(schema)}", "output.parse=columns"]
        cases = {"a": ("plain", []), "b": ("logprobs=5", ["sampling.logprobs=5"]),
                 "c": ("json_schema, parse=columns", structured),
                 "d": ("logprobs=5 and json_schema", ["sampling.logprobs=5", *structured])}
        prompts = pq.read_table(data, columns=["prompt"]).column("prompt").to_pylist()
        got: dict[str, list[tuple[float, dict]]] = {key: [] for key in cases}
        with Engine(work, capacity=CAPACITY, request_latency_s=REQUEST_LATENCY_S,
                    token_latency_s=TOKEN_LATENCY_S) as engine:
            info = EngineInfo(url=engine.url, protocol="openai", model_name=served_model(engine.url),
                              api="completions")
            bodies, in_flight = {}, {}
            for key, (_, extra) in cases.items():  # the bodies the pipeline sends, case by case
                cfg = compose([*COMMON, *extra])
                codec = OpenAICodec(cfg, info)
                bodies[key] = [codec.payload([format_prompt(p, cfg.model.prompt)]) for p in prompts]
                in_flight[key] = codec.in_flight
            for r in range(args.rounds):
                for key, (_, extra) in cases.items():
                    bare = asyncio.run(bare_loop(engine.url, bodies[key], in_flight[key]))
                    got[key].append((bare, run(engine.url, data, work / f"{key}{r}", args.prompts, extra)))

        print(f"machine: {machine()}; {load_before}, {probe_before} (before); {load()}, {cpu_probe()} (after)")
        print(cpu.report())
        print(f"OpenAI route (completions), {args.prompts} prompts a run, tokens_to_generate={TOKENS}, capacity "
              f"{CAPACITY}, {REQUEST_LATENCY_S} s + {TOKEN_LATENCY_S} s/token a sequence, {in_flight['a']} in flight; "
              f"{args.rounds} rounds, each case's bare loop then its run")
        plain = [s["prompts_per_s"] / bare for bare, s in got["a"]]
        worst = None
        for key, (label, _) in cases.items():
            ratios = [s["prompts_per_s"] / bare for bare, s in got[key]]
            cpu_k = [1000 * s["cpu_s"] / args.prompts for _, s in got[key]]
            rates = ", ".join(f"{bare:.0f}/{s['prompts_per_s']:.0f}" for bare, s in got[key])
            line = (f"({key}) {label:28s} bare / run prompts/s per round {rates}; run / bare "
                    f"{', '.join(f'{x:.3f}' for x in ratios)}; client CPU s per 1,000 rows "
                    f"{', '.join(f'{x:.2f}' for x in cpu_k)}")
            if key != "a":
                relative = statistics.median(x / p for x, p in zip(ratios, plain))
                worst = relative if worst is None else min(worst, relative)
                line += f"; (run / bare) / plain's, median {relative:.3f}"
            print(line)
        print(f"HEADLINE worst case's (run / bare) over the plain case's (median of rounds): {worst:.3f} "
              f"(target >= {TARGET}: {'met' if worst >= TARGET else 'MISSED'})")
        print(f"bench total {time.perf_counter() - t_all:.1f} s")
        return 0
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
