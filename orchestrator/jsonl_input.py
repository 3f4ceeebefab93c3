"""JSON Lines inputs (data.input=prompts.jsonl) and OpenAI Batch API files, read in bounded memory.

Planning makes one streaming pass over each file (a line at a time, one unit's lines held at once): it counts
the rows (non-blank lines), records the byte offset of every unit's first line, checks every line, and
infers the columns' Arrow types (pyarrow.json over one unit's lines at a time, the units' types unified).
The offsets go in plan.json, so reading a unit later is a seek to its offset and a parse of its own lines
(`read_unit_lines`): no unit needs the whole file, and nothing is converted or copied. A resume checks a
JSONL file by its size, time and row count like a Parquet file (fingerprint.json's input_files).

Plain JSONL: one JSON object per line, its keys are the columns (a key missing from a line is null). A line
that is not JSON or not an object is refused before submission, naming file:line.

OpenAI Batch API files (data.format=openai_batch, or a JSONL whose first line has `custom_id` and `body`):
one request per line, `{"custom_id", "method": "POST", "url", "body"}`, every line with the same url,
`/v1/chat/completions` (body.messages: the row's conversation) or `/v1/completions` (body.prompt). A row
is read as the columns custom_id (the row id), messages or prompt, and body (the body's other fields as
JSON text, model left out), which row_settings turns into the row's own settings. Every line is checked
before submission (method, url, body, custom_id present and unique: a repeat names both lines); the
custom_ids seen are held in memory while planning (one string per row).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa

from .errors import InputError

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
BATCH_URLS = (CHAT_URL, COMPLETIONS_URL)
BODY_COLUMN = "body"  # a batch row's other body fields, as JSON text
BATCH_ID = "custom_id"
BATCH_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# body fields every engine honours (each is a RowSampling field); the others go to OpenAI engines as they are
SAMPLING_BODY_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "response_format")
_BATCH_LINE = ('{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", '
               '"body": {"messages": [{"role": "user", "content": "Hi"}]}}')


def looks_like_batch(path: Path) -> bool:
    """Whether a JSONL file's first object line has the Batch API's custom_id and body fields."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return False
                return isinstance(first, dict) and BATCH_ID in first and "body" in first
    return False


def _parse_block(lines: list[bytes], path: Path, first_line: list[int], schema: pa.Schema | None = None) -> pa.Table:
    """One unit's lines as a table (pyarrow.json): a line that is not a JSON object is named (file:line)."""
    import pyarrow.json as pj

    data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    read = pj.ReadOptions(block_size=max(1 << 20, len(data) + 1), use_threads=False)
    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore") if schema is not None \
        else pj.ParseOptions(newlines_in_values=False)
    try:
        return pj.read_json(io.BytesIO(data), read_options=read, parse_options=parse)
    except pa.ArrowInvalid as exc:
        for number, line in zip(first_line, lines):
            _object(line, path, number)
        raise InputError(f"{path}: lines {first_line[0]}-{first_line[-1]} do not read as one table "
                         f"({str(exc).splitlines()[0][:200]}); give each key one type in every line (e.g. all "
                         f"numbers or all text), or convert the file to Parquet") from None


def _object(line: bytes, path: Path, number: int) -> dict:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise InputError(f"{path}:{number}: not valid JSON ({exc}); each line of a JSONL file must be one JSON "
                         f"object, e.g. {{\"id\": \"q1\", \"prompt\": \"...\"}}. Fix or remove that line") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}:{number}: a JSON {type(value).__name__}, not an object; each line of a JSONL "
                         f"file must be one JSON object, e.g. {{\"id\": \"q1\", \"prompt\": \"...\"}}")
    return value


def _lines(path: Path):
    """(line number, byte offset, line) of every non-blank line, streamed."""
    offset = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, offset, line
            offset += len(line)


def scan_jsonl(path: Path, unit_rows: int) -> tuple[pa.Schema, int, list[int]]:
    """A plain JSONL file's columns (types unified over its units), rows, and each unit's first byte."""
    schema, rows, offsets = None, 0, []
    block: list[bytes] = []
    numbers: list[int] = []

    def flush():
        nonlocal schema
        found = _parse_block(block, path, numbers).schema
        try:
            schema = found if schema is None else pa.unify_schemas([schema, found], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{path}: a key changes type near lines {numbers[0]}-{numbers[-1]} "
                             f"({str(exc).splitlines()[0][:200]}); give each key one type in every line, or "
                             f"convert the file to Parquet") from None
        block.clear()
        numbers.clear()

    for number, offset, line in _lines(path):
        if rows % unit_rows == 0:
            if block:
                flush()
            offsets.append(offset)
        block.append(line)
        numbers.append(number)
        rows += 1
    if block:
        flush()
    return schema if schema is not None else pa.schema([]), rows, offsets


def batch_schema(url: str | None) -> pa.Schema:
    """The columns a Batch API file's rows are read as."""
    prompt = ("messages", BATCH_MESSAGES) if url == CHAT_URL else ("prompt", pa.string())
    return pa.schema([(BATCH_ID, pa.string()), prompt, (BODY_COLUMN, pa.string())])


def _fix(what: str) -> str:
    return f"{what}; each line of an OpenAI Batch API file is one request, e.g. {_BATCH_LINE}"


class BatchScan:
    """What planning learns of Batch API files: their one url, the custom_ids seen (with where), and the
    body fields beyond the sampling ones (which only OpenAI engines honour)."""

    def __init__(self):
        self.url: str | None = None
        self.first: str | None = None  # where the url was first seen
        self.seen: dict[str, str] = {}
        self.body_fields: dict[str, str] = {}  # field -> the first line that has it

    def scan(self, path: Path, unit_rows: int) -> tuple[int, list[int]]:
        """A Batch API file's rows and each unit's first byte; every line checked (see the module)."""
        rows, offsets = 0, []
        for number, offset, line in _lines(path):
            if rows % unit_rows == 0:
                offsets.append(offset)
            self.check(_object(line, path, number), f"{path}:{number}")
            rows += 1
        return rows, offsets

    def check(self, req: dict, where: str) -> None:
        ident = req.get(BATCH_ID)
        if ident is None or ident == "":
            raise InputError(f"{where}: no custom_id; " + _fix("give every line a unique custom_id (the row's id)"))
        if not isinstance(ident, str):
            raise InputError(f"{where}: custom_id is {ident!r}, not text; " + _fix("write it as a string"))
        if ident in self.seen:
            raise InputError(f"{where}: custom_id {ident!r} repeats the one of {self.seen[ident]}; custom_ids must "
                             f"be unique (they are the rows' ids): rename one of them")
        self.seen[ident] = where
        method = req.get("method")
        if method != "POST":
            raise InputError(f"{where}: method is {method!r}; " + _fix('the Batch API takes "method": "POST"'))
        url = req.get("url")
        if url not in BATCH_URLS:
            raise InputError(f"{where}: url is {url!r}; " + _fix(f"the url must be {CHAT_URL} or {COMPLETIONS_URL}"))
        if self.url is None:
            self.url, self.first = url, where
        elif url != self.url:
            raise InputError(f"{where}: url is {url!r}, but {self.first} has {self.url!r}; all requests of a batch "
                             f"use one url (as the OpenAI Batch API requires): split the file in two runs")
        body = req.get("body")
        if not isinstance(body, dict):
            raise InputError(f"{where}: " + ("no body" if body is None else f"body is a {type(body).__name__}")
                             + "; " + _fix("each line needs a body object with the request"))
        if url == CHAT_URL:
            _, problem = batch_messages(body.get("messages"))
            if problem:
                raise InputError(f"{where}: body.messages {problem}; " + _fix("give the conversation as a list "
                                                                             "of {role, content}"))
        elif not isinstance(body.get("prompt"), str):
            raise InputError(f"{where}: body.prompt is {_kind(body.get('prompt'))}; " + _fix(
                f"a {COMPLETIONS_URL} request needs one prompt string (a list of prompts: one line each)"))
        if body.get("n", 1) != 1:
            raise InputError(f"{where}: body.n={body.get('n')!r}; one answer per line is supported: repeat the line "
                             f"under other custom_ids, or use sampling.rollouts")
        if body.get("stream"):
            raise InputError(f"{where}: body.stream is set; batch requests are not streamed: drop it")
        for name in body:
            if name not in ("model", "messages", "prompt", *SAMPLING_BODY_FIELDS):
                self.body_fields.setdefault(name, where)


def _kind(value) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def batch_messages(value) -> tuple[list[dict] | None, str | None]:
    """A chat body's messages as {role, content} with text content (a list of text parts is joined)."""
    if not isinstance(value, list) or not value:
        return None, "is missing or empty" if not value else f"is a {type(value).__name__}, not a list"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None, f"[{i}] is not a {{role, content}} object"
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                return None, f"[{i}].content has a part that is not text (only text parts are supported)"
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            return None, f"[{i}].content is {_kind(content)}, not text"
        out.append({"role": m["role"], "content": content})
    return out, None


def read_unit_lines(path: str, offset: int, count: int) -> list[bytes]:
    """A unit's lines: `count` non-blank lines from byte `offset` on."""
    out: list[bytes] = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh:
            if line.strip():
                out.append(line)
                if len(out) == count:
                    break
    if len(out) < count:
        raise InputError(f"{path}: {count} rows expected from byte {offset} on, {len(out)} found; the file changed "
                         f"since the run was planned. Restore it, or start a new run_dir=")
    return out


def jsonl_table(path: str, lines: list[bytes], schema: pa.Schema) -> pa.Table:
    """A plain JSONL unit's lines as a table of the plan's schema."""
    return _parse_block(lines, Path(path), list(range(1, len(lines) + 1)), schema)


def unit_table(plan, unit: int) -> pa.Table:
    """A JSONL or Batch API unit of a plan (orchestrator.plan.Plan) as a table: its lines read from the offset
    the plan recorded, parsed once."""
    import base64

    file_index, start, count = plan.units[unit]
    path = plan.files[file_index].path
    try:
        lines = read_unit_lines(path, plan.offsets[file_index][start // plan.unit_rows], count)
    except OSError as exc:
        raise InputError(f"{path}: rows {start}-{start + count - 1} cannot be read ({exc}); restore the file, or "
                         f"start a new run_dir=") from None
    if plan.input_format == "openai_batch":
        return batch_table(path, lines, plan.batch_url)
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.jsonl_schema)))
    return jsonl_table(path, lines, schema)


def batch_table(path: str, lines: list[bytes], url: str) -> pa.Table:
    """A Batch API unit's lines as the columns custom_id, messages or prompt, and body (see the module)."""
    ids, prompts, bodies = [], [], []
    for line in lines:
        req = json.loads(line)
        body = dict(req["body"])
        body.pop("model", None)
        if url == CHAT_URL:
            prompts.append(batch_messages(body.pop("messages", None))[0])
        else:
            prompts.append(body.pop("prompt", None))
        ids.append(req[BATCH_ID])
        bodies.append(json.dumps(body, sort_keys=True) if body else None)
    schema = batch_schema(url)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(prompts, schema.field(1).type),
                                 pa.array(bodies, pa.string())], schema=schema)
