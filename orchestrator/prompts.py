"""Per-model prompt formats (as in the model cards) and post-processing of the engine's output."""
from __future__ import annotations

from .config import PromptConfig

TEMPLATES = {
    "nemotron4_chat": "<extra_id_0>System\n{system}\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n",
    "steerlm": ("<extra_id_0>System\n{system}\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n"
                "<extra_id_2>{attributes}\n"),
    "nemotron_mini": "<extra_id_0>System\n{system}\n\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n",
    "raw": "{prompt}",
    "chat_template": "{prompt}",  # the engine's chat API renders it with the tokenizer's template
}


# how each chat format opens (with the system turn) and marks a turn; the assistant header is where the
# model writes, and SteerLM puts its attribute line after every assistant header
HEADERS = {
    "nemotron4_chat": "<extra_id_0>System\n{system}\n",
    "steerlm": "<extra_id_0>System\n{system}\n",
    "nemotron_mini": "<extra_id_0>System\n{system}\n\n",
}
ROLE_TAGS = {"user": "<extra_id_1>User\n", "assistant": "<extra_id_1>Assistant\n"}


def format_prompt(prompt: str, cfg: PromptConfig) -> str:
    """The text the engine receives for one user prompt."""
    if cfg.format in ("raw", "chat_template"):
        return prompt
    return TEMPLATES[cfg.format].format(system=cfg.system, prompt=prompt, attributes=cfg.steerlm_attributes)


def row_prompt(prompt: str, system: str | None, cfg: PromptConfig, chat: bool = False):
    """What is sent for one row's prompt. system: the row's own system prompt (data.system_column), which
    replaces model.prompt.system (None: the model's, as format_prompt sends it): on the chat API the messages
    [system, user], else the text in the model's format (raw has no system turn: the system text, a newline,
    then the prompt, as render_messages joins a conversation; an empty one adds nothing)."""
    if system is None:
        return format_prompt(prompt, cfg)
    if chat:
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if cfg.format not in HEADERS:
        return f"{system}\n{prompt}" if system else prompt
    return render_messages([{"role": "system", "content": system}, {"role": "user", "content": prompt}], cfg)


def render_messages(messages: list[dict], cfg: PromptConfig, attributes: str | None = None) -> str:
    """A checked conversation (see conversation.check_messages) as the text a completion engine receives:
    the model's format with its turns alternating, ending where the assistant writes. A system message
    replaces model.prompt.system; `attributes` replaces model.prompt.steerlm_attributes. One user message
    renders exactly as format_prompt does. raw joins the contents by lines (model.prompt.system is not
    used, as for a prompt)."""
    if cfg.format not in HEADERS:  # no template: a row's own system message is text like the others
        return "\n".join(m["content"] for m in messages)
    system = cfg.system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    attribute_line = f"<extra_id_2>{cfg.steerlm_attributes if attributes is None else attributes}\n" \
        if cfg.format == "steerlm" else ""
    parts = [HEADERS[cfg.format].format(system=system)]
    for m in messages:
        parts.append(ROLE_TAGS[m["role"]])
        if m["role"] == "assistant":
            parts.append(attribute_line)
        parts.append(f"{m['content']}\n")
    return "".join(parts) + ROLE_TAGS["assistant"] + attribute_line


def cut_answer(output: str, sent_prompt: str, end_strings: list[str],
               strip_echo: bool = True) -> tuple[str, str | None]:
    """The answer in the engine's output: the echoed prompt stripped (NeMo returns prompt + generation), cut at
    the first end string, trimmed; and that end string (None: none was in it)."""
    if strip_echo and output.startswith(sent_prompt):
        output = output[len(sent_prompt):]
    cut, matched = len(output), None
    for end in end_strings:
        if end:
            at = output.find(end)
            if 0 <= at < cut:
                cut, matched = at, end
    return output[:cut].strip(), matched


def split_reasoning(text: str, tags: list[str]) -> tuple[str | None, str]:
    """(reasoning, answer) of a text whose thinking is between tags[0] and tags[1] (model.prompt.reasoning_tags,
    e.g. <think> and </think>); the opening tag may be in the prompt (templates that open it for the model).
    No closing tag: all of it is the answer, no reasoning."""
    opening, closing = tags
    at = text.find(closing)
    if at < 0:
        return None, text
    thought = text[:at]
    start = thought.find(opening)
    thought = thought[start + len(opening):] if start >= 0 else thought
    return thought.strip(), text[at + len(closing):].strip()


# engines' words for the two endings (OpenAI servers say stop and length; TRT-LLM's runtime end_id, ...)
FINISH_WORDS = {"stop": "stop", "eos": "stop", "end_id": "stop", "stop_word": "stop", "length": "length",
                "max_tokens": "length", "max_length": "length"}


def ending(engine_reason: str | None, engine_stop: str | None, matched: str | None, output_tokens: int | None,
           budget: int) -> tuple[str | None, str | None]:
    """(finish_reason, stop) of one answer. An end string in the text (the client cut there: NeMo and Triton
    keep it) or the stop string the engine names is `stop` with that string; else the engine's own word,
    normalised (stop, length; others lowercased as they are); else, from the token count where the engine
    gives one (NeMo), `length` when it used the whole budget and `stop` (its end of sequence) before;
    None where nothing tells (Triton without an end string)."""
    if matched is not None or engine_stop is not None:
        return "stop", matched if matched is not None else engine_stop
    if engine_reason:
        word = engine_reason.strip().lower()
        return FINISH_WORDS.get(word, word), None
    if output_tokens is not None:
        return ("length" if output_tokens >= budget else "stop"), None
    return None, None
