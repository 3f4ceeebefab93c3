"""Real-engine benchmark on Triton: `orchestrator run` against a real Triton server (tritonserver 2.51.0 from
PyTriton) serving NeMo's deploy tensors with the tiny model behind them (tests/triton_deploy_server.py).

One server (started by the orchestrator's own engine owner, engine=triton, max_batch_size B) serves, in
this order:
  a. a bare loop as NeMo's NemoQuery sends (B prompts a request, `prompts` and `max_output_len` only), at
     1, 2 and 4 requests in flight (the best rate is the reference);
  b. `orchestrator run engine=endpoint engine.protocol=triton` with the codec's defaults;
  c. the bare loop again at its best concurrency (the machine drifts: both readings are printed).
Every path sends the same prompts with greedy decoding and the same max_output_len. It prints run / best
bare loop.

    python bench/triton_real.py [--prompts 240] [--tokens 16] [--max-batch-size 4] [--rounds 3]

Needs scripts/install_triton.sh and the tiny model (scripts/build_tiny_model.py, built by the vLLM venv).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
from _common import REPO, cleanup, cpu_probe, load, machine, run_orchestrator, tmpdir, write_prompts

sys.path.insert(0, str(REPO))
from orchestrator.config import compose  # noqa: E402
from orchestrator.engines.server import EngineServer  # noqa: E402

TRITON_VENV = Path(os.environ.get("ORCHESTRATOR_TRITON_VENV", Path.home() / ".cache" / "orchestrator-triton-venv"))


async def bare_loop(url: str, model: str, prompts: list[str], tokens: int, batch: int, concurrency: int) -> float:
    """prompts/s of the simplest client: `concurrency` workers, each sending the next `batch` prompts."""
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)][::-1]

    async def worker(session):
        while chunks:
            chunk = chunks.pop()
            body = {"inputs": [{"name": "prompts", "datatype": "BYTES", "shape": [len(chunk), 1], "data": chunk},
                               {"name": "max_output_len", "datatype": "INT64", "shape": [len(chunk), 1],
                                "data": [tokens] * len(chunk)}]}
            async with session.post(f"{url}/v2/models/{model}/infer", json=body) as resp:
                answer = await resp.json()
                assert resp.status == 200 and len(answer["outputs"][0]["data"]) == len(chunk), answer

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
        return len(prompts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache" / "orchestrator" / "tiny-nemotron"))
    args = parser.parse_args()
    if not (TRITON_VENV / "bin" / "python").exists():
        raise SystemExit(f"no PyTriton venv at {TRITON_VENV}: run `bash scripts/install_triton.sh`")
    if not (Path(args.model_dir) / "config.json").exists():
        raise SystemExit(f"no model at {args.model_dir}: build it with scripts/build_tiny_model.py (vLLM venv)")
    work = tmpdir("triton-real")
    src = write_prompts(work / "in.parquet", args.prompts)
    print(f"machine: {machine()}; {load()}; {cpu_probe()}")
    print(f"{args.prompts} prompts, max_output_len {args.tokens}, greedy, max_batch_size {args.max_batch_size}; "
          f"model {args.model_dir}")
    overrides = ["model=hf", f"model.path={args.model_dir}", "model.prompt.format=raw", "sampling.end_strings=[]",
                 f"sampling.tokens_to_generate={args.tokens}", "sampling.greedy=true",
                 "sampling.min_tokens_to_generate=0"]
    engine = ["engine=triton", f"engine.command=[{TRITON_VENV / 'bin' / 'python'}]",
              f"engine.script={REPO / 'tests' / 'triton_deploy_server.py'}", f"engine.checkpoint={args.model_dir}",
              f"engine.options.max_batch_size={args.max_batch_size}", "engine.ready_timeout_s=600"]
    cfg = compose(overrides + engine)
    prompts = [str(p) for p in pq.read_table(src).column("prompt").to_pylist()]
    batch = args.max_batch_size
    try:
        with EngineServer(cfg, work / "engine.log", work / "engine.port") as server:
            started = time.monotonic()
            info = server.wait_ready()
            print(f"Triton ready in {time.monotonic() - started:.0f} s at {info.url} (model {info.model_name}, "
                  f"max_batch_size {info.max_batch_size})")
            loop = lambda c: asyncio.run(bare_loop(info.url, info.model_name, prompts, args.tokens, batch, c))  # noqa: E731
            loop(2)  # warm-up, not counted
            bare = {c: loop(c) for c in (1, 2, 4)}
            for c, rate in bare.items():
                print(f"bare loop, {batch} prompts a request, {c} in flight: {rate:.1f} prompts/s")
            best_c = max(bare, key=bare.get)
            runs, agains = [], []
            for round_ in range(args.rounds):
                run_dir = work / f"run{round_}"
                run_orchestrator(overrides + ["engine=endpoint", f"engine.url={info.url}", "engine.protocol=triton",
                                              f"engine.served_model_name={info.model_name}", f"data.input={src}",
                                              f"run_dir={run_dir}"], 1800)
                summary = json.loads((run_dir / "summary.json").read_text())
                runs.append(summary["prompts_per_s"])
                agains.append(loop(best_c))
                print(f"round {round_}: orchestrator run {runs[-1]:.1f} prompts/s ({summary['ok']}/{summary['total']} "
                      f"ok); bare loop at {best_c} right after: {agains[-1]:.1f} prompts/s; ratio "
                      f"{runs[-1] / agains[-1]:.3f}")
        best = max(max(bare.values()), max(agains))
        print(f"RATIO run / best bare loop: {max(runs) / best:.3f} (best run over best bare reading); per round: "
              f"{', '.join(f'{r / a:.3f}' for r, a in zip(runs, agains))}")
    finally:
        cleanup(work)


if __name__ == "__main__":
    main()
