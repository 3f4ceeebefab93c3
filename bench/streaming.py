"""Streaming between pipeline stages: the local two-stage pipeline streamed against one stage after the other.

Two run stages on the embedded engine (cluster=local), equal in cost: `generate` answers P prompts, and
`judge` (`from: generate`) answers one judge prompt per answer, a template over generate's columns, with the
same engine settings (OpenAI route, capacity C, request_latency_s + tokens x token_latency_s per request, the
same tokens). Two ways, interleaved over the rounds (a b a b ...), each its own `orchestrator pipeline` process
in a fresh directory:

(a) streamed: judge follows generate unit by unit (the default, `data.follow_after=0`: its job is submitted once
    generate has committed its first unit);
(b) one after the other: judge's job is submitted once generate has committed every unit
    (`data.follow_after=1.0`), as a pipeline of separate runs would.

The wall time is the `orchestrator pipeline` process's, start to exit (job starts, engine starts, both stages).
The headline is (b) / (a), median over the rounds. Both pipelines' results are checked: every (id, rollout)
once in each stage.

    python bench/streaming.py [--prompts 400] [--rounds 3] [--capacity 16] [--tokens 16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from _common import REPO, CpuWatch, cleanup, cpu_probe, load, machine, tmpdir, write_prompts


def pipeline_file(path: Path, src: Path, args) -> Path:
    engine = ["engine=mock", "engine.protocol=openai", f"engine.simulator.capacity={args.capacity}",
              f"engine.simulator.request_latency_s={args.request_latency}",
              f"engine.simulator.token_latency_s={args.token_latency}",
              f"engine.simulator.max_natural_tokens={args.tokens}", f"sampling.tokens_to_generate={args.tokens}",
              f"data.unit_rows={args.unit_rows}"]
    stages = [{"name": "generate", "overrides": [f"data.input={src}", *engine, "data.keep_columns=[prompt]"]},
              {"name": "judge", "from": "generate",
               "overrides": [*engine, "data.prompt_template='Rate this answer: {{ response }}'",
                             "data.keep_columns=[prompt]"]}]
    path.write_text(json.dumps({"stages": stages}))
    return path


def run(file: Path, run_dir: Path, follow_after: float, timeout_s: float) -> float:
    cmd = [sys.executable, "-m", "orchestrator.cli", "pipeline", str(file), f"run_dir={run_dir}"]
    if follow_after:  # every run stage gets it; generate reads a file, so only judge uses it
        cmd.append(f"data.follow_after={follow_after}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the pipeline failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def check(run_dir: Path, prompts: int) -> None:
    for stage in ("generate", "judge"):
        table = pq.read_table(run_dir / stage / "results", columns=["id"]).to_pandas()
        if len(table) != prompts or table.id.duplicated().any():
            sys.exit(f"{stage}: {len(table)} rows, {table.id.duplicated().sum()} duplicated ids; {prompts} expected")


def first_and_last(run_dir: Path) -> tuple[float, float]:
    """judge's first commit and generate's last, as the files' times (how much the stages overlapped)."""
    judge = min(p.stat().st_mtime for p in (run_dir / "judge" / "results").glob("part-*.parquet"))
    gen = max(p.stat().st_mtime for p in (run_dir / "generate" / "results").glob("part-*.parquet"))
    return judge, gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--request-latency", type=float, default=0.2)
    ap.add_argument("--token-latency", type=float, default=0.02)
    ap.add_argument("--unit-rows", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    work = tmpdir("bench-streaming-")
    try:
        src = write_prompts(work / "prompts.parquet", args.prompts)
        file = pipeline_file(work / "pipeline.yaml", src, args)
        per_request = args.request_latency + args.tokens * args.token_latency
        ideal = args.prompts / args.capacity * per_request
        print(f"machine: {machine()}; {load()}; {cpu_probe()}")
        print(f"{args.prompts} prompts, 2 equal stages, capacity {args.capacity}, {per_request:.2f} s a request "
              f"(about {ideal:.0f} s of engine time per stage), units of {args.unit_rows} rows")
        streamed, sequential = [], []
        watch = CpuWatch()
        for r in range(args.rounds):
            for name, share, into in (("streamed", 0.0, streamed), ("one after the other", 1.0, sequential)):
                run_dir = work / f"run-{r}-{int(share)}"
                wall = run(file, run_dir, share, args.timeout)
                check(run_dir, args.prompts)
                judge_first, gen_last = first_and_last(run_dir)
                into.append(wall)
                print(f"round {r + 1} {name:>20}: {wall:6.1f} s; judge's first commit {gen_last - judge_first:+6.1f} s "
                      f"before generate's last", flush=True)
                cleanup(run_dir)
        ratios = [s / t for s, t in zip(sequential, streamed)]
        print(f"other processes' CPU while it ran: {watch.report()}")
        print(f"streamed: median {statistics.median(streamed):.1f} s; one after the other: median "
              f"{statistics.median(sequential):.1f} s")
        print(f"speed-up (one after the other / streamed), per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f} (target >= 1.3)")
    finally:
        cleanup(work)


if __name__ == "__main__":
    main()
