"""One row's conversation: its messages so far, the user turns still to send, and the model's answers.

A row is either a list of {role, content} messages (data.messages_column), a list of user turns
(data.turns_column), or both (the messages open the conversation, the turns follow). Turn k is sent
with the model's own answers to turns 1..k-1, so the conversation grows as it is answered. A row that
cannot be sent is a reason (a row error), never an exception. Turns makes the requests of such rows,
turn by turn, for the client.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .plan import Plan
from .prompts import render_messages
from .protocols.base import DEFAULT_ROW, Request, RowSampling

ROLES = ("system", "user", "assistant")


def check_messages(value) -> tuple[list[dict] | None, str | None]:
    """The row's messages as plain {role, content} dicts, or why they cannot be sent."""
    if value is None:
        return None, "messages is null"
    if not isinstance(value, list) or not value:
        return None, ("messages is empty" if isinstance(value, list)
                      else f"messages is not a list ({type(value).__name__})")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return None, f"messages[{i}] is not a {{role, content}} object ({type(m).__name__})"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return None, f"messages[{i}].role is {role!r}; it must be one of {', '.join(ROLES)}"
        if role == "system" and i > 0:
            return None, f"messages[{i}] is a system message; only the first message may be one"
        if not isinstance(content, str):
            return None, f"messages[{i}].content is not text ({type(content).__name__})"
        out.append({"role": role, "content": content})
    return out, None


def check_turns(value) -> tuple[list[str] | None, str | None]:
    """The row's user turns, or why they cannot be sent."""
    if value is None:
        return None, "turns is null"
    if not isinstance(value, list) or not value:
        return None, "turns is empty" if isinstance(value, list) else f"turns is not a list ({type(value).__name__})"
    for i, turn in enumerate(value):
        if not isinstance(turn, str):
            return None, f"turns[{i}] is not text ({type(turn).__name__})"
        if not turn.strip():
            return None, f"turns[{i}] is empty"
    return list(value), None


@dataclass
class Conversation:
    """A row being answered turn by turn; the request of the current turn is `messages`."""

    messages: list[dict]
    turns: list[str]  # user turns not yet sent (the current one is already in messages)
    total: int  # turns in all: 1 for a messages row
    attributes: str | None = None  # the row's SteerLM attribute line
    answers: list[str] = field(default_factory=list)
    tokens: int | None = None
    latency_s: float = 0.0
    attempts: int = 0
    row: RowSampling = DEFAULT_ROW  # the row's own settings, sent with each of its turns

    @classmethod
    def start(cls, messages=None, turns=None, attributes=None, *, has_messages: bool = False,
              has_turns: bool = False) -> "Conversation | str":
        """A row's conversation from its columns (has_*: whether the plan reads that column), or why it
        cannot be sent."""
        opening: list[dict] = []
        if has_messages:
            opening, problem = check_messages(messages)
            if problem:
                return problem
        todo: list[str] = []
        if has_turns:
            todo, problem = check_turns(turns)
            if problem:
                return problem
        elif opening[-1]["role"] != "user":
            return f"the last message is the {opening[-1]['role']}'s; end each row's messages with a user message"
        elif not opening[-1]["content"].strip():
            return f"messages[{len(opening) - 1}] (the user's) is empty"
        if attributes is not None and not isinstance(attributes, str):
            return f"attributes are not text ({type(attributes).__name__})"
        conv = cls(opening, todo, len(todo) or 1, attributes)
        if todo:
            conv.messages.append({"role": "user", "content": conv.turns.pop(0)})
        return conv

    @property
    def turn(self) -> int:
        """The turn being answered, from 1."""
        return len(self.answers) + 1

    @property
    def done(self) -> bool:
        return len(self.answers) == self.total

    def answered(self, text: str, tokens: int | None, latency_s: float, attempts: int) -> None:
        """Record the current turn's answer; the next turn, if any, becomes the request."""
        self.answers.append(text)
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens
        self.latency_s += latency_s or 0.0
        self.attempts += attempts
        self.messages.append({"role": "assistant", "content": text})
        if self.turns:
            self.messages.append({"role": "user", "content": self.turns.pop(0)})

    def why(self, problem: str) -> str:
        """A failure of the current turn, named when the row has several."""
        return f"turn {self.turn} of {self.total}: {problem}" if self.total > 1 else problem


def conversation_rows(part, plan: Plan) -> list[tuple]:
    """(messages, turns, attributes) per row of a record batch; None for a column the plan does not read."""
    def column(name):
        return part.column(name).to_pylist() if name else [None] * part.num_rows

    return list(zip(column(plan.messages_column), column(plan.turns_column), column(plan.attributes_column)))


class Turns:
    """The requests of conversation rows, turn by turn, for a unit's buffer (unit_source.UnitBuffer): a
    request is a protocols.base.Request, as the client's workers send them. `exact_tokens`: the
    engine counts tokens itself, so a conversation too long for the `context` is its own refusal."""

    def __init__(self, cfg: Config, plan: Plan, protocol, context: int, exact_tokens: bool):
        self.cfg, self.plan, self.protocol, self.context, self.exact_tokens = cfg, plan, protocol, context, exact_tokens

    def start(self, buf, i: int, row: tuple, settings: RowSampling = DEFAULT_ROW) -> Request | None:
        """The first request of a conversation row (settings: the row's own), or None when the row is
        recorded as an error."""
        plan = self.plan
        conv = Conversation.start(*row, has_messages=bool(plan.messages_column), has_turns=bool(plan.turns_column))
        if isinstance(conv, str):
            buf.fail(i, conv)
            return None
        conv.row = settings
        buf.conversations[i] = conv
        return self.request(buf, i, conv)

    def request(self, buf, i: int, conv: Conversation) -> Request | None:
        """(buf, row, what is sent) for the conversation's current turn: the messages on the chat API, else
        the text in the model's prompt format. Without the engine's own token count, a conversation that
        outgrows the context is a row error here (conversations are never truncated)."""
        chat = getattr(self.protocol, "chat", False)
        sent = [dict(m) for m in conv.messages] if chat else \
            render_messages(conv.messages, self.cfg.model.prompt, conv.attributes)
        if not self.exact_tokens:
            size = sum(len(m["content"].encode()) for m in sent) if chat else len(sent.encode())
            estimate = size / self.cfg.data.bytes_per_token
            if estimate > self.context:
                buf.fail(i, f"the conversation is about {estimate:.0f} tokens ({size} bytes), longer than the "
                            f"model's {self.context}-token context (data.truncate_prompts does not cut conversations)")
                return None
        return Request(buf, i, sent, row=conv.row)

    def next_turns(self, batch) -> list[list]:
        """The next turn of every conversation a batch just answered, in batches: the client queues them
        ahead of new rows."""
        follow: list = []
        for buf in dict.fromkeys(item.buf for item in batch):
            rows, buf.next_turn = buf.next_turn, []
            for i in rows:
                item = self.request(buf, i, buf.conversations[i])
                if item is not None:
                    follow.append(item)
        size = self.protocol.batch_size
        return [follow[start:start + size] for start in range(0, len(follow), size)]
