"""Each input row's own request settings (protocols.base.RowSampling), read from its record batch: the
per-row columns a plan names (data.sampling_columns) and an OpenAI batch line's body. A row whose values
cannot be used gets the reason, which becomes that row's error (never a crash).

Each source fills a list of {RowSampling field: value} per row (its own helper function); row_settings
builds the RowSampling of every row from them, and keeps the first reason a row cannot be sent.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

from .errors import ConfigError
from .plan import UPSTREAM_ERROR, UPSTREAM_STATUS, Plan
from .protocols.base import DEFAULT_ROW, RowSampling


def row_settings(part, plan: Plan) -> list[tuple[RowSampling, str | None]]:
    """(settings, why the row cannot be sent, or None) per row of a record batch of plan.input_columns."""
    n = part.num_rows
    settings = [(DEFAULT_ROW, None)] * n
    if plan.sampling_columns or plan.input_format == "openai_batch":
        values: list[dict] = [{} for _ in range(n)]
        problems: list[str | None] = [None] * n
        if plan.sampling_columns:
            sampling_column_values(part, plan, values, problems)
        if plan.input_format == "openai_batch":
            batch_body_values(part, values, problems)
        settings = [(RowSampling(**v) if v else DEFAULT_ROW, why) for v, why in zip(values, problems)]
    if plan.schema_column:
        settings = _with_schemas(part, plan.schema_column, settings)
    if plan.follow and UPSTREAM_STATUS in part.schema.names:
        settings = _failed_upstream(part, plan.follow, settings)
    return settings


FAILED_UPSTREAM = "FailedUpstream"  # a row error: the row failed in the run this one follows, and was not sent


def failed_upstream(error: str | None) -> bool:
    return bool(error) and error.startswith(FAILED_UPSTREAM + ":")


def _failed_upstream(part, upstream: str, settings: list) -> list[tuple[RowSampling, str | None]]:
    """data.follow: a row whose answer failed in the upstream run is not sent (nothing to score or judge); it
    is this run's error too, naming the upstream's, and counted (failed_upstream), never the engine's fault."""
    status = part.column(UPSTREAM_STATUS).to_pylist()
    errors = part.column(UPSTREAM_ERROR).to_pylist() if UPSTREAM_ERROR in part.schema.names else [None] * len(status)
    return [(row, why) if state == "ok" or why else
            (row, f"{FAILED_UPSTREAM}: the row failed in {upstream}, which this run follows: {error}")
            for (row, why), state, error in zip(settings, status, errors)]


def _with_schemas(part, column: str, settings: list) -> list[tuple[RowSampling, str | None]]:
    """data.schema_column: each row's JSON schema (JSON text) in RowSampling.schema; a row whose schema is not
    JSON or not a JSON Schema cannot be sent (structured.row_schema says why)."""
    from .structured import row_schema

    out = []
    for (row, why), value in zip(settings, part.column(column).to_pylist()):
        text, problem = row_schema(value, column)
        out.append((replace(row, schema=text) if text is not None else row, why or problem))
    return out


# the range of each per-row value: (lowest, whether the lowest is excluded, highest)
_RANGES = {"max_tokens": (1, False, None), "seed": (0, False, 2 ** 63 - 1), "temperature": (0, True, None),
           "top_p": (0, False, 1)}


def _checked(name: str, value, where: str, temperature_zero: bool = False):
    """A per-row value as its field's type, or raise ValueError with why it cannot be used."""
    integer = name in ("max_tokens", "seed")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and isinstance(value, float)
                                                                          and not value.is_integer()):
        raise ValueError(f"{where} is {value!r}; it must be {'an integer' if integer else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}; it must be a finite number")
    lo, lo_open, hi = _RANGES[name]
    if temperature_zero and name == "temperature":
        lo_open = False  # an OpenAI body's temperature 0 is greedy decoding
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"{where} is {value!r}; it must be {bound}")
    return int(value) if integer else float(value)


def sampling_column_values(part, plan: Plan, values: list[dict], problems: list) -> None:
    """data.sampling_columns: each row's non-null values; an out-of-range one is that row's error, naming
    the column and the value."""
    for name, column in plan.sampling_columns.items():
        for r, value in enumerate(part.column(column).to_pylist()):
            if value is None or problems[r]:
                continue
            try:
                values[r][name] = _checked(name, value, f"column {column!r} (data.sampling_columns.{name})")
            except ValueError as exc:
                problems[r] = f"{exc} (null: the config's)"


def batch_body_values(part, values: list[dict], problems: list) -> None:
    """An OpenAI batch line's body (model and the prompt left out): max_tokens (or max_completion_tokens),
    temperature, top_p and seed are the row's own sampling, a json_schema response_format its schema, and
    the other fields go to OpenAI engines as they are (RowSampling.body)."""
    from .jsonl_input import BODY_COLUMN

    for r, text in enumerate(part.column(BODY_COLUMN).to_pylist()):
        if text is None or problems[r]:
            continue
        body = json.loads(text)
        try:
            if "max_tokens" in body and "max_completion_tokens" in body:
                raise ValueError("body has both max_tokens and max_completion_tokens; keep one")
            for key, name in (("max_tokens", "max_tokens"), ("max_completion_tokens", "max_tokens"),
                              ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
                value = body.pop(key, None)
                if value is not None:
                    values[r][name] = _checked(name, value, f"body.{key}", temperature_zero=True)
            fmt = body.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"),
                                                                                   dict) else None
                if not isinstance(schema, dict):
                    raise ValueError("body.response_format.json_schema.schema is not a JSON schema object")
                values[r]["schema"] = json.dumps(schema, sort_keys=True)
                del body["response_format"]
            elif isinstance(fmt, dict) and fmt.get("type") == "text":
                del body["response_format"]
        except ValueError as exc:
            problems[r] = f"{exc} (the batch line's body)"
            continue
        if body:
            values[r]["body"] = json.dumps(body, sort_keys=True)


def check_row_engine(plan: Plan, engine: str, protocol: str | None) -> None:
    """Before submission: an OpenAI batch file's body fields beyond the sampling ones reach OpenAI engines
    only; on a NeMo or Triton engine they are refused, naming the field and the engine."""
    if plan.body_fields and protocol in ("nemo", "triton"):
        names = ", ".join(plan.body_fields[:6])
        raise ConfigError(f"the OpenAI batch file's bodies set {names}, which engine={engine} (the {protocol} "
                          f"protocol) cannot honour: only messages/prompt, max_tokens, temperature, top_p and seed "
                          f"reach it. Remove {'that field' if len(plan.body_fields) == 1 else 'those fields'} from "
                          f"the bodies, or use an engine with the OpenAI API (vllm, sglang, trtllm, mock)")
