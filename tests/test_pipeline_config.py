"""Pipeline files (issue 22): loading, the stages' checks before anything is submitted, the columns each
stage produces."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.pipeline_config import load_pipeline, run_columns, stage_columns
from orchestrator.selection import PAIRS_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ("  - name: generate\n"
            "    overrides: [engine=mock, sampling.rollouts=4, sampling.greedy=false, 'data.keep_columns=[prompt]']\n")


@pytest.fixture
def write(tmp_path):
    folder = tmp_path / "a dir with 'quotes'"
    folder.mkdir()

    def write(text: str, name: str = "pipe.yaml") -> Path:
        path = folder / name
        path.write_text(text)
        return path
    return write


def test_the_example_loads(tmp_path):
    pipeline = load_pipeline(ROOT / "examples" / "pipeline_local.yaml", [f"run_dir={tmp_path}/p", "replicas=2"])
    assert [(s.name, s.kind, s.source) for s in pipeline.stages] == [
        ("generate", "run", None), ("keep", "filter", "generate"), ("longest", "best", "generate"),
        ("pairs", "pairs", "generate")]
    generate = pipeline.stage("generate")
    assert generate.config.engine.name == "mock" and generate.config.sampling.rollouts == 4
    assert generate.config.replicas == 2  # a global override reaches every run stage
    assert pipeline.run_dir == f"{tmp_path}/p"
    assert generate.config.run_dir == generate.run_dir == f"{tmp_path}/p/generate"
    assert pipeline.stage("keep").run_dir == f"{tmp_path}/p/keep"
    columns = stage_columns(pipeline)
    assert columns["generate"][:3] == ["id", "rollout", "prompt"]
    assert {"response", "status", "finish_reason", "output_tokens"} <= set(columns["generate"])
    assert columns["keep"] == columns["longest"] == columns["generate"]
    assert columns["pairs"] == list(PAIRS_COLUMNS)


def test_global_overrides_come_after_the_stage_ones(write):
    path = write("stages:\n" + GENERATE)
    pipeline = load_pipeline(path, ["sampling.rollouts=2"])
    assert pipeline.stage("generate").config.sampling.rollouts == 2
    assert pipeline.run_dir == "runs/pipe"  # no run_dir: runs/<the file's stem>
    assert pipeline.stage("generate").config.run_dir == "runs/pipe/generate"


def test_run_columns_follow_the_config():
    from orchestrator.config import compose

    one = run_columns(compose(["engine=mock", "run_dir=x"]))
    assert "rollout" not in one and one[0] == "id" and "token_logprobs" not in one
    more = run_columns(compose(["engine=mock", "run_dir=x", "sampling.rollouts=3", "sampling.greedy=false",
                                "sampling.logprobs=2", "data.keep_columns=[topic]"]))
    assert more[:3] == ["id", "rollout", "topic"]
    assert {"token_logprobs", "top_logprobs"} <= set(more)


@pytest.mark.parametrize("text, words", [
    ("stages: []\n", ["non-empty list"]),
    ("- name: a\n", ["a mapping with one key, stages"]),
    ("stages:\n" + GENERATE + "extra: 1\n", ["unknown top-level key 'extra'"]),
    ("stages:\n" + GENERATE + GENERATE, ["stage 'generate'", "earlier stage too"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: generate\n    filtr: 'a > 1'\n",
     ["stage 'k'", "'filtr' (did you mean 'filter'?)"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: generate\n", ["stage 'k'", "has none of", "exactly one"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: generate\n    filter: 'a > 1'\n    best: {by: a}\n",
     ["filter and best", "exactly one"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: nope\n    filter: 'output_tokens > 1'\n",
     ["from: nope names no stage", "generate"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: later\n    filter: 'output_tokens > 1'\n"
     "  - name: later\n    from: generate\n    best: {by: output_tokens}\n",
     ["stage 'k'", "comes after it", "cannot have a cycle"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: k\n    filter: 'output_tokens > 1'\n",
     ["reads itself", "cannot have a cycle"]),
    ("stages:\n  - name: generate\n    from: x\n    overrides: [engine=mock]\n", ["first stage", "drop `from`"]),
    ("stages:\n" + GENERATE + "  - name: k\n    filter: 'output_tokens > 1'\n", ["stage 'k'", "add from:"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: generate\n    filter: 'output_tokens >'\n",
     ["stage 'k'", "does not parse"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: generate\n    filter: 'open(output_tokens)'\n",
     ["stage 'k'", "Call", "not allowed"]),
    ("stages:\n" + GENERATE + "  - name: k\n    from: generate\n    best: {by: output_tokens, top: 2}\n",
     ["stage 'k'", "no key 'top'"]),
    ("stages:\n  - name: a/b\n    overrides: [engine=mock]\n", ["needs a name", "'a/b'"]),
    ("stages:\n  - name: g\n    overrides: engine=mock\n", ["stage 'g'", "list of KEY=VALUE"]),
    ("stages:\n  - name: g\n    overrides: [engine=mock, run_dir=x]\n", ["stage 'g'", "'run_dir=x'", "run_dir=DIR"]),
    ("stages:\n" + GENERATE + "  - name: j\n    from: generate\n    overrides: [engine=mock, data.input=x.parquet]\n",
     ["stage 'j'", "data.input", "drop data.input"]),
    ("stages:\n  - name: g\n    overrides: [engine=nope]\n", ["stage 'g'", "engine/nope", "mock"]),
    ("stages:\n  - name: g\n    overrides: [engine=mock, sampling.rollouts=4]\n", ["stage 'g'", "sampling.greedy"]),
    ("stages:\n  - name: g\n    overrides: [engine=mock\n", ["not valid YAML", "line"]),
    ("stages:\n" + GENERATE + "  - name: s\n    from: generate\n    overrides: [model=nemotron4_340b_reward, "
     "engine=sglang, model.path=/m]\n", ["stage 's'", "reward model", "only generates", "engine=nemo_reward"]),
])
def test_bad_pipelines_are_refused_naming_the_file_and_the_stage(write, text, words):
    path = write(text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path, [])
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_pipeline(tmp_path / "none.yaml")


def test_a_selection_reading_a_column_its_source_lacks(write):
    path = write("stages:\n" + GENERATE + "  - name: pairs\n    from: generate\n"
                 "    pairs: {by: helpfulness, min_margin: 0.5}\n")
    with pytest.raises(ConfigError, match=r"stage 'pairs' \(from: generate\): reads column 'helpfulness'.*"
                                          r"columns are id, rollout, prompt, response"):
        load_pipeline(path, [])


def test_a_selection_after_pairs_sees_only_the_pairs_columns(write):
    head = "stages:\n" + GENERATE + "  - name: pairs\n    from: generate\n    pairs: {by: output_tokens}\n"
    load_pipeline(write(head + "  - name: wide\n    from: pairs\n    filter: 'chosen_score - rejected_score > 9'\n"))
    with pytest.raises(ConfigError, match="stage 'wide'.*'output_tokens'"):
        load_pipeline(write(head + "  - name: wide\n    from: pairs\n    filter: 'output_tokens > 9'\n"))


def test_a_generation_stage_reading_a_column_upstream_lacks(write):
    stage = ("  - name: judge\n    from: generate\n    overrides: [engine=mock, "
             "'data.prompt_template=\"Rate: {{ question }} {{ response }}\"']\n")
    with pytest.raises(ConfigError, match=r"stage 'judge' \(from: generate\): reads 'question'"):
        load_pipeline(write("stages:\n" + GENERATE + stage))
    ok = stage.replace("question", "prompt")
    pipeline = load_pipeline(write("stages:\n" + GENERATE + ok))
    assert "rollout" not in stage_columns(pipeline)["judge"]  # the judge's own run: one answer per row


def test_a_scoring_stage_writes_its_models_attributes_and_the_columns_it_keeps(write):
    """A scoring run (model.attributes) writes one column per attribute in place of its own response, and keeps
    what data.keep_columns names of its input: a pairs stage reading it needs the response kept."""
    score = ("  - name: score\n    from: generate\n    overrides: [model=nemotron4_340b_reward, engine=mock, "
             "engine.protocol=reward, 'data.keep_columns=[rollout,prompt,response]']\n")
    pairs = "  - name: pairs\n    from: score\n    pairs: {by: helpfulness, min_margin: 0.5}\n"
    pipeline = load_pipeline(write("stages:\n" + GENERATE + score + pairs))
    columns = stage_columns(pipeline)
    assert columns["score"][:4] == ["id", "rollout", "prompt", "response"]
    assert columns["score"][-9:] == ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness",
                                     "coherence", "complexity", "verbosity"]
    assert pipeline.stage("score").scores[4] == "helpfulness"
    unkept = score.replace("rollout,prompt,response", "rollout,prompt")
    with pytest.raises(ConfigError, match="reads column 'response', which its input does not produce"):
        load_pipeline(write("stages:\n" + GENERATE + unkept + pairs))
    with pytest.raises(ConfigError, match="'helpfulness'"):
        load_pipeline(write("stages:\n" + GENERATE + score + pairs.replace("from: score", "from: generate")))
