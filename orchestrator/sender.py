"""One request to the engine, with its retries, timeouts and hung-engine detection (see Sender).

It knows nothing of units: it sends prompts and hands back the engine's completions, or why there are
none. Each HTTP try leaves one record in `requests`, which the client writes with its progress.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp

from .config import ClientConfig
from .errors import EngineError
from .protocols.base import MalformedAnswer, RejectedError, TransientError


class EngineLost(EngineError):
    """The engine this replica talks to died; its unfinished units go back to the pool."""


class EngineHung(EngineLost):
    """Requests were in flight and the engine answered none of them for a whole request timeout."""


@dataclass
class Answered:
    """The engine's completions of one request; the caller settles its rows, then calls Sender.answered."""

    completions: list
    latency: float
    attempt: int
    record: dict
    started: float


@dataclass
class Failed:
    """A request that failed for good: its rows are errors; the caller sets record["failed"], then keeps it."""

    error: str
    attempt: int
    retryable: bool
    record: dict


class Sender:
    """Sends one request at a time for the client's workers: retries a transient failure with backoff, and
    halts the replica (through `halt`) when the engine is hung or gone, so that no row is blamed for it.
    `session` is set once the client has opened its HTTP session."""

    def __init__(self, protocol, url: str, client: ClientConfig, timeout_s: float, owner: str, stats,
                 halt: Callable[[Exception], None], stopping: Callable[[], bool], engine_alive: Callable[[], bool]):
        self.protocol, self.url, self.client, self.timeout_s, self.owner = protocol, url, client, timeout_s, owner
        self.stats = stats  # ClientStats: first_request_at
        self.halt, self.stopping, self.engine_alive = halt, stopping, engine_alive
        self.session: aiohttp.ClientSession | None = None
        self.last_answer_at = time.monotonic()  # any HTTP answer from the engine: a hung engine gives none
        # one record per HTTP request, kept here and appended to work/requests/ with each progress write:
        # `orchestrator status` and `report` read them, and no request waits for a write of its own
        self.requests: list[dict] = []

    async def send(self, payload: dict, prompts: list, n) -> Answered | Failed | None:
        """One request for `prompts` (asking for n answers each where n is set): the completions, the failure
        its rows are to record, or None when the request is abandoned (stopping, the engine gone or hung:
        the rows are redone on resume, never recorded as errors)."""
        client = self.client
        error = ""
        for attempt in range(1, client.max_retries + 2):
            if self.stats.first_request_at is None:
                self.stats.first_request_at = time.time()
            started = time.perf_counter()
            record = {"prompts": len(prompts), "attempt": attempt}
            try:
                async with self.session.request(self.protocol.method, self.url + self.protocol.path,
                                                json=payload) as resp:
                    try:
                        body = await resp.json(content_type=None)
                    except (json.JSONDecodeError, aiohttp.ContentTypeError, ValueError):
                        body = await resp.text()
                    completions = self.protocol.parse(resp.status, body, prompts, n=n)
            except RejectedError as exc:
                error, retryable = str(exc), isinstance(exc, MalformedAnswer)
                self.record(record, started, error=error, done=False)
                break
            except (TransientError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    error = f"timed out: no answer within {self.timeout_s:g} s (client.request_timeout_s)"
                    silent = time.monotonic() - self.last_answer_at
                    hung_after = client.hung_after_s or self.timeout_s
                    if silent >= hung_after and not self.stopping():
                        self.record(record, started, error=error)
                        self.halt(EngineHung(
                            f"the engine at {self.url} answered nothing for {silent:.0f} s while requests were in "
                            f"flight (client.hung_after_s={hung_after:g} s): it is hung. Unfinished units go back "
                            f"to the pool, no row is blamed; rerun to resume"))
                        return None
                else:
                    error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransientError) else str(exc)
                if self.stopping() or not self.engine_alive():
                    self.record(record, started, error=error)
                    return None  # abandoned: the unit is redone on resume, never recorded as an error
                # the last try's record is kept after the loop, once it is known whether its rows failed
                self.record(record, started, error=error, done=attempt <= client.max_retries)
                if attempt <= client.max_retries:
                    delay = min(client.retry_backoff_max_s, client.retry_backoff_s * 2 ** (attempt - 1))
                    await asyncio.sleep(delay * (0.5 + random.random()))
                continue
            latency = time.perf_counter() - started
            self.last_answer_at = time.monotonic()
            return Answered(completions, latency, attempt, record, started)
        else:
            attempt, retryable = client.max_retries + 1, True
            error = f"gave up after {attempt} attempts: {error}"
            if not await self._engine_answers():
                self.halt(EngineLost(f"the engine at {self.url} no longer answers ({error}); unfinished units "
                                     f"go back to the pool"))
                self.requests.append(record)
                return None
        if not self.engine_alive():
            self.requests.append(record)
            return None
        return Failed(error, attempt, retryable, record)

    def answered(self, answer: Answered, ok: int, tokens: int, failed: int = 0) -> None:
        """Keep the record of a request whose rows are settled: `ok` answers taken, `tokens` generated, `failed`
        rows whose own answer was unusable."""
        self.record(answer.record, answer.started, ok=ok, tokens=tokens, failed=failed)

    def record(self, record: dict, started: float, ok: int = 0, tokens: int = 0, error: str | None = None,
               done: bool = True, failed: int = 0) -> None:
        """Fill in one HTTP request's record and keep it; done=False leaves keeping it to the caller (the
        last try's rows count as failed only once they are recorded as errors)."""
        record.update(at=round(time.time(), 3), latency_s=round(time.perf_counter() - started, 4),
                      output_tokens=tokens, ok=ok, failed=failed, replica=self.owner,
                      error=error[:300] if error is not None else None)
        if done:
            self.requests.append(record)

    async def _engine_answers(self) -> bool:
        """Whether anything answers HTTP at the engine's address (any status will do): a failed row is then
        the row's problem; no answer at all means the engine is gone, and the rows are not to blame."""
        try:
            async with self.session.get(self.url + "/", timeout=aiohttp.ClientTimeout(total=10)):
                return True
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
            return False
        except aiohttp.ClientError:
            return True
