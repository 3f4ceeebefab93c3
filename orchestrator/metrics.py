"""Engine metrics: each replica's engine's Prometheus ``/metrics``, read every client.metrics_interval_s.

Every engine served here has one, in the Prometheus text exposition format (parsed with prometheus_client's
parser), each with its own names; one mapping per engine family turns a scrape into one record:

    {"t", "replica", "attempt", "engine", "running", "waiting", "kv_cache_use", "prefix_cache_hit_rate",
     "generation_tokens", "capacity", "max_in_flight", "interval_s"}

- vllm (vLLM's OpenAI server, and the embedded engine, which imitates it): ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before
  vLLM's V1 engine; 1 means 100 %), the counters ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``
  (``vllm:gpu_prefix_cache_*`` before) and ``vllm:generation_tokens``; one series per engine core (label
  ``engine``): summed, KV use averaged.
- sglang (``--enable-metrics``): ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:token_usage``, ``sglang:cache_hit_rate`` (a gauge) and ``sglang:generation_tokens``.
- trtllm (trtllm-serve, at ``/prometheus/metrics``): ``trtllm_num_requests_running``,
  ``trtllm_num_requests_waiting``, ``trtllm_kv_cache_utilization``, the counters
  ``trtllm_kv_cache_reused_blocks`` / ``trtllm_kv_cache_missed_blocks`` (else the gauge
  ``trtllm_kv_cache_hit_rate``) and ``trtllm_generation_tokens``.
- triton (Triton's metrics port, 8002 by default: known only from engine.options.metrics_port):
  ``nv_inference_pending_request_count`` (waiting), and the TensorRT-LLM backend's
  ``nv_trt_llm_request_metrics{request_type="active"|"waiting"}`` and
  ``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}``; Triton counts no generated tokens.

A value an engine does not expose is null. The prefix-cache hit rate of counters is that of the tokens
queried since the previous scrape (null when none were). Records go to work/metrics/<replica>.jsonl, one line
a scrape (the file is started afresh past MAX_BYTES, the older lines kept in <replica>.jsonl.1);
`orchestrator status` shows the newest of each live replica (engine_summary).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

MAX_BYTES = 8 << 20  # one metrics file; past this it is moved to <replica>.jsonl.1 and started afresh
STARVED_RECORDS = 3  # the newest records of a replica that must all show a starved engine
STARVED_SHARE = 0.5  # running below this share of the engine's capacity, nothing waiting: starved
FIELDS = ("running", "waiting", "kv_cache_use", "prefix_cache_hit_rate", "generation_tokens")

Selector = tuple  # (sample name, {label: value} that the sample must carry)


@dataclass(frozen=True)
class Family:
    """Where one engine family keeps each value: the samples summed (running, waiting, generated tokens) or
    averaged (KV use, a hit-rate gauge), the first name found of each list winning."""

    name: str
    path: str = "/metrics"
    running: tuple = ()
    waiting: tuple = ()
    kv_cache_use: tuple = ()
    hits_queries: tuple = ()  # ((hits counter, queries counter), ...): a rate of the deltas
    hit_rate: tuple = ()  # gauges of the hit rate itself
    generation_tokens: tuple = ()
    capacity: tuple = ()  # what the engine says it can run at once, where it says it


def _s(name: str, **labels) -> Selector:
    return (name, labels)


FAMILIES = {f.name: f for f in (
    Family("vllm",
           running=(_s("vllm:num_requests_running"),), waiting=(_s("vllm:num_requests_waiting"),),
           kv_cache_use=(_s("vllm:kv_cache_usage_perc"), _s("vllm:gpu_cache_usage_perc")),
           hits_queries=((_s("vllm:prefix_cache_hits_total"), _s("vllm:prefix_cache_queries_total")),
                         (_s("vllm:gpu_prefix_cache_hits_total"), _s("vllm:gpu_prefix_cache_queries_total"))),
           hit_rate=(_s("vllm:gpu_prefix_cache_hit_rate"),),
           generation_tokens=(_s("vllm:generation_tokens_total"),)),
    Family("sglang",
           running=(_s("sglang:num_running_reqs"),), waiting=(_s("sglang:num_queue_reqs"),),
           kv_cache_use=(_s("sglang:token_usage"),), hit_rate=(_s("sglang:cache_hit_rate"),),
           generation_tokens=(_s("sglang:generation_tokens_total"),)),
    Family("trtllm", path="/prometheus/metrics",
           running=(_s("trtllm_num_requests_running"),), waiting=(_s("trtllm_num_requests_waiting"),),
           kv_cache_use=(_s("trtllm_kv_cache_utilization"),),
           hits_queries=((_s("trtllm_kv_cache_reused_blocks_total"), None),),
           hit_rate=(_s("trtllm_kv_cache_hit_rate"),),
           generation_tokens=(_s("trtllm_generation_tokens_total"),),
           capacity=(_s("trtllm_max_num_active_requests"),)),
    Family("triton",
           running=(_s("nv_trt_llm_request_metrics", request_type="active"),),
           waiting=(_s("nv_trt_llm_request_metrics", request_type="waiting"),
                    _s("nv_inference_pending_request_count")),
           kv_cache_use=(_s("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="fraction"),),
           capacity=(_s("nv_trt_llm_request_metrics", request_type="max"),)),
)}
_TRTLLM_MISSED = _s("trtllm_kv_cache_missed_blocks_total")  # with reused blocks: reused / (reused + missed)


def parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text exposition -> {sample name: [(labels, value), ...]}; ValueError for text that is not
    that format."""
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _values(samples: dict, selectors) -> list[float] | None:
    """The values of the first selector that has samples (None: none has)."""
    for selector in selectors:
        if selector is None:
            continue
        name, labels = selector
        found = [v for lab, v in samples.get(name, ()) if all(lab.get(k) == want for k, want in labels.items())]
        if found:
            return found
    return None


def _sum(samples, selectors) -> float | None:
    found = _values(samples, selectors)
    return None if found is None else sum(found)


def _mean(samples, selectors) -> float | None:
    found = _values(samples, selectors)
    return None if found is None else sum(found) / len(found)


def _whole(value: float | None) -> int | float | None:
    return int(value) if value is not None and float(value).is_integer() else value


@dataclass
class Scraper:
    """Turns one replica's successive scrapes into records (the counters' deltas need the previous one)."""

    family: Family
    replica: str = "r0"
    attempt: str | None = None
    capacity: int | None = None  # sequences the engine runs at once (from the config) where it says none
    max_in_flight: int | None = None  # the client's requests in flight at most
    interval_s: float = 5.0
    previous: dict = field(default_factory=dict)  # counter name -> its last value

    def record(self, text: str, now: float | None = None) -> dict:
        samples = parse(text)
        f = self.family
        rate = _mean(samples, f.hit_rate)
        for hits_sel, queries_sel in f.hits_queries:
            hits = _sum(samples, (hits_sel,))
            queries = _sum(samples, (queries_sel,)) if queries_sel is not None else None
            if queries is None and f.name == "trtllm" and hits is not None:
                missed = _sum(samples, (_TRTLLM_MISSED,))
                queries = None if missed is None else hits + missed
            if hits is None or queries is None:
                continue
            key = hits_sel[0]
            before = self.previous.get(key)
            self.previous[key] = (hits, queries)
            rate = None
            if before is not None and queries - before[1] > 0 and hits >= before[0]:
                rate = round((hits - before[0]) / (queries - before[1]), 4)
            break
        kv = _mean(samples, f.kv_cache_use)
        capacity = _sum(samples, f.capacity) or self.capacity
        return {"t": round(time.time() if now is None else now, 3), "replica": self.replica,
                "attempt": self.attempt, "engine": f.name,
                "running": _whole(_sum(samples, f.running)), "waiting": _whole(_sum(samples, f.waiting)),
                "kv_cache_use": None if kv is None else round(kv, 4),
                "prefix_cache_hit_rate": None if rate is None else round(rate, 4),
                "generation_tokens": _whole(_sum(samples, f.generation_tokens)),
                "capacity": _whole(capacity), "max_in_flight": self.max_in_flight, "interval_s": self.interval_s}


def family_for(engine: str, protocol: str, dialect: str | None) -> Family | None:
    """The family of the engine a replica talks to (engine.name, the protocol readiness found, and
    engine.dialect), None for one that serves no Prometheus metrics (NeMo's text generation server)."""
    if engine in ("vllm", "sglang", "trtllm"):
        return FAMILIES[engine]
    if protocol in ("triton", "reward"):  # Triton (PyTriton: NeMo's deploy_triton.py, NeMo-Aligner's reward)
        return FAMILIES["triton"]
    if engine == "nemo":
        return None
    # the embedded engine and engine=endpoint: an OpenAI server of its dialect (the embedded one: vLLM's names)
    return FAMILIES.get(dialect if engine == "endpoint" and dialect else "vllm")


def metrics_url(family: Family, base_url: str, metrics_port: int | None = None) -> str | None:
    """Where the family's metrics are: the engine's base URL + its path, or for Triton its metrics port (None
    when that port is not known: engine.options.metrics_port)."""
    parts = urlsplit(base_url.rstrip("/"))
    path = parts.path[:-3] if parts.path.endswith("/v1") else parts.path
    netloc = parts.netloc
    if family.name == "triton":
        if not metrics_port:
            return None
        netloc = f"{parts.hostname}:{int(metrics_port)}" if ":" not in (parts.hostname or "") else \
            f"[{parts.hostname}]:{int(metrics_port)}"
        path = ""
    return urlunsplit((parts.scheme, netloc, path + family.path, "", ""))


def metrics_dir(run_root: Path) -> Path:
    return Path(run_root) / "work" / "metrics"


def append(path: Path, record: dict) -> None:
    """One record appended to a replica's metrics file; past MAX_BYTES the file is moved aside first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.stat().st_size > MAX_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass
    with open(path, "a") as fh:
        fh.write(json.dumps(record, separators=(",", ":")) + "\n")


def read_tail(path: Path, n: int = STARVED_RECORDS, chunk: int = 1 << 14) -> list[dict]:
    """The newest n records of a metrics file (a line being written, or cut, is skipped)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - chunk))
            lines = fh.read().splitlines()
            if size > chunk:
                lines = lines[1:]
    except OSError:
        return []
    records = []
    for line in lines[-(n + 1):]:
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict) and isinstance(found.get("t"), (int, float)):
            records.append(found)
    return records[-n:]


def _starved(records: list[dict]) -> bool:
    """The engine had nothing waiting and ran well below its capacity in each of these records."""
    if len(records) < STARVED_RECORDS:
        return False
    for r in records:
        running, waiting, capacity = r.get("running"), r.get("waiting"), r.get("capacity")
        if running is None or waiting is None or not capacity or waiting > 0 or running >= STARVED_SHARE * capacity:
            return False
    return True


def engine_summary(run_root: Path, now: float | None = None, rows_left: bool = True) -> dict | None:
    """The newest record of each live replica (one scraped within 3 of its intervals + 10 s), their totals
    (running and waiting summed, KV use and hit rate averaged), and whether the engine is starved while rows
    are left (each live replica starved over its last STARVED_RECORDS records); None without records."""
    folder = metrics_dir(run_root)
    now = time.time() if now is None else now
    latest, starved = [], []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        records = read_tail(path)
        if not records:
            continue
        newest = records[-1]
        if now - newest["t"] > 3 * float(newest.get("interval_s") or 5.0) + 10:
            continue
        latest.append(newest)
        starved.append(_starved(records))

    if not latest:
        return None

    def total(key, mean=False):
        found = [r[key] for r in latest if r.get(key) is not None]
        if not found:
            return None
        return round(sum(found) / len(found), 4) if mean else _whole(sum(found))

    is_starved = rows_left and all(starved)
    in_flight = total("max_in_flight")
    advice = None
    if is_starved:
        advice = (f"the engine is starved: nothing waiting and {total('running')} running of about "
                  f"{total('capacity')} it can run, over the last {STARVED_RECORDS} scrapes, while rows are left; "
                  f"raise client.max_in_flight" + (f" (now {in_flight} in all)" if in_flight else ""))
    return {"replicas": latest, "running": total("running"), "waiting": total("waiting"),
            "kv_cache_use": total("kv_cache_use", mean=True),
            "prefix_cache_hit_rate": total("prefix_cache_hit_rate", mean=True),
            "generation_tokens": total("generation_tokens"), "capacity": total("capacity"),
            "starved": is_starved, "advice": advice}


def format_engine(summary: dict) -> list[str]:
    """`orchestrator status`'s engine line (and the starved line under it)."""
    parts = []
    if summary["running"] is not None:
        parts.append(f"{summary['running']} running")
    if summary["waiting"] is not None:
        parts.append(f"{summary['waiting']} waiting")
    if summary["kv_cache_use"] is not None:
        parts.append(f"KV {100 * summary['kv_cache_use']:.0f} %")
    if summary["prefix_cache_hit_rate"] is not None:
        parts.append(f"prefix cache hits {100 * summary['prefix_cache_hit_rate']:.0f} %")
    n = len(summary["replicas"])
    lines = [f"engine:     {', '.join(parts) or 'no values'}" + (f" ({n} replicas)" if n > 1 else "")]
    if summary["advice"]:
        lines.append(f"            {summary['advice']}")
    return lines
