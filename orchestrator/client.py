"""One replica's loop: claim units -> stream rows -> requests -> commit results.

Rows stream from Parquet a record batch at a time; a bounded queue between the reader and the
senders keeps memory flat whatever the input size, and keeps enough requests in flight that the
engine never waits for the client.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp
import pandas  # noqa: F401 - pyarrow imports it on the first pa.array(list): pay that at start, not mid-run
import pyarrow as pa

from .config import Config, config_yaml
from .errors import EngineError, RunError
from .engines import auth
from .engines.codecs import EngineInfo, MalformedAnswer, RejectedError, TransientError, make_codec, openai_api
from .conversation import Conversation
from .prompts import format_prompt, postprocess, render_messages
from .claims import WAIT, Scheduler, result_exists
from .journal import Entry, Journals, UnitJournal, settings_digest
from .work import (Ledger, Plan, RunPaths, UnitReader, UnitStats, commit_unit, done_units, error_summary, kept_rows,
                   mark_retried, result_schema, retried, retry_units, rollout_seed, write_progress)

log = logging.getLogger(__name__)


class UnitBuffer:
    """Results of one unit, filled in any order, committed once every row has an outcome. A row that is a
    conversation has its outcome after its last turn (or its first failed one): the unit commits whole
    conversations only. Rows whose outcome is new are listed in `fresh` until the client appends them to
    the unit's journal (see journal.py).

    With sampling.rollouts = N > 1 a "row" here is one answer: input row r's rollout k is row r * N + k
    (rows counts them all), so the journal, replay and retry_failed work per rollout."""

    def __init__(self, unit: int, rows: int, turns: bool = False, rollouts: int = 1):
        self.unit, self.rollouts = unit, rollouts
        self.responses: list | None = [None] * rows if turns else None  # every turn's answer (data.turns_column)
        self.kept: dict[str, list] = {}  # data.keep_columns: arrow chunks in row order
        self.conversations: dict[int, Conversation] = {}  # rows between turns
        self.next_turn: list[int] = []  # rows whose next turn is ready to send
        self.ids: list = []
        self.response: list = [None] * rows
        self.status: list = [None] * rows
        self.error: list = [None] * rows
        self.output_tokens: list = [None] * rows
        self.latency: list = [None] * rows
        self.attempts: list = [0] * rows
        self.remaining = rows
        self.read_done = False
        self.abandoned = False  # another copy of the unit committed first: its rows are not sent any more
        self.retryable = 0  # failed rows the engine is to blame for: a rerun with retry_failed=true may recover them
        self.blamed: set[int] = set()  # those rows
        self.fresh: list[int] = []  # rows with an outcome that is not in the unit's journal yet
        self.journal: UnitJournal | None = None  # this replica's journal of the unit
        self.replayed_from: list = []  # other replicas' journals replayed into it (removed at the commit)

    def fail(self, i: int, message: str, attempts: int = 0, retryable: bool = False) -> None:
        conv = self.conversations.pop(i, None)
        if conv is not None:
            message, attempts = conv.why(message), conv.attempts + attempts
        self.status[i], self.error[i], self.attempts[i] = "error", message, attempts
        self.retryable += retryable
        if retryable:
            self.blamed.add(i)
        self.remaining -= 1
        self.fresh.append(i)

    def succeed(self, i: int, text: str, tokens: int | None, latency: float, attempts: int,
                responses: list | None = None) -> None:
        conv = self.conversations.get(i)
        if conv is not None:
            conv.answered(text, tokens, latency, attempts)
            if not conv.done:
                self.next_turn.append(i)
                return
            del self.conversations[i]
            responses, tokens, latency, attempts = conv.answers, conv.tokens, conv.latency_s, conv.attempts
        if self.responses is not None:
            self.responses[i] = responses
        self.response[i], self.status[i], self.output_tokens[i] = text, "ok", tokens
        self.latency[i], self.attempts[i] = latency, attempts
        self.remaining -= 1
        self.fresh.append(i)

    def restore(self, i: int, entry: Entry) -> None:
        """A row's outcome as a journal (or a retried unit's commit) holds it: nothing to send, nothing
        to journal again."""
        if self.responses is not None:
            self.responses[i] = entry.responses
        self.status[i], self.response[i], self.error[i] = entry.status, entry.response, entry.error
        self.output_tokens[i], self.latency[i], self.attempts[i] = entry.output_tokens, entry.latency_s, entry.attempts
        if entry.blamed and entry.status == "error":
            self.retryable += 1
            self.blamed.add(i)
        self.remaining -= 1

    def journal_record(self, rows: list[int]) -> dict:
        """These rows' outcomes as one journal record: a list per column (see journal.py)."""
        ids, status = self.ids, self.status
        record = {"i": rows, "id": [ids[i] for i in rows], "response": [self.response[i] for i in rows],
                  "tokens": [self.output_tokens[i] for i in rows], "latency": [self.latency[i] for i in rows],
                  "attempts": [self.attempts[i] for i in rows]}
        if any(status[i] != "ok" for i in rows):
            record.update(status=[status[i] for i in rows], error=[self.error[i] for i in rows],
                          blamed=[i for i in rows if i in self.blamed])
        if self.responses is not None:
            record["responses"] = [self.responses[i] for i in rows]
        return record

    def keep(self, part: pa.RecordBatch, columns: list[str]) -> None:
        """The kept input columns of rows just read (categoricals as their values)."""
        repeat = pa.array([r for r in range(part.num_rows) for _ in range(self.rollouts)], pa.int64()) \
            if columns and self.rollouts > 1 else None
        for name in columns:
            column = part.column(name)
            column = column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
            self.kept.setdefault(name, []).append(column.take(repeat) if repeat is not None else column)

    @property
    def complete(self) -> bool:
        return self.read_done and self.remaining == 0

    def table(self, schema: pa.Schema) -> tuple[pa.Table, UnitStats]:
        columns = {
            "id": pa.array(self.ids, schema.field("id").type), "response": pa.array(self.response, pa.string()),
            "responses": pa.array(self.responses or [], pa.list_(pa.string())),
            "status": pa.array(self.status, pa.string()), "error": pa.array(self.error, pa.string()),
            "output_tokens": pa.array(self.output_tokens, pa.int64()), "latency_s": pa.array(self.latency, pa.float64()),
            "attempts": pa.array(self.attempts, pa.int32()),
        }
        if "rollout" in schema.names:  # answer i is rollout i % N of its input row
            columns["rollout"] = pa.array([i % self.rollouts for i in range(len(self.ids))], pa.int32())
        for name in schema.names:
            if name not in columns:  # a kept input column
                kind, chunks = schema.field(name).type, self.kept.get(name, [])
                columns[name] = pa.concat_arrays([c.cast(kind) for c in chunks]) if chunks else pa.array([], kind)
        table = pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
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
        self.protocol = make_codec(cfg, self.info)
        self.context = self.info.max_model_len or cfg.model.architecture.max_seq_len
        # the engine counts tokens itself: it refuses a too-long prompt with its own message, and
        # truncation (data.truncate_prompts) cuts by its exact count
        self.exact_tokens = self.info.can_tokenize
        self.schema = result_schema(plan)
        self.rollouts = plan.rollouts  # answers per input row: fixed with the plan (and checked by the fingerprint)
        if self.rollouts > 1 and not self.protocol.takes_seed:
            raise EngineError(f"sampling.rollouts={self.rollouts} sends each rollout with its own seed, but the "
                              f"engine at {self.url} takes none (its Triton model has no random_seed input), so "
                              f"every rollout would be the same answer; serve a model with a random_seed input")
        self.reader = UnitReader(plan, cfg.data.read_batch_rows)
        self.stats = ClientStats()
        self.retry_units = retry_units(paths, attempt) if cfg.retry_failed else set()
        done = done_units(paths)
        retry = {u for u in self.retry_units if not retried(paths, attempt, u)}
        self.stats.skipped_units = len(done - retry)
        self.scheduler = Scheduler(paths, attempt, owner, [u for u in range(len(plan.units)) if u not in done or u in retry],
                                   index=replica, lease_s=cfg.client.lease_s, backups=cfg.client.backups, retry=retry,
                                   retried=lambda unit: retried(paths, attempt, unit))
        self.ledger = Ledger(paths, owner)
        # rows answered in units not committed yet survive a kill (journal.py); this replica's journals, and
        # which units have one (one listing; those of units committed since are removed)
        self.journals = Journals(paths, owner, attempt, settings_digest(paths, fallback=lambda: config_yaml(cfg)))
        self.journals.scan(stale=lambda unit: unit in done and unit not in self.retry_units)
        self._journal_due: set[UnitBuffer] = set()  # units with rows to append to their journal
        self.active: dict[int, UnitBuffer] = {}  # units being run, by unit
        self.dirty = False  # a commit since progress was last written
        self.records_at = time.monotonic()  # when request records were last written
        self._continue_attempt()
        self.timeout_s = cfg.request_timeout_s
        self.last_answer_at = time.monotonic()  # any HTTP answer from the engine: a hung engine gives none
        self.engine_alive = engine_alive or (lambda: True)
        self.stop_reason: str | None = None
        self.fatal: Exception | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        # one record per HTTP request, kept here and appended to work/requests/ with each progress write:
        # `orchestrator status` and `report` read them, and no request waits for a write of its own
        self.requests: list[dict] = []

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
            self.stats.backup_copies = record.get("backup_copies", 0)
            self.stats.discarded_rows = record.get("discarded_rows", 0)
            self.stats.journal_rows = record.get("journal_rows", 0)
            self.scheduler.resume(record.get("holding", []))

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
        self.unit_done = asyncio.Event()  # a unit of this replica is committed (or lost): look for work again
        self.next_turns: collections.deque = collections.deque()  # see _worker
        if self.stop_reason:
            self.stopping.set()
        in_flight = self.protocol.in_flight
        queue: asyncio.Queue = asyncio.Queue(maxsize=in_flight)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=in_flight, ssl=auth.client_ssl(self.cfg))  # engine.verify_tls, ca_bundle
        self._write_progress()  # the replica's heartbeat file, from its start
        # every request carries the key (engine.api_key_env); a 401/403 on any of them stops the replica
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=auth.headers(self.cfg),
                                         raise_for_status=auth.stop_on_refusal(self.cfg, self.url, self._halt)) as session:
            self.session = session
            helpers = [asyncio.create_task(self._report_progress()), asyncio.create_task(self._watch()),
                       asyncio.create_task(self._sync_journals())]
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
                self._flush_journals()  # what was answered is kept for the next run of these units
                await asyncio.to_thread(self.journals.close_all, self.cfg.client.journal_sync_s > 0)
                self._write_progress()
                self.ledger.close()
        if self.fatal is not None:
            raise self.fatal
        return self.stats

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
                        self.dirty = True
                        await asyncio.to_thread(Journals.remove, *self._take_journals(buf))

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
            # a claim made once no unit is free (a backup copy, a takeover) may be of a unit that another
            # replica of this attempt journaled since this one listed the journals: look again
            relist = bool(got.copy) or self.scheduler.in_tail
            batch = await self._read_unit(unit, batch, queue, keep, relist)
        if batch and not self.stopping.is_set():
            await queue.put(batch)

    def _start_journal(self, unit: int, rows: int, relist: bool):
        if relist:
            self.journals.scan()
        return self.journals.start(unit, rows)

    async def _read_unit(self, unit: int, batch: list, queue: asyncio.Queue, keep: dict | None = None,
                         relist: bool = False) -> list:
        """Queue a unit's rows. The rows its journals hold (an earlier run of it was interrupted) are taken
        from them, not sent; with keep (a retried unit's committed columns), its ok rows are kept as they
        are. Only the others are sent."""
        fmt, batch_size, plan, n = self.cfg.model.prompt, self.protocol.batch_size, self.plan, self.rollouts
        rows = plan.unit_answers(unit)  # result rows: input rows x rollouts
        buf = UnitBuffer(unit, rows, turns=bool(plan.turns_column), rollouts=n)
        self.active[unit] = buf
        journal, replay, buf.replayed_from = await asyncio.to_thread(self._start_journal, unit, rows, relist)
        if journal is not None:
            buf.journal = journal
            self.journals.open.add(journal)
        # a retried unit redoes its failed rows: a journal's errors count only when this attempt made them
        retrying = unit in self.retry_units
        for ids, part in self.reader.read_parts(unit):
            base = len(buf.ids)
            buf.ids.extend(ids if n == 1 else [ident for ident in ids for _ in range(n)])
            buf.keep(part, plan.keep_columns)
            prompts = _conversation_rows(part, plan) if plan.conversational else \
                part.column(plan.prompt_column).to_pylist()
            for offset, prompt in enumerate(prompts):
                first = base + offset * n  # the row's first answer (rollout 0)
                todo = []  # its rollouts to ask for: those neither kept nor journaled
                for i in range(first, first + n):
                    if keep is not None and keep["status"][i] == "ok":
                        buf.restore(i, Entry(ids[offset], "ok", keep["response"][i], None, keep["output_tokens"][i],
                                             keep["latency_s"][i], keep["attempts"][i], False,
                                             (keep.get("responses") or [None] * (i + 1))[i], None))
                        continue
                    entry = replay.get(i) if replay else None
                    if entry is not None and entry.id == ids[offset] and \
                            (not retrying or entry.status == "ok" or entry.attempt == self.attempt):
                        buf.restore(i, entry)
                        self.stats.journal_rows += 1
                        continue
                    todo.append(i - first)
                if not todo:
                    continue
                i = first
                if plan.conversational:  # one answer per row (sampling.rollouts > 1 refuses conversations)
                    item = self._start_conversation(buf, i, prompt)
                    if item is not None:
                        batch.append(item)
                        if len(batch) >= batch_size:
                            await queue.put(batch)
                            batch = []
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
                    for k in todo:
                        buf.fail(first + k, problem)
                    continue
                for item in self._requests(buf, first, format_prompt(prompt, fmt), ids[offset], todo):
                    batch.append(item)
                    if len(batch) >= batch_size:
                        await queue.put(batch)
                        batch = []
            if buf.fresh:
                self._journal_soon(buf)
        buf.read_done = True
        if buf.complete:
            await self._commit(buf)
        return batch

    def _requests(self, buf: UnitBuffer, first: int, sent: str, row_id, todo: list[int]) -> list[tuple]:
        """The requests for a row's rollouts `todo`: (buf, first answer, what is sent, seed, answers). One
        answer: the configured seed. Rollouts: rollout k is sampled with rollout_seed(...) + k; a run of
        consecutive rollouts goes in one request with n where the engine answers n as separate requests with
        seeds seed, seed + 1, ... (vLLM; sampling.rollouts_in_one_request), else one request each. NeMo's
        copies (rollouts_in_one_request there): the row's rollouts in blocks of up to 128 copies, block b
        seeded base + b x 128; a block is always sent whole (a copy's answer depends on the batch), and only
        the answers of `todo` are taken (see _send)."""
        if self.rollouts == 1:
            return [(buf, first, sent, None, 1)]
        base = rollout_seed(self.cfg.sampling.seed, row_id)
        most = getattr(self.protocol, "max_n", 1)
        if getattr(self.protocol, "copies", False):
            blocks = sorted({k // most for k in todo})
            return [(buf, first + b * most, sent, base + b * most, min(most, self.rollouts - b * most)) for b in blocks]
        items: list[tuple] = []
        for k in todo:
            last = items[-1] if items else None
            if last is not None and last[1] + last[4] == first + k and last[4] < most:  # extends the previous run
                items[-1] = last[:4] + (last[4] + 1,)
            else:
                items.append((buf, first + k, sent, base + k, 1))
        return items

    def _start_conversation(self, buf: UnitBuffer, i: int, row: tuple) -> tuple | None:
        """The first request of a conversation row, or None when the row is recorded as an error."""
        plan = self.plan
        conv = Conversation.start(*row, has_messages=bool(plan.messages_column), has_turns=bool(plan.turns_column))
        if isinstance(conv, str):
            buf.fail(i, conv)
            return None
        buf.conversations[i] = conv
        return self._turn_request(buf, i, conv)

    def _turn_request(self, buf: UnitBuffer, i: int, conv: Conversation) -> tuple | None:
        """(buf, row, what is sent) for the conversation's current turn: the messages on the chat API, else
        the text in the model's prompt format. Without the engine's own token count, a conversation that
        outgrows the context is a row error here (conversations are never truncated)."""
        chat = getattr(self.protocol, "chat", False)
        sent = [dict(m) for m in conv.messages] if chat else \
            render_messages(conv.messages, self.cfg.model.prompt, conv.attributes)
        if not self.exact_tokens:
            size = sum(len(m["content"].encode()) for m in sent) if chat else len(sent.encode())
            estimate = size / self.cfg.data.bytes_per_token
            if estimate > self.context:
                buf.fail(i, f"the conversation is about {estimate:.0f} tokens ({size} bytes), longer than the "
                            f"model's {self.context}-token context (data.truncate_prompts does not cut conversations)")
                return None
        return buf, i, sent, None, 1

    def _queue_next_turns(self, batch) -> None:
        """The next turn of every conversation a batch just answered, queued ahead of new rows."""
        follow: list = []
        for buf in dict.fromkeys(item[0] for item in batch):
            rows, buf.next_turn = buf.next_turn, []
            for i in rows:
                item = self._turn_request(buf, i, buf.conversations[i])
                if item is not None:
                    follow.append(item)
        size = self.protocol.batch_size
        for start in range(0, len(follow), size):
            self.next_turns.append(follow[start:start + size])

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
        """Sends batches: a conversation's next turn first, else new rows from the bounded queue. A worker
        that answered a turn queues the next one before it looks again, so it (or another) always sends it;
        next_turns holds at most one batch per worker. The rows answered so far are in their journals
        before a worker sends again: a kill loses at most the requests in flight."""
        while True:
            batch = self.next_turns.popleft() if self.next_turns else await queue.get()
            if batch is None:
                return
            if not self.stopping.is_set():  # once stopping, queued requests are abandoned unsent
                if self._journal_due:
                    self._flush_journals()
                await self._send(batch)

    async def _send(self, batch: list[tuple]) -> None:
        """One request for a batch of (buf, first answer, what is sent, seed, answers): several prompts of one
        answer each (NeMo, Triton), or one prompt with its seed, asking for `answers` answers (rollouts: with
        n, or as NeMo copies, of which only the answers the row lacks are taken)."""
        batch = [item for item in batch if not item[0].abandoned]
        if not batch:
            return
        prompts = [item[2] for item in batch]
        seed, n = batch[0][3], batch[0][4]  # a batch of several prompts has neither (one answer each)
        payload = self.protocol.payload(prompts, seed=seed, n=n)
        client = self.cfg.client
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
                self._record(record, started, error=error, done=False)
                break
            except (TransientError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    error = f"timed out: no answer within {self.timeout_s:g} s (client.request_timeout_s)"
                    silent = time.monotonic() - self.last_answer_at
                    hung_after = client.hung_after_s or self.timeout_s
                    if silent >= hung_after and not self.stopping.is_set():
                        self._record(record, started, error=error)
                        self._halt(EngineHung(
                            f"the engine at {self.url} answered nothing for {silent:.0f} s while requests were in "
                            f"flight (client.hung_after_s={hung_after:g} s): it is hung. Unfinished units go back "
                            f"to the pool, no row is blamed; rerun to resume"))
                        return
                else:
                    error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransientError) else str(exc)
                if self.stopping.is_set() or not self.engine_alive():
                    self._record(record, started, error=error)
                    return  # abandoned: the unit is redone on resume, never recorded as an error
                # the last try's record is kept after the loop, once it is known whether its rows failed
                self._record(record, started, error=error, done=attempt <= client.max_retries)
                if attempt <= client.max_retries:
                    delay = min(client.retry_backoff_max_s, client.retry_backoff_s * 2 ** (attempt - 1))
                    await asyncio.sleep(delay * (0.5 + random.random()))
                continue
            latency = time.perf_counter() - started
            self.last_answer_at = time.monotonic()
            end_strings = self.cfg.end_strings
            strip = self.cfg.model.prompt.strip_echo and self.protocol.echoes_prompt
            got, settled, tokens = iter(completions), 0, 0
            for buf, i, sent, _, count in batch:
                for k, comp in zip(range(count), got):
                    if buf.status[i + k] is None:  # not a NeMo copy whose answer the row already has
                        buf.succeed(i + k, postprocess(comp.text, sent, end_strings, strip), comp.output_tokens,
                                    latency, attempt)
                        settled += 1
                        tokens += comp.output_tokens if isinstance(comp.output_tokens, int) else 0
            self._record(record, started, ok=settled, tokens=tokens)
            await self._commit_ready(batch)
            return
        else:
            attempt, retryable = client.max_retries + 1, True
            error = f"gave up after {attempt} attempts: {error}"
            if not await self._engine_answers():
                self._halt(EngineLost(f"the engine at {self.url} no longer answers ({error}); unfinished units "
                                      f"go back to the pool"))
                self.requests.append(record)
                return
        if not self.engine_alive():
            self.requests.append(record)
            return
        settled = 0
        for buf, i, _, _, count in batch:
            for k in range(count):
                if buf.status[i + k] is None:
                    buf.fail(i + k, error, attempt, retryable)
                    settled += 1
        record["failed"] = settled
        self.requests.append(record)
        await self._commit_ready(batch)

    def _record(self, record: dict, started: float, ok: int = 0, tokens: int = 0, error: str | None = None,
                done: bool = True) -> None:
        """Fill in one HTTP request's record and keep it; done=False leaves keeping it to the caller (the
        last try's rows count as failed only once they are recorded as errors)."""
        record.update(at=round(time.time(), 3), latency_s=round(time.perf_counter() - started, 4),
                      output_tokens=tokens, ok=ok, failed=0, replica=self.owner,
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

    def _journal_soon(self, buf: UnitBuffer) -> None:
        """Append the unit's fresh rows to its journal once the answers of this turn of the event loop are
        in: one write for all of them."""
        if not self._journal_due:
            self.loop.call_soon(self._flush_journals)
        self._journal_due.add(buf)

    def _flush_journals(self) -> None:
        due, self._journal_due = self._journal_due, set()
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

    def _take_journals(self, buf: UnitBuffer) -> tuple[UnitJournal | None, list]:
        """The unit is committed (or another copy committed it): its journals, to remove."""
        journal, others = buf.journal, buf.replayed_from
        buf.journal, buf.replayed_from = None, []
        self.journals.open.discard(journal)
        return journal, others

    async def _sync_journals(self) -> None:
        """fsync the journals written since the last look, every client.journal_sync_s: what a node crash
        (not only a killed process) may lose of the answered rows."""
        every = self.cfg.client.journal_sync_s
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            due = [journal for journal in self.journals.open if journal.unsynced]
            if due:
                await asyncio.to_thread(Journals.sync, due)

    async def _commit_ready(self, batch) -> None:
        self._queue_next_turns(batch)
        for buf in dict.fromkeys(item[0] for item in batch):
            if buf.fresh:
                self._journal_soon(buf)
        seen = set()
        for item in batch:
            buf = item[0]
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
        journals = self._take_journals(buf)
        if buf.abandoned:
            await asyncio.to_thread(Journals.remove, *journals)
            return
        table, stats = buf.table(self.schema)
        record = dict(stats.__dict__)
        if stats.failed:  # grouped by reason once here, so `orchestrator status` reads no result file for them
            record["errors"] = error_summary(e for s, e in zip(buf.status, buf.error) if s != "ok")
        retry = buf.unit in self.retry_units
        won = await asyncio.to_thread(_commit_and_remove_journals, self.paths, buf.unit, table, record,
                                      self.owner, self.ledger, retry, journals)
        self.dirty = True
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

    def _write_progress(self) -> None:
        """This replica's totals in this attempt (all its segments), the units it holds (a requeued job
        takes them back), and the request records gathered since the last write: the progress bar,
        `orchestrator status` and summary.json read them."""
        records, self.requests = self.requests, []
        self.dirty, self.records_at = False, time.monotonic()
        self.scheduler.wrote()
        write_progress(self.paths, self.owner, {
            "owner": self.owner, "attempt": self.attempt, **self.stats.rows.__dict__,
            "segments": self.stats.segments, "holding": sorted(self.scheduler.held),
            "backup_copies": self.stats.backup_copies, "discarded_rows": self.stats.discarded_rows,
            "journal_rows": self.stats.journal_rows, "updated": time.time()}, records)

    async def _report_progress(self) -> None:
        """Progress is written after commits (at most once per client.progress_interval_s), and request
        records at least once per lease_s / 4: a few metadata operations per unit, not per second."""
        records_every = max(self.cfg.client.progress_interval_s, self.cfg.client.lease_s / 4)
        while True:
            await asyncio.sleep(self.cfg.client.progress_interval_s)
            if self.dirty or (self.requests and time.monotonic() - self.records_at >= records_every):
                self._write_progress()


def _commit_and_remove_journals(paths: RunPaths, unit: int, table: pa.Table, stats: dict, owner: str, ledger: Ledger,
                                replace: bool, journals: tuple) -> bool:
    """commit_unit, then the unit's journals are removed (won or lost, the unit is committed now); a crash
    in between leaves a journal of a committed unit, which the next replica to start removes."""
    won = commit_unit(paths, unit, table, stats, owner, ledger, replace)
    Journals.remove(*journals)
    return won


def _conversation_rows(part: pa.RecordBatch, plan: Plan) -> list[tuple]:
    """(messages, turns, attributes) per row of a record batch; None for a column the plan does not read."""
    def column(name):
        return part.column(name).to_pylist() if name else [None] * part.num_rows

    return list(zip(column(plan.messages_column), column(plan.turns_column), column(plan.attributes_column)))


async def _cancel(*tasks) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already reported through self.fatal
            pass
