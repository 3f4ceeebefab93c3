"""Scoring runs (model.attributes set: a reward model): what is scored and the result columns the scores fill.

Each row is one conversation, its prompt (data.prompt_column or data.prompt_template, with data.system_column,
or a conversation of turns, data.messages_column) answered by its response (data.response_column), rendered in
NeMo-Aligner's SteerLM reward format (examples/nlp/data/steerlm/common.py):
`<extra_id_0>System\\n{system}\\n` + `<extra_id_1>User\\n{text}\\n` / `<extra_id_1>Assistant\\n{text}\\n` per turn
+ `<extra_id_2>`. The reward model answers one float per attribute; a row's scores travel as its answer text (a
JSON list, so the journal and resume keep them as they keep answers) and become one float column per attribute
in the results (ScoreColumns), in place of the `response` column (a scoring run keeps its input's).
"""
from __future__ import annotations

import json

import pyarrow as pa

from .columns import NOT_SCORED
from .conversation import check_messages

LABEL_PREFIX = "<extra_id_2>"


def sentence(turns: list[dict], system: str) -> str:
    """A checked conversation ([{role, content}], user and assistant turns, a first system message replacing
    `system`) in the SteerLM reward format, ending with the label prefix the reward head reads."""
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    header = {"user": "User", "assistant": "Assistant"}
    body = "".join(f"<extra_id_1>{header[t['role']]}\n{t['content']}\n" for t in turns)
    return f"<extra_id_0>System\n{system}\n{body}{LABEL_PREFIX}"


def score_rows(part, plan, prompts: list[tuple], system: str) -> list[tuple[str | None, str | None]]:
    """(sentence, why the row cannot be scored) per row of a record batch. prompts: per row (prompt, its system
    prompt, problem) as templates.row_prompts gives them, or (messages, turns, attributes) for
    data.messages_column (conversation.conversation_rows); system: model.prompt.system."""
    responses = part.column(plan.response_column).to_pylist()
    out = []
    for prompt, response in zip(prompts, responses):
        if not isinstance(response, str):
            out.append((None, f"the response (data.response_column={plan.response_column!r}) is "
                              f"{'null' if response is None else type(response).__name__}, not text: nothing to score"))
            continue
        if plan.messages_column:
            turns, problem = check_messages(prompt[0])
            own = system
        else:
            text, own, problem = prompt
            own = system if own is None else own
            if problem is None and not isinstance(text, str):
                problem = f"the prompt is {'null' if text is None else type(text).__name__}, not text"
            turns = [{"role": "user", "content": text}]
        if problem is not None:
            out.append((None, problem))
            continue
        out.append((sentence(turns + [{"role": "assistant", "content": response}], own), None))
    return out


def scores_text(scores: list[float]) -> str:
    """A row's scores as its answer text (what the journal keeps)."""
    return json.dumps([float(s) for s in scores])


class ScoreColumns:
    """The result columns of a scoring run: one float64 per attribute, from each ok row's scores; they replace
    the run's own `response` and generation columns (columns.NOT_SCORED: the input's may be kept)."""

    replaces = NOT_SCORED  # plan.result_schema leaves these out: the input's may be kept

    def __init__(self, attributes: list[str]):
        self.attributes = list(attributes)

    def schema_fields(self) -> list[tuple[str, pa.DataType]]:
        return [(name, pa.float64()) for name in self.attributes]

    def arrays(self, texts: list, status: list) -> dict[str, pa.Array]:
        rows = []
        for text, state in zip(texts, status):
            value = None
            if state == "ok" and isinstance(text, str):
                try:
                    value = json.loads(text)
                except ValueError:
                    value = None
            rows.append(value if isinstance(value, list) and len(value) == len(self.attributes) else None)
        return {name: pa.array([r[k] if r is not None else None for r in rows], pa.float64())
                for k, name in enumerate(self.attributes)}

    def texts(self, committed: dict) -> list:
        """The answer texts of a committed unit's rows (its score columns; None where a row has none), for a
        retried unit that keeps its ok rows."""
        columns = [committed.get(name) or [] for name in self.attributes]
        count = len(committed.get("status") or [])
        return [scores_text([c[i] for c in columns]) if all(i < len(c) and c[i] is not None for c in columns)
                else None for i in range(count)]


def columns_for(cfg) -> ScoreColumns | None:
    """A scoring run's result columns, or None for a generation run."""
    return ScoreColumns(cfg.model.attributes) if cfg.model.attributes else None
