"""The selection stages without an engine (issue 22): filter, best, pairs on one unit's results."""
from __future__ import annotations

import pyarrow as pa
import pytest

from orchestrator.errors import ConfigError
from orchestrator.selection import (
    PAIRS_COLUMNS,
    Counts,
    apply_filter,
    compile_filter,
    keep_best,
    make_pairs,
    parse_selection,
)


def unit(rows: list[tuple]) -> pa.Table:
    """(id, rollout, response, score, status, finish_reason) rows, as a run with rollouts > 1 writes them."""
    names = ["id", "rollout", "response", "helpfulness", "status", "finish_reason"]
    cols = list(zip(*rows))
    types = [pa.string(), pa.int32(), pa.string(), pa.float64(), pa.string(), pa.string()]
    return pa.table({n: pa.array(list(c), t) for n, c, t in zip(names, cols, types)})


ROWS = [
    ("a", 0, "a0", 1.0, "ok", "stop"),
    ("a", 1, "a1", 4.0, "ok", "stop"),
    ("a", 2, "a2", 4.0, "ok", "length"),
    ("a", 3, "a3", 0.5, "ok", "stop"),
    ("b", 0, "b0", None, "ok", "stop"),
    ("b", 1, "b1", 9.0, "error", None),
    ("b", 2, "b2", 3.0, "ok", "stop"),
    ("b", 3, "b3", 3.2, "ok", "stop"),
    ("c", 0, "c0", 2.0, "ok", "stop"),
    ("c", 1, "c1", 2.0, "ok", "stop"),
    ("c", 2, "c2", 2.0, "ok", "stop"),
    ("c", 3, "c3", float("nan"), "ok", "stop"),
]


# ------------------------------------------------------------------------------------------ filter


def test_filter_keeps_rows_where_the_expression_is_true_and_counts_the_rest():
    kept, counts = apply_filter(unit(ROWS), "helpfulness >= 3.5 and finish_reason == 'stop'")
    assert kept["response"].to_pylist() == ["a1"]
    # b1 (helpfulness 9, but an error upstream) is dropped as failed, not kept; b0's null helpfulness makes
    # the expression null (null and true), dropped and counted as null
    assert counts == Counts(rows_in=12, kept=1, dropped_failed=1, dropped_null=1)


def test_filter_drops_and_counts_rows_where_the_expression_is_null():
    kept, counts = apply_filter(unit(ROWS), "helpfulness > 2")
    assert kept["response"].to_pylist() == ["a1", "a2", "b2", "b3"]
    assert counts.dropped_null == 1  # b0: null helpfulness (c3 is NaN: NaN > 2 is false, not null)
    assert counts.dropped_failed == 1


def test_filter_operators():
    t = unit(ROWS)

    def responses(expr: str) -> list[str]:
        return apply_filter(t, expr)[0]["response"].to_pylist()

    assert responses("rollout in [1, 3] and id not in ('a', 'c')") == ["b3"]
    assert responses("helpfulness is None") == ["b0"]
    assert responses("not (helpfulness is not None) or rollout == 2 and id == 'c'") == ["b0", "c2"]
    assert responses("-helpfulness < -3.9") == ["a1", "a2"]
    assert responses("rollout / 2 == 1.5") == ["a3", "b3", "c3"]  # true division of an integer column
    assert responses("helpfulness * 2 - 1 + 0 >= 7") == ["a1", "a2"]
    assert responses("1 < rollout < 3 and finish_reason != 'length'") == ["b2", "c2"]
    assert responses("True") == [r[2] for r in ROWS if r[4] == "ok"]


def test_null_in_a_list_is_null_not_false():
    t = unit(ROWS)
    _, counts = apply_filter(t, "helpfulness not in [1.0]")
    assert counts.dropped_null == 1  # b0's null is neither in nor out


@pytest.mark.parametrize("expr, words", [
    ("__import__('os').system('true')", ["Call", "column 1", "allowed"]),
    ("helpfulness >= 3.5 and", ["does not parse", "helpfulness >= 3.5 and"]),
    ("x.y > 1", ["Attribute"]),
    ("a[0] == 1", ["Subscript"]),
    ("a ** 2 > 1", ["operator"]),
    ("a == None", ["is None"]),
    ("a is 3", ["only with None"]),
    ("a in b", ["list of constants"]),
    ("a in [b]", ["not a constant"]),
    ("lambda: 1", ["Lambda"]),
    ("", ["not an expression"]),
])
def test_a_disallowed_construct_is_refused_naming_the_expression(expr, words):
    with pytest.raises(ConfigError) as err:
        compile_filter(expr)
    message = str(err.value)
    assert repr(expr) in message
    for word in words:
        assert word in message


def test_an_unknown_name_lists_the_columns():
    with pytest.raises(ConfigError, match=r"'helpfulnes'.*columns are id, rollout, response, helpfulness"):
        apply_filter(unit(ROWS), "helpfulnes > 1")


def test_a_type_mismatch_is_a_config_error_with_the_types():
    with pytest.raises(ConfigError, match=r"helpfulness: double"):
        apply_filter(unit(ROWS), "helpfulness > 'high'")
    with pytest.raises(ConfigError, match="not true/false"):
        apply_filter(unit(ROWS), "helpfulness + 1")


def test_filter_of_an_empty_unit():
    kept, counts = apply_filter(unit(ROWS).slice(0, 0), "helpfulness > 1")
    assert kept.num_rows == 0 and counts == Counts()


# ------------------------------------------------------------------------------------------ best


def test_best_keeps_the_top_k_of_each_prompt_in_input_order():
    kept, counts = keep_best(unit(ROWS), "helpfulness", k=1)
    # a: 4.0 twice, the lowest rollout wins; b: b1 failed, b0 null, b3 best; c: ties, c3 is NaN
    assert kept["response"].to_pylist() == ["a1", "b3", "c0"]
    assert kept.column_names == unit(ROWS).column_names
    assert counts == Counts(rows_in=12, kept=3, dropped_failed=1, dropped_null=2)


def test_best_k_and_order_min():
    assert keep_best(unit(ROWS), "helpfulness", k=2)[0]["response"].to_pylist() == ["a1", "a2", "b2", "b3",
                                                                                    "c0", "c1"]
    assert keep_best(unit(ROWS), "helpfulness", k=1, order="min")[0]["response"].to_pylist() == ["a3", "b2", "c0"]


def test_best_without_rollouts_and_integer_ids():
    t = pa.table({"id": [3, 1, 3, 2], "response": ["x", "y", "z", "w"], "output_tokens": [5, 7, 9, 1]})
    kept, counts = keep_best(t, "output_tokens")
    assert kept["response"].to_pylist() == ["y", "z", "w"]  # one per id, the input's order kept
    assert counts == Counts(rows_in=4, kept=3)


def test_best_refuses_a_text_score():
    with pytest.raises(ConfigError, match="not a number"):
        keep_best(unit(ROWS), "response")


# ------------------------------------------------------------------------------------------ pairs


def test_pairs_chosen_highest_rejected_lowest():
    out, counts = make_pairs(unit(ROWS), "helpfulness", min_margin=0.0)
    assert out.column_names == list(PAIRS_COLUMNS)
    assert out.to_pylist() == [
        {"id": "a", "prompt": None, "chosen": "a1", "rejected": "a3", "chosen_score": 4.0, "rejected_score": 0.5},
        {"id": "b", "prompt": None, "chosen": "b3", "rejected": "b2", "chosen_score": 3.2, "rejected_score": 3.0},
        # all equal: chosen the lowest rollout, rejected the next one, never the same answer
        {"id": "c", "prompt": None, "chosen": "c0", "rejected": "c1", "chosen_score": 2.0, "rejected_score": 2.0},
    ]
    assert counts == Counts(rows_in=12, kept=3, dropped_failed=1, dropped_null=2)


def test_pairs_min_margin_and_prompt_column():
    t = unit(ROWS).append_column("prompt", pa.array([r[0].upper() for r in ROWS]))
    out, counts = make_pairs(t, "helpfulness", min_margin=0.5)
    assert out["id"].to_pylist() == ["a"]  # b's margin is 0.2, c's 0
    assert out["prompt"].to_pylist() == ["A"]
    assert counts.kept == 1


def test_pairs_needs_two_answers():
    t = unit([("a", 0, "x", 1.0, "ok", "stop"), ("a", 1, "y", 5.0, "error", None),
              ("b", 0, "p", 1.0, "ok", "stop"), ("b", 1, "q", 2.0, "ok", "stop")])
    out, counts = make_pairs(t, "helpfulness")
    assert out["id"].to_pylist() == ["b"]
    assert counts == Counts(rows_in=4, kept=1, dropped_failed=1)


def test_pairs_without_a_response_column():
    with pytest.raises(ConfigError, match="'response'"):
        make_pairs(unit(ROWS).drop_columns(["response"]), "helpfulness")


def test_counts_add():
    assert sum([Counts(3, 1, 1, 0), Counts(2, 2, 0, 1)], start=Counts()) == Counts(5, 3, 1, 1)


# ------------------------------------------------------------------------------------------ specs and columns


def test_parse_selection_and_its_columns():
    best = parse_selection("best", {"by": "helpfulness", "k": 2})
    assert (best.by, best.k, best.order) == ("helpfulness", 2, "max")
    assert best.columns(["id", "response", "helpfulness"]) == ["id", "response", "helpfulness"]
    pairs = parse_selection("pairs", {"by": "helpfulness", "min_margin": 0.5})
    assert pairs.columns(["id"]) == list(PAIRS_COLUMNS)
    flt = parse_selection("filter", "helpfulness >= 3.5 and finish_reason == 'stop'")
    assert set(flt.reads) == {"helpfulness", "finish_reason"}
    kept, _ = flt.apply(unit(ROWS))
    assert kept["response"].to_pylist() == ["a1"]


@pytest.mark.parametrize("kind, spec, words", [
    ("best", {"by": "x", "top": 1}, ["no key 'top'", "by: COLUMN, k: 1, order: max"]),
    ("best", {"k": 1}, ["by: COLUMN"]),
    ("best", {"by": "x", "k": 0}, ["best.k=0"]),
    ("best", {"by": "x", "order": "high"}, ["best.order='high'"]),
    ("pairs", {"by": "x", "min_margin": -1}, ["min_margin=-1"]),
    ("pairs", "x", ["must be a mapping"]),
    ("filter", "x >", ["does not parse"]),
])
def test_parse_selection_refuses_bad_specs(kind, spec, words):
    with pytest.raises(ConfigError) as err:
        parse_selection(kind, spec, where="p.yaml, stage 'keep'")
    assert str(err.value).startswith("p.yaml, stage 'keep'")
    for word in words:
        assert word in str(err.value)


def test_check_columns_before_submission():
    pairs = parse_selection("pairs", {"by": "helpfulness"})
    pairs.check_columns(["id", "response", "helpfulness"])
    with pytest.raises(ConfigError, match=r"stage 'pairs': reads column 'helpfulness'.*columns are id, response"):
        pairs.check_columns(["id", "response"], where="stage 'pairs'")
    flt = parse_selection("filter", "quality > 1 or output_tokens < 3")
    with pytest.raises(ConfigError, match="column 'quality'"):
        flt.check_columns(["id", "output_tokens"])


def test_a_unit_read_in_several_chunks_gives_the_same_answers():
    t = unit(ROWS)
    chunked = pa.concat_tables([t.slice(0, 3), t.slice(3, 6), t.slice(9)])
    assert chunked["id"].num_chunks == 3
    assert make_pairs(chunked, "helpfulness")[0].equals(make_pairs(t, "helpfulness")[0])
    assert keep_best(chunked, "helpfulness", k=2)[0].to_pylist() == keep_best(t, "helpfulness", k=2)[0].to_pylist()
    assert apply_filter(chunked, "rollout > 1")[1] == apply_filter(t, "rollout > 1")[1]
