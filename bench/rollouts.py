"""Several answers per prompt: `sampling.rollouts=8` over P prompts against 8 x P distinct rows with rollouts=1.

One embedded engine process on the OpenAI route (continuous batching like vLLM: `--capacity` sequences at
once, each busy request_latency_s + tokens x token_latency_s; more wait). Three `orchestrator run`s, the
same 8 x P answers each, interleaved over the rounds (a b c a b c ...):

(a) rollouts=8 over P prompts, one request per row with n=8 (`sampling.rollouts_in_one_request=true`,
    the default for engine=vllm and engine=mock);
(b) rollouts=8 over P prompts, one request per rollout with its seed (`rollouts_in_one_request=false`, the
    default for sglang, trtllm and endpoint);
(c) rollouts=1 over 8 x P rows: the P prompts each written 8 times under distinct ids (the same token work).

prompts/s and answers/s come from summary.json (over generate_s: first request to last commit). The
headline is answers/s of (a) over (c), median over the rounds (each round's runs are adjacent, so a drift
of this small shared VM's speed hits them alike); (b)/(c) is printed too.

--nemo-prompts P2 (default 40; 0 skips it) also runs the NeMo route (PUT /generate, one generation at a time,
request_latency_s per request + the batch's longest sequence): rollouts=8 with one prompt per request (the
default: NeMo has one random_seed per request), rollouts=8 as 8 copies of a row's prompt in one request
(`sampling.rollouts_in_one_request=true`), and 8 x P2 rows sent 128 per request.

    python bench/rollouts.py [--prompts 1000] [--rounds 3] [--nemo-prompts 40]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import pyarrow as pa
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
    prompt_text,
    run_orchestrator,
    tmpdir,
)

ROLLOUTS = 8
TOKENS = 16
CAPACITY = 256
REQUEST_LATENCY_S = 0.2  # OpenAI route: per sequence (prefill and scheduling)
TOKEN_LATENCY_S = 0.005  # per generated token
NEMO_REQUEST_LATENCY_S = 0.05
NEMO_TOKEN_LATENCY_S = 0.002
ENV = {"PYTHONPATH": str(REPO)}  # this checkout's code, whatever `pip install -e` points at


def write_inputs(folder, prompts: int) -> tuple:
    """P prompts (ids q<i>), and the same prompts each written ROLLOUTS times (ids q<i>-<k>)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = [prompt_text(i) for i in range(prompts)]
    few = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(prompts)], "prompt": texts}), few)
    many = folder / "rows.parquet"
    pq.write_table(pa.table({"id": [f"q{i}-{k}" for i in range(prompts) for k in range(ROLLOUTS)],
                             "prompt": [t for t in texts for _ in range(ROLLOUTS)]}), many)
    return few, many


def run(url: str, protocol: str, data, run_dir, answers: int, extra: list[str]) -> dict:
    overrides = ["engine=endpoint", f"engine.url={url}", f"engine.protocol={protocol}", "sampling.greedy=false",
                 f"sampling.tokens_to_generate={TOKENS}", f"engine.simulator.capacity={CAPACITY}", "data.unit_rows=512",
                 f"data.input={hydra_quote(data)}", f"run_dir={hydra_quote(run_dir)}", *extra]
    wall, _ = run_orchestrator(overrides, timeout_s=600, env_extra=ENV)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["ok"] != answers:
        raise RuntimeError(f"{run_dir.name}: {summary['ok']}/{answers} answers ok")
    summary["wall_s"] = wall
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nemo-prompts", type=int, default=40)
    args = ap.parse_args()
    work = tmpdir("bench-rollouts-")
    try:
        t_all = time.perf_counter()
        load_before, probe_before = load(), cpu_probe()
        cpu = CpuWatch()
        few, many = write_inputs(work, args.prompts)
        answers = args.prompts * ROLLOUTS
        cases = {
            "a": ("rollouts=8, n=8 in one request", few, [f"sampling.rollouts={ROLLOUTS}",
                                                          "sampling.rollouts_in_one_request=true"]),
            "b": ("rollouts=8, one request per rollout", few, [f"sampling.rollouts={ROLLOUTS}",
                                                               "sampling.rollouts_in_one_request=false"]),
            "c": (f"rollouts=1 over {ROLLOUTS} x P rows", many, []),
        }
        got: dict[str, list[dict]] = {key: [] for key in cases}
        with Engine(work, capacity=CAPACITY, request_latency_s=REQUEST_LATENCY_S,
                    token_latency_s=TOKEN_LATENCY_S) as engine:
            for r in range(args.rounds):
                for key, (_, data, extra) in cases.items():
                    got[key].append(run(engine.url, "openai", data, work / f"{key}{r}", answers, extra))
        nemo = {}
        if args.nemo_prompts:
            small_few, small_many = write_inputs(work / "nemo", args.nemo_prompts)
            with Engine(work, request_latency_s=NEMO_REQUEST_LATENCY_S, token_latency_s=NEMO_TOKEN_LATENCY_S) as engine:
                nemo["rollouts"] = run(engine.url, "nemo", small_few, work / "nemo-a", args.nemo_prompts * ROLLOUTS,
                                       [f"sampling.rollouts={ROLLOUTS}"])
                nemo["copies"] = run(engine.url, "nemo", small_few, work / "nemo-b", args.nemo_prompts * ROLLOUTS,
                                     [f"sampling.rollouts={ROLLOUTS}", "sampling.rollouts_in_one_request=true"])
                nemo["rows"] = run(engine.url, "nemo", small_many, work / "nemo-c", args.nemo_prompts * ROLLOUTS, [])

        print(f"machine: {machine()}; {load_before}, {probe_before} (before); {load()}, {cpu_probe()} (after)")
        print(cpu.report())
        print(f"OpenAI route: {args.prompts} prompts x {ROLLOUTS} = {answers} answers per run, tokens_to_generate="
              f"{TOKENS}, engine capacity {CAPACITY} sequences, {REQUEST_LATENCY_S} s + {TOKEN_LATENCY_S} s/token "
              f"per sequence; {args.rounds} rounds a b c")
        for r in range(args.rounds):
            line = " | ".join(f"({k}) {got[k][r]['prompts_per_s']:.0f} prompts/s {got[k][r]['answers_per_s']:.0f} "
                              f"answers/s (generate_s {got[k][r]['generate_s']:.1f}, wall {got[k][r]['wall_s']:.1f})"
                              for k in cases)
            print(f"round {r}: {line}  -> a/c {got['a'][r]['answers_per_s'] / got['c'][r]['answers_per_s']:.3f}, "
                  f"b/c {got['b'][r]['answers_per_s'] / got['c'][r]['answers_per_s']:.3f}")
        for key, (what, _, _) in cases.items():
            print(f"({key}) {what}: median {statistics.median(s['prompts_per_s'] for s in got[key]):.0f} prompts/s, "
                  f"{statistics.median(s['answers_per_s'] for s in got[key]):.0f} answers/s")
        ideal = CAPACITY / (REQUEST_LATENCY_S + TOKENS * TOKEN_LATENCY_S)
        print(f"the engine's ceiling: {ideal:.0f} answers/s ({CAPACITY} sequences / "
              f"{REQUEST_LATENCY_S + TOKENS * TOKEN_LATENCY_S:.2f} s)")
        a_c = statistics.median(a["answers_per_s"] / c["answers_per_s"] for a, c in zip(got["a"], got["c"]))
        b_c = statistics.median(b["answers_per_s"] / c["answers_per_s"] for b, c in zip(got["b"], got["c"]))
        print(f"answers/s ratio, median over rounds: (a) n in one request / (c) separate rows = {a_c:.3f}; "
              f"(b) one request per rollout / (c) = {b_c:.3f}")
        if nemo:
            ra, rb, rc = nemo["rollouts"], nemo["copies"], nemo["rows"]
            print(f"NeMo route ({args.nemo_prompts} prompts x {ROLLOUTS}, {NEMO_REQUEST_LATENCY_S} s per request + "
                  f"{NEMO_TOKEN_LATENCY_S} s/token of the longest, one generation at a time): rollouts=8, one prompt a "
                  f"request {ra['answers_per_s']:.1f} answers/s; rollouts=8 as 8 copies in one request "
                  f"{rb['answers_per_s']:.1f} answers/s; {ROLLOUTS} x P rows (128 a request) "
                  f"{rc['answers_per_s']:.1f} answers/s -> ratios {ra['answers_per_s'] / rc['answers_per_s']:.3f} and "
                  f"{rb['answers_per_s'] / rc['answers_per_s']:.3f}")
        print(f"bench total {time.perf_counter() - t_all:.1f} s")
        return 0
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
