"""Several answers per prompt (issue 12): sampling.rollouts=N gives N answers per input row, each sampled
with its own seed (rollout_seed(sampling.seed, id) + k), keyed (id, rollout) exactly once through kills,
journals and retry_failed; one OpenAI request with n gives what N separate requests give.

The engine runs in this process (EngineThread) and records every request body, so the tests see which
prompt was asked with which seed, across a killed job and its rerun."""
import asyncio
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from orchestrator.client import Client
from orchestrator.commits import scan_committed, write_retry_units
from orchestrator.config import compose
from orchestrator.errors import ConfigError, InputError
from orchestrator.journal import Journals, settings_digest
from orchestrator.plan import rollout_seed
from orchestrator.preflight import prepare
from orchestrator.protocols import ready
from orchestrator.report import build_summary, one_line
from orchestrator.simulator import routes_nemo, routes_openai, validation
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.engine import _Engine
from orchestrator.simulator.model import EngineSettings
from orchestrator.status import collect, format_status
from orchestrator.unit_source import UnitBuffer
from tests.conftest import journaled, kill_jobs_when, orchestrator_cmd, write_prompts

N = 4
SAMPLE = ["sampling.greedy=false", f"sampling.rollouts={N}", "sampling.tokens_to_generate=6",
          "client.lease_s=2"]  # an idle replica looks for work again within 0.5 s, not 2 s
KEY = ["id", "rollout"]
SAME = ["id", "rollout", "response", "status", "error", "output_tokens"]  # all but latency_s and attempts


def row_of(prompt: str) -> int:
    """The input row a prompt was made from (write_prompts: 'Question number i: ...')."""
    return int(prompt.split("Question number ", 1)[1].split(":", 1)[0])


class Recorder:
    """Every request the engine is sent, as (input row, seed, answers asked for), by route."""

    def __init__(self):
        self.asked: list[tuple[int, int | None, int]] = []
        self.bodies: list[dict] = []

    def add(self, body) -> None:
        if not isinstance(body, dict):
            return
        self.bodies.append(body)
        if "sentences" in body:  # NeMo: a batch of prompts, one random_seed
            for sentence in body["sentences"]:
                self._add(sentence, body.get("random_seed"), 1)
        elif "inputs" in body:  # Triton infer: tensors
            tensors = {t["name"]: t["data"] for t in body["inputs"]}
            seeds = tensors.get("random_seed") or [None] * len(tensors["prompts"])
            for prompt, seed in zip(tensors["prompts"], seeds):
                self._add(prompt, seed, 1)
        elif "prompt" in body or "messages" in body:  # OpenAI: one prompt, n answers
            self._add(body["prompt"] if "prompt" in body else body["messages"][-1]["content"], body.get("seed"),
                      body.get("n") or 1)

    def _add(self, text, seed, n) -> None:
        if isinstance(text, str) and "Question number" in text:  # not the readiness probe
            self.asked.append((row_of(text), seed, n))

    def answers(self) -> Counter:
        """(row, seed) -> how often an answer with that seed was asked for (a request with n and seed s asks
        for s, s + 1, ..., s + n - 1)."""
        out: Counter = Counter()
        for row, seed, n in self.asked:
            for k in range(n):
                out[(row, None if seed is None else seed + k)] += 1
        return out


@pytest.fixture
def recorder(monkeypatch):
    found = Recorder()
    read_object, triton_body = validation._read_object, _Engine._triton_body

    async def read_and_record(request):
        body = await read_object(request)
        found.add(body)
        return body

    async def triton_and_record(request, *args):
        body = await triton_body(request, *args)
        found.add(body)
        return body

    monkeypatch.setattr(routes_nemo, "_read_object", read_and_record)
    monkeypatch.setattr(routes_openai, "_read_object", read_and_record)
    monkeypatch.setattr(_Engine, "_triton_body", staticmethod(triton_and_record))
    return found


def expected_seeds(rows, seed=None) -> Counter:
    return Counter({(r, rollout_seed(seed, f"q{r}") + k): 1 for r in rows for k in range(N)})


def run_client(cfg, url: str, attempt: str = "a1", owner: str = "r0"):
    plan, paths = prepare(cfg)
    info = ready(cfg, url, cfg.engine.protocol)
    stats = asyncio.run(Client(cfg, plan, paths, url, attempt, owner, info=info).run())
    return plan, paths, stats


def results(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results").sort_values(KEY).reset_index(drop=True)


def with_category(path: Path, rows: int) -> Path:
    write_prompts(path, rows)
    table = pq.read_table(path)
    pq.write_table(table.append_column("category", pa.array([f"c{i % 3}" for i in range(rows)])), path)
    return path


@pytest.mark.parametrize("protocol", ["nemo", "triton"])
def test_rollouts_give_n_distinct_answers_per_row_each_with_its_own_seed_and_a_rerun_reproduces_them(
        tmp_path, recorder, protocol):
    """12 rows, units of 5 (the last one short), rollouts=4: 48 answers, (id, rollout) unique, 4 different
    answers per row, rollout k asked once with seed base + k, one prompt per request (NeMo and Triton take one
    seed per request). A fresh run_dir gives the very same answers."""
    src = with_category(tmp_path / "in.parquet", 12)
    base = ["engine=endpoint", f"engine.protocol={protocol}", "engine.served_model_name=mock", "data.unit_rows=5",
            "sampling.seed=7", "data.keep_columns=[category]", *SAMPLE]
    with EngineThread(EngineSettings()) as engine:
        runs = []
        for name in ("first", "again"):
            cfg = compose([*base, f"engine.url={engine.url}", f"data.input={src}", f"run_dir={tmp_path / name}"])
            recorder.asked.clear()
            run_client(cfg, engine.url)
            assert recorder.answers() == expected_seeds(range(12), seed=7)  # each rollout once, with its seed
            runs.append(pd.read_parquet(tmp_path / name / "results"))
    first, again = runs
    assert len(first) == 12 * N and not first.duplicated(KEY).any()
    assert first.dtypes["rollout"] == "int32"
    # a unit's answers are row 0's rollouts 0..N-1, then row 1's, ...
    assert first["id"].tolist() == [f"q{r}" for r in range(12) for _ in range(N)]
    assert first["rollout"].tolist() == list(range(N)) * 12
    assert first["category"].tolist() == [f"c{r % 3}" for r in range(12) for _ in range(N)]  # kept per answer
    assert (first["status"] == "ok").all() and (first.groupby("id")["response"].nunique() == N).all()
    assert first[SAME].equals(again[SAME])  # reproduced exactly
    bodies = [b for b in recorder.bodies if "sentences" in b or "inputs" in b]
    if protocol == "nemo":
        assert all(len(b["sentences"]) == 1 for b in bodies if "Question" in b["sentences"][0])


def test_a_sampling_seed_of_none_and_other_seeds_give_other_answers(tmp_path):
    """rollout_seed is a pure function of (sampling.seed or 0, id); another seed moves every base."""
    assert rollout_seed(None, "q1") == rollout_seed(0, "q1") != rollout_seed(1, "q1")
    assert rollout_seed(0, "q1") != rollout_seed(0, "q2") and rollout_seed(0, 5) != rollout_seed(0, "5")
    assert all(0 <= rollout_seed(s, i) < 2 ** 31 - 1024 for s in (0, 1, 2 ** 40) for i in ("a", 7, "x" * 100))


def test_the_embedded_engine_answers_n_as_n_requests_with_seeds_seed_plus_i(recorder):
    """The faithful OpenAI route: choice i of a request with n and seed s is what a request with seed s + i
    answers (vLLM's parallel sampling), on /v1/completions and /v1/chat/completions, with each choice's
    token ids when asked (return_token_ids); usage counts them all."""
    with EngineThread(EngineSettings()) as engine:
        for path, body, text in (
                ("/v1/completions", {"prompt": "Question number 1: hi"}, lambda c: c["text"]),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Question number 1: hi"}]},
                 lambda c: c["message"]["content"])):
            one = requests.post(engine.url + path, json={**body, "max_tokens": 8, "seed": 40, "n": 3,
                                                         "return_token_ids": True}).json()
            apart = [requests.post(engine.url + path, json={**body, "max_tokens": 8, "seed": 40 + i}).json()
                     for i in range(3)]
            assert [c["index"] for c in one["choices"]] == [0, 1, 2]
            assert [text(c) for c in one["choices"]] == [text(a["choices"][0]) for a in apart]
            assert len({text(c) for c in one["choices"]}) == 3
            counts = [len(c["token_ids"]) for c in one["choices"]]
            assert counts == [a["usage"]["completion_tokens"] for a in apart]
            assert one["usage"]["completion_tokens"] == sum(counts)
        bad = requests.post(engine.url + "/v1/completions", json={"prompt": "x", "n": 0})
        assert bad.status_code == 400 and "n must be at least 1" in bad.text


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_rollouts_in_one_request_with_n_give_the_answers_of_separate_requests(tmp_path, recorder, api):
    """OpenAI engines: sampling.rollouts_in_one_request=true sends each row once with n=4 and seed=base;
    false sends 4 requests with seeds base + k. Same results (latency aside)."""
    src = write_prompts(tmp_path / "in.parquet", 10)
    base = ["engine=endpoint", "engine.protocol=openai", f"engine.api={api}", "data.unit_rows=4", *SAMPLE]
    got = {}
    with EngineThread(EngineSettings()) as engine:
        for together in (True, False):
            run_dir = tmp_path / f"together-{together}"
            cfg = compose([*base, f"engine.url={engine.url}", f"data.input={src}", f"run_dir={run_dir}",
                           f"sampling.rollouts_in_one_request={str(together).lower()}"])
            recorder.asked.clear()
            run_client(cfg, engine.url)
            asked = [a for a in recorder.asked]
            if together:  # one request per row, n=4, seed = the row's base
                assert sorted(asked) == sorted((r, rollout_seed(None, f"q{r}"), N) for r in range(10))
            else:
                assert sorted(asked) == sorted((r, rollout_seed(None, f"q{r}") + k, 1) for r in range(10)
                                               for k in range(N))
            got[together] = results(run_dir)
    assert len(got[True]) == 10 * N and (got[True]["status"] == "ok").all()
    assert got[True]["output_tokens"].notna().all()  # each choice's own count (its token ids)
    assert got[True][SAME].equals(got[False][SAME])


def test_the_default_sends_rollouts_in_one_request_only_to_engines_known_to_honour_n(make_cfg):
    from orchestrator.engines.base import rollouts_in_one_request
    from orchestrator.protocols.openai import OpenAICodec

    assert rollouts_in_one_request(make_cfg(*SAMPLE, "engine=mock", "engine.protocol=openai"))
    assert rollouts_in_one_request(make_cfg(*SAMPLE, "engine=vllm", "model.path=/m"))
    assert not rollouts_in_one_request(make_cfg(*SAMPLE, "engine=sglang", "model.path=/m"))
    assert not rollouts_in_one_request(make_cfg(*SAMPLE, "engine=endpoint", "engine.url=http://h:1"))
    assert rollouts_in_one_request(make_cfg(*SAMPLE, "engine=endpoint", "engine.url=http://h:1",
                                            "sampling.rollouts_in_one_request=true"))
    cfg = make_cfg(*SAMPLE, "engine=mock", "engine.protocol=openai", "engine.simulator.capacity=64")
    assert OpenAICodec(cfg).max_n == 1  # the caller says whether the engine honours n: by default only when asked
    codec = OpenAICodec(cfg, one_request=rollouts_in_one_request(cfg))
    assert codec.max_n == N and codec.in_flight == 2 * 64 // N  # about 2 x capacity sequences in flight
    body = codec.payload(["p"], seed=11, n=N)
    assert body["seed"] == 11 and body["n"] == N and body["return_token_ids"] is True
    assert "n" not in codec.payload(["p"]) and "seed" not in codec.payload(["p"])  # one answer: as before


def test_nemo_and_triton_codecs_send_one_prompt_a_request_with_its_own_seed(make_cfg):
    """One random_seed per request on NeMo and Triton: with rollouts every prompt goes alone, with its seed
    (over sampling.seed); without rollouts nothing changes."""
    from orchestrator.protocols.base import EngineInfo
    from orchestrator.protocols.nemo import NemoCodec
    from orchestrator.protocols.triton import TritonCodec

    cfg, plain = make_cfg(*SAMPLE, "sampling.seed=3"), make_cfg("sampling.seed=3")
    assert NemoCodec(cfg).batch_size == 1 and NemoCodec(plain).batch_size == 128
    assert NemoCodec(cfg).payload(["p"], seed=99)["random_seed"] == 99 and NemoCodec(plain).payload(["p"])[
        "random_seed"] == 3
    infer = EngineInfo(url="u", protocol="triton", model_name="m", api="infer",
                       inputs={"prompts": "BYTES", "random_seed": "INT64"})
    tensors = {t["name"]: t["data"] for t in TritonCodec(cfg, infer).payload(["p"], seed=99)["inputs"]}
    assert tensors["random_seed"] == [99] and TritonCodec(cfg, infer).batch_size == 1
    assert TritonCodec(cfg, EngineInfo(url="u", protocol="triton", model_name="m", api="generate")).payload(
        ["p"], seed=99)["random_seed"] == 99
    assert not TritonCodec(cfg, EngineInfo(url="u", protocol="triton", model_name="m", api="infer",
                                           inputs={"prompts": "BYTES"})).takes_seed


def test_kill_9_mid_run_then_rerun_gives_every_id_and_rollout_exactly_once(tmp_path, recorder, cli_env):
    """60 rows x 4 rollouts over the NeMo route (one prompt a request, 2 in flight). kill -9 of the job (and
    its front-end) once a unit is committed and the next has journaled answers; the rerun replays the
    journal, asks only for what was lost in flight, and commits each (id, rollout) once, with the answers of
    a run nothing interrupted."""
    rows, unit = 60, 10
    src = write_prompts(tmp_path / "in.parquet", rows)
    args = ["engine=endpoint", "engine.protocol=nemo", f"data.unit_rows={unit}", "client.max_in_flight=2",
            "engine.ready_timeout_s=30", *SAMPLE, f"data.input={src}"]
    with EngineThread(EngineSettings()) as engine:
        run_client(compose([*args, f"engine.url={engine.url}", f"run_dir={tmp_path / 'whole'}"]), engine.url)
    expected = results(tmp_path / "whole")
    recorder.asked.clear()
    run_dir = tmp_path / "run"
    with EngineThread(EngineSettings(request_latency_s=0.02)) as engine:
        cmd = [*orchestrator_cmd(), "run", *args, f"engine.url={engine.url}", f"run_dir={run_dir}"]
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
        kill_jobs_when(first, run_dir, lambda: any((run_dir / "results").glob("*.parquet"))
                       and len(journaled(run_dir)) >= 3, front_end=True, timeout_s=60)
        done_before = len(list((run_dir / "results").glob("*.parquet")))
        assert 1 <= done_before < rows // unit
        asked_before = recorder.answers()
        second = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=120)
        assert second.returncode == 0, second.stderr
    got = results(run_dir)
    assert len(got) == rows * N and not got.duplicated(KEY).any()  # every (id, rollout) exactly once
    assert got[SAME].equals(expected[SAME])  # with the answers of the uninterrupted run
    asked = recorder.answers()
    assert set(asked) == set(expected_seeds(range(rows)))  # only these seeds, ever
    extra = sum(asked.values()) - len(asked)
    assert extra <= 2  # the kill cost at most the 2 requests in flight (one answer each), not its unit
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["journal_rows"] > 0 and summary["complete"]
    assert (summary["prompts"], summary["answers"], summary["total"], summary["ok"]) == (rows, rows * N, rows * N,
                                                                                          rows * N)
    assert sum(asked_before.values()) < rows * N  # it was killed part-way
    assert f"{rows * N}/{rows * N} answers ok ({rows} prompts x {N} rollouts)" in second.stdout
    assert not list((run_dir / "work" / "journal").glob("*.jsonl"))


def journal_of_a_killed_replica(paths, rows: int, answered: dict[int, str]) -> None:
    """Unit 0's journal as a killed replica r9 left it: these answers (3 tokens each), by answer index."""
    killed = UnitBuffer(0, rows * N, rollouts=N)
    killed.ids = [f"q{r}" for r in range(rows) for _ in range(N)]
    for i, text in answered.items():
        killed.succeed(i, text, 3, 0.5, 1)
    journal, _, _ = Journals(paths, "r9", "a0", settings_digest(paths)).start(0, rows * N)
    journal.append(killed.journal_record(killed.fresh))
    journal.close()


def test_a_journal_replays_per_rollout_and_the_rest_go_out_as_runs_of_consecutive_rollouts(tmp_path, recorder):
    """Unit 0's journal (a killed replica's) holds rollouts 0 and 2 of row 0 and all of row 1: the rerun
    asks for rollouts 1 and 3 of row 0 one request each (seeds base + 1, base + 3: not consecutive), and the
    other rows in one request each (n=4); the replayed answers are kept as they were."""
    src = write_prompts(tmp_path / "in.parquet", 4)
    base = ["engine=endpoint", "engine.protocol=openai", "sampling.rollouts_in_one_request=true", "data.unit_rows=4",
            *SAMPLE, f"data.input={src}"]
    with EngineThread(EngineSettings()) as engine:
        run_client(compose([*base, f"engine.url={engine.url}", f"run_dir={tmp_path / 'whole'}"]), engine.url)
        expected = results(tmp_path / "whole")
        cfg = compose([*base, f"engine.url={engine.url}", f"run_dir={tmp_path / 'run'}"])
        plan, paths = prepare(cfg)
        kept = {0: "kept zero", 2: "kept two", 4: "r1 k0", 5: "r1 k1", 6: "r1 k2", 7: "r1 k3"}
        journal_of_a_killed_replica(paths, 4, kept)
        recorder.asked.clear()
        info = ready(cfg, engine.url, "openai")
        stats = asyncio.run(Client(cfg, plan, paths, engine.url, "a1", "r0", info=info).run())
    b0, b2, b3 = (rollout_seed(None, f"q{r}") for r in (0, 2, 3))
    assert sorted(recorder.asked) == sorted([(0, b0 + 1, 1), (0, b0 + 3, 1), (2, b2, N), (3, b3, N)])
    got = results(tmp_path / "run")
    assert stats.journal_rows == len(kept)
    assert got.loc[[0, 2, 4, 5, 6, 7], "response"].tolist() == list(kept.values())
    others = [1, 3, *range(8, 16)]
    assert got.loc[others, SAME].equals(expected.loc[others, SAME])  # asked apart or together: the same answers


def test_retry_failed_redoes_only_the_failed_rollouts_with_their_own_seeds(tmp_path, recorder, monkeypatch):
    """Rollouts 1 and 3 of every row fail (HTTP 500, no retry); retry_failed=true asks for exactly those
    again, each with its seed, keeps rollouts 0 and 2 as committed, and ends with the answers of a run that
    never failed."""
    src = write_prompts(tmp_path / "in.parquet", 8)
    base = ["engine.protocol=nemo", "data.unit_rows=4", "client.max_retries=0", "client.max_error_fraction=1.0",
            *SAMPLE, f"data.input={src}"]  # the engine's URL goes to the client, not the settings: two engines
    generate = _Engine.generate
    odd = {rollout_seed(None, f"q{r}") + k for r in range(8) for k in (1, 3)}

    async def failing(self, request):
        body = await request.json()
        if body.get("random_seed") in odd:
            return validation._json({"error": "simulated engine failure"}, 500)
        return await generate(self, request)

    with monkeypatch.context() as patch:
        patch.setattr(_Engine, "generate", failing)
        with EngineThread(EngineSettings()) as engine:
            _, paths, _ = run_client(compose([*base, f"run_dir={tmp_path / 'run'}"]), engine.url)
    first = results(tmp_path / "run")
    assert first["status"].tolist() == ["ok", "error"] * (8 * N // 2)
    assert scan_committed(paths).total.retryable == 8 * 2
    with EngineThread(EngineSettings()) as engine:
        run_client(compose([*base, f"run_dir={tmp_path / 'whole'}"]), engine.url)
        expected = results(tmp_path / "whole")
        recorder.asked.clear()
        cfg = compose([*base, f"run_dir={tmp_path / 'run'}", "retry_failed=true"])
        plan, paths = prepare(cfg)
        write_retry_units(paths, "a2", [0, 1])
        info = ready(cfg, engine.url, "nemo")
        asyncio.run(Client(cfg, plan, paths, engine.url, "a2", "r0", info=info).run())
    assert sorted(recorder.answers()) == sorted((r, s) for r in range(8) for s in odd
                                                if s - rollout_seed(None, f"q{r}") in (1, 3))
    after = results(tmp_path / "run")
    assert len(after) == 8 * N and not after.duplicated(KEY).any() and (after["status"] == "ok").all()
    even = after["rollout"] % 2 == 0
    assert after.loc[even, "latency_s"].equals(first.loc[even, "latency_s"])  # kept, not asked again
    assert after[SAME].equals(expected[SAME])


def test_summary_and_status_count_prompts_and_answers(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    cfg = compose(["engine.protocol=nemo", "data.unit_rows=4", *SAMPLE, f"data.input={src}",
                   f"run_dir={tmp_path / 'run'}"])
    with EngineThread(EngineSettings()) as engine:
        plan, paths = prepare(cfg)
        asyncio.run(Client(cfg, plan, paths, engine.url, "a1", "r0").run())
    summary = build_summary(paths, plan, "a1", time.time() - 1)
    assert (summary["total"], summary["committed"], summary["ok"], summary["complete"]) == (40, 40, 40, True)
    assert (summary["prompts"], summary["answers"], summary["rollouts"]) == (10, 40, N)
    assert summary["answers_per_s"] == pytest.approx(N * summary["prompts_per_s"], rel=0.01)
    assert "40/40 answers ok (10 prompts x 4 rollouts)" in one_line(summary)
    s = collect(paths.root)
    assert {k: s["rows"][k] for k in ("total", "committed", "prompts", "prompts_total", "answers")} == \
        {"total": 40, "committed": 40, "prompts": 10, "prompts_total": 10, "answers": 40}
    text = format_status(s)
    assert "answers:    40/40 committed (100.0%), 40 ok, 0 failed" in text and "prompts:    10/10 committed" in text
    from orchestrator.html_report import write_report

    page = write_report(paths.root).read_text()
    assert "40/40 answers (10 prompts x 4 rollouts) committed, 40 ok, 0 failed" in " ".join(page.split())
    plan, paths = prepare(compose(["engine=endpoint", "engine.url=http://127.0.0.1:9", f"data.input={src}",
                                   f"run_dir={tmp_path / 'plain'}"]))
    plain = build_summary(paths, plan, "a1", time.time())
    assert (plain["total"], plain["prompts"], plain["answers"], plain["rollouts"]) == (10, 0, 0, 1)


def test_a_resume_with_other_rollouts_is_refused_and_an_older_run_dir_resumes_as_one_rollout(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    base = ["sampling.greedy=false", f"data.input={src}", f"run_dir={tmp_path / 'r'}"]
    prepare(compose([*base, "sampling.rollouts=4"]))
    with pytest.raises(InputError, match="sampling.rollouts was 4, now 2"):
        prepare(compose([*base, "sampling.rollouts=2"]))
    prepare(compose([*base, "sampling.rollouts=4", "sampling.rollouts_in_one_request=false"]))  # transport only
    old = tmp_path / "old"
    prepare(compose([*base[:-1], f"run_dir={old}"]))
    stored = json.loads((old / "fingerprint.json").read_text())
    del stored["sampling"]["rollouts"]  # a run_dir started before sampling.rollouts existed
    (old / "fingerprint.json").write_text(json.dumps(stored))
    prepare(compose([*base[:-1], f"run_dir={old}"]))
    with pytest.raises(InputError, match="sampling.rollouts was 1, now 3"):
        prepare(compose([*base[:-1], f"run_dir={old}", "sampling.rollouts=3"]))


@pytest.mark.parametrize("overrides, message", [
    (["data.turns_column=turns"], "sampling.rollouts=4 cannot be combined with data.turns_column='turns'"),
    (["data.messages_column=msgs"], "cannot be combined with data.messages_column='msgs'"),
    (["sampling.greedy=true"], "sampling.greedy=true picks the most likely token every time"),
    (["sampling.greedy=false", "sampling.top_k=1"], "sampling.top_k=1 picks"),
    (["sampling.greedy=false", "sampling.rollouts=0"], "sampling.rollouts=0 is out of range"),
])
def test_what_cannot_give_n_different_answers_is_refused_before_submission(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        compose(["sampling.rollouts=4", "sampling.greedy=false", *overrides])


def test_a_kept_column_named_rollout_is_refused_only_with_rollouts(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "rollout": [1, 2]}), src)
    prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'one'}", "data.keep_columns=[rollout]"]))
    with pytest.raises(InputError, match="'rollout', which is a result column"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'four'}", "data.keep_columns=[rollout]",
                         *SAMPLE]))


def nemo_rows(recorder: Recorder) -> list[tuple[int, int, int]]:
    """NeMo requests of input rows as (row, random_seed, sentences), each a row's copies."""
    out = []
    for body in recorder.bodies:
        sentences = body.get("sentences") or []
        if sentences and "Question number" in sentences[0]:
            assert len(set(sentences)) == 1, "a request of copies holds one row's prompt only"
            out.append((row_of(sentences[0]), body.get("random_seed"), len(sentences)))
    return sorted(out)


def test_nemo_copies_send_each_row_once_with_its_rollouts_as_copies_under_one_seed(tmp_path, recorder):
    """sampling.rollouts_in_one_request=true on NeMo: one request per row, its prompt 4 times, random_seed =
    the row's base; copy k is rollout k. 4 different answers per row, and a fresh run_dir gives them again."""
    src = write_prompts(tmp_path / "in.parquet", 9)
    base = ["engine=endpoint", "engine.protocol=nemo", "data.unit_rows=4", "sampling.rollouts_in_one_request=true",
            *SAMPLE, f"data.input={src}"]
    runs = []
    with EngineThread(EngineSettings()) as engine:
        for name in ("first", "again"):
            recorder.bodies.clear()
            run_client(compose([*base, f"engine.url={engine.url}", f"run_dir={tmp_path / name}"]), engine.url)
            assert nemo_rows(recorder) == [(r, rollout_seed(None, f"q{r}"), N) for r in range(9)]
            runs.append(results(tmp_path / name))
    first, again = runs
    assert len(first) == 9 * N and (first["status"] == "ok").all() and not first.duplicated(KEY).any()
    assert (first.groupby("id")["response"].nunique() == N).all()  # the copies differ: sampled in one batch
    assert first[SAME].equals(again[SAME])


def test_nemo_copies_resend_a_row_whole_and_take_only_the_rollouts_its_journal_lacks(tmp_path, recorder):
    """A killed replica journaled rollouts 0 and 2 of row 0: the rerun sends row 0's four copies again (a copy's
    answer depends on its batch), takes rollouts 1 and 3 from them and keeps the journaled two; the result is
    the uninterrupted run's, row 0's journaled answers aside."""
    src = write_prompts(tmp_path / "in.parquet", 3)
    base = ["engine=endpoint", "engine.protocol=nemo", "sampling.rollouts_in_one_request=true", "data.unit_rows=3",
            *SAMPLE, f"data.input={src}"]
    with EngineThread(EngineSettings()) as engine:
        run_client(compose([*base, f"engine.url={engine.url}", f"run_dir={tmp_path / 'whole'}"]), engine.url)
        expected = results(tmp_path / "whole")
        cfg = compose([*base, f"engine.url={engine.url}", f"run_dir={tmp_path / 'run'}"])
        plan, paths = prepare(cfg)
        journal_of_a_killed_replica(paths, 3, {i: expected["response"][i] for i in (0, 2)})
        recorder.bodies.clear()
        info = ready(cfg, engine.url, "nemo")
        stats = asyncio.run(Client(cfg, plan, paths, engine.url, "a1", "r0", info=info).run())
    assert nemo_rows(recorder) == [(r, rollout_seed(None, f"q{r}"), N) for r in range(3)]  # row 0 whole again
    assert stats.journal_rows == 2 and stats.rows.rows == 3 * N
    got = results(tmp_path / "run")
    answers = ["id", "rollout", "response", "status", "error"]
    assert got[answers].equals(expected[answers])
    assert got["output_tokens"].tolist()[:4] == [3, expected["output_tokens"][1], 3, expected["output_tokens"][3]]
    # rollouts 0 and 2 are the journal's (3 tokens, as it says), not taken from the copies sent again


def test_nemo_copies_change_the_answers_so_a_resume_may_not_switch_them_on_openai_it_may(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 4)
    for protocol, refused in (("nemo", True), ("openai", False)):
        run = [f"engine.protocol={protocol}", *SAMPLE, f"data.input={src}", f"run_dir={tmp_path / protocol}"]
        prepare(compose([*run, "sampling.rollouts_in_one_request=false"]))
        if refused:
            with pytest.raises(InputError, match="sampling.rollouts_in_one_request was None, now True"):
                prepare(compose([*run, "sampling.rollouts_in_one_request=true"]))
        else:
            prepare(compose([*run, "sampling.rollouts_in_one_request=true"]))


def test_the_nemo_codec_sends_copies_in_blocks_of_at_most_128(make_cfg):
    from orchestrator.protocols.nemo import NemoCodec

    codec = NemoCodec(make_cfg("sampling.greedy=false", "sampling.rollouts=200",
                               "sampling.rollouts_in_one_request=true"))
    assert codec.copies and codec.max_n == 128 and codec.batch_size == 1
    body = codec.payload(["p"], seed=5, n=3)
    assert body["sentences"] == ["p", "p", "p"] and body["random_seed"] == 5
    answer = {"sentences": ["pa", "pb", "pc"], "tokens": [["p", "a"], ["p", "b"], ["p", "c"]]}
    assert [c.output_tokens for c in codec.parse(200, answer, ["p"], n=3)] == [1, 1, 1]
    assert not NemoCodec(make_cfg("sampling.greedy=false", "sampling.rollouts=4")).copies  # the default: one a request
