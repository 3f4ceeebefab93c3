"""The run's plan: the input files cut into units of rows, fixed when a run starts and stored in
`<run_dir>/plan.json`, with the id policy applied and the result schema that follows from it."""
from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .config import DataConfig
from .duplicates import find_duplicate_ids
from .errors import InputError
from .inputs import (
    InputFile,
    _check_conversation_columns,
    _footers,
    _id_type,
    _is_text,
    _kept_types,
    _list_value,
    _sampling_types,
    check_schema_column,
    discover_inputs,
    input_format,
)
from .structured import Columns
from .templates import template_columns

# a followed run's results (data.follow) say how each row ended there: `status` (ok or error) and `error`
UPSTREAM_STATUS, UPSTREAM_ERROR = "status", "error"


class Units(Sequence):
    """The plan's units, each (file index, first row, row count), derived from the files' row counts and
    unit_rows (build_plan cuts every file into runs of unit_rows rows): nothing per unit is stored or
    built. len() is free, units[u] is a bisection over the files, iteration walks them in order."""

    __slots__ = ("rows", "unit_rows", "_first", "_len")

    def __init__(self, rows: list[int], unit_rows: int):
        self.rows, self.unit_rows = list(rows), int(unit_rows)
        self._first, n = [], 0  # the first unit of each file
        for count in self.rows:
            self._first.append(n)
            n += -(-count // self.unit_rows)
        self._len = n

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        i = index + self._len if index < 0 else index
        if not 0 <= i < self._len:
            raise IndexError(f"unit {index} is not in the plan ({self._len} units)")
        f = bisect.bisect_right(self._first, i) - 1  # a file without rows has no unit: the last file at or before i
        start = (i - self._first[f]) * self.unit_rows
        return f, start, min(self.unit_rows, self.rows[f] - start)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        step = self.unit_rows
        for f, count in enumerate(self.rows):
            for start in range(0, count, step):
                yield f, start, min(step, count - start)

    def __eq__(self, other) -> bool:
        if isinstance(other, Units) and other.rows == self.rows and other.unit_rows == self.unit_rows:
            return True
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == self._len and all(tuple(a) == tuple(b) for a, b in zip(self, other))

    __hash__ = None

    def rows_of(self, units) -> int:
        """Rows of the given units (a set of unit numbers; others are ignored) without a lookup per unit:
        every unit holds unit_rows rows but the last of a file, which may hold fewer."""
        done = units if isinstance(units, (set, frozenset, dict)) else set(units)
        total = self.unit_rows * sum(1 for u in done if 0 <= u < self._len)
        for f, count in enumerate(self.rows):
            short = count % self.unit_rows
            if short and self._first[f] + count // self.unit_rows in done:
                total -= self.unit_rows - short
        return total

    def __repr__(self) -> str:
        return f"Units({self._len} units of up to {self.unit_rows} rows over {len(self.rows)} files)"


def _files_json(files: list[InputFile]) -> dict:
    """The input files as columns; each path is one shared prefix + its name when it can be (the usual case)."""
    out = {"name": [f.name for f in files], "rows": [f.rows for f in files], "size": [f.size for f in files],
           "mtime_ns": [f.mtime_ns for f in files]}
    prefixes = {f.path[:len(f.path) - len(f.name)] if f.name and f.path.endswith(f.name) else None for f in files}
    if len(prefixes) == 1 and None not in prefixes:
        out["prefix"] = prefixes.pop()
    else:
        out["path"] = [f.path for f in files]
    return out


def _files_from_json(found) -> list[InputFile]:
    if isinstance(found, list):  # plan.json of the previous version: one object per file
        return [InputFile(**f) for f in found]
    paths = found["path"] if "path" in found else [found["prefix"] + name for name in found["name"]]
    return [InputFile(*row) for row in zip(paths, found["name"], found["rows"], found["size"], found["mtime_ns"])]


@dataclass
class Plan:
    files: list[InputFile]
    units: Sequence[tuple[int, int, int]]  # (file index, first row, row count): Units, or a list from an old plan
    prompt_column: str
    id_column: str | None  # None: ids are "<file>:<row>"
    id_type: str  # arrow type of the id column in results
    unit_rows: int
    messages_column: str | None = None  # conversations (docs/conversations.md "Conversations and multi-turn")
    turns_column: str | None = None
    attributes_column: str | None = None
    keep_columns: list[str] = field(default_factory=list)
    keep_schema: str = ""  # the kept columns' arrow types (base64 IPC schema), the same in every file
    rollouts: int = 1  # answers per input row (sampling.rollouts): a unit's results are rows x rollouts
    prompt_template: str | None = None  # data.prompt_template: each row's prompt from template_columns
    template_columns: list[str] = field(default_factory=list)  # the input columns the template reads
    system_column: str | None = None  # each row's system prompt (data.system_column)
    # data.sampling_columns: {RowSampling field: input column}; the columns are among keep_columns too
    sampling_columns: dict = field(default_factory=dict)
    input_format: str = "parquet"  # parquet, jsonl or openai_batch (orchestrator.jsonl_input)
    offsets: list = field(default_factory=list)  # JSONL: per file, the byte offset of each of its units' first row
    jsonl_schema: str = ""  # plain JSONL: the columns' arrow types (base64 IPC schema), the same in every file
    batch_url: str | None = None  # openai_batch: the one url of its lines (/v1/chat/completions or /v1/completions)
    body_fields: list = field(default_factory=list)  # openai_batch: body fields beyond the sampling ones
    schema_column: str | None = None  # each row's JSON schema (data.schema_column, orchestrator.structured)
    response_column: str | None = None  # a scoring run's answers to score (data.response_column, orchestrator.scoring)
    follow: str | None = None  # data.follow: the run whose results are the input, unit for unit (orchestrator.follow)

    @property
    def total_rows(self) -> int:
        """Input rows (prompts)."""
        return sum(f.rows for f in self.files)

    @property
    def total_answers(self) -> int:
        """Result rows: every input row's rollouts."""
        return self.total_rows * self.rollouts

    def unit_answers(self, unit: int) -> int:
        """Result rows of one unit: row 0's rollouts 0..N-1, then row 1's, ... (index row * N + rollout)."""
        return self.units[unit][2] * self.rollouts

    @property
    def conversational(self) -> bool:
        """Rows are conversations (messages and/or turns) instead of one prompt each."""
        return bool(self.messages_column or self.turns_column)

    @property
    def input_columns(self) -> list[str]:
        """The columns a unit's rows are read from, each once."""
        prompt = list(self.template_columns) if self.prompt_template is not None else [self.prompt_column]
        named = ([self.messages_column, self.turns_column, self.attributes_column] if self.conversational
                 else prompt + [self.system_column]) + [self.schema_column] + list(self.keep_columns) + \
            [self.id_column]
        named += list(self.sampling_columns.values()) + [self.response_column]
        if self.follow:  # the upstream's outcome of each row: a row that failed there is not sent (row_settings)
            named += [UPSTREAM_STATUS, UPSTREAM_ERROR]
        if self.input_format == "openai_batch":
            from .jsonl_input import BODY_COLUMN

            named.append(BODY_COLUMN)
        return list(dict.fromkeys(c for c in named if c))

    def to_json(self) -> str:
        """plan.json: the files as columns and unit_rows, from which the units follow (format 2); a plan whose
        units are not those (none that build_plan makes) keeps its list of units."""
        d = {"format": 2, **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("files", "units")}}
        d["files"] = _files_json(self.files)
        if self.units != Units([f.rows for f in self.files], self.unit_rows):
            d["units"] = [list(u) for u in self.units]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """A plan of either format: this one, or the previous version's (files as objects, every unit listed)."""
        d = json.loads(text)
        d.pop("format", None)
        d["files"] = _files_from_json(d["files"])
        derived = Units([f.rows for f in d["files"]], d["unit_rows"])
        units = d.pop("units", None)
        d["units"] = derived if units is None or derived == units else [tuple(u) for u in units]
        return cls(**d)


def keep_schema(plan: Plan) -> pa.Schema:
    """The kept columns' fields, as the plan fixed them."""
    import base64

    if not plan.keep_schema:
        return pa.schema([])
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.keep_schema)))


def build_plan(data: DataConfig, input_spec: str, rollouts: int = 1, score: bool = False) -> Plan:
    """Check every input file's schema (from its footer only, read once) and cut the rows into units
    (rollouts: answers per row, sampling.rollouts; score: a scoring run, which reads data.response_column)."""
    fmt = data.format
    paths, root = discover_inputs(input_spec, fmt) if fmt != "auto" else discover_inputs(input_spec)
    fmt = input_format(input_spec, paths, fmt)
    if fmt == "openai_batch":
        data = _batch_data(data)
    scanned, extra = _scan(paths, data, fmt)
    return plan_of(data, fmt, paths, root, scanned, extra, rollouts, score)


def plan_of(data: DataConfig, fmt: str, paths: list[Path], root: Path, scanned: list, extra: dict,
            rollouts: int = 1, score: bool = False) -> Plan:
    """build_plan once the files are scanned: (schema, rows, stat) per file (orchestrator.follow gives those of
    files still to come)."""
    import base64

    if fmt == "openai_batch":
        import dataclasses

        from .jsonl_input import CHAT_URL

        data = dataclasses.replace(data, messages_column="messages" if extra["batch_url"] == CHAT_URL else None)
    files: list[InputFile] = []
    id_types: dict[str, str] = {}
    kept: dict[str, tuple[pa.DataType, Path]] = {}
    conversational = bool(data.messages_column or data.turns_column)
    used: dict[str, None] = {}  # the input columns data.prompt_template reads, in order
    for path, (schema, num_rows, stat) in zip(paths, scanned):
        names = schema.names
        if conversational:
            _check_conversation_columns(path, schema, data)
        elif data.prompt_template is not None:
            read, missing = template_columns(data.prompt_template, names)
            if missing:
                raise InputError(f"{path}: data.prompt_template uses {_names(missing)} that the input lacks; "
                                 f"the columns are {names}; name only these in the template (by their names, "
                                 f"e.g. {{{{ {names[0] if names else 'question'} }}}}), or add the missing "
                                 f"{'column' if len(missing) == 1 else 'columns'} to the input")
            for name in read:
                used.setdefault(name, None)
        elif data.prompt_column not in names:
            raise InputError(f"{path}: no prompt column {data.prompt_column!r}; the columns are "
                             f"{names}; set data.prompt_column=<one of them> (or data.messages_column, "
                             f"data.turns_column for conversations)")
        elif _list_value(ptype := schema.field(data.prompt_column).type) is not None or pa.types.is_struct(ptype):
            raise InputError(f"{path}: prompt column {data.prompt_column!r} has type {ptype}, not text; "
                             f"store one prompt string per row (a list of {{role, content}} per row is "
                             f"data.messages_column={data.prompt_column}; a list of user turns is "
                             f"data.turns_column={data.prompt_column})")
        if data.system_column and not conversational:
            if data.system_column not in names:
                raise InputError(f"{path}: no system column {data.system_column!r} (data.system_column); the "
                                 f"columns are {names}; set data.system_column=<one of them>, or leave it unset "
                                 f"for model.prompt.system")
            if not _is_text(stype := schema.field(data.system_column).type):
                raise InputError(f"{path}: system column {data.system_column!r} (data.system_column) has type "
                                 f"{stype}, not text; store one system prompt string (or null: "
                                 f"model.prompt.system) per row")
        check_schema_column(path, schema, data)
        if score:
            _check_response_column(path, schema, data)
        kept_here = {**_kept_types(path, schema, data, rollouts, score), **_sampling_types(path, schema, data)}
        for name, kind in kept_here.items():
            first = kept.setdefault(name, (kind, path))
            if first[0] != kind:
                raise InputError(f"input files disagree on the type of kept column {name!r} ({first[1].name}: "
                                 f"{first[0]}, {path.name}: {kind}); give every file the same type, or drop it "
                                 f"from data.keep_columns")
        id_types[str(path)] = _id_type(schema.field(data.id_column).type, path, data) if data.id_column in names else ""
        files.append(InputFile(str(path), os.path.relpath(path, root), num_rows, stat.st_size, stat.st_mtime_ns))
    kinds = set(id_types.values())
    if len(kinds) > 1:
        detail = ", ".join(f"{Path(p).name}: {t or 'no id column'}" for p, t in list(id_types.items())[:6])
        raise InputError(f"input files disagree on the id column {data.id_column!r} ({detail}); "
                         f"give every file the same id column type, or none")
    id_type = kinds.pop() if kinds else ""
    kept_fields = pa.schema([(name, kind) for name, (kind, _) in kept.items()])
    return Plan(files, Units([f.rows for f in files], data.unit_rows), data.prompt_column,
                data.id_column if id_type else None,
                id_type or "string", data.unit_rows, data.messages_column, data.turns_column,
                data.attributes_column, list(kept),
                base64.b64encode(kept_fields.serialize().to_pybytes()).decode() if kept else "", rollouts,
                None if conversational else data.prompt_template, list(used),
                None if conversational else data.system_column or None, dict(data.sampling_columns.items()),
                fmt, schema_column=data.schema_column or None, response_column=data.response_column if score else None,
                **extra)


def _check_response_column(path: Path, schema: pa.Schema, data: DataConfig) -> None:
    """A scoring run's data.response_column: there, and text; and its prompts not a conversation still to answer."""
    if data.turns_column:
        raise InputError(f"data.turns_column={data.turns_column!r}: a reward model scores a finished conversation, "
                         f"not turns still to answer; give the conversation as data.messages_column (or the prompt "
                         f"as data.prompt_column) and its answer as data.response_column")
    if data.response_column not in schema.names:
        raise InputError(f"{path}: no response column {data.response_column!r} to score (data.response_column); "
                         f"the columns are {schema.names}; set data.response_column=<the column holding each "
                         f"row's answer>")
    kind = schema.field(data.response_column).type
    if not _is_text(kind):
        raise InputError(f"{path}: response column {data.response_column!r} (data.response_column) has type {kind}, "
                         f"not text; store one answer string per row")


def _scan(paths: list[Path], data: DataConfig, fmt: str) -> tuple[list, dict]:
    """(schema, rows, stat) of every input file, and the plan's fields that follow from a JSONL input:
    Parquet files from their footers, JSONL files from one streaming pass each (orchestrator.jsonl_input)."""
    import base64

    from . import jsonl_input

    if fmt == "parquet":
        return list(_footers(paths)), {}
    out, offsets = [], []
    if fmt == "openai_batch":
        scan = jsonl_input.BatchScan()
        counts = []
        for path in paths:
            rows, starts = scan.scan(path, data.unit_rows)
            counts.append(rows)
            offsets.append(starts)
        schema = jsonl_input.batch_schema(scan.url)
        out = [(schema, rows, path.stat()) for path, rows in zip(paths, counts)]
        return out, {"offsets": offsets, "batch_url": scan.url or jsonl_input.CHAT_URL,
                     "body_fields": sorted(scan.body_fields)}
    common: pa.Schema | None = None
    for path in paths:
        schema, rows, starts = jsonl_input.scan_jsonl(path, data.unit_rows)
        out.append((schema, rows, path.stat()))
        offsets.append(starts)
        try:
            common = schema if common is None else pa.unify_schemas([common, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{path}: its keys' types differ from the other input files' "
                             f"({str(exc).splitlines()[0][:200]}); give each key one type in every file") from None
    common = common if common is not None else pa.schema([])
    return out, {"offsets": offsets, "jsonl_schema": base64.b64encode(common.serialize().to_pybytes()).decode()}


def _batch_data(data: DataConfig) -> DataConfig:
    """An OpenAI Batch API input's rows: custom_id is the id, body.messages the conversation (or body.prompt
    the prompt), the body's sampling fields the row's own. Keys that would read other columns are refused."""
    import dataclasses

    from .jsonl_input import BATCH_ID

    for key in ("messages_column", "turns_column", "attributes_column", "prompt_template", "system_column",
                "sampling_columns"):
        if getattr(data, key):
            raise InputError(f"data.{key} does not apply to an OpenAI Batch API input (data.format=openai_batch): "
                             f"its lines give the prompts and their settings (body); drop data.{key}, or set "
                             f"data.format=jsonl to read the lines as plain columns")
    return dataclasses.replace(data, id_column=BATCH_ID, prompt_column="prompt")


def _names(columns: list[str]) -> str:
    return f"column {columns[0]!r}" if len(columns) == 1 else f"columns {', '.join(map(repr, columns))}"


def apply_duplicate_policy(plan: Plan, data: DataConfig, spill_dir: Path | None = None) -> Plan:
    """Refuse repeated ids (with examples), or apply the policy the user opted into. Reads every id once
    (twice when some repeat, for the examples); a big input's hashes spill under spill_dir (see
    find_duplicate_ids)."""
    if plan.id_column and data.duplicate_ids != "keep":
        count, examples, nulls = find_duplicate_ids(plan, data.read_batch_rows * 8, spill_dir=spill_dir)
        if nulls[0] and data.duplicate_ids == "error":
            raise InputError(f"{nulls[0]} row(s) have a null id in column {plan.id_column!r} (first at {nulls[1]}); "
                             f"ids must be set for exactly-once results. Fill them in, or opt in: "
                             f"data.duplicate_ids=positional (ids become <file>:<row>)")
        if count and data.duplicate_ids == "error":
            shown = "; ".join(f"{ident!r} at {', '.join(where)}" for ident, where in examples)
            raise InputError(f"{count} rows repeat an id of column {plan.id_column!r} (e.g. {shown}); ids must be "
                             f"unique for exactly-once results. Fix the input, or opt in: "
                             f"data.duplicate_ids=positional (ids become <file>:<row>) or data.duplicate_ids=keep "
                             f"(every row runs; ids repeat in results)")
        if count or nulls[0]:  # positional
            plan.id_column, plan.id_type = None, "string"
    return plan


SEED_SPAN = 2 ** 31 - 1024  # a row's base seed; base + rollout stays below 2**31 (sampling.rollouts <= 1024)


def rollout_seed(seed: int | None, row_id) -> int:
    """The base seed of a row's rollouts (sampling.rollouts > 1): rollout k is sampled with base + k. A pure
    function of sampling.seed (None counts as 0) and the row's id, so a rerun asks for the same answers;
    base + k is what vLLM gives choice k of one request with n and seed=base."""
    import hashlib

    key = json.dumps([int(seed or 0), row_id if isinstance(row_id, (int, str)) else str(row_id)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % SEED_SPAN


TOP_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float64())])


def result_schema(plan: Plan, logprobs: bool = False, structured: Columns | None = None) -> pa.Schema:
    """id, rollout (with sampling.rollouts > 1: (id, rollout) is the key), the kept input columns,
    response (the last turn's answer), responses (every turn's, with data.turns_column), then the outcome;
    with sampling.logprobs (logprobs=True), token_logprobs and top_logprobs; with a JSON schema
    (structured: structured.columns_for), the parsed columns, schema_retries and seed."""
    left_out = getattr(structured, "replaces", ())  # a scoring run's (columns.NOT_SCORED): kept from the input
    return pa.schema([
        ("id", pa.type_for_alias(plan.id_type) if plan.id_type else pa.string()),
        *([("rollout", pa.int32())] if plan.rollouts > 1 else []),
        *keep_schema(plan),
        *[field for field in [
            ("response", pa.string()),
            *([("responses", pa.list_(pa.string()))] if plan.turns_column else []),
            ("status", pa.string()),
            ("error", pa.string()),
            ("finish_reason", pa.string()),  # stop, length, or the engine's own word
            ("stop", pa.string()),  # the end string the answer stopped at
            ("prompt_tokens", pa.int64()),
            ("reasoning", pa.string()),  # a reasoning model's thinking (engine field or reasoning_tags)
            ("output_tokens", pa.int64())] if field[0] not in left_out],
        ("latency_s", pa.float64()),
        ("attempts", pa.int32()),
        *([("token_logprobs", pa.list_(pa.float64())), ("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB)))]
          if logprobs else []),
        *(structured.schema_fields() if structured is not None else []),
    ])
