"""Real-engine benchmark: `orchestrator run` against a real vLLM, on the tiny model built offline.

One vLLM server (started by the orchestrator's own engine owner, engine=vllm) serves, in this order:
  a. a bare aiohttp loop at concurrency 16, 64 and 256 (the best rate is the reference);
  b. `orchestrator run engine=endpoint` with the default client.max_in_flight;
  c. the bare loop again at the best concurrency (the machine drifts: both readings are printed).
Then the server stops and vLLM's offline `LLM.generate` runs the same prompts in the vLLM venv.
Every path sends the same formatted prompts with greedy decoding and the same max_tokens, so each
generates the same tokens. It prints run / best bare loop and run / offline.

    python bench/real_engine.py [--prompts 400] [--tokens 32]

Needs scripts/install_vllm.sh (CPU) or, on a GPU machine, `--venv` pointing at a CUDA vLLM venv and
`--cpu false`; `--model-dir` takes any model directory (default: the tiny model, built if missing).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
from _common import REPO, cleanup, cpu_probe, load, machine, run_orchestrator, tmpdir, write_prompts

sys.path.insert(0, str(REPO))
from orchestrator.config import compose  # noqa: E402
from orchestrator.engines.server import EngineServer  # noqa: E402

CPU_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


async def bare_loop(url: str, model: str, prompts: list[str], tokens: int, concurrency: int) -> float:
    """prompts/s of the simplest client: a fixed pool of workers, one prompt per request."""
    queue = list(reversed(prompts))

    async def worker(session):
        while queue:
            prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0}
            async with session.post(url + "/v1/completions", json=body) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
        return len(prompts) / (time.perf_counter() - started)


OFFLINE = r"""
import json, sys, time
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    args = json.load(open(sys.argv[1]))
    llm = LLM(model=args["model"], max_model_len=4096, dtype="bfloat16", enable_chunked_prefill=args["cpu"] is False)
    params = SamplingParams(max_tokens=args["tokens"], temperature=0.0)
    llm.generate(args["prompts"], params)  # warm-up, as the server got its warm-up pass
    started = time.perf_counter()
    out = llm.generate(args["prompts"], params)
    secs = time.perf_counter() - started
    print("RESULT " + json.dumps({"prompts_per_s": len(args["prompts"]) / secs,
                      "tokens": sum(len(o.outputs[0].token_ids) for o in out)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--venv", default=os.environ.get("ORCHESTRATOR_VLLM_VENV",
                                                         str(Path.home() / ".cache" / "orchestrator-vllm-venv")))
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache" / "orchestrator" / "tiny-nemotron"))
    parser.add_argument("--cpu", default="true", choices=["true", "false"])
    args = parser.parse_args()
    venv, model_dir, cpu = Path(args.venv), Path(args.model_dir), args.cpu == "true"
    if not (model_dir / "config.json").exists():
        subprocess.run([str(venv / "bin" / "python"), str(REPO / "scripts" / "build_tiny_model.py"), str(model_dir)],
                       check=True)
    work = tmpdir("real-engine")
    src = write_prompts(work / "in.parquet", args.prompts)
    print(f"machine: {machine()}; {load()}; {cpu_probe()}")
    print(f"{args.prompts} prompts, max_tokens {args.tokens}, greedy; model {model_dir}")
    env = CPU_ENV if cpu else {"HF_HUB_OFFLINE": "1"}
    overrides = ["model=hf", f"model.path={model_dir}", "model.prompt.format=raw",
                 f"sampling.tokens_to_generate={args.tokens}", "sampling.greedy=true",
                 "sampling.min_tokens_to_generate=0"]
    engine = ["engine=vllm", f"engine.command=[{venv / 'bin' / 'vllm'},serve]", "engine.ready_timeout_s=600",
              *(f"+engine.env.{k}={v}" for k, v in env.items())]
    if cpu:
        engine.append("engine.extra_args=[--no-enable-chunked-prefill]")
    cfg = compose(overrides + engine)
    prompts = [str(p) for p in pq.read_table(src).column("prompt").to_pylist()]
    try:
        with EngineServer(cfg, work / "engine.log", work / "engine.port") as server:
            started = time.monotonic()
            info = server.wait_ready()
            print(f"vLLM ready in {time.monotonic() - started:.0f} s at {info.url} (model {info.model_name})")
            asyncio.run(bare_loop(info.url, info.model_name, prompts, args.tokens, 64))  # warm-up, not counted
            bare = {c: asyncio.run(bare_loop(info.url, info.model_name, prompts, args.tokens, c))
                    for c in (16, 64, 256)}
            for c, rate in bare.items():
                print(f"bare loop, concurrency {c}: {rate:.1f} prompts/s")
            best_c = max(bare, key=bare.get)
            runs, agains = [], []
            for round_ in range(args.rounds):  # run, then the best bare loop again: the machine drifts
                run_dir = work / f"run{round_}"
                run_orchestrator(overrides + ["engine=endpoint", f"engine.url={info.url}", f"data.input={src}",
                                              f"run_dir={run_dir}"], 1800)
                summary = json.loads((run_dir / "summary.json").read_text())
                runs.append(summary["prompts_per_s"])
                agains.append(asyncio.run(bare_loop(info.url, info.model_name, prompts, args.tokens, best_c)))
                print(f"round {round_}: orchestrator run (default client.max_in_flight) {runs[-1]:.1f} prompts/s "
                      f"({summary['ok']}/{summary['total']} ok); bare loop at {best_c} right after: "
                      f"{agains[-1]:.1f} prompts/s; ratio {runs[-1] / agains[-1]:.3f}")
            run_rate, again = max(runs), max(agains)
        spec = work / "offline.json"
        spec.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "tokens": args.tokens, "cpu": cpu}))
        script = work / "offline.py"
        script.write_text(OFFLINE)
        proc = subprocess.run([str(venv / "bin" / "python"), str(script), str(spec)], capture_output=True, text=True,
                              env=dict(os.environ, **env), timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"offline LLM.generate failed:\n{proc.stderr[-3000:]}")
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not result:
            raise SystemExit(f"offline LLM.generate printed no result:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        offline = json.loads(result[-1][len("RESULT "):])["prompts_per_s"]
        print(f"offline LLM.generate: {offline:.1f} prompts/s")
        best = max(max(bare.values()), again)
        print(f"RATIO run / best bare loop: {run_rate / best:.3f} (best run over best bare reading, concurrency "
              f"16, 64, 256 and after each run); per round: "
              f"{', '.join(f'{r / a:.3f}' for r, a in zip(runs, agains))}; target >= 0.95")
        print(f"RATIO run / offline LLM.generate: {run_rate / offline:.3f}")
    finally:
        cleanup(work)


if __name__ == "__main__":
    main()
