"""LLM-as-judge (orchestrator/judge.py, docs/output.md "Scores from a judge"): a generation run whose answers
are parsed into a float score column (output.score_column), by output.score_pattern (MT-Bench's
"Rating: [[N]]") or from a JSON answer's property; out of output.score_range or no score: asked again with a new
seed, then the row's error UnparsedScore; bad keys refused before submission; the score keys in the
fingerprint; a pipeline ranking by the score (examples/pipeline_judge.yaml)."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.frontend import run
from orchestrator.judge import DEFAULT_PATTERN, Judge
from orchestrator.pipeline import run_pipeline
from orchestrator.pipeline_config import load_pipeline, run_columns
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import EngineSettings
from orchestrator.structured import RESEED
from tests.conftest import write_prompts

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pipeline_judge.yaml"
JUDGE_TEMPLATE = "data.prompt_template='Rate the answer by \"[[rating]]\": {{ prompt }}'"
RATING = re.compile(r"Rating: \[\[(\d+)\]\]")  # what the embedded engine's judge writes (simulator/model.py)


# ------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, expected", [
    ("Short and right. Rating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [[10]] (and later [[2]])", 10.0),  # the first match, as MT-Bench reads it
    ("Rating: [[9.]]", 9.0),
])
def test_the_default_pattern_is_mt_benchs_and_reads_the_first_rating(text, expected):
    assert DEFAULT_PATTERN == compose([]).output.score_pattern == r"\[\[(\d+\.?\d*)\]\]"  # FastChat's
    assert Judge("rating").parse(text) == (expected, None)


@pytest.mark.parametrize("judge, text, why", [
    (Judge("rating"), "Rating: 7", "no match of output.score_pattern"),
    (Judge("rating"), None, "not text"),
    (Judge("rating", bounds=[1, 10]), "Rating: [[11]]", "the score 11 is outside output.score_range=[1, 10]"),
    (Judge("rating", r"Score: (\S+)"), "Score: seven", "matched 'seven', not a number"),
    (Judge("rating", r"Score: (\S+)"), "Score: nan", "not a finite number"),
    (Judge("rating", json_mode=True), "Rating: [[7]]", "not JSON"),
    (Judge("rating", json_mode=True), '{"score": 7}', "no property 'rating'"),
    (Judge("rating", json_mode=True), '{"rating": true}', "'rating' is true, not a number"),
    (Judge("rating", json_mode=True, bounds=[0, 1]), '{"rating": 3}', "outside output.score_range"),
])
def test_an_answer_without_a_usable_score_says_why(judge, text, why):
    score, problem = judge.parse(text)
    assert score is None and why in problem


def test_a_custom_pattern_a_range_and_a_json_property_give_the_score():
    assert Judge("s", r"Score:\s*(-?\d+)/10", bounds=[-5, 10]).parse("Score: -3/10") == (-3.0, None)
    assert Judge("rating", json_mode=True, bounds=[1, 10]).parse(' {"rating": 4, "reason": "ok"}\n') == (4.0, None)


# ------------------------------------------------------------------------------------ config, before submission

@pytest.mark.parametrize("overrides, message", [
    (["output.score_column=rating", r"output.score_pattern='Rating: (\d+'"],
     r"output.score_pattern='Rating: (\\d+' is not a regular expression (missing ), unterminated subpattern"),
    (["output.score_column=rating", r"output.score_pattern='Rating: \d+'"], "has 0 groups; give exactly one"),
    (["output.score_column=rating", r"output.score_pattern='(\w+): (\d+)'"], "has 2 groups; give exactly one"),
    (["output.score_column=rating", "output.score_range=[10,1]"], "output.score_range=[10.0, 1.0]: lo is above hi"),
    (["output.score_column=rating", "output.score_range=[1]"], "give [lo, hi], two numbers"),
    (["output.score_range=[1,10]"], "without output.score_column: set output.score_column"),
    (["output.score_column='my rating'"], "output.score_column='my rating': name the score column"),
    (["output.score_column=status"], "output.score_column='status' is a result column already"),
    (["output.score_column=rating", "sampling.json_schema={type: object, properties: {score: {type: integer}}}"],
     "the schema does not give as a number; add \"rating\""),
    (["model=nemotron4_340b_reward", "engine=nemo_reward", "output.score_column=rating"],
     "a reward model writes its own score columns"),
])
def test_bad_score_keys_are_refused_naming_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value)


def test_the_score_column_is_a_run_column_so_a_later_stage_may_rank_by_it(tmp_path):
    cfg = compose(["output.score_column=rating", "sampling.json_schema={type: object, properties: {rating: "
                   "{type: integer}, reason: {type: string}}}", "output.parse=columns", "run_dir=x"])
    columns = run_columns(cfg)
    assert columns.count("rating") == 1 and "reason" in columns  # the property's column is the float score
    stages = tmp_path / "p.yaml"
    stages.write_text("stages:\n  - {name: g, overrides: [engine=mock]}\n"
                      "  - {name: j, from: g, overrides: [engine=mock, \"data.prompt_template='{{ response }}'\"]}\n"
                      "  - {name: b, from: j, best: {by: rating, k: 1}}\n"
                      "  - {name: f, from: j, filter: 'rating >= 7'}\n  - {name: p, from: j, pairs: {by: rating}}\n")
    with pytest.raises(ConfigError, match="rating"):  # no output.score_column: refused before anything runs
        load_pipeline(stages)
    stages.write_text(stages.read_text().replace("engine=mock, \"data", "engine=mock, output.score_column=rating, "
                                                                        "\"data"))
    assert load_pipeline(stages, [f"run_dir={tmp_path / 'p'}"]).stage("b").spec is not None


# ------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def engine_url():
    with EngineThread(EngineSettings()) as engine:
        yield engine.url


def judge_run(tmp_path, url, *overrides, name="run", rows=30):
    src = tmp_path / "in.parquet"
    if not src.exists():
        write_prompts(src, rows)
    run(compose(["engine=endpoint", f"engine.url={url}", "engine.protocol=nemo", f"data.input={src}",
                 f"run_dir={tmp_path / name}", "data.unit_rows=10", JUDGE_TEMPLATE, "output.score_column=rating",
                 "client.max_error_fraction=1.0", *overrides]), show_progress=False)
    return pd.read_parquet(tmp_path / name / "results").sort_values("id").reset_index(drop=True)


def test_answers_out_of_range_are_asked_again_with_new_seeds_then_are_unparsed_score(tmp_path, engine_url):
    df = judge_run(tmp_path, engine_url, "output.score_range=[8,10]", "client.invalid_retries=3")
    ok, failed = df[df.status == "ok"], df[df.status == "error"]
    assert len(ok) and len(failed) and (ok.schema_retries > 0).any()
    for row in ok.itertuples():  # the score is the kept answer's, in range, asked with RESEED per re-ask
        assert row.rating == float(RATING.search(row.response).group(1)) and 8 <= row.rating <= 10
        assert (0 if pd.isna(row.seed) else row.seed) == RESEED * row.schema_retries
    assert (failed.schema_retries == 3).all() and failed.rating.isna().all()
    assert failed.error.str.match(r"UnparsedScore: the score \d+ is outside output\.score_range=\[8, 10\]").all()
    # the engine's fault: a rerun with retry_failed=true and more re-asks recovers rows, keeping the ok ones
    again = judge_run(tmp_path, engine_url, "output.score_range=[8,10]", "client.invalid_retries=12",
                      "retry_failed=true")
    assert (again.status == "error").sum() < len(failed)
    assert list(again.response[df.status == "ok"]) == list(ok.response)


def test_an_answer_without_a_rating_is_re_asked_then_the_rows_error(tmp_path, engine_url):
    # 3 tokens leave the rating out of every judgement: each row is asked again twice, then fails
    df = judge_run(tmp_path, engine_url, "sampling.tokens_to_generate=3", rows=10)
    assert (df.status == "error").all() and (df.schema_retries == 2).all()
    assert df.error.str.startswith("UnparsedScore: no match of output.score_pattern=").all()


def test_a_json_judge_takes_the_score_from_the_answers_property(tmp_path, engine_url):
    schema = "sampling.json_schema={type: object, properties: {rating: {type: integer, minimum: 1, maximum: 10}, " \
             "reason: {type: string}}, required: [rating, reason]}"
    df = judge_run(tmp_path, engine_url, "engine.protocol=openai", schema, "output.parse=columns",
                   "output.score_range=[1,5]", "client.invalid_retries=6", rows=20)
    assert str(df.rating.dtype) == "float64" and "reason" in df.columns
    ok = df[df.status == "ok"]
    assert len(ok) and (ok.schema_retries > 0).any()  # ratings above 5 were asked again
    assert list(ok.rating) == [float(json.loads(text)["rating"]) for text in ok.response]
    assert ok.rating.between(1, 5).all()


def test_a_rerun_with_other_score_settings_is_refused(tmp_path, engine_url):
    judge_run(tmp_path, engine_url, rows=10)
    with pytest.raises(OrchestratorError, match="score_range"):
        judge_run(tmp_path, engine_url, "output.score_range=[1,10]", rows=10)
    with pytest.raises(OrchestratorError, match="score_pattern"):
        judge_run(tmp_path, engine_url, r"output.score_pattern='Rating: (\d+)'", rows=10)
    with pytest.raises(OrchestratorError, match="judge"):
        judge_run(tmp_path, engine_url, "output.score_column=null", rows=10)


# ------------------------------------------------------------------------------------ the example pipeline

def test_the_judge_example_scores_each_answer_and_best_keeps_each_prompts_highest(tmp_path):
    funnel = run_pipeline(load_pipeline(EXAMPLE, [f"run_dir={tmp_path / 'p'}", "data.unit_rows=40"]),
                          show_progress=False)
    gen = pd.read_parquet(tmp_path / "p" / "generate" / "results")
    judged = pd.read_parquet(tmp_path / "p" / "judge" / "results")
    best = pd.read_parquet(tmp_path / "p" / "best" / "results")
    assert funnel["judge"]["ok"] == len(judged) == len(gen) == 160
    assert sorted(zip(judged.id, judged.rollout)) == sorted(zip(gen.id, gen.rollout))
    assert list(judged.rating) == [float(RATING.search(text).group(1)) for text in judged.response]
    assert judged.rating.between(1, 10).all() and judged.rating.nunique() > 3
    assert len(best) == best.id.nunique() == gen.id.nunique()
    top = judged.groupby("id").rating.max()
    assert all(row.rating == top[row.id] for row in best.itertuples())
