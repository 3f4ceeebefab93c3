"""How each answer ended, kept in its row: finish_reason (stop or length, or the engine's own word),
stop (the end string it stopped at), prompt_tokens and output_tokens from the engine's own counts."""
import pandas as pd
import pytest

from orchestrator.config import compose
from orchestrator.frontend import run
from orchestrator.journal import Details, parse
from orchestrator.prompts import ending
from orchestrator.unit_source import UnitBuffer
from tests.conftest import write_prompts


def results(tmp_path, *overrides, rows=60) -> pd.DataFrame:
    src = write_prompts(tmp_path / "in.parquet", rows)
    run(compose([f"data.input={src}", f"run_dir={tmp_path / 'run'}", "data.unit_rows=20",
                 "engine.simulator.max_natural_tokens=12", *overrides]), show_progress=False)
    return pd.read_parquet(tmp_path / "run" / "results")


@pytest.mark.parametrize("protocol", ["nemo", "openai"])
def test_each_row_says_how_its_answer_ended(tmp_path, protocol):
    """The embedded engine ends an answer at its natural length (0-12 tokens here: its end of sequence), at
    an end string, or at the budget of 8: length exactly when the whole budget was used."""
    df = results(tmp_path, f"engine.protocol={protocol}", "sampling.tokens_to_generate=8",
                 "sampling.end_strings=['<extra_id_1>', 'zz']")
    assert (df["status"] == "ok").all()
    assert set(df["finish_reason"]) <= {"stop", "length"} and {"stop", "length"} <= set(df["finish_reason"])
    # length exactly when the whole budget went without an end string (one may end it on its last token)
    assert ((df["finish_reason"] == "length") == ((df["output_tokens"] == 8) & df["stop"].isna())).all()
    assert df.loc[df["stop"].notna(), "finish_reason"].eq("stop").all()
    assert (df["prompt_tokens"] > 0).all()  # NeMo: its tokens past the answer's; OpenAI: usage.prompt_tokens


def test_the_end_string_an_answer_stopped_at_is_kept():
    assert ending(None, None, "<extra_id_1>", 3, 8) == ("stop", "<extra_id_1>")  # cut by the client (NeMo, Triton)
    assert ending("stop", "###", None, 3, 8) == ("stop", "###")  # vLLM's stop_reason
    assert ending("stop", None, None, 3, 8) == ("stop", None)  # its end of sequence
    assert ending("length", None, None, 8, 8) == ("length", None)
    assert ending("ABORT", None, None, 2, 8) == ("abort", None)  # another word: lowercased, kept
    assert ending("max_tokens", None, None, 8, 8) == ("length", None)
    assert ending(None, None, None, 8, 8) == ("length", None)  # NeMo: no word, the whole budget used
    assert ending(None, None, None, 5, 8) == ("stop", None)
    assert ending(None, None, None, None, 8) == (None, None)  # Triton without counts: nothing tells


def test_the_journal_keeps_how_answers_ended():
    """A killed run's journaled rows come back with their finish_reason, stop and prompt_tokens."""
    import json

    buf = UnitBuffer(0, 3)
    buf.ids = ["a", "b", "c"]
    buf.succeed(0, "x", 8, 0.1, 1, details=Details("length", None, 11))
    buf.succeed(1, "y", 2, 0.1, 1, details=Details("stop", "<extra_id_1>", 9, "thought"))
    buf.fail(2, "too long", 1)
    lines = [{"journal": 1, "settings": "d", "unit": 0, "rows": 3, "owner": "o"},
             buf.journal_record([0, 1, 2])]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    entries, _ = parse(data, "d", 0, 3)
    assert [entries[i].details for i in range(3)] == [Details("length", None, 11),
                                                      Details("stop", "<extra_id_1>", 9, "thought"), Details()]
    fresh = UnitBuffer(0, 3)
    for i, entry in entries.items():
        fresh.restore(i, entry)
    assert (fresh.finish_reason, fresh.stop, fresh.prompt_tokens) == (["length", "stop", None],
                                                                      [None, "<extra_id_1>", None], [11, 9, None])
    assert fresh.reasoning == [None, "thought", None]


def test_a_reasoning_models_thinking_goes_to_its_own_column():
    from orchestrator.prompts import split_reasoning

    assert split_reasoning("<think>first 2 + 2</think> 4", ["<think>", "</think>"]) == ("first 2 + 2", "4")
    assert split_reasoning("opened in the prompt</think>4", ["<think>", "</think>"]) == ("opened in the prompt", "4")
    assert split_reasoning("no tags", ["<think>", "</think>"]) == (None, "no tags")
    chat = compose(["model.prompt.format=chat_template", "engine.protocol=openai"])
    from orchestrator.protocols import make_codec
    from orchestrator.protocols.base import EngineInfo

    codec = make_codec(chat, EngineInfo(url="http://x", protocol="openai", model_name="m", api="chat"))
    (answer,) = codec.parse(200, {"choices": [{"index": 0, "finish_reason": "stop", "stop_reason": None,
                                               "message": {"content": "4", "reasoning": "2 + 2 is 4"}}],
                                  "usage": {"prompt_tokens": 9, "completion_tokens": 5}}, ["p"])
    assert (answer.text, answer.reasoning, answer.finish_reason, answer.prompt_tokens) == ("4", "2 + 2 is 4", "stop", 9)


def test_reasoning_tags_split_every_answer_of_a_run(tmp_path):
    """The embedded engine's answers start "[simulated]": taken as the closing tag, what is before it is the
    reasoning (empty) and the rest the answer; tags that are not a pair are refused."""
    from orchestrator.errors import ConfigError

    df = results(tmp_path, "model.prompt.reasoning_tags=['<think>','[simulated]']", rows=20)
    assert (df["reasoning"] == "").all() and not df["response"].str.contains("[simulated]", regex=False).any()
    with pytest.raises(ConfigError, match="give the opening and the closing tag"):
        compose(["model.prompt.reasoning_tags=['</think>']"])
