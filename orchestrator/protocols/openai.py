"""OpenAI (`POST /v1/completions` or `/v1/chat/completions`: vLLM, SGLang, TRT-LLM): continuous
batching, so one prompt per request and many requests in flight.

Detection: GET /v1/models answers 200. Discovery: the served model's name and max_model_len from
/v1/models, the API (completions or chat) from the config, and whether POST /tokenize counts tokens.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

import requests

from ..config import MAX_LOGPROBS, Config, default_capacity
from .base import (
    DEFAULT_ROW,
    PROBE_PROMPT,
    Completion,
    EngineInfo,
    Http,
    MalformedAnswer,
    RejectedError,
    RowSampling,
    TransientError,
    _json,
    _status,
    _text,
    _tokens,
    engine_info,
    row_fields,
)

# RowSampling's fields, as the OpenAI API names them
OPENAI_FIELDS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}

NAME = "openai"
OPENAI_SERVERS = ("vllm", "sglang", "trtllm")  # engines that are their own OpenAI server (openai_dialect)


class OpenAICodec:
    """`/v1/completions` (the card's prompt format, rendered here) or `/v1/chat/completions` (the
    tokenizer's chat template, rendered by the engine)."""

    name = "openai"
    method = "POST"
    echoes_prompt = False
    takes_seed = True

    def __init__(self, cfg: Config, info: EngineInfo | None = None, one_request: bool | None = None):
        """one_request: whether a row's rollouts may go in one request with `n` (the engine's adapter knows:
        engines.base.rollouts_in_one_request); None: only when sampling.rollouts_in_one_request says so."""
        if one_request is None:
            one_request = bool(cfg.sampling.rollouts_in_one_request)
        self.chat = (info.api if info else openai_api(cfg)) == "chat"
        self.path = "/v1/chat/completions" if self.chat else "/v1/completions"
        self.batch_size = 1
        rollouts = cfg.sampling.rollouts
        self.max_n = rollouts if rollouts > 1 and one_request else 1  # answers one request may ask for
        # requests in flight: about 2 x capacity sequences, whether a request holds one or n of them
        self.in_flight = cfg.client.max_in_flight or max(2, math.ceil(2 * default_capacity(cfg) / self.max_n))
        self.system = cfg.model.prompt.system
        s = cfg.sampling
        self.base: dict[str, Any] = {
            "model": info.model_name if info else cfg.model.name,
            "max_tokens": s.tokens_to_generate,
            "temperature": 0.0 if s.greedy else s.temperature,
            "top_p": s.top_p if not s.greedy else 1.0,
            "min_tokens": s.min_tokens_to_generate,
            "repetition_penalty": s.repetition_penalty,
        }
        if cfg.end_strings:
            self.base["stop"] = cfg.end_strings
        skip = cfg.engine.skip_special_tokens
        if skip is None and cfg.end_strings:
            skip = False  # vLLM drops special tokens from the text by default: <extra_id_1> would never match
        if skip is not None:
            self.base["skip_special_tokens"] = skip
        if s.top_k > 0:
            self.base["top_k"] = s.top_k
        if s.seed is not None:
            self.base["seed"] = s.seed
        self.logprobs = s.logprobs
        if s.logprobs is not None:  # the chat API's form, or the completions API's (K alternatives a token)
            # vLLM's chat API lists the sampled token first and cuts at top_logprobs, so the sampled token may
            # push the K-th best out: one more is asked for, and the K best kept (_best)
            self.base.update({"logprobs": True, "top_logprobs": min(s.logprobs + 1, MAX_LOGPROBS)} if self.chat
                             else {"logprobs": s.logprobs})
        self.base.update(cfg.engine.extra_body)
        # structured answers: the run's schema (a row's own, RowSampling.schema, wins), in the engine's dialect
        from ..structured import schema_text

        self.schema = schema_text(s.json_schema)
        self.dialect = openai_dialect(cfg)
        self.guide = guided_decoding(self.dialect, self.chat)

    def payload(self, prompts: list, tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1, row: RowSampling = DEFAULT_ROW) -> dict:
        """prompts: one prompt, or on the chat API one conversation (a list of {role, content}); the system
        prompt of the config opens it unless it has its own. seed: this request's (a rollout's); n > 1: that
        many answers (choice i sampled with seed + i), each with its token ids, which give its token count
        (usage counts them all together)."""
        if self.chat:
            messages = prompts[0] if isinstance(prompts[0], list) else [{"role": "user", "content": prompts[0]}]
            if self.system and not (messages and messages[0]["role"] == "system"):
                messages = [{"role": "system", "content": self.system}] + messages
            body = dict(self.base, messages=messages)
        else:
            body = dict(self.base, prompt=prompts[0])
        if row != DEFAULT_ROW:
            body.update(row_fields(row, OPENAI_FIELDS))
        schema = _loaded(row.schema or self.schema)  # None: none (or a row's that is not JSON: its row's error)
        if schema is not None:
            body.update(self.guide(schema))
        if seed is not None:
            body["seed"] = seed
        if n > 1:
            body["n"] = n
            if self.dialect != "trtllm":  # trtllm-serve refuses fields it does not know (its token_ids come or not)
                body["return_token_ids"] = True
        if tokens_to_generate is not None:
            body["max_tokens"] = tokens_to_generate
            body["min_tokens"] = 0
        if row.body is not None:  # an OpenAI batch line's own body fields, last (model and prompt aside)
            body.update(json.loads(row.body))
        return body

    def parse(self, status: int, body: Any, prompts: list[str], n: int = 1) -> list[Completion]:
        if status != 200:
            _status(status, body, _error_message(body))
        if n > 1:
            return self._parse_choices(body, n)
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise MalformedAnswer("malformed OpenAI response: "
                                  f"no choices[0].{'message.content' if self.chat else 'text'}") from None
        usage = _usage(body)
        return [Completion(_text(text, "choices[0].text"), _tokens(usage.get("completion_tokens"),
                                                                  "usage.completion_tokens"),
                           **_ending(choice, 0), prompt_tokens=_tokens(usage.get("prompt_tokens"),
                                                                      "usage.prompt_tokens"),
                           reasoning=_reasoning(choice) if self.chat else None, **self._logprobs(choice, 0))]

    def _parse_choices(self, body: Any, n: int) -> list[Completion]:
        """The n answers of one request, in the order of their index (choice i: seed + i); each one's token
        count from its token_ids (return_token_ids), else unknown."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, dict) for c in choices):
            raise MalformedAnswer(f"malformed OpenAI response: expected {n} choices (n={n}); does the engine "
                                  f"honour n? If not, set sampling.rollouts_in_one_request=false")
        indexes = [c.get("index") for c in choices]
        if sorted(i for i in indexes if isinstance(i, int) and not isinstance(i, bool)) != list(range(n)):
            raise MalformedAnswer(f"malformed OpenAI response: choice indexes {indexes[:8]}, not 0..{n - 1}")
        prompt_tokens = _tokens(_usage(body).get("prompt_tokens"), "usage.prompt_tokens")  # one prompt, n answers
        # each choice on its own: an unusable one is its answer's error, the others are answers
        return [Completion.checked(lambda choice=choice: self._choice(choice, prompt_tokens))
                for choice in sorted(choices, key=lambda c: c["index"])]

    def _choice(self, choice: dict, prompt_tokens: int | None) -> Completion:
        """One choice of an answer with n; raises MalformedAnswer when it is unusable."""
        i = choice["index"]
        try:
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, TypeError):
            raise MalformedAnswer("malformed OpenAI response: "
                                  f"no choices[{i}].{'message.content' if self.chat else 'text'}") from None
        ids = choice.get("token_ids")
        if ids is not None and not isinstance(ids, list):
            raise MalformedAnswer(f"malformed OpenAI response: choices[{i}].token_ids is {type(ids).__name__}")
        return Completion(_text(text, f"choices[{i}].text"), len(ids) if ids is not None else None,
                          **_ending(choice, i), prompt_tokens=prompt_tokens,
                          reasoning=_reasoning(choice) if self.chat else None, **self._logprobs(choice, i))

    def _logprobs(self, choice: dict, i: int) -> dict:
        """sampling.logprobs=K: choice i's token logprobs and each token's K best alternatives (best first),
        from the chat API's logprobs.content or the completions API's token_logprobs and top_logprobs (whose
        dicts may hold the sampled token beside the K: the K best are kept). Anything else is malformed."""
        if self.logprobs is None:
            return {}
        found, k = choice.get("logprobs"), self.logprobs
        bad = MalformedAnswer(f"malformed OpenAI response: choices[{i}].logprobs is not the "
                              f"{'chat' if self.chat else 'completions'} API's logprobs (sampling.logprobs={k})")
        try:
            if self.chat:
                content = found["content"]
                chosen = [float(t["logprob"]) for t in content]
                top = [_best([_alt(a["token"], a["logprob"]) for a in t.get("top_logprobs") or []], k) for t in content]
            else:
                chosen = [float(x) for x in found["token_logprobs"]]
                top = [_best([_alt(tok, lp) for tok, lp in (d or {}).items()], k)
                       for d in found.get("top_logprobs") or [{}] * len(chosen)]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise bad from None
        if len(top) != len(chosen):
            raise bad
        return {"token_logprobs": chosen, "top_logprobs": top}


def openai_dialect(cfg: Config) -> str:
    """Whose OpenAI server the engine is (vllm, sglang or trtllm): engine=vllm, sglang and trtllm their own;
    engine=endpoint and the embedded engine engine.dialect, vLLM's by default. The servers differ in how they
    take a JSON schema (guided_decoding), whether they take fields they do not know (trtllm-serve refuses
    them), and how they answer errors (_error_message)."""
    return cfg.engine.name if cfg.engine.name in OPENAI_SERVERS else (cfg.engine.dialect or "vllm")


def refusal_hint(cfg: Config, message: str) -> str:
    """The fix for a server refusing our request's fields: trtllm-serve refuses every field it does not know
    (pydantic's extra_forbidden), so a vLLM-dialect request to it fails; '' when that is not the case."""
    if "extra_forbidden" in message and openai_dialect(cfg) != "trtllm":
        return ("\nThe server refuses request fields it does not know, as trtllm-serve does: if it is trtllm-serve, "
                "set engine.dialect=trtllm (for SGLang, engine.dialect=sglang)")
    return ""


def _error_message(body: Any) -> Any:
    """The message of an OpenAI server's error answer: vLLM's {"error": {"message"}}, SGLang's and trtllm-serve's
    ErrorResponse {"object": "error", "message"}, trtllm-serve's {"error": "<validation errors>"}, FastAPI's
    {"detail"}; else the body itself."""
    if not isinstance(body, dict):
        return body
    error = body.get("error")
    if isinstance(error, dict):
        return error.get("message")
    if isinstance(error, str):
        return error
    return body.get("message", body.get("detail"))


def guided_decoding(dialect: str, chat: bool):
    """The request fields that ask an OpenAI server of dialect `dialect` (openai_dialect) for an answer
    matching a JSON schema (schema -> fields):
    - vLLM (vllm, mock, and endpoint, which defaults to it; shared/reference/VLLM_CPU.md "Structured output"):
      completions `structured_outputs: {json: schema}`; chat `response_format: {type: json_schema,
      json_schema: {name, schema}}`.
    - SGLang (docs.sglang.io/advanced_features/structured_outputs.html; its CompletionRequest's extra field
      `json_schema: Optional[str]`): completions `json_schema: <the schema as JSON text>`; chat the OpenAI
      `response_format` as above.
    - TRT-LLM's trtllm-serve (nvidia.github.io/TensorRT-LLM/features/guided-decoding.html and
      examples/serve/openai_completion_client_json_schema.py; its openai_protocol.ResponseFormat maps
      type "json" with `schema` to GuidedDecodingParams(json=schema)), completions and chat alike:
      `response_format: {type: json, schema: schema}` (the server needs guided_decoding_backend in its
      --config YAML)."""
    def openai_form(schema: dict) -> dict:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}

    if dialect == "trtllm":
        return lambda schema: {"response_format": {"type": "json", "schema": schema}}
    if dialect == "sglang":
        return openai_form if chat else (lambda schema: {"json_schema": json.dumps(schema)})
    return openai_form if chat else (lambda schema: {"structured_outputs": {"json": schema}})


@lru_cache(maxsize=256)
def _loaded(text: str | None) -> Any:
    """A schema's JSON text, loaded once (rows share schemas; the body only serialises it); None for none,
    or for text that is not JSON (the answer's check makes that the row's error)."""
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def _usage(body: dict) -> dict:
    usage = body.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise MalformedAnswer(f"malformed OpenAI response: usage is {type(usage).__name__}")
    return usage or {}


def _best(alternatives: list[dict], k: int) -> list[dict]:
    """The k most likely, best first (vLLM lists the sampled token first, whatever its rank)."""
    return sorted(alternatives, key=lambda a: -a["logprob"])[:k]


def _alt(token: Any, logprob: Any) -> dict:
    """One alternative of a token: the top_logprobs column's struct."""
    if not isinstance(token, str):
        raise TypeError(token)
    return {"token": token, "logprob": float(logprob)}


def _reasoning(choice: dict) -> str | None:
    """A reasoning model's thinking, which vLLM's reasoning parser sends beside the answer (`reasoning`;
    `reasoning_content` before vLLM 0.10, and in SGLang)."""
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    found = message.get("reasoning", message.get("reasoning_content"))
    return found if isinstance(found, str) else None


def _ending(choice: dict, i: int) -> dict:
    """Why choice i ended, in the engine's words: finish_reason, and vLLM's stop_reason when it is the stop
    string that matched (a token id or null: not a string; SGLang's matched_stop likewise)."""
    reason = choice.get("finish_reason")
    if reason is not None and not isinstance(reason, str):
        raise MalformedAnswer(f"malformed OpenAI response: choices[{i}].finish_reason is {reason!r}")
    stop = choice.get("stop_reason", choice.get("matched_stop"))
    return {"finish_reason": reason, "stop": stop if isinstance(stop, str) else None}


def openai_api(cfg: Config) -> str:
    """completions for the cards' prompt formats; chat where the tokenizer's template renders the prompt."""
    return cfg.engine.api or ("chat" if cfg.model.prompt.format == "chat_template" else "completions")


Codec = OpenAICodec


def detect(http: Http) -> bool:
    """GET /v1/models answers 200 (a connection error propagates: the server is not up yet)."""
    return http("GET", "/v1/models").status_code == 200


def discover(cfg: Config, url: str, http: Http) -> EngineInfo:
    """The served model's name and max_model_len (GET /v1/models), the API, and whether /tokenize works."""
    info = engine_info(cfg, url, NAME)
    resp = http("GET", "/v1/models")
    body = _json(resp)
    if resp.status_code != 200:
        raise TransientError(f"GET /v1/models: HTTP {resp.status_code}: {str(body)[:200]}")
    try:
        model = body["data"][0]
        info.model_name = model["id"]
    except (KeyError, IndexError, TypeError):
        raise RejectedError(f"GET /v1/models lists no model: {str(body)[:200]}") from None
    info.max_model_len = model.get("max_model_len") if isinstance(model.get("max_model_len"), int) else None
    info.api = openai_api(cfg)
    if cfg.engine.use_tokenizer:
        info.can_tokenize = _tokenize_works(http, info.model_name)
    return info


def _tokenize_works(http: Http, model: str) -> bool:
    try:
        resp = http("POST", "/tokenize", json={"model": model, "prompt": PROBE_PROMPT})
        body = _json(resp)
        return resp.status_code == 200 and isinstance(body, dict) and isinstance(body.get("count"), int)
    except requests.RequestException:
        return False
