"""Selection stages without an engine (a pipeline's `filter`, `best` and `pairs`, issue 22), applied to one
committed unit's results at a time: every rollout of an id is in one unit, so memory stays bounded by a unit.

- `filter`: keep the rows where an expression over the columns is true, e.g.
  `helpfulness >= 3.5 and finish_reason == 'stop'` (parsed with `ast`, never evaluated by Python);
- `best`: keep the best k answers of each prompt (`id`) by a score column;
- `pairs`: one preference pair per prompt, its highest- and lowest-scored answers, when far enough apart.

A row that failed upstream (`status` other than "ok", where the table has a status column) is never used,
nor is a row whose score is null (or NaN); each stage returns the kept table and the `Counts` of what it
dropped and why.
"""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError

KINDS = ("filter", "best", "pairs")
PAIRS_COLUMNS = ("id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score")


@dataclass(frozen=True)
class Counts:
    """What one stage did to one unit (they add: `sum(counts, start=Counts())`). `kept` is the rows written:
    for `pairs`, the pairs. `dropped_failed`: rows whose status was not "ok"; `dropped_null`: rows whose
    score (or, for a filter, whose expression) was null."""
    rows_in: int = 0
    kept: int = 0
    dropped_failed: int = 0
    dropped_null: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


# ------------------------------------------------------------------------------------------ filter expressions

_COMPARE = {ast.Eq: pc.equal, ast.NotEq: pc.not_equal, ast.Lt: pc.less, ast.LtE: pc.less_equal,
            ast.Gt: pc.greater, ast.GtE: pc.greater_equal}
_ARITHMETIC = {ast.Add: pc.add_checked, ast.Sub: pc.subtract_checked, ast.Mult: pc.multiply_checked}
_ALLOWED = ("column names, numbers, strings, True/False/None, comparisons (== != < <= > >=), `in`/`not in` a "
            "list of constants, `is None`/`is not None`, and/or/not, unary minus and + - * /")


@dataclass(frozen=True)
class Filter:
    """A parsed filter expression: its text, the columns it names, and the pyarrow expression it becomes."""
    text: str
    names: tuple[str, ...]
    expression: Any  # pyarrow.compute.Expression


def _refuse(text: str, node: ast.AST, what: str) -> ConfigError:
    where = f" at column {node.col_offset + 1}" if hasattr(node, "col_offset") else ""
    return ConfigError(f"filter {text!r}: {what}{where}; a filter may use only {_ALLOWED}, "
                       f"e.g. \"helpfulness >= 3.5 and finish_reason == 'stop'\"")


class _Translator:
    def __init__(self, text: str):
        self.text = text
        self.names: dict[str, None] = {}

    def constant(self, node: ast.AST) -> Any:
        """A constant value (a negative number included), or raise."""
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
                and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
            return -node.operand.value
        raise _refuse(self.text, node, f"{ast.unparse(node)!r} is not a constant (a number, a string, "
                                       f"True/False/None)")

    def __call__(self, node: ast.AST):
        if isinstance(node, ast.Name):
            self.names.setdefault(node.id, None)
            return pc.field(node.id)
        if isinstance(node, ast.Constant):
            value = self.constant(node)
            if value is None:
                raise _refuse(self.text, node, "None may appear only as `COLUMN is None` or `COLUMN is not None`")
            return pc.scalar(value)
        if isinstance(node, ast.BoolOp):
            parts = [self(v) for v in node.values]
            out = parts[0]
            for part in parts[1:]:
                out = out & part if isinstance(node.op, ast.And) else out | part  # Kleene: null and False is False
            return out
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return ~self(node.operand)
            if isinstance(node.op, ast.USub):
                return pc.negate_checked(self(node.operand))
            raise _refuse(self.text, node, f"the operator in {ast.unparse(node)!r} is not allowed")
        if isinstance(node, ast.BinOp):
            left, right = self(node.left), self(node.right)
            if isinstance(node.op, ast.Div):  # true division, as in Python, also of two integer columns
                return pc.divide(left.cast(pa.float64()), right.cast(pa.float64()))
            if type(node.op) in _ARITHMETIC:
                return _ARITHMETIC[type(node.op)](left, right)
            raise _refuse(self.text, node, f"the operator in {ast.unparse(node)!r} is not allowed (only + - * /)")
        if isinstance(node, ast.Compare):
            out, left = None, node.left
            for op, right in zip(node.ops, node.comparators):  # a < b < c is a < b and b < c
                part = self.compare(left, op, right)
                out = part if out is None else out & part
                left = right
            return out
        raise _refuse(self.text, node, f"{ast.unparse(node)!r} ({type(node).__name__}) is not allowed")

    def compare(self, left: ast.AST, op: ast.cmpop, right: ast.AST):
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(right, ast.Constant) and right.value is None):
                raise _refuse(self.text, right, "`is` and `is not` compare only with None (use == and != for values)")
            value = self(left)
            return value.is_null() if isinstance(op, ast.Is) else value.is_valid()
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, (ast.List, ast.Tuple)):
                raise _refuse(self.text, right, "`in` and `not in` need a list of constants, e.g. x in ['a', 'b']")
            values = [self.constant(v) for v in right.elts]
            if any(v is None for v in values):
                raise _refuse(self.text, right, "None cannot be in the list (use `COLUMN is None`)")
            value = self(left)
            found = value.isin(pa.array(values)) if values else pc.scalar(False)
            if isinstance(op, ast.NotIn):
                found = ~found
            # as in SQL, `null in [...]` is null, not false: the row is dropped and counted as null
            return pc.if_else(value.is_null(), pa.scalar(None, pa.bool_()), found)
        for side in (left, right):
            if isinstance(side, ast.Constant) and side.value is None:
                raise _refuse(self.text, side, "a comparison with None is always null; write `COLUMN is None` "
                                               "or `COLUMN is not None`")
        return _COMPARE[type(op)](self(left), self(right))


def compile_filter(text: Any) -> Filter:
    """Parse a filter expression; a syntax error or a construct outside the allowed ones is a ConfigError that
    names the expression, the problem and where it is."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"filter {text!r} is not an expression; write one as text over the columns, e.g. "
                          f"\"helpfulness >= 3.5 and finish_reason == 'stop'\"")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"filter {text!r} does not parse: {exc.msg} at column {exc.offset}; write a Python-style "
                          f"expression using only {_ALLOWED}") from None
    translate = _Translator(text)
    expression = translate(tree.body)
    return Filter(text, tuple(translate.names), expression)


# ------------------------------------------------------------------------------------------ the stages

def _usable(table: pa.Table, score: str | None = None) -> tuple[pa.Table, int, int]:
    """The rows that did not fail upstream and (with `score`) have a score: (rows, failed, null)."""
    failed = null = 0
    if "status" in table.column_names:
        ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
        failed = table.num_rows - pc.sum(ok).as_py() if table.num_rows else 0
        table = table.filter(ok)
    if score is not None:
        values = table[score]
        valid = pc.is_valid(values)
        if pa.types.is_floating(values.type):
            valid = pc.and_(valid, pc.invert(pc.is_nan(values)))
        valid = pc.fill_null(valid, False)
        null = table.num_rows - (pc.sum(valid).as_py() or 0) if table.num_rows else 0
        table = table.filter(valid)
    return table, failed, null


def _check_present(table: pa.Table, names, what: str) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ConfigError(f"{what} reads {_listed(missing)}, which the input does not have; its columns are "
                          f"{', '.join(table.column_names)}; name one of those")


def _listed(names) -> str:
    names = list(names)
    return ("column " if len(names) == 1 else "columns ") + ", ".join(repr(n) for n in names)


def apply_filter(table: pa.Table, expression: str | Filter) -> tuple[pa.Table, Counts]:
    """The rows where the expression is true; rows where it is null are dropped and counted as null."""
    flt = expression if isinstance(expression, Filter) else compile_filter(expression)
    _check_present(table, flt.names, f"filter {flt.text!r}")
    rows_in = table.num_rows
    usable, failed, _ = _usable(table)
    import pyarrow.dataset as ds

    try:
        mask = ds.dataset(usable).to_table(columns={"keep": flt.expression})["keep"] if usable.num_rows else None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        types = ", ".join(f"{n}: {usable.schema.field(n).type}" for n in flt.names)
        raise ConfigError(f"filter {flt.text!r} cannot be evaluated on these columns ({types}): {exc}; compare "
                          f"each column with a value of its type (numbers with numbers, text with 'quoted text')"
                          ) from None
    if mask is None:
        return usable, Counts(rows_in, 0, failed, 0)
    if not pa.types.is_boolean(mask.type):
        raise ConfigError(f"filter {flt.text!r} gives {mask.type} values, not true/false; compare it, "
                          f"e.g. {flt.text} > 0")
    kept = usable.filter(mask)  # a null mask value drops the row
    return kept, Counts(rows_in, kept.num_rows, failed, mask.null_count)


def _check_score(table: pa.Table, by: str, stage: str) -> None:
    _check_present(table, ["id", by], f"{stage} (by: {by})")
    kind = table.schema.field(by).type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
        raise ConfigError(f"{stage} (by: {by}): column {by!r} has type {kind}, not a number; score by a numeric "
                          f"column (a score model's attribute, output_tokens, ...)")


def _ranked(table: pa.Table, by: str, order: str) -> tuple[pa.Table, "Any"]:
    """The rows sorted by id, then score (best first), then rollout and row (ties: the lowest rollout first),
    and each row's position in its id's group."""
    import numpy as np

    keys = [("id", "ascending"), (by, "descending" if order == "max" else "ascending")]
    table = table.append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    keys += [("rollout", "ascending")] if "rollout" in table.column_names else []
    table = table.take(pc.sort_indices(table, sort_keys=keys + [("__row", "ascending")]))
    ids = table["id"].combine_chunks()
    starts = np.zeros(table.num_rows, dtype=bool)
    if table.num_rows:
        starts[0] = True
        starts[1:] = pc.fill_null(pc.not_equal(ids[1:], ids[:-1]), True).to_numpy(zero_copy_only=False)
    first = np.maximum.accumulate(np.where(starts, np.arange(table.num_rows), 0))
    return table, np.arange(table.num_rows) - first


def keep_best(table: pa.Table, by: str, k: int = 1, order: str = "max") -> tuple[pa.Table, Counts]:
    """The best k answers of each id by column `by` (order: max keeps the highest), in their input order, with
    the input's columns; ties go to the lowest rollout."""
    _check_score(table, by, "best")
    rows_in = table.num_rows
    usable, failed, null = _usable(table, by)
    ranked, position = _ranked(usable, by, order)
    kept = ranked.filter(pa.array(position < k))
    kept = kept.take(pc.sort_indices(kept["__row"])).drop_columns(["__row"])
    return kept, Counts(rows_in, kept.num_rows, failed, null)


def make_pairs(table: pa.Table, by: str, min_margin: float = 0.0) -> tuple[pa.Table, Counts]:
    """One preference pair per id with two answers at least: chosen is the answer with the highest `by`,
    rejected the one with the lowest (ties: the lowest rollout; when every score is equal, the two lowest
    rollouts), kept when chosen_score - rejected_score >= min_margin. Columns: id, prompt, chosen,
    rejected, chosen_score, rejected_score; chosen/rejected are the `response` column's text, and `prompt`
    is the input's `prompt` column where it has one (a run keeps it with data.keep_columns=[prompt]),
    otherwise null."""
    import numpy as np

    _check_score(table, by, "pairs")
    _check_present(table, ["response"], f"pairs (by: {by})")
    rows_in = table.num_rows
    usable, failed, null = _usable(table, by)
    best, best_pos = _ranked(usable, by, "max")
    worst, worst_pos = _ranked(usable, by, "min")
    chosen = best.filter(pa.array(best_pos == 0))
    # per id, the lowest-scored row unless that is the chosen one (all scores equal): then the next
    first, second = worst.filter(pa.array(worst_pos == 0)), worst.filter(pa.array(worst_pos == 1))
    # both are sorted by id; a group of one row has no second row, and no pair
    sizes = np.diff(np.append(np.flatnonzero(worst_pos == 0), worst.num_rows))
    many = sizes >= 2
    chosen, first = chosen.filter(pa.array(many)), first.filter(pa.array(many))
    same = pc.equal(chosen["__row"], first["__row"]).to_numpy(zero_copy_only=False)
    rows = np.arange(first.num_rows)
    # second is aligned with first (one row per id of two answers or more); take it where first is chosen
    rejected = pa.concat_tables([first, second]).take(pa.array(np.where(same, first.num_rows + rows, rows)))
    chosen_score = pc.cast(chosen[by], pa.float64())
    rejected_score = pc.cast(rejected[by], pa.float64())
    far = pc.greater_equal(pc.subtract(chosen_score, rejected_score), float(min_margin))
    prompt = chosen["prompt"] if "prompt" in chosen.column_names else pa.nulls(chosen.num_rows, pa.string())
    out = pa.table({"id": chosen["id"], "prompt": prompt, "chosen": chosen["response"],
                    "rejected": rejected["response"], "chosen_score": chosen_score,
                    "rejected_score": rejected_score}).filter(far)
    out = out.take(pc.sort_indices(chosen.filter(far)["__row"]))  # the ids in their input order
    return out, Counts(rows_in, out.num_rows, failed, null)


# ------------------------------------------------------------------------------------------ specs and columns

@dataclass(frozen=True)
class Selection:
    """A selection stage's parsed spec: kind (filter, best, pairs) and its settings."""
    kind: str
    filter: Filter | None = None
    by: str | None = None
    k: int = 1
    order: str = "max"
    min_margin: float = 0.0

    @property
    def reads(self) -> tuple[str, ...]:
        """The input columns it needs (status is used where present, never required)."""
        if self.kind == "filter":
            return self.filter.names
        return ("id", self.by) + (("response",) if self.kind == "pairs" else ())

    def columns(self, input_columns) -> list[str]:
        """The columns it writes, given its input's."""
        return list(PAIRS_COLUMNS) if self.kind == "pairs" else list(input_columns)

    def check_columns(self, available, where: str = "") -> None:
        """Refuse, before anything runs, a stage reading a column the stage before it does not produce."""
        missing = [n for n in self.reads if n not in set(available)]
        if missing:
            raise ConfigError(f"{where or self.kind}: reads {_listed(missing)}, which its input does not produce; "
                              f"the input's columns are {', '.join(available)}; read one of those, or make the "
                              f"stage before produce it (a score model's attributes, data.keep_columns)")

    def apply(self, table: pa.Table) -> tuple[pa.Table, Counts]:
        if self.kind == "filter":
            return apply_filter(table, self.filter)
        if self.kind == "best":
            return keep_best(table, self.by, self.k, self.order)
        return make_pairs(table, self.by, self.min_margin)


_SETTINGS = {"best": {"by": None, "k": 1, "order": "max"}, "pairs": {"by": None, "min_margin": 0.0}}


def parse_selection(kind: str, spec: Any, where: str = "") -> Selection:
    """A stage's `filter: EXPR`, `best: {by, k, order}` or `pairs: {by, min_margin}`, checked; `where`
    prefixes the messages (the file and the stage)."""
    where = where or kind
    if kind == "filter":
        try:
            return Selection("filter", filter=compile_filter(spec))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if kind not in _SETTINGS:
        raise ConfigError(f"{where}: unknown selection {kind!r}; the selections are {', '.join(KINDS)}")
    defaults = _SETTINGS[kind]
    usage = ", ".join(f"{k}: {'COLUMN' if v is None else v}" for k, v in defaults.items())
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {kind} must be a mapping {{{usage}}}, not {spec!r}")
    unknown = [k for k in spec if k not in defaults]
    if unknown:
        raise ConfigError(f"{where}: {kind} has no key {', '.join(map(repr, unknown))}; its keys are {usage} "
                          f"(by is required, the others show their defaults)")
    by = spec.get("by")
    if not isinstance(by, str) or not by:
        raise ConfigError(f"{where}: {kind} needs `by: COLUMN`, the score column to rank answers by")
    if kind == "best":
        k, order = spec.get("k", 1), spec.get("order", "max")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"{where}: best.k={k!r} must be a whole number >= 1 (answers kept per prompt)")
        if order not in ("max", "min"):
            raise ConfigError(f"{where}: best.order={order!r} must be max (keep the highest scores) or min")
        return Selection("best", by=by, k=k, order=order)
    margin = spec.get("min_margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise ConfigError(f"{where}: pairs.min_margin={margin!r} must be a number >= 0 (the least "
                          f"chosen_score - rejected_score of a pair)")
    return Selection("pairs", by=by, min_margin=float(margin))
