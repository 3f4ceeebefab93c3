"""Structured answers (docs/output.md "Structured answers"): a JSON schema for the whole run
(sampling.json_schema: a .json file, or inline) or per row (data.schema_column), checked before submission;
each answer parsed and validated with `jsonschema`, asked again with a new seed when it does not match
(client.invalid_retries times), then the row's error `InvalidStructuredOutput: <why>`; and the typed result
columns the schema maps to (output.parse: one `parsed` column, or its top-level properties as columns).

JSON schema to Arrow: string -> string, integer -> int64, number -> float64, boolean -> bool, array of T ->
list<T>, object with properties -> struct, anything else (anyOf, no type, an object without properties) ->
its JSON text. A type list of one type and "null" is that type. Every column is nullable (an error row's are
null).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from .columns import RESULT_COLUMNS
from .errors import ConfigError

REASON = "InvalidStructuredOutput"  # the row error's reason: its text starts with "InvalidStructuredOutput: "
RESEED = 1000003  # re-ask k of an answer is sampled with (its seed, else the config's, else 0) + RESEED * k
SEED_SPAN = 2 ** 31  # re-ask seeds wrap below 2**31 (every engine's seed field takes that)
PARSE_MODES = ("struct", "columns")
# the result columns a schema adds besides the parsed value: re-asks taken, the seed of the kept answer
EXTRA_COLUMNS = (("schema_retries", pa.int32()), ("seed", pa.int64()))


# ------------------------------------------------------------------------------------------ schemas

def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a JSON Schema (jsonschema's own check, in the draft its $schema names, else
    2020-12), or None."""
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        return f"a JSON schema is a JSON object, not {type(schema).__name__}"
    try:
        cls = validators.validator_for(schema, default=Draft202012Validator)
    except Exception as exc:  # noqa: BLE001 - an unknown $schema URI
        return f"unknown $schema: {exc}"
    try:
        cls.check_schema(schema)
    except SchemaError as exc:  # jsonschema's best match of the errors
        return _message(exc)
    return None


def load_schema(value: Any, key: str = "sampling.json_schema") -> dict | None:
    """sampling.json_schema as given (a dict, JSON text, or the path of a .json file) -> the schema, checked;
    ConfigError naming the key (and the file) and the fix."""
    if value is None:
        return None
    if hasattr(value, "items") and not isinstance(value, dict):  # a DictConfig
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    where = key
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):  # a path
            path = Path(text).expanduser()
            where = f"{key}={str(path)!r}"
            if not path.is_file():
                raise ConfigError(f"{where}: no such file; give the path of a .json file holding the JSON schema "
                                  f"(or the schema inline, e.g. {key}='{{\"type\": \"object\", ...}}')")
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{where}: cannot read it ({exc}); give a readable UTF-8 .json file") from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where} is not JSON ({exc}); write the JSON schema as JSON (a file, or inline "
                              f"text such as '{{\"type\": \"object\"}}')") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a JSON schema is a JSON object, not {type(value).__name__}; give an "
                          f"object such as {{\"type\": \"object\", \"properties\": {{...}}}}")
    problem = schema_problem(value)
    if problem:
        raise ConfigError(f"{where} is not a valid JSON Schema: {problem}; fix the schema (see "
                          f"https://json-schema.org/understanding-json-schema)")
    return value


def row_schema(text: Any, column: str) -> tuple[str | None, str | None]:
    """A data.schema_column value -> (its JSON text, why it is unusable, or None); a null: (None, None), the
    run's schema (if any) applies."""
    if text is None:
        return None, None
    if not isinstance(text, str):
        return None, f"data.schema_column {column!r}: the row's schema is {type(text).__name__}, not JSON text"
    try:
        compiled(text)
    except ValueError as exc:
        return None, f"data.schema_column {column!r}: the row's schema {exc}; fix it in the input"
    return text, None


@lru_cache(maxsize=256)
def compiled(text: str):
    """The validator of a schema's JSON text (cached: rows share schemas); ValueError when it is not JSON or
    not a JSON Schema."""
    from jsonschema import Draft202012Validator, validators

    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"is not JSON ({exc})") from None
    problem = schema_problem(schema)
    if problem:
        raise ValueError(f"is not a valid JSON Schema: {problem}")
    return validators.validator_for(schema, default=Draft202012Validator)(schema)


def schema_text(schema: dict | None) -> str | None:
    """The run's schema as the JSON text RowSampling.schema holds (one form for the caches)."""
    return None if schema is None else json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _message(error) -> str:
    if error is None:
        return "does not match the schema"
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}" + (f" (at /{where})" if where else "")


def check_answer(text: str, schema: str) -> tuple[Any, str | None]:
    """An answer against a schema's JSON text: (the parsed value, None), or (None, why it is invalid:
    jsonschema's best_match); ValueError when the schema itself is unusable."""
    from jsonschema.exceptions import best_match

    try:
        value = json.loads(text.strip())
    except ValueError as exc:
        return None, f"the answer is not JSON ({exc})"
    try:
        error = best_match(compiled(schema).iter_errors(value))
    except Exception as exc:  # noqa: BLE001 - e.g. a $ref that cannot be resolved: the schema's fault
        raise ValueError(f"cannot be applied ({type(exc).__name__}: {exc})") from None
    return (value, None) if error is None else (None, _message(error))


def reseed(seed: int | None, k: int) -> int:
    """The seed of re-ask k (1, 2, ...) of an answer first asked with `seed` (None: 0)."""
    return (int(seed or 0) + RESEED * k) % SEED_SPAN


# ------------------------------------------------------------------------------------------ config checks

def check_keys(cfg) -> None:
    """What needs several groups: output.parse=columns needs the run's schema with top-level properties that
    do not clash with result columns (per-row schemas give no columns to type); and output.score_column
    against the run (judge.check_keys)."""
    from .judge import check_keys as check_judge

    check_judge(cfg, taken={"parsed", *(name for name, _ in EXTRA_COLUMNS)})
    schema, column, parse = cfg.sampling.json_schema, cfg.data.schema_column, cfg.output.parse
    if schema is None and not column:
        if parse == "columns":
            raise ConfigError("output.parse=columns needs a schema: set sampling.json_schema (a .json file or "
                              "inline)")
        return
    added = {"parsed", *(name for name, _ in EXTRA_COLUMNS)} & set(cfg.data.keep_columns)
    if added:
        raise ConfigError(f"data.keep_columns names {sorted(added)}, which a JSON schema adds as result columns; "
                          f"rename those input columns, or drop them from data.keep_columns")
    if parse != "columns":
        return
    if column:
        raise ConfigError(f"output.parse=columns with data.schema_column={column!r}: each row has its own schema, "
                          f"so there are no columns to type; use output.parse=struct (parsed is then the JSON text)")
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise ConfigError("output.parse=columns: sampling.json_schema has no top-level properties to make "
                          "columns of; give it \"properties\": {...}, or use output.parse=struct")
    reserved = set(RESULT_COLUMNS) | {"rollout", "parsed"} | {name for name, _ in EXTRA_COLUMNS} | \
        set(cfg.data.keep_columns)
    clash = sorted(set(props) & reserved)
    if clash:
        raise ConfigError(f"output.parse=columns: the schema's properties {clash} clash with result columns (or "
                          f"data.keep_columns); rename them in the schema, or use output.parse=struct")


def fingerprint(cfg) -> dict | None:
    """What decides the structured answers and their columns beyond sampling.json_schema (in the sampling
    group): None when no schema is set, as in a run_dir started before they existed. client.invalid_retries
    is not in it (like client.max_retries): an ok row's answer is the same under any limit (re-ask k always
    has the same seed), so a rerun with retry_failed=true may raise it to recover InvalidStructuredOutput rows.
    A judge's score keys (judge.fingerprint) join it when output.score_column is set, with or without a schema."""
    from .judge import fingerprint as judge_fingerprint

    judged = judge_fingerprint(cfg)
    if cfg.sampling.json_schema is None and not cfg.data.schema_column:
        return {"judge": judged} if judged else None
    found = {"schema_column": cfg.data.schema_column, "parse": cfg.output.parse}
    return {**found, "judge": judged} if judged else found


# ------------------------------------------------------------------------------------------ typed columns

def _kind(schema: Any):
    """A schema node -> its column kind: 'string', 'int', 'float', 'bool', 'json', ('list', kind) or
    ('struct', [(name, kind), ...])."""
    if not isinstance(schema, dict):
        return "json"
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [k for k in kind if k != "null"]
        kind = named[0] if len(named) == 1 else None
    if kind == "string":
        return "string"
    if kind == "integer":
        return "int"
    if kind == "number":
        return "float"
    if kind == "boolean":
        return "bool"
    if kind == "array" and isinstance(schema.get("items"), dict):
        return ("list", _kind(schema["items"]))
    props = schema.get("properties")
    if kind in ("object", None) and isinstance(props, dict) and props and not set(schema) & {"anyOf", "oneOf",
                                                                                           "allOf", "$ref"}:
        return ("struct", [(name, _kind(sub)) for name, sub in props.items()])
    return "json"


_SIMPLE = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "json": pa.string()}


def _arrow(kind) -> pa.DataType:
    if isinstance(kind, str):
        return _SIMPLE[kind]
    if kind[0] == "list":
        return pa.list_(_arrow(kind[1]))
    return pa.struct([(name, _arrow(sub)) for name, sub in kind[1]])


def arrow_type(schema: Any) -> pa.DataType:
    return _arrow(_kind(schema))


def _coerce(kind, value):
    """A validated value as its column holds it (a value that does not fit its kind is null)."""
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if kind == "string":
        return value if isinstance(value, str) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind == "int":
        if isinstance(value, (int, float)) and float(value).is_integer() and -2 ** 63 <= value < 2 ** 63:
            return int(value)
        return None
    if kind == "float":
        return float(value) if isinstance(value, (int, float)) else None
    if kind[0] == "list":
        return [_coerce(kind[1], v) for v in value] if isinstance(value, list) else None
    if not isinstance(value, dict):
        return None
    return {name: _coerce(sub, value.get(name)) for name, sub in kind[1]}


class Columns:
    """The result columns of a run with a schema, and their values from the answers' text."""

    def __init__(self, schema: dict | None, parse: str = "struct", per_row: bool = False):
        # per-row schemas (data.schema_column): types vary per row, so `parsed` is the JSON text
        self.kind = "json" if per_row or schema is None else _kind(schema)
        self.parse = parse
        if parse == "columns" and isinstance(self.kind, tuple) and self.kind[0] == "struct":
            self.fields = [(name, _arrow(sub)) for name, sub in self.kind[1]]
        else:
            self.parse = "struct"
            self.fields = [("parsed", _arrow(self.kind))]

    def schema_fields(self) -> list[tuple[str, pa.DataType]]:
        return self.fields + list(EXTRA_COLUMNS)

    def arrays(self, texts: list, status: list) -> dict[str, pa.Array]:
        """The parsed columns of a unit's rows, from each ok row's answer (validated when it was taken)."""
        values = []
        for text, state in zip(texts, status):
            value = None
            if state == "ok" and isinstance(text, str):
                try:
                    value = _coerce(self.kind, json.loads(text.strip()))
                except ValueError:  # only validated answers are ok rows; an old journal's may not parse
                    value = None
            values.append(value)
        if self.parse == "struct":
            return {"parsed": pa.array(values, self.fields[0][1])}
        return {name: pa.array([v.get(name) if isinstance(v, dict) else None for v in values], kind)
                for name, kind in self.fields}


def columns_for(cfg, plan):
    """The run's structured columns, or None when it has no schema (sampling.json_schema, data.schema_column);
    a judge's (output.score_column): its score column with them (judge.ScoreColumn), schema or not."""
    from .judge import ScoreColumn, judge_for

    per_row = bool(getattr(plan, "schema_column", None))
    columns = None
    if cfg.sampling.json_schema is not None or per_row:
        columns = Columns(cfg.sampling.json_schema, cfg.output.parse, per_row)
    judge = judge_for(cfg)
    return ScoreColumn(judge, columns, EXTRA_COLUMNS) if judge is not None else columns
