"""Rows redone after one kill -9: `orchestrator run` against datatrove's inference runner, same engine.

One embedded engine, served from this process (OpenAI routes, capacity 64 sequences at once,
50 ms + 2 ms per generated token), counts how often it is asked for each input row (the row's number
is in its prompt). N prompts (default 10,000). For each side and round: start the run, kill -9 every
process of it once the engine has been asked for half of the rows, rerun it to the end, then check
the output holds every row once. Rows redone = asks beyond the first of each row; also the most asks
of one row.

(a) `orchestrator run engine=endpoint engine.protocol=openai client.max_in_flight=64
    sampling.tokens_to_generate=16` (units of data.unit_rows=2,048, the default).
(b) datatrove: ParquetReader -> InferenceRunner(server_type="endpoint", use_chat=True,
    max_concurrent_generations=64, checkpoints_local_dir=..., records_per_chunk=6,000 (its default),
    max_tokens 16) -> JsonlWriter, run by LocalPipelineExecutor(tasks=1), in the Python given by
    --datatrove-python (a venv with `pip install datatrove aiosqlite xxhash aiofiles httpx`: its
    endpoint readiness check needs httpx, which datatrove 0.10.1 does not pull in); skipped when it
    cannot import them.

    python bench/kill_redo.py [--prompts 10000] [--rounds 3] [--datatrove-python PATH] [--sides orchestrator]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
from _common import REPO, cleanup, cpu_probe, hydra_quote, load, machine, tmpdir, write_prompts

from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.engine import _Engine
from orchestrator.simulator.model import EngineSettings

IN_FLIGHT = 64
TOKENS = 16
ROW = re.compile(r"Q(\d+): ")

DATATROVE_DRIVER = textwrap.dedent('''
    import sys
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import JsonlWriter

    data, out, checkpoints, logs, url, model, in_flight, tokens = sys.argv[1:]


    async def rollout(document, generate):
        result = await generate({"messages": [{"role": "user", "content": document.text}],
                                 "max_tokens": int(tokens)})
        return result.text


    if __name__ == "__main__":
        runner = InferenceRunner(
            rollout_fn=rollout,
            config=InferenceConfig(server_type="endpoint", model_name_or_path=model, endpoint_url=url, use_chat=True,
                                   max_concurrent_generations=int(in_flight), metric_interval=3600),
            output_writer=JsonlWriter(out, output_filename="${rank}_chunk_${chunk_index}.jsonl", compression=None),
            checkpoints_local_dir=checkpoints)
        LocalPipelineExecutor(pipeline=[ParquetReader(data, text_key="prompt", id_key="id"), runner], tasks=1,
                              logging_dir=logs, skip_completed=True).run()
''')


class Counting:
    """The engine's OpenAI routes, counting the rows they are asked for (in this process)."""

    def __init__(self):
        self.asked: collections.Counter = collections.Counter()
        self.originals = {}

    def install(self) -> None:
        for name in ("completions", "chat_completions"):
            original = getattr(_Engine, name)
            self.originals[name] = original

            async def counted(engine, request, _original=original):
                body = await request.json()
                text = json.dumps(body.get("prompt") if "prompt" in body else body.get("messages"))
                for found in ROW.finditer(text):
                    self.asked[int(found.group(1))] += 1
                return await _original(engine, request)

            setattr(_Engine, name, counted)

    def distinct(self) -> int:
        return len(self.asked)


def wait_then_kill(proc: subprocess.Popen, counting: Counting, at: int, extra_pids=lambda: []) -> float:
    """kill -9 the run's whole process group (and extra_pids()) once `at` rows were asked; seconds it ran."""
    started = time.monotonic()
    while counting.distinct() < at:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before the kill (exit {proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.monotonic() - started > 300:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{counting.distinct()} of {at} rows asked after 300 s: the run is stuck")
        time.sleep(0.005)
    for pid in extra_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - started


def ours(work: Path, data: Path, url: str, n: int, counting: Counting) -> dict:
    run_dir = work / "ours"
    cmd = ["orchestrator", "run", "engine=endpoint", f"engine.url={url}", "engine.protocol=openai",
           f"client.max_in_flight={IN_FLIGHT}", f"sampling.tokens_to_generate={TOKENS}",
           f"data.input={hydra_quote(data)}", f"run_dir={hydra_quote(run_dir)}"]

    def job():  # the job runs in its own session (submitit): killed by pid
        out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {run_dir}"], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                             start_new_session=True)
    ran = wait_then_kill(first, counting, n // 2, job)
    asked_before = sum(counting.asked.values())
    journaled = 0
    for path in (run_dir / "work" / "journal").glob("*.jsonl"):
        journaled += sum(len(json.loads(line)["i"]) for line in path.read_bytes().splitlines()
                         if line.startswith(b'{"i":') and line.endswith(b"}"))
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    if rerun.returncode != 0:
        raise RuntimeError(f"the rerun failed:\n{rerun.stdout[-2000:]}\n{rerun.stderr[-2000:]}")
    ids = pq.read_table(run_dir / "results", columns=["id"]).column("id").to_pylist()
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"killed_after_s": ran, "asked_before_kill": asked_before, "in_journals": journaled, "ids": ids,
            "journal_rows": summary.get("journal_rows")}


def datatrove(work: Path, data: Path, url: str, n: int, counting: Counting, python: str) -> dict:
    base = work / "datatrove"
    driver = base / "driver.py"
    base.mkdir(parents=True, exist_ok=True)
    driver.write_text(DATATROVE_DRIVER)
    out = base / "out"
    cmd = [python, str(driver), str(data.parent), str(out), str(base / "checkpoints"), str(base / "logs"), url,
           "mock", str(IN_FLIGHT), str(TOKENS)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=base,
                             start_new_session=True)
    ran = wait_then_kill(first, counting, n // 2)
    asked_before = sum(counting.asked.values())
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=base, timeout=900)
    if rerun.returncode != 0:
        raise RuntimeError(f"the datatrove rerun failed:\n{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}")
    ids = []
    for path in sorted(out.glob("*.jsonl")):
        ids += [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
    return {"killed_after_s": ran, "asked_before_kill": asked_before, "ids": ids}


def datatrove_python(path: str | None) -> str | None:
    for candidate in [path, sys.executable]:
        if candidate and subprocess.run([candidate, "-c", "import datatrove.pipeline.inference.run_inference, "
                                         "aiosqlite, xxhash, aiofiles, httpx"], capture_output=True).returncode == 0:
            return candidate
    return None


def report(name: str, got: dict, n: int, counting: Counting) -> dict:
    asked = counting.asked
    redone = sum(asked.values()) - len(asked)
    ids = got["ids"]
    line = {"side": name, "rows_redone": redone, "max_asks_of_a_row": max(asked.values()),
            "rows_never_asked": n - len(asked), "output_rows": len(ids), "output_distinct": len(set(ids)),
            "asked_before_kill": got["asked_before_kill"], "killed_after_s": round(got["killed_after_s"], 1)}
    for key in ("in_journals", "journal_rows"):
        if got.get(key) is not None:
            line[key] = got[key]
    print(json.dumps(line), flush=True)
    return line


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--datatrove-python", default=os.environ.get("DATATROVE_PYTHON"),
                    help="a Python that imports datatrove (default: this one)")
    ap.add_argument("--sides", default="orchestrator,datatrove", help="which runners to measure")
    args = ap.parse_args()
    n = args.prompts
    work = tmpdir("bench-kill-")
    try:
        print(f"machine: {machine()}; {load()}, {cpu_probe()}")
        (work / "data").mkdir()
        data = write_prompts(work / "data" / "prompts.parquet", n)
        python = datatrove_python(args.datatrove_python) if "datatrove" in args.sides else None
        if python is None and "datatrove" in args.sides:
            print("datatrove: not importable (pip install datatrove aiosqlite xxhash aiofiles httpx, or "
                  "--datatrove-python); measuring this project alone")
        counting = Counting()
        counting.install()
        settings = EngineSettings(capacity=IN_FLIGHT, request_latency_s=0.05, token_latency_s=0.002)
        results = collections.defaultdict(list)
        print(f"prompts: {n}; engine: OpenAI routes, capacity {IN_FLIGHT}, 50 ms + 2 ms/token, {TOKENS} tokens; "
              f"{IN_FLIGHT} requests in flight on each side; kill -9 once {n // 2} rows were asked")
        for r in range(args.rounds):
            sides = []
            if "orchestrator" in args.sides:
                sides.append(("orchestrator", lambda w, u: ours(w, data, u, n, counting)))
            if python is not None:
                sides.append(("datatrove", lambda w, u: datatrove(w, data, u, n, counting, python)))
            for name, side in sides:
                with EngineThread(settings) as engine:
                    counting.asked.clear()
                    round_dir = work / f"round{r}"
                    round_dir.mkdir(exist_ok=True)
                    results[name].append(report(name, side(round_dir, engine.url), n, counting))
        for name, lines in results.items():
            redone = [x["rows_redone"] for x in lines]
            exact = all(x["output_rows"] == x["output_distinct"] == n for x in lines)
            print(f"{name}: rows redone after one kill -9: {', '.join(map(str, redone))} (rounds); max asks of one "
                  f"row {max(x['max_asks_of_a_row'] for x in lines)}; output every row exactly once: {exact}")
        print(f"{load()}, {cpu_probe()} (after)")
        return 0
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
