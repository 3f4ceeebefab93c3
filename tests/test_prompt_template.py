"""Prompts from input columns (issue 21): data.prompt_template (a sandboxed Jinja2 template) and
data.system_column. The rendered prompt reaches the engine (the embedded engine's NeMo route echoes it with
model.prompt.strip_echo=false; the chat API is checked with a recording server), a template naming a column
the input lacks, a syntax error or a conversation column is refused before submission, a row the template
cannot render is that row's error, and both keys are part of what a resumed run_dir must match."""
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError, InputError
from orchestrator.frontend import run
from orchestrator.preflight import prepare
from orchestrator.reader import read_unit
from tests.test_client import results
from tests.test_conversations import Recorder, run_against

JUDGE = "Question: {{ question }}\nAnswer: {{ answer }}\nScore it 1-10."
QUESTIONS = ["What is 2 + 2?", "Name the capital of France.", "Who wrote Hamlet?"]
ANSWERS = ["4", "Paris", "Shakespeare"]


def template(text: str) -> str:
    """data.prompt_template=<text> as a Hydra override (quoted: braces are Hydra syntax)."""
    return "data.prompt_template='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def judge_rows(path: Path, **extra) -> Path:
    n = len(QUESTIONS)
    columns = {"id": [f"j{i}" for i in range(n)], "question": QUESTIONS, "answer": ANSWERS,
               "category": ["math", "geography", "literature"], **extra}
    pq.write_table(pa.table(columns), path)
    return path


def local_run(tmp_path: Path, name: str, src: Path, *overrides: str):
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / name}", "sampling.tokens_to_generate=8", *overrides])
    summary = run(cfg, show_progress=False)
    return summary, pd.read_parquet(tmp_path / name / "results").set_index("id").sort_index()


def rendered(i: int) -> str:
    return f"Question: {QUESTIONS[i]}\nAnswer: {ANSWERS[i]}\nScore it 1-10."


@pytest.fixture
def recorder():
    with Recorder() as r:
        yield r


# ---------------------------------------------------------------- the prompt the engine gets

def test_a_judge_template_sends_the_rendered_text_and_keeps_columns(tmp_path):
    src = judge_rows(tmp_path / "in.parquet")  # no prompt column: the template replaces data.prompt_column
    summary, df = local_run(tmp_path, "echo", src, template(JUDGE), "model.prompt.format=raw",
                            "model.prompt.strip_echo=false", "data.keep_columns=[question,category]")
    assert summary["complete"] and (df["status"] == "ok").all()
    for i in range(3):  # NeMo's route echoes the prompt it got, then generates
        assert df.loc[f"j{i}", "response"].startswith(rendered(i) + "[simulated]"), df.loc[f"j{i}", "response"]
    assert list(df["question"]) == QUESTIONS and list(df["category"]) == ["math", "geography", "literature"]
    assert "answer" not in df.columns  # read for the template, not kept

    # in the model's own format: the same answers as a prompt column holding the rendered text
    _, templated = local_run(tmp_path, "templated", src, template(JUDGE))
    pre = tmp_path / "pre.parquet"
    pq.write_table(pa.table({"id": [f"j{i}" for i in range(3)], "prompt": [rendered(i) for i in range(3)]}), pre)
    _, plain = local_run(tmp_path, "plain", pre)
    assert (templated["status"] == "ok").all()
    assert list(templated["response"]) == list(plain["response"])


def test_the_plan_reads_only_the_columns_the_template_names(tmp_path):
    src = judge_rows(tmp_path / "in.parquet", unused=[1, 2, 3], sys=["S0", "S1", "S2"])
    plan, _ = prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", template(JUDGE),
                               "data.system_column=sys"]))
    assert plan.template_columns == ["answer", "question"]
    assert plan.input_columns == ["answer", "question", "sys", "id"]
    (ids, prompts), = read_unit(plan, 0, 16)
    assert ids == ["j0", "j1", "j2"] and prompts == [rendered(i) for i in range(3)]


def test_the_system_column_gives_each_row_its_system_prompt(tmp_path):
    src = judge_rows(tmp_path / "in.parquet", sys=["Be strict.", None, ""])
    # nemotron4_chat: the echo is cut at the first end string, right after the system turn
    summary, df = local_run(tmp_path, "r", src, template(JUDGE), "data.system_column=sys",
                            "model.prompt.system=Config system.", "model.prompt.strip_echo=false")
    assert summary["complete"]
    assert list(df["response"]) == ["<extra_id_0>System\nBe strict.",  # the row's own
                                    "<extra_id_0>System\nConfig system.",  # null: model.prompt.system
                                    "<extra_id_0>System"]  # empty: none


def test_the_system_column_is_the_system_message_on_the_chat_api(recorder, tmp_path):
    src = judge_rows(tmp_path / "in.parquet", sys=["Be strict.", None, "Be kind."])
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", template(JUDGE), "data.system_column=sys",
                   "model.prompt.format=chat_template", "model.prompt.system=Config system.", "engine.protocol=openai"])
    paths, _ = run_against(recorder, cfg)
    sent = sorted((b["messages"] for b in recorder.bodies), key=lambda m: m[-1]["content"])
    assert sent == [[{"role": "system", "content": s}, {"role": "user", "content": rendered(i)}]
                    for i, s in [(1, "Config system."), (0, "Be strict."), (2, "Be kind.")]]
    assert (results(paths)["status"] == "ok").all()


def test_a_row_system_prompt_in_each_format():
    from orchestrator.prompts import row_prompt

    steer = compose(["model=llama2_70b_steerlm_chat"]).model.prompt
    assert row_prompt("Q", "S", steer) == ("<extra_id_0>System\nS\n<extra_id_1>User\nQ\n<extra_id_1>Assistant\n"
                                           f"<extra_id_2>{steer.steerlm_attributes}\n")
    raw = compose(["model.prompt.format=raw", "model.prompt.system=ignored"]).model.prompt
    assert row_prompt("Q", "S", raw) == "S\nQ" and row_prompt("Q", "", raw) == "Q" and row_prompt("Q", None, raw) == "Q"
    as_chat = row_prompt("Q", "S", raw, chat=True)
    assert as_chat == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert row_prompt("Q", None, raw, chat=True) == "Q"  # the codec adds model.prompt.system


# ---------------------------------------------------------------- refused before submission

def test_a_template_naming_a_missing_column_is_refused_with_the_columns_that_exist(tmp_path):
    src = judge_rows(tmp_path / "in.parquet")
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}",
                   template("Q: {{ question }} A: {{ response }} ({{ rubric }}) {% for x in range(2) %}{% endfor %}")])
    with pytest.raises(InputError) as err:
        run(cfg, show_progress=False)
    message = str(err.value)
    assert str(src) in message and "columns 'response', 'rubric'" in message
    assert "['id', 'question', 'answer', 'category']" in message and "range" not in message.split("lacks")[0]
    assert not (tmp_path / "r" / "plan.json").exists()  # nothing planned, nothing submitted


def test_a_template_with_a_syntax_error_is_refused_with_its_line_and_jinjas_message():
    with pytest.raises(ConfigError, match=r"syntax error on line 2: unexpected '}'.*'Answer: \{\{ answer }'"):
        compose([template("Question: {{ question }}\nAnswer: {{ answer }\nScore it.")])
    with pytest.raises(ConfigError, match="line 1: .*The innermost block that needs to be closed is 'if'"):
        compose([template("{% if answer %}{{ answer }}")])
    with pytest.raises(ConfigError, match="No filter named 'shout'"):
        compose([template("{{ answer | shout }}")])


def test_a_template_cannot_be_combined_with_a_conversation_column():
    with pytest.raises(ConfigError, match="data.prompt_template cannot be combined with data.messages_column='m'"):
        compose([template(JUDGE), "data.messages_column=m"])
    with pytest.raises(ConfigError, match="data.prompt_template cannot be combined with data.turns_column='t'"):
        compose([template(JUDGE), "data.turns_column=t"])
    with pytest.raises(ConfigError, match="data.system_column='s' cannot be combined with data.messages_column"):
        compose(["data.system_column=s", "data.messages_column=m"])
    with pytest.raises(ConfigError, match="data.prompt_template is empty"):
        compose([template("  ")])


def test_a_missing_or_non_text_system_column_is_refused(tmp_path):
    src = judge_rows(tmp_path / "in.parquet", level=[1, 2, 3])
    with pytest.raises(InputError, match=r"no system column 'sys' \(data.system_column\); the columns are \['id'"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'a'}", template(JUDGE), "data.system_column=sys"]))
    with pytest.raises(InputError, match="system column 'level' .* has type int64, not text"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'b'}", template(JUDGE),
                         "data.system_column=level"]))


# ---------------------------------------------------------------- rows that cannot be rendered

def test_a_row_the_template_cannot_render_is_that_rows_error(tmp_path):
    src = judge_rows(tmp_path / "in.parquet", score=pa.array([3, None, 5], pa.int64()))
    _, df = local_run(tmp_path, "r", src, template("{{ question }} (score {{ score + 1 }})"),
                            "model.prompt.format=raw", "model.prompt.strip_echo=false")
    assert list(df["status"]) == ["ok", "error", "ok"]
    assert df.loc["j1", "error"] == ("data.prompt_template cannot be rendered for this row: TypeError: unsupported "
                                     "operand type(s) for +: 'NoneType' and 'int'")
    assert df.loc["j0", "response"].startswith("What is 2 + 2? (score 4)[simulated]")


def test_printing_a_null_or_escaping_the_sandbox_is_a_row_error(tmp_path):
    src = judge_rows(tmp_path / "in.parquet", answer=["4", None, "x"])
    _, df = local_run(tmp_path, "null", src, template(JUDGE))
    assert list(df["status"]) == ["ok", "error", "ok"]
    assert df.loc["j1", "error"].startswith("data.prompt_template cannot be rendered for this row: the template "
                                            "prints a null value")
    assert df.loc["j1", "error"].endswith("(null in this row: answer)")
    _, df = local_run(tmp_path, "default", src, template("{{ question }} {{ answer | default('none given', true) }}"),
                      "model.prompt.format=raw", "model.prompt.strip_echo=false")
    assert (df["status"] == "ok").all() and df.loc["j1", "response"].startswith(f"{QUESTIONS[1]} none given")
    _, df = local_run(tmp_path, "escape", src, template("{{ question.__class__.__mro__ }}"))
    assert (df["status"] == "error").all() and df["error"].str.contains(
        "SecurityError: access to attribute '__class__' of 'str' object is unsafe").all()


# ---------------------------------------------------------------- resume

def test_changing_the_template_or_system_column_on_a_run_dir_is_refused(tmp_path):
    src = judge_rows(tmp_path / "in.parquet", sys=["a", "b", "c"], prompt=["p0", "p1", "p2"])
    base = [f"data.input={src}", f"run_dir={tmp_path / 'r'}"]
    prepare(compose(base + [template(JUDGE)]))
    prepare(compose(base + [template(JUDGE)]))  # the same settings resume
    with pytest.raises(InputError, match=r"data.prompt_template was 'Question: \{\{ question }}\\nAnswer: .*, now "
                                         r"'Rate: \{\{ answer }}'"):
        prepare(compose(base + [template("Rate: {{ answer }}")]))
    with pytest.raises(InputError, match="data.system_column was None, now 'sys'"):
        prepare(compose(base + [template(JUDGE), "data.system_column=sys"]))
    with pytest.raises(InputError, match=r"data.prompt_template was 'Question.*', now None"):
        prepare(compose(base))


def test_a_template_with_rollouts_sends_the_rendered_text_for_every_answer(tmp_path):
    src = judge_rows(tmp_path / "in.parquet")
    _, df = local_run(tmp_path, "r", src, template(JUDGE), "model.prompt.format=raw", "model.prompt.strip_echo=false",
                      "sampling.rollouts=2", "sampling.greedy=false", "sampling.top_k=0", "sampling.seed=1")
    assert len(df) == 6 and (df["status"] == "ok").all()
    for i in range(3):
        answers = df.loc[f"j{i}"].sort_values("rollout")
        assert list(answers["rollout"]) == [0, 1]
        assert all(r.startswith(rendered(i) + "[simulated]") for r in answers["response"])
