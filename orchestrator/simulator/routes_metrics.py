"""The simulator's ``GET /metrics``: vLLM's Prometheus names (vllm/v1/metrics/loggers.py, labels ``engine``
and ``model_name``), with the engine's own numbers: sequences in service (running) and queued for a slot
(waiting), KV-cache use (running / capacity), prefix-cache queries and hits (prompt tokens, and those of a
prompt's leading 16-token blocks already seen: a bounded table of block prefixes, as vLLM's block hashes),
and generated tokens."""
from __future__ import annotations

from collections import OrderedDict

from aiohttp import web

from .model import _TOKEN_RE

BLOCK = 16  # tokens per KV-cache block (vLLM's default block size)
MAX_BLOCKS = 1 << 16  # block prefixes remembered, least recently used dropped first

_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv"),
)
_COUNTERS = (
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", "queries"),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "hits"),
    ("vllm:generation_tokens", "Number of generation tokens processed.", "generated"),
)


class PrefixCache:
    """Which leading blocks of the prompts seen are cached: counts queried and hit tokens as vLLM does."""

    def __init__(self, max_blocks: int = MAX_BLOCKS):
        self.blocks: OrderedDict = OrderedDict()
        self.max_blocks = max_blocks
        self.queries = self.hits = 0

    def query(self, text: str) -> None:
        tokens = _TOKEN_RE.findall(text)
        self.queries += len(tokens)
        key, hit = None, True
        for start in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
            key = hash((key, *tokens[start:start + BLOCK]))
            if hit and key in self.blocks:
                self.hits += BLOCK
                self.blocks.move_to_end(key)
                continue
            hit = False
            self.blocks[key] = None
            if len(self.blocks) > self.max_blocks:
                self.blocks.popitem(last=False)


class _MetricsRoutes:
    """vLLM's ``/metrics`` (a mixin of engine._Engine: ``counters``, ``s``, ``prefix_cache``)."""

    def metrics_text(self) -> str:
        c, s = self.counters, self.s
        values = {"running": c["active"], "waiting": c["waiting"], "kv": min(1.0, c["active"] / s.capacity),
                  "queries": self.prefix_cache.queries, "hits": self.prefix_cache.hits,
                  "generated": c["generated_tokens"]}
        name = s.model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        labels = f'{{engine="0",model_name="{name}"}}'
        lines = []
        for metric, help_text, key in _GAUGES:
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge",
                      f"{metric}{labels} {float(values[key])}"]
        for metric, help_text, key in _COUNTERS:
            lines += [f"# HELP {metric}_total {help_text}", f"# TYPE {metric}_total counter",
                      f"{metric}_total{labels} {float(values[key])}"]
        return "\n".join(lines) + "\n"

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")
