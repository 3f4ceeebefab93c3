"""Each input row's own request settings (protocols.base.RowSampling), read from its record batch: the
per-row columns a plan names. A row whose values cannot be used gets the reason, which becomes that row's
error (never a crash)."""
from __future__ import annotations

from dataclasses import replace

from .plan import Plan
from .protocols.base import DEFAULT_ROW, RowSampling


def row_settings(part, plan: Plan) -> list[tuple[RowSampling, str | None]]:
    """(settings, why the row cannot be sent, or None) per row of a record batch of plan.input_columns."""
    settings = [(DEFAULT_ROW, None)] * part.num_rows
    if plan.schema_column:
        settings = _with_schemas(part, plan.schema_column, settings)
    return settings


def _with_schemas(part, column: str, settings: list) -> list[tuple[RowSampling, str | None]]:
    """data.schema_column: each row's JSON schema (JSON text) in RowSampling.schema; a row whose schema is not
    JSON or not a JSON Schema cannot be sent (structured.row_schema says why)."""
    from .structured import row_schema

    out = []
    for (row, why), value in zip(settings, part.column(column).to_pylist()):
        text, problem = row_schema(value, column)
        out.append((replace(row, schema=text) if text is not None else row, why or problem))
    return out
