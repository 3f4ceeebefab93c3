"""One replica's loop: claim units -> stream rows -> requests -> commit results.

Rows stream from Parquet a record batch at a time; a bounded queue between the reader and the
senders keeps memory flat whatever the input size, and keeps enough requests in flight that the
engine never waits for the client.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp
import pandas  # noqa: F401 - pyarrow imports it on the first pa.array(list): pay that at start, not mid-run
import pyarrow as pa

from .config import Config
from .errors import EngineError, RunError
from .engines.codecs import EngineInfo, MalformedAnswer, RejectedError, TransientError, make_codec, openai_api
from .prompts import format_prompt, postprocess
from .work import (Plan, RunPaths, UnitReader, UnitStats, atomic_write_text, claim, commit_unit, done_units,
                   heartbeat, is_committed, kept_rows, mark_retried, result_schema, retried, retry_units)

log = logging.getLogger(__name__)


class UnitBuffer:
    """Results of one unit, filled in any order, committed once every row has an outcome."""

    def __init__(self, unit: int, rows: int):
        self.unit = unit
        self.ids: list = []
        self.response: list = [None] * rows
        self.status: list = [None] * rows
        self.error: list = [None] * rows
        self.output_tokens: list = [None] * rows
        self.latency: list = [None] * rows
        self.attempts: list = [0] * rows
        self.remaining = rows
        self.read_done = False
        self.retryable = 0  # failed rows the engine is to blame for: a rerun with retry_failed=true may recover them

    def fail(self, i: int, message: str, attempts: int = 0, retryable: bool = False) -> None:
        self.status[i], self.error[i], self.attempts[i] = "error", message, attempts
        self.retryable += retryable
        self.remaining -= 1

    def succeed(self, i: int, text: str, tokens: int | None, latency: float, attempts: int) -> None:
        self.response[i], self.status[i], self.output_tokens[i] = text, "ok", tokens
        self.latency[i], self.attempts[i] = latency, attempts
        self.remaining -= 1

    @property
    def complete(self) -> bool:
        return self.read_done and self.remaining == 0

    def table(self, schema: pa.Schema) -> tuple[pa.Table, UnitStats]:
        table = pa.Table.from_arrays([
            pa.array(self.ids, schema.field("id").type), pa.array(self.response, pa.string()),
            pa.array(self.status, pa.string()), pa.array(self.error, pa.string()),
            pa.array(self.output_tokens, pa.int64()), pa.array(self.latency, pa.float64()),
            pa.array(self.attempts, pa.int32()),
        ], schema=schema)
        ok = sum(1 for s in self.status if s == "ok")
        tokens = sum(t for t in self.output_tokens if t)
        return table, UnitStats(len(self.ids), ok, len(self.ids) - ok, tokens, 1, self.retryable)


def check_prompt(value) -> str | None:
    """Why a row's prompt cannot be sent, or None when it can."""
    if value is None:
        return "prompt is null"
    if not isinstance(value, str):
        return f"prompt is not text ({type(value).__name__})"
    if not value.strip():
        return "prompt is empty"
    return None


class EngineLost(EngineError):
    """The engine this replica talks to died; its unfinished units go back to the pool."""


class EngineHung(EngineLost):
    """Requests were in flight and the engine answered none of them for a whole request timeout."""


class TooManyErrors(RunError):
    """More than client.max_error_fraction of the rows failed: stop instead of burning GPU hours."""


@dataclass
class ClientStats:
    """One replica's totals in one attempt of the run, across its requeued segments."""

    rows: UnitStats = field(default_factory=UnitStats)
    first_request_at: float | None = None  # this segment
    last_commit_at: float | None = None
    skipped_units: int = 0
    earlier: list = field(default_factory=list)  # [first request, last commit] of the segments before a requeue

    @property
    def segments(self) -> list:
        now = [[self.first_request_at, self.last_commit_at]] if self.first_request_at and self.last_commit_at else []
        return self.earlier + now

    @property
    def generate_s(self) -> float:
        return sum(max(0.0, end - start) for start, end in self.segments)


class Client:
    """Runs a plan's not-yet-committed units against one engine endpoint.

    `request_stop()` (thread-safe) makes it stop taking work, give in-flight requests up to
    client.grace_s, commit the units that finished and abandon the rest (they are redone on resume).
    A failure while stopping, or once the engine is gone, never becomes a row error.
    """

    def __init__(self, cfg: Config, plan: Plan, paths: RunPaths, url: str, attempt: str, owner: str,
                 model_name: str = "mock", engine_alive: Callable[[], bool] | None = None,
                 info: EngineInfo | None = None):
        self.cfg, self.plan, self.paths, self.url = cfg, plan, paths, url.rstrip("/")
        self.attempt, self.owner = attempt, owner
        self.info = info or EngineInfo(url=self.url, protocol=cfg.engine.protocol or "nemo", model_name=model_name,
                                       api=openai_api(cfg))
        self.protocol = make_codec(cfg, self.info)
        self.context = self.info.max_model_len or cfg.model.architecture.max_seq_len
        # the engine counts tokens itself: it refuses a too-long prompt with its own message, and
        # truncation (data.truncate_prompts) cuts by its exact count
        self.exact_tokens = self.info.can_tokenize
        self.schema = result_schema(plan)
        self.reader = UnitReader(plan, cfg.data.read_batch_rows)
        self.stats = ClientStats()
        self._continue_attempt()
        self.retry_units = retry_units(paths, attempt) if cfg.retry_failed else set()
        self.timeout_s = cfg.request_timeout_s
        self.last_answer_at = time.monotonic()  # any HTTP answer from the engine: a hung engine gives none
        self.engine_alive = engine_alive or (lambda: True)
        self.stop_reason: str | None = None
        self.fatal: Exception | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None

    def _continue_attempt(self) -> None:
        """A job requeued within one attempt continues its replica's totals, so progress and the summary
        count every segment, not the last one."""
        try:
            record = json.loads((self.paths.progress / f"{self.owner}.json").read_text())
        except (OSError, ValueError):
            return
        if isinstance(record, dict) and record.get("attempt") == self.attempt:
            self.stats.rows = UnitStats.of(record)
            self.stats.earlier = [list(s) for s in record.get("segments", [])]

    def request_stop(self, reason: str) -> None:
        """Thread-safe: stop taking work and wind down within client.grace_s."""
        self.stop_reason = self.stop_reason or reason
        if self.loop is not None and self.stopping is not None:
            try:
                self.loop.call_soon_threadsafe(self.stopping.set)
            except RuntimeError:  # the loop has closed: the client already ended, nothing to stop
                pass

    def _halt(self, error: Exception) -> None:
        if self.fatal is None:
            self.fatal = error
        self.stopping.set()

    async def run(self) -> ClientStats:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        if self.stop_reason:
            self.stopping.set()
        in_flight = self.protocol.in_flight
        queue: asyncio.Queue = asyncio.Queue(maxsize=in_flight)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=in_flight)
        heartbeat(self.paths, self.attempt, self.owner)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self.session = session
            helpers = [asyncio.create_task(self._report_progress()), asyncio.create_task(self._watch())]
            work = asyncio.gather(self._produce(queue, in_flight), *[self._worker(queue) for _ in range(in_flight)])
            stop = asyncio.create_task(self.stopping.wait())
            try:
                await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    grace = 0.0 if isinstance(self.fatal, EngineLost) else self.cfg.client.grace_s
                    try:
                        await asyncio.wait_for(asyncio.shield(work), timeout=grace)
                    except asyncio.TimeoutError:
                        pass
                failed = work.done() and not work.cancelled() and work.exception()
                await _cancel(work)
                if failed and self.fatal is None:
                    raise failed
            finally:
                await _cancel(stop, *helpers)
                self._write_progress()
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    async def _watch(self) -> None:
        """Heartbeat for our claims, and notice at once when the engine process dies."""
        beat_every = max(0.5, self.cfg.client.lease_s / 4)
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            if not self.engine_alive():
                self._halt(EngineLost("the engine process exited during the run; unfinished units go back to the pool"))
                return
            if time.monotonic() - last_beat >= beat_every:
                await asyncio.to_thread(heartbeat, self.paths, self.attempt, self.owner)
                last_beat = time.monotonic()

    async def _produce(self, queue: asyncio.Queue, workers: int) -> None:
        await self._produce_units(queue)
        for _ in range(workers):
            await queue.put(None)

    async def _produce_units(self, queue: asyncio.Queue) -> None:
        done = done_units(self.paths)
        retry = {u for u in self.retry_units if not retried(self.paths, self.attempt, u)}
        self.stats.skipped_units = len(done - retry)
        pending = [u for u in range(len(self.plan.units)) if u not in done or u in retry]
        batch: list[tuple[UnitBuffer, int, str]] = []
        lease = self.cfg.client.lease_s
        while pending and not self.stopping.is_set():
            waiting = []
            for unit in pending:
                if self.stopping.is_set():
                    return
                if is_committed(self.paths, unit) and unit not in retry:
                    continue
                if not claim(self.paths, self.attempt, unit, self.owner, lease):
                    waiting.append(unit)
                    continue
                keep = None
                if unit in retry:
                    if retried(self.paths, self.attempt, unit):  # done before this job was requeued
                        continue
                    keep = await asyncio.to_thread(kept_rows, self.paths, unit)
                    if keep is not None and len(keep["status"]) != self.plan.units[unit][2]:
                        keep = None  # not this unit's rows: redo it whole
                batch = await self._read_unit(unit, batch, queue, keep)
            if batch and not self.stopping.is_set():
                await queue.put(batch)
                batch = []
            pending = [u for u in waiting if not is_committed(self.paths, u)]
            if pending:  # held by other replicas: wait for them to commit, or for their lease to lapse
                await asyncio.sleep(min(2.0, lease / 4))

    async def _read_unit(self, unit: int, batch: list, queue: asyncio.Queue, keep: dict | None = None) -> list:
        """Queue a unit's rows; with keep (a retried unit's committed columns), its ok rows are kept as
        they are and only the others are sent again."""
        fmt, batch_size = self.cfg.model.prompt, self.protocol.batch_size
        buf = UnitBuffer(unit, self.plan.units[unit][2])
        for ids, prompts in self.reader.read(unit):
            base = len(buf.ids)
            buf.ids.extend(ids)
            for offset, prompt in enumerate(prompts):
                i = base + offset
                if keep is not None and keep["status"][i] == "ok":
                    buf.succeed(i, keep["response"][i], keep["output_tokens"][i], keep["latency_s"][i],
                                keep["attempts"][i])
                    continue
                problem = check_prompt(prompt)
                if not problem and self.exact_tokens:
                    if self.cfg.data.truncate_prompts:
                        try:
                            prompt = await self._truncate_exact(prompt)
                        except (TransientError, aiohttp.ClientError, asyncio.TimeoutError):
                            prompt, problem = self._fit_context(prompt)
                elif not problem:
                    prompt, problem = self._fit_context(prompt)
                if problem:
                    buf.fail(base + offset, problem)
                    continue
                batch.append((buf, base + offset, format_prompt(prompt, fmt)))
                if len(batch) >= batch_size:
                    await queue.put(batch)
                    batch = []
        buf.read_done = True
        if buf.complete:
            await self._commit(buf)
        return batch

    async def _count_tokens(self, prompt: str) -> int:
        body = self.protocol.payload([format_prompt(prompt, self.cfg.model.prompt)], tokens_to_generate=1)
        request = {"model": self.info.model_name}
        request.update({"messages": body["messages"]} if "messages" in body else {"prompt": body["prompt"]})
        async with self.session.post(self.url + "/tokenize", json=request) as resp:
            answer = await resp.json(content_type=None)
        if resp.status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("count"), int):
            raise TransientError(f"/tokenize answered HTTP {resp.status}: {str(answer)[:200]}")
        return answer["count"]

    async def _truncate_exact(self, prompt: str) -> str:
        """The longest start of the prompt whose formatted text leaves room for one generated token, by the
        engine's own count (a few /tokenize calls, only for prompts that may be too long)."""
        limit = self.context - max(1, self.cfg.sampling.min_tokens_to_generate)
        if len(prompt.encode()) + 64 < limit or await self._count_tokens(prompt) <= limit:  # a token is >= 1 byte
            return prompt
        lo, hi = 0, len(prompt)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await self._count_tokens(prompt[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return prompt[:lo]

    def _fit_context(self, prompt: str) -> tuple[str, str | None]:
        """The prompt within the model's context (estimated from its UTF-8 size), truncated when allowed."""
        data, context = self.cfg.data, self.context
        size = len(prompt.encode())
        estimate = size / data.bytes_per_token
        if estimate <= context:
            return prompt, None
        if data.truncate_prompts:
            keep = int(context * data.bytes_per_token)
            return prompt.encode()[:keep].decode(errors="ignore"), None
        return prompt, (f"prompt is about {estimate:.0f} tokens ({size} bytes), longer than the model's "
                        f"{context}-token context; set data.truncate_prompts=true to keep its start")

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            batch = await queue.get()
            if batch is None:
                return
            if not self.stopping.is_set():  # once stopping, queued requests are abandoned unsent
                await self._send(batch)

    async def _send(self, batch: list[tuple[UnitBuffer, int, str]]) -> None:
        prompts = [p for _, _, p in batch]
        payload = self.protocol.payload(prompts)
        client = self.cfg.client
        error = ""
        for attempt in range(1, client.max_retries + 2):
            if self.stats.first_request_at is None:
                self.stats.first_request_at = time.time()
            started = time.perf_counter()
            try:
                async with self.session.request(self.protocol.method, self.url + self.protocol.path,
                                                 json=payload) as resp:
                    try:
                        body = await resp.json(content_type=None)
                    except (json.JSONDecodeError, aiohttp.ContentTypeError, ValueError):
                        body = await resp.text()
                    completions = self.protocol.parse(resp.status, body, prompts)
            except RejectedError as exc:
                error, retryable = str(exc), isinstance(exc, MalformedAnswer)
                break
            except (TransientError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    error = f"timed out: no answer within {self.timeout_s:g} s (client.request_timeout_s)"
                    silent = time.monotonic() - self.last_answer_at
                    hung_after = client.hung_after_s or self.timeout_s
                    if silent >= hung_after and not self.stopping.is_set():
                        self._halt(EngineHung(
                            f"the engine at {self.url} answered nothing for {silent:.0f} s while requests were in "
                            f"flight (client.hung_after_s={hung_after:g} s): it is hung. Unfinished units go back "
                            f"to the pool, no row is blamed; rerun to resume"))
                        return
                else:
                    error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransientError) else str(exc)
                if self.stopping.is_set() or not self.engine_alive():
                    return  # abandoned: the unit is redone on resume, never recorded as an error
                if attempt <= client.max_retries:
                    delay = min(client.retry_backoff_max_s, client.retry_backoff_s * 2 ** (attempt - 1))
                    await asyncio.sleep(delay * (0.5 + random.random()))
                continue
            latency = time.perf_counter() - started
            self.last_answer_at = time.monotonic()
            end_strings = self.cfg.end_strings
            strip = self.cfg.model.prompt.strip_echo and self.protocol.echoes_prompt
            for (buf, i, sent), comp in zip(batch, completions):
                buf.succeed(i, postprocess(comp.text, sent, end_strings, strip), comp.output_tokens, latency, attempt)
            await self._commit_ready(batch)
            return
        else:
            attempt, retryable = client.max_retries + 1, True
            error = f"gave up after {attempt} attempts: {error}"
            if not await self._engine_answers():
                self._halt(EngineLost(f"the engine at {self.url} no longer answers ({error}); unfinished units "
                                      f"go back to the pool"))
                return
        if not self.engine_alive():
            return
        for buf, i, _ in batch:
            buf.fail(i, error, attempt, retryable)
        await self._commit_ready(batch)

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

    async def _commit_ready(self, batch) -> None:
        seen = set()
        for buf, _, _ in batch:
            if buf.unit not in seen and buf.complete:
                seen.add(buf.unit)
                await self._commit(buf)

    async def _commit(self, buf: UnitBuffer) -> None:
        buf.remaining = -1  # committed: never again
        table, stats = buf.table(self.schema)
        await asyncio.to_thread(commit_unit, self.paths, buf.unit, table, stats.__dict__, self.owner)
        if buf.unit in self.retry_units:
            await asyncio.to_thread(mark_retried, self.paths, self.attempt, buf.unit)
        self.stats.rows = self.stats.rows + stats
        self.stats.last_commit_at = time.time()
        rows, client = self.stats.rows, self.cfg.client
        if rows.rows >= client.min_rows_for_error_check and rows.failed > client.max_error_fraction * rows.rows:
            self._halt(TooManyErrors(
                f"{rows.failed} of {rows.rows} rows failed (more than client.max_error_fraction="
                f"{client.max_error_fraction}); stopping early. See the error column of {self.paths.results}"))

    def _write_progress(self) -> None:
        """This replica's totals in this attempt (all its segments): the progress bar and summary.json
        read them."""
        atomic_write_text(self.paths.progress / f"{self.owner}.json", json.dumps(
            {"owner": self.owner, "attempt": self.attempt, **self.stats.rows.__dict__,
             "segments": self.stats.segments, "updated": time.time()}))

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.client.progress_interval_s)
            self._write_progress()


async def _cancel(*tasks) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already reported through self.fatal
            pass
