"""The simulator's capacity and fault injection: latency, the capacity semaphore (OpenAI routes), the one
generation at a time lock (NeMo, Triton), error_rate and stall_rate (fail or hang a request, deterministic
from the seed). A mixin of ``engine._Engine``, which holds the state (``s``, ``lock``, ``slots``, ``fail_rng``,
``busy_s``, ``counters``); an engine rank that exits at once (``--fail-rank``) is the command line's
(``cli``), slow replicas (``engine.simulator.slow_replicas``) scale the latencies given to each engine
(``orchestrator.engines.mock``)."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class _Faults:
    """Latency, capacity and injected failures, shared by the three protocols' routes."""

    def _fail(self) -> bool:
        if self.s.error_rate > 0 and self.fail_rng.random() < self.s.error_rate:
            self._count("errors")
            return True
        return False

    async def _maybe_stall(self) -> None:
        if self.s.stall_rate > 0 and self.fail_rng.random() < self.s.stall_rate:
            self._count("stalls")
            await asyncio.sleep(self.s.stall_s)

    @asynccontextmanager
    async def _hold(self, gate):
        self._count("waiting")
        try:
            await gate.acquire()
        finally:
            self._count("waiting", -1)
        self._count("active")
        try:
            yield
        finally:
            self._count("active", -1)
            gate.release()

    async def _serialised(self, longest: int) -> None:
        """One generation at a time (NeMo's global lock, a PyTriton model instance): the batch takes
        as long as its longest sequence."""
        service = self.s.request_latency_s + longest * self.s.token_latency_s
        if service > 0:
            async with self._hold(self.lock):
                await asyncio.sleep(service)
                self.busy_s += service

    async def _occupy(self, service: float) -> None:
        async with self._hold(self.slots):
            await asyncio.sleep(service)
            self.busy_s += service / self.s.capacity
