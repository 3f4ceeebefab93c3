"""Whose OpenAI server the simulator's OpenAI routes imitate (``--openai-dialect``): vLLM's (the default),
SGLang's (``python -m sglang.launch_server``) or TensorRT-LLM's (``trtllm-serve``). The routes generate alike;
each dialect decides what only its server does, read from that server's own request and response models:

- vLLM (vllm/entrypoints/openai/protocol.py): unknown request fields are ignored; guided decoding in
  ``structured_outputs`` or ``response_format`` (simulator.structured); choices carry ``stop_reason`` and,
  with ``return_token_ids``, ``token_ids``; ``POST /tokenize``; ``max_model_len`` in /v1/models; errors
  ``{"error": {"message", "type", "param", "code"}}``.
- SGLang (python/sglang/srt/entrypoints/openai/protocol.py): pydantic models that ignore unknown fields (so a
  vLLM ``structured_outputs`` is silently unguided); completions take the schema as JSON text in
  ``json_schema``, both routes take ``response_format`` {type: json_schema, json_schema: {name, schema}} or
  json_object; choices carry ``matched_stop`` (the stop string or token id) instead of ``stop_reason``, the
  chat message ``reasoning_content``; ``return_token_ids``; ``max_model_len`` in /v1/models; no /tokenize
  served here; errors are the top-level ``ErrorResponse`` {"object": "error", "message", "type", "param",
  "code"}.
- TRT-LLM (tensorrt_llm/serve/openai_protocol.py): every request model has ``extra="forbid"``, so a field
  it does not know is a 400 (its RequestValidationError handler answers ``{"error": str(exc)}``); guided
  decoding only in ``response_format`` {type: json, schema} (or json_schema, json_object) on both routes;
  choices carry ``stop_reason``; no ``return_token_ids``, no /tokenize, no ``max_model_len`` in /v1/models;
  other errors are the top-level ``ErrorResponse``.
"""
from __future__ import annotations

from aiohttp import web

from .structured import Guide, _schema, read_guide
from .validation import _json, _oai_error

DIALECTS = ("vllm", "sglang", "trtllm")

# trtllm-serve's CompletionRequest and ChatCompletionRequest fields (extra="forbid": any other is refused)
_TRTLLM_COMMON = frozenset((
    "model", "best_of", "frequency_penalty", "logit_bias", "logprobs", "n", "presence_penalty", "seed", "stop",
    "stream", "stream_options", "temperature", "top_p", "user", "lora_request", "prompt_ignore_length",
    "use_beam_search", "top_k", "top_p_min", "min_p", "repetition_penalty", "length_penalty", "early_stopping",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "add_special_tokens", "response_format",
    "disaggregated_params", "priority", "conversation_params", "thinking_token_budget", "echo"))
TRTLLM_FIELDS = {
    False: _TRTLLM_COMMON | {"prompt", "max_tokens", "suffix", "return_context_logits", "detokenize"},
    True: _TRTLLM_COMMON | {
        "messages", "prompt_token_ids", "top_logprobs", "max_completion_tokens", "max_tokens", "tools",
        "tool_choice", "parallel_tool_calls", "reasoning_effort", "thinking", "add_generation_prompt",
        "documents", "chat_template", "chat_template_kwargs", "cache_salt", "mm_processor_kwargs"},
}
_TRTLLM_FORMATS = ("text", "json", "json_schema", "json_object", "regex", "ebnf", "structural_tag")
_SGLANG_FORMATS = ("text", "json_object", "json_schema")


class Dialect:
    """vLLM's server: the routes' own behaviour (simulator.routes_openai)."""

    name = "vllm"
    serves_tokenize = True
    lists_max_model_len = True
    stop_field = "stop_reason"
    message_fields: dict = {"refusal": None, "annotations": None, "audio": None, "function_call": None,
                            "reasoning": None}

    def error(self, message: str, status: int = 400, param: str | None = None,
              kind: str = "BadRequestError") -> web.Response:
        return _oai_error(message, status, param, kind)

    def refused_fields(self, body: dict, chat: bool) -> web.Response | None:
        """The 400 for request fields this server does not take (None: it takes or ignores them all)."""
        return None

    def guide(self, body: dict, chat: bool) -> tuple[Guide | None, tuple[str, str] | None]:
        """(the request's guided-decoding constraint or None, or the (message, param) of the server's 400)."""
        return read_guide(body)


class SglangDialect(Dialect):
    name = "sglang"
    serves_tokenize = False
    stop_field = "matched_stop"
    message_fields = {"reasoning_content": None, "tool_calls": None}

    def error(self, message, status=400, param=None, kind="BadRequestError"):
        return _json({"object": "error", "message": message, "type": kind, "param": param, "code": status}, status)

    def guide(self, body, chat):
        text, rf = (None if chat else body.get("json_schema")), body.get("response_format")
        if text is not None:  # CompletionRequest.json_schema: Optional[str], handed to the grammar backend
            if not isinstance(text, str):
                return None, ("json_schema: Input should be a valid string", "json_schema")
            return _schema(text, "json_schema")
        if rf is None:
            return None, None
        if not isinstance(rf, dict) or rf.get("type") not in _SGLANG_FORMATS:
            return None, ("response_format.type: Input should be 'text', 'json_object' or 'json_schema'",
                          "response_format")
        if rf["type"] == "json_object":
            return Guide(), None
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("name"), str):
                return None, ("response_format.json_schema.name: Field required", "response_format")
            return _schema(js.get("schema", {}), "response_format")
        return None, None


class TrtllmDialect(Dialect):
    name = "trtllm"
    serves_tokenize = False
    lists_max_model_len = False
    message_fields = {"reasoning_content": None, "reasoning": None, "tool_calls": []}

    def error(self, message, status=400, param=None, kind="BadRequestError"):
        return _json({"object": "error", "message": message, "type": kind, "param": param, "code": status}, status)

    def refused_fields(self, body, chat):
        extra = sorted(set(body) - TRTLLM_FIELDS[chat])
        if not extra:
            return None
        errors = [f"  {{'type': 'extra_forbidden', 'loc': ('body', {name!r}), 'msg': 'Extra inputs are not "
                  f"permitted', 'input': {body[name]!r}}}" for name in extra]
        return _json({"error": f"{len(errors)} validation error{'s' if len(errors) > 1 else ''}:\n"
                               + "\n".join(errors)}, 400)

    def guide(self, body, chat):
        rf = body.get("response_format")
        if rf is None:
            return None, None
        if not isinstance(rf, dict) or rf.get("type") not in _TRTLLM_FORMATS:
            return None, (f"response_format.type: Input should be {', '.join(map(repr, _TRTLLM_FORMATS))}",
                          "response_format")
        kind = rf["type"]
        if kind == "json_object":
            return Guide(), None
        if kind in ("json", "json_schema"):
            found = rf.get("schema" if kind == "json" else "json_schema")
            if found is None:
                key = "schema" if kind == "json" else "json_schema"
                return None, (f"response_format.{key} is required for response_format.type == {kind!r}, but got "
                              "None.", "response_format")
            if kind == "json_schema" and isinstance(found, dict) and "schema" in found:
                found = found["schema"]  # the OpenAI wrapper {name, schema}, unwrapped as trtllm-serve does
            return _schema(found, "response_format")
        if kind != "text":
            return None, (f"response_format {kind} is not served by the embedded engine", "response_format")
        return None, None


_BY_NAME = {d.name: d for d in (Dialect(), SglangDialect(), TrtllmDialect())}


def dialect(name: str) -> Dialect:
    """The dialect called ``name``; ValueError for another."""
    if name not in _BY_NAME:
        raise ValueError(f"openai_dialect must be one of {', '.join(DIALECTS)}, not {name!r}")
    return _BY_NAME[name]
