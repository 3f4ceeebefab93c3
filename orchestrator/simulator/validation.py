"""Request rules and checks shared by the simulator's routes, and the error bodies they answer."""
from __future__ import annotations

import json

from aiohttp import web

from .model import EOS, _dumps


def _check_messages(messages) -> str | None:
    """None when ``messages`` is a chat the Nemotron template renders, else the error message."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            return f"messages[{i}].role must be one of 'system', 'user', 'assistant', got {role!r}"
        if role == "system" and i > 0:
            return "System message must be at the beginning."
        text_parts = isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
        if not isinstance(content, str) and not text_parts:
            return f"messages[{i}].content must be a string"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return type(v) in (int, float)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# NeMo's checks in the order of its text_generation_server.py: (field, default, valid, message).
_NEMO_RULES = (
    ("tokens_to_generate", 64, lambda v: _is_int(v) and v >= 1,
     "tokens_to_generate must be an integer greater than 0"),
    ("all_probs", False, _is_bool, "all_probs must be a boolean value"),
    ("temperature", 1.0, lambda v: _is_num(v) and 0.0 < v <= 100.0,
     "temperature must be a positive number less than or equal to 100.0"),
    ("add_BOS", False, _is_bool, "add_BOS must be a boolean value"),
    ("greedy", False, _is_bool, "greedy must be a boolean value"),
    ("top_k", 0, lambda v: _is_num(v) and v >= 0, "top_k must be a positive integer number"),
    ("top_p", 0.9, lambda v: _is_num(v) and 0.0 <= v <= 1.0,
     "top_p must be a positive number less than or equal to 1.0"),
    ("repetition_penalty", 1.0, lambda v: _is_num(v) and v >= 1.0,
     "repetition_penalty must be a positive number no less than 1.0"),
    ("end_strings", [EOS], _is_str_list, "expect end_strings to be a list of strings"),
    ("min_tokens_to_generate", 0, lambda v: _is_int(v) and v >= 0,
     "min_tokens_to_generate must be an integer no less than 0"),
    ("compute_logprob", False, _is_bool, "compute_logprob must be a boolean value"),
    ("random_seed", None, lambda v: v is None or (_is_int(v) and v >= 0),
     "random_seed must be a positive integer number or None"),
)


def _nullable(rules):
    """OpenAI fields: null means the default."""
    return tuple((name, default, lambda v, ok=ok: v is None or ok(v), message)
                 for name, default, ok, message in rules)


# vLLM's sampling fields, shared by /v1/completions and /v1/chat/completions.
_OAI_SAMPLING = (
    ("temperature", 1.0, lambda v: _is_num(v) and v >= 0, "temperature must be a non-negative number"),
    ("top_p", 1.0, lambda v: _is_num(v) and 0 < v <= 1, "top_p must be in (0, 1]"),
    ("top_k", -1, lambda v: _is_int(v) and v >= -1, "top_k must be -1 (disable), or at least 1"),
    ("stop", None, lambda v: isinstance(v, str) or _is_str_list(v), "stop must be a string or a list of strings"),
    ("seed", None, _is_int, "seed must be an integer"),
    ("n", 1, lambda v: _is_int(v) and v >= 1, "n must be at least 1"),
    ("min_tokens", 0, lambda v: _is_int(v) and v >= 0, "min_tokens must be greater than or equal to 0"),
    ("repetition_penalty", 1.0, lambda v: _is_num(v) and v > 0, "repetition_penalty must be greater than zero"),
    ("stop_token_ids", None, lambda v: isinstance(v, list) and all(map(_is_int, v)),
     "stop_token_ids must contain only integers"),
    ("skip_special_tokens", True, _is_bool, "skip_special_tokens must be a boolean"),
    ("spaces_between_special_tokens", True, _is_bool, "spaces_between_special_tokens must be a boolean"),
    ("include_stop_str_in_output", False, _is_bool, "include_stop_str_in_output must be a boolean"),
    ("return_token_ids", False, _is_bool, "return_token_ids must be a boolean"),
)
# /v1/completions: max_tokens defaults to 16 (null: the rest of the context).
_OAI_RULES = _nullable((
    ("max_tokens", 16, lambda v: _is_int(v) and v >= 1, "max_tokens must be at least 1"),
    *_OAI_SAMPLING,
    ("logprobs", None, lambda v: _is_int(v) and v >= 0, "logprobs must be a non-negative integer"),
))
# /v1/chat/completions: max_completion_tokens (or the older max_tokens), default the rest of the context.
_CHAT_RULES = _nullable((
    ("max_completion_tokens", None, lambda v: _is_int(v) and v >= 1, "max_completion_tokens must be at least 1"),
    ("max_tokens", None, lambda v: _is_int(v) and v >= 1, "max_tokens must be at least 1"),
    *_OAI_SAMPLING,
    ("logprobs", False, _is_bool, "logprobs must be a boolean"),
    ("top_logprobs", None, lambda v: _is_int(v) and v >= 0, "top_logprobs must be a non-negative integer"),
))
_OAI_DEFAULTS = {name: default for name, default, _, _ in _OAI_SAMPLING}


def _check(body: dict, rules) -> tuple[str | None, str | None, dict]:
    params = {}
    for name, default, valid, message in rules:
        value = params[name] = body.get(name, default)
        if name in body and not valid(value):
            return message, name, params
    return None, None, params


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(data).encode(), status=status, content_type="application/json")


def _oai_error(message: str, status: int = 400, param: str | None = None, kind: str = "BadRequestError"):
    return _json({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


async def _read_object(request: web.Request) -> dict | None:
    try:
        body = json.loads(await request.read())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


# ---------------------------------------------------------------- Triton (KServe v2) model signatures
