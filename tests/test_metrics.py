"""Engine metrics (orchestrator.metrics): each engine family's Prometheus names parsed from a sample of its own
/metrics, the embedded engine's /metrics following its work, a local run's work/metrics/<replica>.jsonl and the
status line read from it, and a server without metrics that does not fail a run."""
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from orchestrator.client import Client
from orchestrator.config import compose
from orchestrator.metrics import (
    FAMILIES,
    STARVED_RECORDS,
    Scraper,
    append,
    engine_summary,
    family_for,
    format_engine,
    metrics_url,
    parse,
    read_tail,
)
from orchestrator.preflight import prepare
from orchestrator.protocols.base import EngineInfo
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import EngineSettings
from orchestrator.status import collect, format_status
from tests.conftest import hydra_value, write_prompts

# vLLM 0.32 (vllm/v1/metrics/loggers.py: labels model_name and engine, one series per engine core; here two,
# --data-parallel-size 2), as prometheus_client writes it: counters' HELP and TYPE carry the _total name
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 7.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.9
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} {q0}
vllm:prefix_cache_queries_total{engine="1",model_name="tiny"} 0.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} {h0}
vllm:prefix_cache_hits_total{engine="1",model_name="tiny"} 0.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 640.0
vllm:generation_tokens_total{engine="1",model_name="tiny"} 360.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 1.7
"""

# vLLM before its V1 engine (0.6-0.8): gpu_cache_usage_perc and gpu_prefix_cache_* (one engine, no label)
VLLM_V0 = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
# HELP vllm:gpu_prefix_cache_hit_rate GPU prefix cache block hit rate.
# TYPE vllm:gpu_prefix_cache_hit_rate gauge
vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.125
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="m"} 77.0
"""

# SGLang's docs (references/production_metrics: `curl http://localhost:30000/metrics`, --enable-metrics)
SGLANG = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.557572e+06
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:cache_hit_rate The cache hit rate
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.007507552643049313
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 28.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
"""

# trtllm-serve's /prometheus/metrics (tensorrt_llm/metrics/collector.py: prefix trtllm_, labels model_name and
# engine_type)
TRTLLM = """\
# HELP trtllm_num_requests_running Number of active requests
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{engine_type="trtllm",model_name="nemotron"} 96.0
# HELP trtllm_num_requests_waiting Number of queued requests
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{engine_type="trtllm",model_name="nemotron"} 12.0
# HELP trtllm_max_num_active_requests Maximum number of active requests
# TYPE trtllm_max_num_active_requests gauge
trtllm_max_num_active_requests{engine_type="trtllm",model_name="nemotron"} 128.0
# HELP trtllm_kv_cache_utilization KV cache utilization
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{engine_type="trtllm",model_name="nemotron"} 0.75
# HELP trtllm_kv_cache_hit_rate KV cache hit rate
# TYPE trtllm_kv_cache_hit_rate gauge
trtllm_kv_cache_hit_rate{engine_type="trtllm",model_name="nemotron"} 0.5
# HELP trtllm_kv_cache_reused_blocks_total Cumulative number of KV cache blocks reused (cache hits)
# TYPE trtllm_kv_cache_reused_blocks_total counter
trtllm_kv_cache_reused_blocks_total{engine_type="trtllm",model_name="nemotron"} {reused}
# HELP trtllm_kv_cache_missed_blocks_total Cumulative number of KV cache blocks missed (cache misses)
# TYPE trtllm_kv_cache_missed_blocks_total counter
trtllm_kv_cache_missed_blocks_total{engine_type="trtllm",model_name="nemotron"} {missed}
# HELP trtllm_generation_tokens_total Cumulative number of generation (output) tokens produced.
# TYPE trtllm_generation_tokens_total counter
trtllm_generation_tokens_total{engine_type="trtllm",model_name="nemotron"} 4096.0
"""

# Triton with the TensorRT-LLM backend, port 8002 (the tensorrtllm_backend README's Triton Metrics section)
TRITON = """\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 0
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.4875
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 6239
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6239
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="tensorrt_llm",version="1"} 0
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 0
"""


def fill(text: str, **values) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def test_vllm_running_and_waiting_are_summed_over_engines_kv_averaged_and_hits_from_counter_deltas():
    scraper = Scraper(FAMILIES["vllm"], "r3", capacity=256, max_in_flight=512)
    first = scraper.record(fill(VLLM, q0="1000.0", h0="100.0"), now=10.0)
    assert (first["running"], first["waiting"], first["kv_cache_use"]) == (5, 7, 0.7)
    assert first["generation_tokens"] == 1000 and first["replica"] == "r3" and first["engine"] == "vllm"
    assert first["prefix_cache_hit_rate"] is None  # one scrape: no delta yet
    second = scraper.record(fill(VLLM, q0="1400.0", h0="400.0"), now=15.0)
    assert second["prefix_cache_hit_rate"] == 0.75  # 300 of the 400 tokens queried since the first scrape
    assert second["capacity"] == 256 and second["max_in_flight"] == 512 and second["t"] == 15.0
    third = scraper.record(fill(VLLM, q0="1400.0", h0="400.0"), now=20.0)
    assert third["prefix_cache_hit_rate"] is None  # nothing queried in between


def test_vllm_before_v1_gpu_cache_names():
    r = Scraper(FAMILIES["vllm"]).record(VLLM_V0)
    assert (r["running"], r["waiting"], r["kv_cache_use"], r["prefix_cache_hit_rate"]) == (4, 0, 0.25, 0.125)
    assert r["generation_tokens"] == 77


def test_sglang_names():
    r = Scraper(FAMILIES["sglang"]).record(SGLANG)
    assert (r["running"], r["waiting"], r["kv_cache_use"]) == (28, 0, 0.28)
    assert r["prefix_cache_hit_rate"] == round(0.007507552643049313, 4) and r["generation_tokens"] == 7557572


def test_trtllm_names_with_reused_and_missed_block_counters():
    scraper = Scraper(FAMILIES["trtllm"], capacity=256)
    first = scraper.record(fill(TRTLLM, reused="10.0", missed="30.0"))
    assert (first["running"], first["waiting"], first["kv_cache_use"]) == (96, 12, 0.75)
    assert first["capacity"] == 128  # what the engine says, over the config's stand-in
    assert first["prefix_cache_hit_rate"] is None and first["generation_tokens"] == 4096
    second = scraper.record(fill(TRTLLM, reused="40.0", missed="40.0"))
    assert second["prefix_cache_hit_rate"] == 0.75  # 30 reused of the 40 blocks looked up since


def test_triton_with_the_tensorrt_llm_backend():
    r = Scraper(FAMILIES["triton"]).record(TRITON)
    assert (r["running"], r["waiting"], r["kv_cache_use"], r["capacity"]) == (0, 1, 0.4875, 512)
    assert r["generation_tokens"] is None and r["prefix_cache_hit_rate"] is None


def test_text_that_is_not_the_exposition_format_is_a_value_error():
    with pytest.raises(ValueError):
        parse("<html><body>Not Found</body></html>")


def test_each_engine_has_its_family_and_url():
    assert family_for("vllm", "openai", None).name == "vllm"
    assert family_for("mock", "openai", "sglang").name == "vllm"  # the embedded engine serves vLLM's names
    assert family_for("endpoint", "openai", "sglang").name == "sglang"
    assert family_for("endpoint", "openai", None).name == "vllm"
    assert family_for("triton", "triton", None).name == "triton"
    assert family_for("nemo", "nemo", None) is None
    assert metrics_url(FAMILIES["vllm"], "http://h:8000/v1/") == "http://h:8000/metrics"
    assert metrics_url(FAMILIES["trtllm"], "https://h:8000") == "https://h:8000/prometheus/metrics"
    assert metrics_url(FAMILIES["triton"], "http://h:8000") is None  # its metrics port is not known
    assert metrics_url(FAMILIES["triton"], "http://h:8000", 8002) == "http://h:8002/metrics"


def get_metrics(url: str) -> dict:
    return Scraper(FAMILIES["vllm"]).record(requests.get(url + "/metrics", timeout=10).text)


def test_the_embedded_engines_metrics_follow_its_work():
    settings = EngineSettings(token_latency_s=0.05, capacity=4, max_natural_tokens=24)
    prompt = " ".join(f"w{i}" for i in range(40))  # 40 tokens: two full 16-token blocks
    with EngineThread(settings) as engine:
        idle = get_metrics(engine.url)
        assert (idle["running"], idle["waiting"], idle["kv_cache_use"], idle["generation_tokens"]) == (0, 0, 0, 0)

        def ask(i: int) -> dict:
            body = {"model": "mock", "prompt": f"{prompt} q{i}", "max_tokens": 12, "seed": i}
            return requests.post(engine.url + "/v1/completions", json=body, timeout=60).json()

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, i) for i in range(6)]
            seen = []
            while not all(f.done() for f in futures):  # the engine's own state while the six are served
                seen.append(get_metrics(engine.url))
            answers = [f.result() for f in futures]
        busy = [m for m in seen if m["running"] == 4]
        assert busy and all(m["kv_cache_use"] == 1.0 for m in busy), seen
        assert any(m["waiting"] == 2 for m in seen), seen  # capacity 4: two of six queue
        done = get_metrics(engine.url)
        assert (done["running"], done["waiting"], done["kv_cache_use"]) == (0, 0, 0)
        # every token generated is counted, the EOS that ends an answer too (which this engine's usage leaves out)
        choices = [c for a in answers for c in a["choices"]]
        eos = sum(c["finish_reason"] == "stop" and c["stop_reason"] is None for c in choices)
        assert done["generation_tokens"] == sum(a["usage"]["completion_tokens"] for a in answers) + eos > 0
        text = requests.get(engine.url + "/metrics", timeout=10).text
        samples = parse(text)
        queried = sum(a["usage"]["prompt_tokens"] for a in answers)
        assert samples["vllm:prefix_cache_queries_total"][0][1] == queried
        # the six prompts share their first 40 tokens: each after the first finds the two leading blocks cached
        assert samples["vllm:prefix_cache_hits_total"][0][1] == 5 * 32
        assert samples["vllm:num_requests_running"][0][0] == {"engine": "0", "model_name": "mock"}


ROWS = 160


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A local run on the embedded engine (OpenAI routes, 20 ms a token), its metrics read every 0.2 s."""
    from orchestrator.frontend import run

    tmp = tmp_path_factory.mktemp("metrics run")
    src = write_prompts(tmp / "in.parquet", ROWS)
    run_dir = tmp / "run"
    cfg = compose([f"data.input={hydra_value(src)}", f"run_dir={hydra_value(run_dir)}", "engine.protocol=openai",
                   "engine.simulator.token_latency_s=0.02", "sampling.tokens_to_generate=8", "data.unit_rows=40",
                   "client.max_in_flight=16", "client.metrics_interval_s=0.2"])
    summary = run(cfg, show_progress=False)
    assert summary["complete"], summary
    return run_dir


def test_a_local_run_writes_the_engines_metrics(local_run):
    files = sorted((local_run / "work" / "metrics").glob("*.jsonl"))
    assert [f.name for f in files] == ["r0.jsonl"]
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(records) >= 3 and all(r["engine"] == "vllm" and r["replica"] == "r0" for r in records)
    assert max(r["running"] for r in records) > 0  # requests were in service at some scrape
    assert all(r["running"] <= 16 and r["waiting"] == 0 for r in records)  # 16 in flight, capacity 256
    tokens = [r["generation_tokens"] for r in records]
    assert tokens == sorted(tokens) and tokens[-1] > tokens[0]
    assert all(r["max_in_flight"] == 16 and r["capacity"] == 256 and r["interval_s"] == 0.2 for r in records)
    assert read_tail(files[0]) == records[-STARVED_RECORDS:]


def test_status_shows_the_engine_line(local_run):
    last = read_tail(local_run / "work" / "metrics" / "r0.jsonl")[-1]
    s = collect(local_run, now=last["t"] + 1)
    assert s["engine"]["replicas"] == [last] and s["engine"]["running"] == last["running"]
    assert s["engine"]["starved"] is False  # complete: no rows left
    text = format_status(s)
    assert f"engine:     {last['running']} running, 0 waiting, KV " in text
    # ten minutes later the replica is not live: no engine line
    later = collect(local_run, now=last["t"] + 600)
    assert later["engine"] is None and "engine:" not in format_status(later)


def test_a_starved_engine_names_the_key_to_raise(local_run):
    """The run's own records: 16 requests in flight against an engine that runs 256 at once."""
    last = read_tail(local_run / "work" / "metrics" / "r0.jsonl")[-1]
    summary = engine_summary(local_run, now=last["t"] + 1, rows_left=True)
    assert summary["starved"] and "client.max_in_flight" in summary["advice"] and "now 16" in summary["advice"]
    assert "client.max_in_flight" in format_engine(summary)[1]


def test_an_engine_with_a_queue_is_not_starved(tmp_path):
    path = tmp_path / "work" / "metrics" / "r0.jsonl"
    for t, waiting in ((1.0, 0), (2.0, 5), (3.0, 0)):
        append(path, {"t": t, "replica": "r0", "engine": "vllm", "running": 20, "waiting": waiting,
                      "kv_cache_use": 0.3, "prefix_cache_hit_rate": None, "generation_tokens": 5, "capacity": 256,
                      "max_in_flight": 32, "interval_s": 1.0})
    summary = engine_summary(tmp_path, now=3.5, rows_left=True)
    assert not summary["starved"] and summary["advice"] is None
    assert format_engine(summary) == ["engine:     20 running, 0 waiting, KV 30 %"]


def test_a_server_without_metrics_does_not_fail_the_run(tmp_path, caplog):
    """trtllm-serve's metrics are at /prometheus/metrics: the embedded engine (trtllm dialect) answers 404."""
    src = write_prompts(tmp_path / "in.parquet", 40)
    with EngineThread(EngineSettings(routes="openai", openai_dialect="trtllm", token_latency_s=0.01)) as engine:
        cfg = compose(["engine=endpoint", f"engine.url={engine.url}", "engine.protocol=openai",
                       "engine.dialect=trtllm", f"data.input={hydra_value(src)}",
                       f"run_dir={hydra_value(tmp_path / 'run')}", "data.unit_rows=20", "sampling.tokens_to_generate=8",
                       "client.metrics_interval_s=0.05"])
        plan, paths = prepare(cfg)
        info = EngineInfo(url=engine.url, protocol="openai", model_name="mock")
        with caplog.at_level(logging.WARNING, logger="orchestrator.client"):
            stats = asyncio.run(Client(cfg, plan, paths, engine.url, "a1", "r0", info=info).run())
    assert stats.rows.rows == 40 and stats.rows.failed == 0
    warnings = [r.getMessage() for r in caplog.records if "engine metrics" in r.getMessage()]
    assert len(warnings) == 1 and "/prometheus/metrics" in warnings[0] and "HTTP 404" in warnings[0]
    assert not (tmp_path / "run" / "work" / "metrics").exists()
