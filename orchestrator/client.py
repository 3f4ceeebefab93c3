"""One replica's loop: claim units -> stream rows -> requests -> commit results.

Rows stream from Parquet a record batch at a time; a bounded queue between the reader and the
senders keeps memory flat whatever the input size, and keeps enough requests in flight that the
engine never waits for the client.

Client supervises the replica (its engine, stopping, claims), schedules the work and commits finished
units, composing the pieces that do the rest: unit_source (a unit's rows still to do, its results),
sender (one request with its retries), conversation.Turns (the turns of conversation rows), context
(prompts fitted into the model's context), and here JournalWrites and Progress.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp
import pandas  # noqa: F401 - pyarrow imports it on the first pa.array(list): pay that at start, not mid-run
import pyarrow as pa

from .claims import WAIT, Scheduler, result_exists
from .commits import (
    Ledger,
    UnitStats,
    commit_unit,
    done_units,
    error_summary,
    kept_rows,
    mark_retried,
    retried,
    retry_units,
    write_progress,
)
from .config import ClientConfig, Config, config_yaml
from .context import ContextFit
from .conversation import Turns
from .engines.base import rollouts_in_one_request
from .errors import EngineError, RunError
from .follow import gate_for
from .journal import Journals, UnitJournal, settings_digest
from .judge import judge_for
from .metrics import Scraper, family_for, metrics_dir, metrics_url
from .metrics import append as append_metrics
from .plan import Plan, result_schema
from .protocols import auth, make_codec
from .protocols.base import EngineInfo, Request
from .protocols.openai import openai_api
from .rundir import RunPaths
from .scoring import columns_for as scoring_columns
from .sender import Answered, EngineLost, Sender
from .structured import columns_for, schema_text
from .unit_source import Reasks, UnitBuffer, UnitSource, settle_answers, settle_failures

log = logging.getLogger(__name__)


class TooManyErrors(RunError):
    """More than client.max_error_fraction of the rows failed: stop instead of burning GPU hours."""


@dataclass
class ClientStats:
    """One replica's totals in one attempt of the run, across its requeued segments."""

    rows: UnitStats = field(default_factory=UnitStats)
    first_request_at: float | None = None  # this segment
    last_commit_at: float | None = None
    skipped_units: int = 0
    journal_rows: int = 0  # rows taken from the journals of units interrupted before their commit (not asked again)
    backup_copies: int = 0  # units this replica ran as a backup copy of a straggler's (client.backups)
    discarded_rows: int = 0  # rows answered for a unit another copy committed first (thrown away, counted)
    earlier: list = field(default_factory=list)  # [first request, last commit] of the segments before a requeue

    @property
    def segments(self) -> list:
        now = [[self.first_request_at, self.last_commit_at]] if self.first_request_at and self.last_commit_at else []
        return self.earlier + now

    @property
    def generate_s(self) -> float:
        return sum(max(0.0, end - start) for start, end in self.segments)


class JournalWrites:
    """When the rows a replica answers are appended to their units' journals (journal.py): once per turn of
    the event loop, one record per unit, and fsynced every client.journal_sync_s. `loop` is set once the
    client runs."""

    def __init__(self, journals: Journals, sync_s: float):
        self.journals, self.sync_s = journals, sync_s
        self.due: set[UnitBuffer] = set()  # units with rows to append to their journal
        self.loop: asyncio.AbstractEventLoop | None = None

    def soon(self, buf: UnitBuffer) -> None:
        """Append the unit's fresh rows to its journal once the answers of this turn of the event loop are
        in: one write for all of them."""
        if not self.due:
            self.loop.call_soon(self.flush)
        self.due.add(buf)

    def flush(self) -> None:
        """Append the fresh rows of the units due to their journals: one record each."""
        due, self.due = self.due, set()
        for buf in due:
            rows, buf.fresh = buf.fresh, []
            journal = buf.journal
            if journal is None or not rows or buf.abandoned:
                continue
            try:
                journal.append(buf.journal_record(rows))
            except (OSError, ValueError) as exc:  # a full disk: the unit goes on without it, whole at its commit
                log.warning("cannot append to %s (%s); unit %d goes on without a journal", journal.path,
                            getattr(exc, "strerror", None) or exc, buf.unit)
                buf.journal = None
                self.journals.open.discard(journal)
                try:
                    journal.close()
                except OSError:
                    pass

    def take(self, buf: UnitBuffer) -> tuple[UnitJournal | None, list]:
        """The unit is committed (or another copy committed it): its journals, to remove."""
        journal, others = buf.journal, buf.replayed_from
        buf.journal, buf.replayed_from = None, []
        self.journals.open.discard(journal)
        return journal, others

    async def sync(self) -> None:
        """fsync the journals written since the last look, every client.journal_sync_s: what a node crash
        (not only a killed process) may lose of the answered rows."""
        every = self.sync_s
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            due = [journal for journal in self.journals.open if journal.unsynced]
            if due:
                await asyncio.to_thread(Journals.sync, due)


class Progress:
    """This replica's progress file (work/progress/<owner>.json) and its request records: written after
    commits and from time to time (see report), read back when a requeued job continues the attempt.
    `dirty`: a commit since progress was last written."""

    def __init__(self, paths: RunPaths, owner: str, attempt: str, client: ClientConfig, stats: ClientStats,
                 scheduler: Scheduler, sender: Sender):
        self.paths, self.owner, self.attempt, self.client = paths, owner, attempt, client
        self.stats, self.scheduler, self.sender = stats, scheduler, sender
        self.dirty = False  # a commit since progress was last written
        self.records_at = time.monotonic()  # when request records were last written

    def continue_attempt(self) -> None:
        """A job requeued within one attempt continues its replica's totals, so progress and the summary
        count every segment, not the last one."""
        try:
            record = json.loads((self.paths.progress / f"{self.owner}.json").read_text())
        except (OSError, ValueError):
            return
        if isinstance(record, dict) and record.get("attempt") == self.attempt:
            self.stats.rows = UnitStats.of(record)
            self.stats.earlier = [list(s) for s in record.get("segments", [])]
            self.stats.backup_copies = record.get("backup_copies", 0)
            self.stats.discarded_rows = record.get("discarded_rows", 0)
            self.stats.journal_rows = record.get("journal_rows", 0)
            self.scheduler.resume(record.get("holding", []))

    def write(self) -> None:
        """This replica's totals in this attempt (all its segments), the units it holds (a requeued job
        takes them back), and the request records gathered since the last write: the progress bar,
        `orchestrator status` and summary.json read them."""
        records, self.sender.requests = self.sender.requests, []
        self.dirty, self.records_at = False, time.monotonic()
        self.scheduler.wrote()
        write_progress(self.paths, self.owner, {
            "owner": self.owner, "attempt": self.attempt, **self.stats.rows.__dict__,
            "segments": self.stats.segments, "holding": sorted(self.scheduler.held),
            "backup_copies": self.stats.backup_copies, "discarded_rows": self.stats.discarded_rows,
            "journal_rows": self.stats.journal_rows, "updated": time.time()}, records)

    async def report(self) -> None:
        """Progress is written after commits (at most once per client.progress_interval_s), and request
        records at least once per lease_s / 4: a few metadata operations per unit, not per second."""
        records_every = max(self.client.progress_interval_s, self.client.lease_s / 4)
        while True:
            await asyncio.sleep(self.client.progress_interval_s)
            if self.dirty or (self.sender.requests and time.monotonic() - self.records_at >= records_every):
                self.write()


class Client:
    """Runs a plan's not-yet-committed units against one engine endpoint.

    `request_stop()` (thread-safe) makes it stop taking work, give in-flight requests up to
    client.grace_s, commit the units that finished and leave the rest: the rows they have answered are in
    their journals (journal.py), and only the others are sent again on resume. A failure while stopping,
    or once the engine is gone, never becomes a row error.
    """

    def __init__(self, cfg: Config, plan: Plan, paths: RunPaths, url: str, attempt: str, owner: str,
                 model_name: str = "mock", engine_alive: Callable[[], bool] | None = None,
                 info: EngineInfo | None = None, replica: int = 0):
        self.cfg, self.plan, self.paths, self.url = cfg, plan, paths, url.rstrip("/")
        self.attempt, self.owner = attempt, owner
        self.info = info or EngineInfo(url=self.url, protocol=cfg.engine.protocol or "nemo", model_name=model_name,
                                       api=openai_api(cfg))
        self.protocol = make_codec(cfg, self.info, one_request=rollouts_in_one_request(cfg))
        context = self.info.max_model_len or cfg.model.architecture.max_seq_len
        # the engine counts tokens itself: it refuses a too-long prompt with its own message, and
        # truncation (data.truncate_prompts) cuts by its exact count
        exact_tokens = self.info.can_tokenize
        # a JSON schema's result columns (and a judge's score, output.score_column), or a scoring run's (None: neither)
        self.structured = scoring_columns(cfg) or columns_for(cfg, plan)
        self.schema = result_schema(plan, logprobs=cfg.sampling.logprobs is not None, structured=self.structured)
        # answers checked against their row's JSON schema or the run's, re-asked when they do not match
        # (and a judge's answers whose score cannot be parsed, output.score_column: orchestrator.judge)
        self.reasks = Reasks(schema_text(cfg.sampling.json_schema), cfg.client.invalid_retries, cfg.sampling.seed,
                             judge_for(cfg))
        self.rollouts = plan.rollouts  # answers per input row: fixed with the plan (and checked by the fingerprint)
        if self.rollouts > 1 and not self.protocol.takes_seed:
            raise EngineError(f"sampling.rollouts={self.rollouts} sends each rollout with its own seed, but the "
                              f"engine at {self.url} takes none (its Triton model has no random_seed input), so "
                              f"every rollout would be the same answer; serve a model with a random_seed input")
        self.stats = ClientStats()
        self.retry_units = retry_units(paths, attempt) if cfg.retry_failed else set()
        done = done_units(paths)
        retry = {u for u in self.retry_units if not retried(paths, attempt, u)}
        self.stats.skipped_units = len(done - retry)
        self.scheduler = Scheduler(paths, attempt, owner,
                                   [u for u in range(len(plan.units)) if u not in done or u in retry],
                                   index=replica, lease_s=cfg.client.lease_s, backups=cfg.client.backups, retry=retry,
                                   retried=lambda unit: retried(paths, attempt, unit), gate=gate_for(plan))
        self.ledger = Ledger(paths, owner)
        # rows answered in units not committed yet survive a kill (journal.py); this replica's journals, and
        # which units have one (one listing; those of units committed since are removed)
        self.journals = Journals(paths, owner, attempt, settings_digest(paths, fallback=lambda: config_yaml(cfg)))
        self.journals.scan(stale=lambda unit: unit in done and unit not in self.retry_units)
        self.writes = JournalWrites(self.journals, cfg.client.journal_sync_s)
        self.active: dict[int, UnitBuffer] = {}  # units being run, by unit
        self.timeout_s = cfg.request_timeout_s
        self.engine_alive = engine_alive or (lambda: True)
        self.stop_reason: str | None = None
        self.fatal: Exception | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        # the pieces: one request with its retries (its records go out with each progress write), the turns
        # of conversation rows, the prompts fitted into the context, and the rows of a unit still to do
        self.sender = Sender(self.protocol, self.url, cfg.client, self.timeout_s, owner, self.stats, self._halt,
                             stopping=lambda: self.stopping.is_set(), engine_alive=self.engine_alive)
        self.progress = Progress(paths, owner, attempt, cfg.client, self.stats, self.scheduler, self.sender)
        self.progress.continue_attempt()
        self.turns = Turns(cfg, plan, self.protocol, context, exact_tokens)
        self.fit = ContextFit(cfg, self.protocol, self.info, self.url, context, exact_tokens)
        self.source = UnitSource(cfg, plan, self.protocol, self.journals, self.stats, attempt=attempt,
                                 retry_units=self.retry_units, active=self.active, turns=self.turns, fit=self.fit,
                                 journal_soon=self.writes.soon, commit=self._commit)

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
        self.writes.loop = self.loop
        self.unit_done = asyncio.Event()  # a unit of this replica is committed (or lost): look for work again
        self.next_turns: collections.deque = collections.deque()  # see _worker
        if self.stop_reason:
            self.stopping.set()
        in_flight = self.protocol.in_flight
        queue: asyncio.Queue = asyncio.Queue(maxsize=in_flight)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        scrape = self._metrics_target()
        # engine.verify_tls, ca_bundle; the metrics scraper has a connection of its own beside the requests'
        connector = aiohttp.TCPConnector(limit=in_flight + (scrape is not None), ssl=auth.client_ssl(self.cfg))
        self.progress.write()  # the replica's heartbeat file, from its start
        # every request carries the key (engine.api_key_env); a 401/403 on any of them stops the replica
        async with aiohttp.ClientSession(
                timeout=timeout, connector=connector, headers=auth.headers(self.cfg),
                raise_for_status=auth.stop_on_refusal(self.cfg, self.url, self._halt)) as session:
            self.sender.session = self.fit.session = session
            helpers = [asyncio.create_task(self.progress.report()), asyncio.create_task(self._watch()),
                       asyncio.create_task(self.writes.sync())]
            if scrape is not None:
                helpers.append(asyncio.create_task(self._scrape_metrics(session, *scrape)))
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
                self.writes.flush()  # what was answered is kept for the next run of these units
                await asyncio.to_thread(self.journals.close_all, self.cfg.client.journal_sync_s > 0)
                self.progress.write()
                self.ledger.close()
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    def _metrics_target(self) -> tuple[str, Scraper] | None:
        """The engine's Prometheus metrics URL and the Scraper of this replica's records (metrics.py), None when
        client.metrics_interval_s is 0 or the engine serves none that is known (Triton's metrics port: only
        from engine.options.metrics_port)."""
        every = self.cfg.client.metrics_interval_s
        family = family_for(self.cfg.engine.name, self.info.protocol, self.cfg.engine.dialect)
        if every <= 0 or family is None:
            return None
        port = self.cfg.engine.options.get("metrics_port")
        try:
            url = metrics_url(family, self.url, port)
        except (TypeError, ValueError):  # a port that is not a number: no metrics, said once, and the run goes on
            log.warning("engine.options.metrics_port=%r is not a port number; the engine's metrics are not read", port)
            return None
        if url is None:
            return None
        capacity = self.cfg.engine.simulator.capacity  # what default_capacity stands for with every engine
        return url, Scraper(family, self.owner, self.attempt, capacity=capacity, max_in_flight=self.protocol.in_flight,
                            interval_s=every)

    async def _scrape_metrics(self, session: aiohttp.ClientSession, url: str, scraper: Scraper) -> None:
        """Every client.metrics_interval_s: the engine's metrics, one record appended to
        work/metrics/<replica>.jsonl. A server without them, or a scrape that fails, never fails the run:
        the first failure is logged once, and later ones are ignored."""
        every, path = self.cfg.client.metrics_interval_s, metrics_dir(self.paths.root) / f"{self.owner}.jsonl"
        timeout = aiohttp.ClientTimeout(total=max(2.0, min(every, 30.0)))
        warned = False
        while True:
            try:
                async with session.get(url, timeout=timeout, raise_for_status=False) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                    text = await resp.text()
                record = scraper.record(text)
                await asyncio.to_thread(append_metrics, path, record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - metrics are a view of the engine, never a cause to stop
                if not warned:
                    warned = True
                    log.warning("engine metrics at %s not read (%s); the run goes on without them "
                                "(client.metrics_interval_s=0 stops trying)", url, str(exc) or type(exc).__name__)
            await asyncio.sleep(every)

    async def _watch(self) -> None:
        """Heartbeat for our claims, and notice at once when the engine process dies. Once no unit is free,
        each beat also checks whether a unit this replica runs was committed by another copy: its rows that
        are not sent yet are dropped."""
        beat_every = max(0.5, self.scheduler.beat_s)
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            if not self.engine_alive():
                self._halt(EngineLost("the engine process exited during the run; unfinished units go back to the pool"))
                return
            if time.monotonic() - last_beat >= beat_every:
                await asyncio.to_thread(self.scheduler.beat)
                last_beat = time.monotonic()
                for unit in await asyncio.to_thread(self.scheduler.lost, result_exists(self.paths)):
                    buf = self.active.pop(unit, None)
                    if buf is not None and not buf.abandoned:
                        buf.abandoned = True
                        self.stats.discarded_rows += len(buf.ids)
                        self.progress.dirty = True
                        await asyncio.to_thread(Journals.remove, *self.writes.take(buf))

    async def _produce(self, queue: asyncio.Queue, workers: int) -> None:
        await self._produce_units(queue)
        for _ in range(workers):
            await queue.put(None)

    async def _produce_units(self, queue: asyncio.Queue) -> None:
        """Claim units one at a time (see claims.Scheduler) and queue their rows; ends when every unit of
        this attempt is committed, by this replica or others."""
        batch: list[tuple] = []
        while not self.stopping.is_set():
            got = await asyncio.to_thread(self.scheduler.next)
            if got is None:
                break
            if got == WAIT:
                if batch:
                    await queue.put(batch)
                    batch = []
                self.unit_done.clear()
                waits = {asyncio.ensure_future(self.stopping.wait()), asyncio.ensure_future(self.unit_done.wait())}
                _, still = await asyncio.wait(waits, timeout=self.scheduler.poll_s, return_when=asyncio.FIRST_COMPLETED)
                await _cancel(*still)
                continue
            unit, keep = got.unit, None
            if got.copy:
                self.stats.backup_copies += 1
            if unit in self.retry_units:
                keep = await asyncio.to_thread(kept_rows, self.paths, unit)
                if keep is not None and len(keep["status"]) != self.plan.unit_answers(unit):
                    keep = None  # not this unit's rows: redo it whole
                if keep is not None and hasattr(self.structured, "texts"):  # a scoring run: its scores are its answers
                    keep["response"] = self.structured.texts(keep)
            # a claim made once no unit is free (a backup copy, a takeover) may be of a unit that another
            # replica of this attempt journaled since this one listed the journals: look again
            relist = bool(got.copy) or self.scheduler.in_tail
            batch = await self.source.read(unit, batch, queue, keep, relist)
        if batch and not self.stopping.is_set():
            await queue.put(batch)

    async def _worker(self, queue: asyncio.Queue) -> None:
        """Sends batches: a conversation's next turn first, else new rows from the bounded queue. A worker
        that answered a turn queues the next one before it looks again, so it (or another) always sends it;
        next_turns holds at most one batch per worker. The rows answered so far are in their journals
        before a worker sends again: a kill loses at most the requests in flight."""
        while True:
            batch = self.next_turns.popleft() if self.next_turns else await queue.get()
            if batch is None:
                return
            if not self.stopping.is_set():  # once stopping, queued requests are abandoned unsent
                if self.writes.due:
                    self.writes.flush()
                await self._send(batch)

    async def _send(self, batch: list[Request]) -> None:
        """One request for a batch of Requests: several prompts of one
        answer each (NeMo, Triton), or one prompt with its seed, asking for `answers` answers (rollouts: with
        n, or as NeMo copies, of which only the answers the row lacks are taken)."""
        batch = [item for item in batch if not item.buf.abandoned]
        if not batch:
            return
        prompts = [item.sent for item in batch]
        # a batch of several prompts has neither a seed nor n (one answer each), and its rows share one setting
        first = batch[0]
        payload = self.protocol.payload(prompts, seed=first.seed, n=first.answers, row=first.row)
        outcome = await self.sender.send(payload, prompts, first.answers)
        if outcome is None:  # abandoned, or the engine is gone: recorded, and no row is blamed
            return
        if isinstance(outcome, Answered):
            strip = self.cfg.model.prompt.strip_echo and self.protocol.echoes_prompt
            ok, tokens, failed = settle_answers(batch, outcome.completions, outcome.latency, outcome.attempt,
                                                self.cfg.end_strings, strip, self.cfg.sampling.tokens_to_generate,
                                                self.cfg.model.prompt.reasoning_tags, self.reasks)
            self.next_turns.extend(self.reasks.take())  # answers that did not match their schema: asked again first
            self.sender.answered(outcome, ok, tokens, failed)
        elif len(batch) > 1 and not outcome.retryable and getattr(self.protocol, "resend_alone", False):
            self.sender.requests.append(outcome.record)  # refused whole (one bad sentence): each alone, only it fails
            for item in batch:
                await self._send([item])
            return
        else:
            outcome.record["failed"] = settle_failures(batch, outcome.error, outcome.attempt, outcome.retryable)
            self.sender.requests.append(outcome.record)
        await self._commit_ready(batch)

    async def _commit_ready(self, batch) -> None:
        self.next_turns.extend(self.turns.next_turns(batch))
        for buf in dict.fromkeys(item.buf for item in batch):
            if buf.fresh:
                self.writes.soon(buf)
        seen = set()
        for item in batch:
            buf = item.buf
            if buf.unit not in seen and buf.complete:
                seen.add(buf.unit)
                await self._commit(buf)

    async def _commit(self, buf: UnitBuffer) -> None:
        buf.remaining = -1  # committed: never again
        self.active.pop(buf.unit, None)
        self.scheduler.release(buf.unit)
        try:
            await self._publish(buf)
        finally:
            self.unit_done.set()  # once the commit is written: a replica waiting for work looks again now

    async def _publish(self, buf: UnitBuffer) -> None:
        journals = self.writes.take(buf)
        if buf.abandoned:
            await asyncio.to_thread(Journals.remove, *journals)
            return
        table, stats = buf.table(self.schema, self.structured)
        record = dict(stats.__dict__)
        if stats.failed:  # grouped by reason once here, so `orchestrator status` reads no result file for them
            record["errors"] = error_summary(e for s, e in zip(buf.status, buf.error) if s != "ok")
        retry = buf.unit in self.retry_units
        won = await asyncio.to_thread(_commit_and_remove_journals, self.paths, buf.unit, table, record,
                                      self.owner, self.ledger, retry, journals)
        self.progress.dirty = True
        if not won:  # another copy committed first: these rows are discarded
            self.stats.discarded_rows += stats.rows
            return
        if retry:
            await asyncio.to_thread(mark_retried, self.paths, self.attempt, buf.unit)
        self.stats.rows = self.stats.rows + stats
        self.stats.last_commit_at = time.time()
        rows, client = self.stats.rows, self.cfg.client
        if rows.rows >= client.min_rows_for_error_check and rows.failed > client.max_error_fraction * rows.rows:
            self._halt(TooManyErrors(
                f"{rows.failed} of {rows.rows} rows failed (more than client.max_error_fraction="
                f"{client.max_error_fraction}); stopping early. See the error column of {self.paths.results}"))


def _commit_and_remove_journals(paths: RunPaths, unit: int, table: pa.Table, stats: dict, owner: str, ledger: Ledger,
                                replace: bool, journals: tuple) -> bool:
    """commit_unit, then the unit's journals are removed (won or lost, the unit is committed now); a crash
    in between leaves a journal of a committed unit, which the next replica to start removes."""
    won = commit_unit(paths, unit, table, stats, owner, ledger, replace)
    Journals.remove(*journals)
    return won


async def _cancel(*tasks) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already reported through self.fatal
            pass
