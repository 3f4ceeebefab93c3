"""The simulator's state, shared by the routes of the three protocol families (``routes_nemo``,
``routes_openai``, ``routes_triton``; ``routes_metrics``'s GET /metrics) and its capacity and fault injection
(``faults``)."""
from __future__ import annotations

import asyncio
import random
import time

from aiohttp import web

from .dialects import dialect
from .faults import _Faults
from .model import EngineSettings
from .routes_metrics import PrefixCache, _MetricsRoutes
from .routes_nemo import _NemoRoutes
from .routes_openai import _OpenAIRoutes
from .routes_reward import _RewardRoutes
from .routes_triton import _TritonRoutes
from .triton_tensors import _triton_model
from .validation import _json


class _Engine(_NemoRoutes, _OpenAIRoutes, _TritonRoutes, _RewardRoutes, _MetricsRoutes, _Faults):
    def __init__(self, settings: EngineSettings):
        self.s = settings
        self.lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(settings.capacity)
        self.fail_rng = random.Random(settings.seed)
        self.started, self.created = time.monotonic(), int(time.time())
        self.counters = dict.fromkeys(("requests", "prompts", "errors", "stalls", "bad_requests", "generated_tokens",
                                       "active", "waiting", "peak_active", "peak_waiting", "authorized",
                                       "unauthorized"), 0)
        self.busy_s = 0.0
        self.prefix_cache = PrefixCache()  # prompt tokens queried and found cached (GET /metrics)
        self.triton = _triton_model(settings)
        self.dialect = dialect(settings.openai_dialect)  # whose OpenAI server the OpenAI routes imitate

    def _count(self, key: str, n: int = 1) -> None:
        c = self.counters
        c[key] += n
        if key in ("active", "waiting"):
            c["peak_" + key] = max(c["peak_" + key], c[key])

    async def stats(self, request: web.Request) -> web.Response:
        return _json({**self.counters, "busy_s": self.busy_s, "uptime_s": time.monotonic() - self.started})
