"""LLM-as-judge (docs/output.md "Scores from a judge"): a generation run whose answers are judgements, each
parsed into a float score column (output.score_column).

The score is the first match of output.score_pattern's group in the answer (default: MT-Bench's
`\\[\\[(\\d+\\.?\\d*)\\]\\]`, which reads `Rating: [[7]]`); with a JSON schema (sampling.json_schema or
data.schema_column), the parsed answer's property named output.score_column. A score outside
output.score_range ([lo, hi], optional) is not a score. An answer without a score is asked again with a new
seed (unit_source.Reasks, client.invalid_retries times, as an answer that breaks its schema), then is the
row's error `UnparsedScore: <why>` (the engine's fault: retry_failed=true redoes it).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import ConfigError

REASON = "UnparsedScore"  # the row error's reason: its text starts with "UnparsedScore: "
# MT-Bench's one_score_pattern (FastChat, fastchat/llm_judge/common.py): "Rating: [[5]]"
DEFAULT_PATTERN = r"\[\[(\d+\.?\d*)\]\]"
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ------------------------------------------------------------------------------------------ config checks

def check_output(out) -> None:
    """OutputConfig's own score keys: the pattern compiles with one group, the range is [lo, hi]."""
    column, pattern, bounds = out.score_column, out.score_pattern, out.score_range
    if column is not None and (not isinstance(column, str) or not _COLUMN.fullmatch(column)):
        raise ConfigError(f"output.score_column={column!r}: name the score column with letters, digits and _ "
                          f"(not starting with a digit), so a filter can read it, e.g. output.score_column=rating")
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"output.score_pattern={pattern!r}: give a regular expression with one group around the "
                          f"number, e.g. the default {DEFAULT_PATTERN!r} (MT-Bench's 'Rating: [[5]]')")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"output.score_pattern={pattern!r} is not a regular expression ({exc}); fix it, e.g. "
                          f"{DEFAULT_PATTERN!r} (quote it on the command line: 'output.score_pattern=...')") from None
    if compiled.groups != 1:
        raise ConfigError(f"output.score_pattern={pattern!r} has {compiled.groups} groups; give exactly one, around "
                          f"the number (make the others non-capturing, (?:...)), e.g. {DEFAULT_PATTERN!r}")
    if bounds is None:
        return
    bounds = list(bounds)
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                   for b in bounds):
        raise ConfigError(f"output.score_range={bounds!r}: give [lo, hi], two numbers, e.g. "
                          f"'output.score_range=[1,10]' (or null for any score)")
    if bounds[0] > bounds[1]:
        raise ConfigError(f"output.score_range={bounds!r}: lo is above hi; give [lo, hi] with lo <= hi, e.g. "
                          f"[{bounds[1]}, {bounds[0]}]")
    if column is None:
        raise ConfigError(f"output.score_range={bounds!r} without output.score_column: set output.score_column "
                          f"(e.g. rating) to parse judgements into scores, or drop output.score_range")


def check_keys(cfg, taken=()) -> None:
    """What needs several groups: the score column clashes with no other result column (`taken`: those a
    JSON schema adds, structured.check_keys), a scoring run (whose model writes its own score columns) has
    none, and a run schema names the column as a numeric property."""
    from .columns import RESULT_COLUMNS

    column = cfg.output.score_column
    if column is None:
        return
    if cfg.model.attributes:
        raise ConfigError(f"output.score_column={column!r} with model.attributes={list(cfg.model.attributes)}: a "
                          f"reward model writes its own score columns; drop output.score_column (it is for a "
                          f"generation run whose answers are judgements)")
    taken = {*RESULT_COLUMNS, "rollout", *taken, *cfg.data.keep_columns}
    if column in taken:
        raise ConfigError(f"output.score_column={column!r} is a result column already (or in data.keep_columns); "
                          f"name the score column otherwise, e.g. output.score_column=rating")
    schema = cfg.sampling.json_schema
    if schema is None:
        return
    prop = (schema.get("properties") or {}).get(column) if isinstance(schema.get("properties"), dict) else None
    kinds = prop.get("type") if isinstance(prop, dict) else None
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not isinstance(prop, dict) or not {"number", "integer"} & set(kinds):
        raise ConfigError(f"output.score_column={column!r}: with sampling.json_schema the score is the answer's "
                          f"property {column!r}, which the schema does not give as a number; add \"{column}\": "
                          f"{{\"type\": \"number\"}} (or integer) to its properties, or name one of its numeric "
                          f"properties")


def fingerprint(cfg) -> dict | None:
    """The keys that decide the scores (None when output.score_column is unset, as before they existed): a
    rerun with another judge setting is refused. The pattern counts only where it is used (no schema)."""
    out = cfg.output
    if out.score_column is None:
        return None
    found = {"score_column": out.score_column,
             "score_range": list(out.score_range) if out.score_range is not None else None}
    if not _json_mode(cfg):
        found["score_pattern"] = out.score_pattern
    return found


def _json_mode(cfg) -> bool:
    return cfg.sampling.json_schema is not None or bool(cfg.data.schema_column)


# ------------------------------------------------------------------------------------------ parsing

class Judge:
    """Parses a judge's answer into its score: parse(text) -> (score, None) or (None, why)."""

    def __init__(self, column: str, pattern: str = DEFAULT_PATTERN, bounds=None, json_mode: bool = False):
        self.column, self.pattern, self.json = column, re.compile(pattern), json_mode
        self.bounds = tuple(float(b) for b in bounds) if bounds is not None else None

    def parse(self, text: Any) -> tuple[float | None, str | None]:
        if not isinstance(text, str):
            return None, "the answer is not text"
        if self.json:
            try:
                value = json.loads(text.strip())
            except ValueError as exc:
                return None, f"the answer is not JSON ({exc})"
            if not isinstance(value, dict) or self.column not in value:
                return None, f"the answer has no property {self.column!r}"
            raw = value[self.column]
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                return None, f"the answer's {self.column!r} is {json.dumps(raw)[:80]}, not a number"
            score = float(raw)
        else:
            match = self.pattern.search(text)
            if match is None or match.group(1) is None:
                return None, f"no match of output.score_pattern={self.pattern.pattern!r} in the answer"
            try:
                score = float(match.group(1))
            except ValueError:
                return None, f"output.score_pattern matched {match.group(1)[:80]!r}, not a number"
        if not math.isfinite(score):
            return None, f"the score {score} is not a finite number"
        if self.bounds is not None and not self.bounds[0] <= score <= self.bounds[1]:
            return None, f"the score {score:g} is outside output.score_range=[{self.bounds[0]:g}, {self.bounds[1]:g}]"
        return score, None


def judge_for(cfg) -> Judge | None:
    """The run's judge, or None when output.score_column is unset."""
    out = cfg.output
    if out.score_column is None:
        return None
    return Judge(out.score_column, out.score_pattern, out.score_range, _json_mode(cfg))


class ScoreColumn:
    """The result columns of a judge run: its structured columns (if it has a schema; with output.parse=columns
    the score column takes the place of the property it is read from), the float score column, then `extra`
    (structured.EXTRA_COLUMNS: schema_retries, the re-asks of either kind, and seed, the kept answer's)."""

    def __init__(self, judge: Judge, structured=None, extra=()):
        self.judge, self.structured, self.extra = judge, structured, list(extra)
        own = [f for f in structured.schema_fields() if f not in self.extra] if structured is not None else []
        self.own = [f for f in own if f[0] != judge.column]

    def schema_fields(self) -> list:
        import pyarrow as pa

        return self.own + [(self.judge.column, pa.float64())] + self.extra

    def arrays(self, texts: list, status: list) -> dict:
        import pyarrow as pa

        columns = {}
        if self.structured is not None:
            columns = {k: v for k, v in self.structured.arrays(texts, status).items() if k != self.judge.column}
        scores = [self.judge.parse(text)[0] if state == "ok" else None for text, state in zip(texts, status)]
        columns[self.judge.column] = pa.array(scores, pa.float64())
        return columns
