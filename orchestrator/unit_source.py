"""The rows of a unit still to do, as requests for the client's workers (see UnitSource), and the unit's
results as they come in (UnitBuffer).

A unit's rows that its journals hold (an earlier run of it was interrupted), or that a retried unit's commit
kept, are taken as they are; only the others are sent, one request per rollout or run of rollouts, in
batches of the engine's batch size. It knows nothing of HTTP.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pyarrow as pa

from .commits import UnitStats
from .config import Config
from .context import ContextFit
from .conversation import Conversation, Turns, conversation_rows
from .journal import DETAILS, NO_DETAILS, Details, Entry, Journals, UnitJournal
from .judge import REASON as JUDGE_REASON
from .judge import Judge
from .plan import Plan, rollout_seed
from .prompts import cut_answer, ending, row_prompt, split_reasoning
from .protocols.base import DEFAULT_ROW, Request, RowSampling
from .reader import UnitReader
from .row_settings import failed_upstream, row_settings
from .scoring import score_rows, scores_text
from .structured import REASON, Columns, check_answer, reseed
from .templates import row_prompts


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
        self.prompt_tokens: list = [None] * rows
        self.finish_reason: list = [None] * rows  # stop, length, or the engine's own word (prompts.ending)
        self.stop: list = [None] * rows  # the end string the answer stopped at
        self.reasoning: list = [None] * rows  # a reasoning model's thinking, apart from its answer
        self.token_logprobs: list = [None] * rows  # sampling.logprobs: each output token's
        self.top_logprobs: list = [None] * rows  # and its K best alternatives
        self.latency: list = [None] * rows
        self.attempts: list = [0] * rows
        self.schema_retries: list = [0] * rows  # structured answers: re-asks of answers that did not match
        self.seed: list = [None] * rows  # and the seed of the kept answer (None: the config's)
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
                responses: list | None = None, details: Details = NO_DETAILS) -> None:
        """Row i's answer; `details`: what the engine said about it (the last turn's, for a conversation)."""
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
        (self.finish_reason[i], self.stop[i], self.prompt_tokens[i], self.reasoning[i], self.token_logprobs[i],
         self.top_logprobs[i]) = details
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
        self.schema_retries[i], self.seed[i] = entry.schema_retries, entry.seed
        (self.finish_reason[i], self.stop[i], self.prompt_tokens[i], self.reasoning[i], self.token_logprobs[i],
         self.top_logprobs[i]) = entry.details
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
        if any(self.finish_reason[i] is not None or self.prompt_tokens[i] is not None for i in rows):
            record.update(finish=[self.finish_reason[i] for i in rows], stop=[self.stop[i] for i in rows],
                          ptokens=[self.prompt_tokens[i] for i in rows])
        for key, column in (("reasoning", self.reasoning), ("logprobs", self.token_logprobs),
                            ("top", self.top_logprobs)):
            if any(column[i] is not None for i in rows):
                record[key] = [column[i] for i in rows]
        if any(self.schema_retries[i] or self.seed[i] is not None for i in rows):  # structured answers
            record.update(sretries=[self.schema_retries[i] for i in rows], seed=[self.seed[i] for i in rows])
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

    def table(self, schema: pa.Schema, structured: Columns | None = None) -> tuple[pa.Table, UnitStats]:
        """The unit's result table and stats; structured (structured.columns_for): the parsed columns of its
        answers, schema_retries and seed."""
        columns = {
            "id": pa.array(self.ids, schema.field("id").type), "response": pa.array(self.response, pa.string()),
            "responses": pa.array(self.responses or [], pa.list_(pa.string())),
            "status": pa.array(self.status, pa.string()), "error": pa.array(self.error, pa.string()),
            "finish_reason": pa.array(self.finish_reason, pa.string()), "stop": pa.array(self.stop, pa.string()),
            "prompt_tokens": pa.array(self.prompt_tokens, pa.int64()),
            "reasoning": pa.array(self.reasoning, pa.string()),
            "output_tokens": pa.array(self.output_tokens, pa.int64()),
            "latency_s": pa.array(self.latency, pa.float64()),
            "attempts": pa.array(self.attempts, pa.int32()),
        }
        for name in ("token_logprobs", "top_logprobs"):  # sampling.logprobs
            if name in schema.names:
                columns[name] = pa.array(getattr(self, name), schema.field(name).type)
        for name in getattr(structured, "replaces", ()):  # scores (orchestrator.scoring): the kept columns stay
            del columns[name]
        if structured is not None:
            columns.update(structured.arrays(self.response, self.status),
                           schema_retries=pa.array(self.schema_retries, pa.int32()),
                           seed=pa.array(self.seed, pa.int64()))
        if self.rollouts > 1:  # answer i is rollout i % N of its input row (else `rollout` may be a kept column)
            columns["rollout"] = pa.array([i % self.rollouts for i in range(len(self.ids))], pa.int32())
        for name in schema.names:
            if name not in columns:  # a kept input column
                kind, chunks = schema.field(name).type, self.kept.get(name, [])
                columns[name] = pa.concat_arrays([c.cast(kind) for c in chunks]) if chunks else pa.array([], kind)
        table = pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
        ok = sum(1 for s in self.status if s == "ok")
        tokens = sum(t for t in self.output_tokens if t)
        invalid = sum(1 for s, e in zip(self.status, self.error) if s == "error" and is_invalid(e))
        upstream = sum(1 for s, e in zip(self.status, self.error) if s == "error" and failed_upstream(e))
        return table, UnitStats(len(self.ids), ok, len(self.ids) - ok, tokens, 1, self.retryable,
                                invalid_structured=invalid, schema_retries=sum(self.schema_retries),
                                failed_upstream=upstream)



class UnitSource:
    """Queues the rows of the units the client claims: the queue takes lists of Requests (a batch, one HTTP
    request). A unit being read is in
    `active`; its rows with an outcome are journaled through `journal_soon`, and a unit complete once read
    is committed through `commit`."""

    def __init__(self, cfg: Config, plan: Plan, protocol, journals: Journals, stats, *, attempt: str,
                 retry_units: set, active: dict, turns: Turns, fit: ContextFit,
                 journal_soon: Callable[[UnitBuffer], None], commit: Callable[[UnitBuffer], Awaitable[None]]):
        self.cfg, self.plan, self.protocol, self.journals, self.stats = cfg, plan, protocol, journals, stats
        self.attempt, self.retry_units, self.active = attempt, retry_units, active
        self.turns, self.fit, self.journal_soon, self.commit = turns, fit, journal_soon, commit
        self.rollouts = plan.rollouts  # answers per input row: fixed with the plan (and checked by the fingerprint)
        self.reader = UnitReader(plan, cfg.data.read_batch_rows)

    def _start_journal(self, unit: int, rows: int, relist: bool):
        if relist:
            self.journals.scan()
        return self.journals.start(unit, rows)

    async def read(self, unit: int, batch: list, queue: asyncio.Queue, keep: dict | None = None,
                   relist: bool = False) -> list:
        """Queue a unit's rows. The rows its journals hold (an earlier run of it was interrupted) are taken
        from them, not sent; with keep (a retried unit's committed columns), its ok rows are kept as they
        are. Only the others are sent."""
        fmt, plan, n = self.cfg.model.prompt, self.plan, self.rollouts
        chat = getattr(self.protocol, "chat", False)  # a row's own system prompt goes as a system message
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
            # a prompt row: (prompt, its system prompt, why it cannot be sent) (templates.row_prompts)
            prompts = conversation_rows(part, plan) if plan.conversational else row_prompts(part, plan)
            # a scoring run: (the conversation and its answer as one sentence, why it cannot be scored)
            scored = score_rows(part, plan, prompts, fmt.system) if plan.response_column else None
            settings = row_settings(part, plan)  # each row's own request settings (RowSampling)
            for offset, prompt in enumerate(prompts):
                first = base + offset * n  # the row's first answer (rollout 0)
                todo = []  # its rollouts to ask for: those neither kept nor journaled
                for i in range(first, first + n):
                    if keep is not None and keep["status"][i] == "ok":
                        buf.restore(i, Entry(ids[offset], "ok", keep["response"][i], None, keep["output_tokens"][i],
                                             keep["latency_s"][i], keep["attempts"][i], False,
                                             (keep.get("responses") or [None] * (i + 1))[i], None,
                                             Details(*((keep.get(c) or [None] * (i + 1))[i] for c in DETAILS)),
                                             (keep.get("schema_retries") or [0] * (i + 1))[i] or 0,
                                             (keep.get("seed") or [None] * (i + 1))[i]))
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
                row, unusable = settings[offset]
                if unusable:
                    for k in todo:
                        buf.fail(first + k, unusable)
                    continue
                if scored is not None:  # the server says whether the sentence fits its context (exceeded)
                    sentence, problem = scored[offset]
                    if problem:
                        buf.fail(first, problem)
                    else:
                        batch = await self._add(batch, Request(buf, first, sentence, row=row), queue)
                    continue
                if plan.conversational:  # one answer per row (sampling.rollouts > 1 refuses conversations)
                    item = self.turns.start(buf, i, prompt, row)
                    if item is not None:
                        batch = await self._add(batch, item, queue)
                    continue
                prompt, system, problem = prompt
                if not problem:
                    prompt, problem = await self.fit.fit(prompt)
                if problem:
                    for k in todo:
                        buf.fail(first + k, problem)
                    continue
                for item in self.requests(buf, first, row_prompt(prompt, system, fmt, chat), ids[offset], todo, row):
                    batch = await self._add(batch, item, queue)
            if buf.fresh:
                self.journal_soon(buf)
        buf.read_done = True
        if buf.complete:
            await self.commit(buf)
        return batch

    async def _add(self, batch: list[Request], item: Request, queue: asyncio.Queue) -> list[Request]:
        """item joins the batch being filled; a full batch is queued (one HTTP request). A batch holds rows of
        one setting (Request.row): a row of another one starts the next batch."""
        if batch and batch[-1].row != item.row:
            await queue.put(batch)
            batch = []
        batch.append(item)
        if len(batch) >= self.protocol.batch_size:
            await queue.put(batch)
            batch = []
        return batch

    def requests(self, buf: UnitBuffer, first: int, sent: str, row_id, todo: list[int],
                 row: RowSampling = DEFAULT_ROW) -> list[Request]:
        """The Requests for a row's rollouts `todo`, with the row's own settings. One
        answer: the configured seed. Rollouts: rollout k is sampled with rollout_seed(...) + k; a run of
        consecutive rollouts goes in one request with n where the engine answers n as separate requests with
        seeds seed, seed + 1, ... (vLLM; sampling.rollouts_in_one_request), else one request each. NeMo's
        copies (rollouts_in_one_request there): the row's rollouts in blocks of up to 128 copies, block b
        seeded base + b x 128; a block is always sent whole (a copy's answer depends on the batch), and only
        the answers of `todo` are taken (see Client._send)."""
        if self.rollouts == 1:
            return [Request(buf, first, sent, row=row)]
        base = rollout_seed(row.seed if row.seed is not None else self.cfg.sampling.seed, row_id)  # a row's own seed
        most = getattr(self.protocol, "max_n", 1)
        if getattr(self.protocol, "copies", False):
            blocks = sorted({k // most for k in todo})
            return [Request(buf, first + b * most, sent, base + b * most, min(most, self.rollouts - b * most), row)
                    for b in blocks]
        items: list[Request] = []
        for k in todo:
            last = items[-1] if items else None
            if last is not None and last.first + last.answers == first + k and last.answers < most:
                items[-1] = last._replace(answers=last.answers + 1)  # extends the previous run
            else:
                items.append(Request(buf, first + k, sent, base + k, 1, row))
        return items


def settle_answers(batch: list[Request], completions: list, latency: float, attempt: int, end_strings: list[str],
                   strip: bool, budget: int, think: list[str] | None = None,
                   schemas: Reasks | None = None) -> tuple[int, int, int]:
    """A request's completions into its rows (a NeMo copy whose answer the row already has is skipped): the
    answers taken, the tokens they generated, and the rows whose own answer was unusable (Completion.error:
    that row's error, the engine's fault, so retry_failed=true redoes it; the request's other rows are
    answered). budget: the tokens a request may generate (an answer's finish_reason where the engine gives
    only a count); think: model.prompt.reasoning_tags, the tags its reasoning is split off the answer at;
    schemas: structured answers (an answer that does not match its row's schema is asked again, see Reasks)."""
    got, settled, tokens, failed = iter(completions), 0, 0, 0
    for buf, i, sent, seed, count, row in batch:
        row_budget = row.max_tokens or budget  # a row's own max_tokens (data.sampling_columns, a batch body)
        for k, comp in zip(range(count), got):
            if buf.status[i + k] is not None:  # a NeMo copy whose answer the row already has
                continue
            if comp.error is not None:
                buf.fail(i + k, comp.error, attempt, retryable=comp.engine_fault)
                failed += 1
                continue
            if comp.scores is not None:  # a reward model's answer (orchestrator.scoring): its scores are its text
                buf.succeed(i + k, scores_text(comp.scores), None, latency, attempt)
                settled += 1
                continue
            text, matched = cut_answer(comp.text, sent, end_strings, strip)
            finish, stop = ending(comp.finish_reason, comp.stop, matched, comp.output_tokens, row_budget)
            reasoning = comp.reasoning
            if reasoning is None and think:
                reasoning, text = split_reasoning(text, think)
            tokens += comp.output_tokens if isinstance(comp.output_tokens, int) else 0
            if schemas is not None and (verdict := schemas.check(buf, i + k, text, sent, seed, k, row, attempt)):
                if verdict == "failed":
                    failed += 1
                continue  # asked again, or failed
            buf.succeed(i + k, text, comp.output_tokens, latency, attempt,
                        details=Details(finish, stop, comp.prompt_tokens, reasoning, comp.token_logprobs,
                                        comp.top_logprobs))
            settled += 1
    return settled, tokens, failed


def is_invalid(error: str | None) -> bool:
    """A row error of an answer that never matched its schema."""
    return bool(error) and error.startswith(REASON + ":")


class Reasks:
    """Structured answers (orchestrator.structured): each answer is parsed and checked against its row's
    schema (RowSampling.schema, whoever set it) or the run's; one that does not match is asked again alone,
    with a new seed (structured.reseed: its seed + RESEED, recorded in the seed column), up to
    client.invalid_retries times, then is the row's error `InvalidStructuredOutput: <why>` (the engine's
    fault: retry_failed=true redoes it). A judge's answer (orchestrator.judge, output.score_column) whose
    score cannot be parsed is asked again the same way, then is the row's error `UnparsedScore: <why>`.
    The re-asks wait in `again` for the client to send first."""

    def __init__(self, schema: str | None, retries: int, seed: int | None, judge: Judge | None = None):
        self.schema, self.retries, self.seed, self.judge = schema, retries, seed, judge
        self.again: list[Request] = []

    def check(self, buf: UnitBuffer, j: int, text: str, sent, seed: int | None, k: int,
              row: RowSampling, attempt: int = 0) -> str | None:
        """None: answer j matches (or has no schema) and is to be taken, with the seed it was asked with;
        'again': asked again; 'failed': the row's error."""
        schema = row.schema or self.schema
        asked = seed + k if seed is not None else None  # answer k of a request with n: seed + k
        if schema is None and self.judge is None:
            return None
        why = None
        if schema is not None:
            try:
                _, why = check_answer(text, schema)
            except ValueError as exc:  # a row's own schema that is unusable (whatever set RowSampling.schema)
                buf.fail(j, f"the row's JSON schema {exc}", attempt)
                return "failed"
        reason = REASON
        if why is None and self.judge is not None:
            _, why = self.judge.parse(text)
            reason = JUDGE_REASON
        if why is None:
            buf.seed[j] = asked
            return None
        taken = buf.schema_retries[j]
        if taken < self.retries:
            buf.schema_retries[j] = taken + 1
            first = asked if asked is not None else row.seed if row.seed is not None else self.seed
            self.again.append(Request(buf, j, sent, reseed(first, 1), 1, row))
            return "again"
        buf.fail(j, f"{reason}: {why}", attempt, retryable=True)
        return "failed"

    def take(self) -> list[list[Request]]:
        """The re-asks waiting, one request each."""
        again, self.again = self.again, []
        return [[item] for item in again]


def settle_failures(batch: list[Request], error: str, attempt: int, retryable: bool) -> int:
    """A request that failed for good: its rows without an outcome are errors; how many."""
    settled = 0
    for buf, i, _, _, count, _ in batch:
        for k in range(count):
            if buf.status[i + k] is None:
                buf.fail(i + k, error, attempt, retryable)
                settled += 1
    return settled
