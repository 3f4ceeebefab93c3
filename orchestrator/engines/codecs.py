"""Request/response codecs: how each engine protocol wants prompts sent and answers read.

- NeMo (`PUT /generate`): one generation at a time on the server, so throughput comes from up to 128
  prompts per request and a next request always waiting.
- OpenAI (`POST /v1/completions` or `/v1/chat/completions`: vLLM, SGLang, TRT-LLM): continuous
  batching, so one prompt per request and many requests in flight.
- Triton / KServe v2 (`POST /v2/models/{name}/infer` with named tensors, as NeMo's deploy_triton.py
  serves it, or the generate extension `POST /v2/models/{name}/generate`).

Every field of every answer is checked: an answer we cannot use is a `RejectedError` for its rows
(recorded as row errors), never a crash.

Several answers per prompt (sampling.rollouts > 1): every request carries its own seed (`payload(...,
seed=)`), so NeMo and Triton get one prompt per request (one seed each); the OpenAI codec may ask for a
row's consecutive rollouts in one request (`n`, seed = the first one's), which vLLM serves as n requests
with seeds seed, seed + 1, ...: the answers of n separate requests. NeMo, with
sampling.rollouts_in_one_request=true, gets a row's rollouts as copies of its prompt in one request under
one seed (`copies`): rollout k is copy k, whose answer depends on the whole batch, so the client always
sends a row's copies together.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from ..config import Config, default_capacity

NEMO_MAX_SENTENCES = 128


class TransientError(Exception):
    """Worth retrying: 5xx, 429, connection reset, timeout."""


class RejectedError(Exception):
    """The engine refused the request, or answered something unusable; retrying at once cannot help."""


class MalformedAnswer(RejectedError):
    """The engine answered something unusable: its fault, not the row's (retry_failed=true may recover it)."""


@dataclass
class Completion:
    text: str  # the engine's output for one prompt, echo included where the engine echoes
    output_tokens: int | None


@dataclass
class EngineInfo:
    """What readiness learnt about a running engine; codecs are built from it."""

    url: str
    protocol: str  # nemo, openai or triton
    model_name: str
    api: str = "completions"  # openai: completions or chat; triton: infer or generate
    max_model_len: int | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # triton: the model's input tensors, name -> datatype
    can_tokenize: bool = False  # POST /tokenize counts tokens (vLLM, SGLang)
    max_batch_size: int | None = None  # triton: rows one request may carry (the model config's max_batch_size)


def _count_output_tokens(tokens: list[str], prompt: str) -> int:
    """Tokens past the echoed prompt: NeMo returns tokens for prompt + generation. (A sentencepiece
    token's "\u2581" stands for one space, so token lengths are text lengths.)"""
    if not prompt:
        return len(tokens)
    ends = list(accumulate(map(len, tokens)))
    return len(tokens) - min(len(tokens), bisect_left(ends, len(prompt)) + 1)


def _status(status: int, body: Any, message: Any = None) -> None:
    """5xx and 429 are worth a retry; any other non-200 is the engine refusing the request."""
    if status >= 500 or status == 429:
        raise TransientError(f"HTTP {status}: {str(body)[:200]}")
    if status != 200:
        raise RejectedError(f"HTTP {status}: {str(message if message is not None else body)[:500]}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedAnswer(f"malformed answer: {what} is {type(value).__name__}, not text")
    return value


def _tokens(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedAnswer(f"malformed answer: {what} is {value!r}, not a token count")
    return value


def rollouts_in_one_request(cfg: Config) -> bool:
    """sampling.rollouts_in_one_request, or the engine's default: vLLM (and the embedded engine, which
    copies it) answer `n` with seeds seed + i; for other engines that is not known, so one request a rollout.
    On NeMo only an explicit true counts: it sends a row's rollouts as copies of its prompt in one request
    (other answers than one request per rollout, so the resume check includes it: launch.fingerprint)."""
    chosen = cfg.sampling.rollouts_in_one_request
    if chosen is not None:
        return bool(chosen)
    from .base import adapter_for

    return adapter_for(cfg).honours_n


def nemo_copies(cfg: Config) -> bool:
    """Whether a row's rollouts go to NeMo as copies of its prompt in one request under one seed: only with
    an explicit sampling.rollouts_in_one_request=true (never by default: its answers are not those of one
    request per rollout, so launch.fingerprint records it)."""
    return cfg.sampling.rollouts > 1 and cfg.sampling.rollouts_in_one_request is True


class NemoCodec:
    name = "nemo"
    method = "PUT"
    path = "/generate"
    echoes_prompt = True
    takes_seed = True  # random_seed: one per request

    def __init__(self, cfg: Config, info: EngineInfo | None = None):
        # one random_seed per request: with several rollouts every prompt has its own, so one prompt a request
        rollouts = cfg.sampling.rollouts
        self.batch_size = 1 if rollouts > 1 else min(cfg.client.batch_size, NEMO_MAX_SENTENCES)
        # sampling.rollouts_in_one_request=true: a row's rollouts go as copies of its prompt in one request (one
        # random_seed: rollout k is copy k of the batch), up to 128 a request; false: one request per rollout
        self.copies = nemo_copies(cfg)
        self.max_n = min(rollouts, NEMO_MAX_SENTENCES) if self.copies else 1
        self.in_flight = cfg.client.max_in_flight or 2
        s = cfg.sampling
        self.base: dict[str, Any] = {
            "tokens_to_generate": s.tokens_to_generate,
            "temperature": s.temperature,
            "add_BOS": s.add_BOS,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "greedy": s.greedy,
            "all_probs": False,
            "repetition_penalty": s.repetition_penalty,
            "min_tokens_to_generate": s.min_tokens_to_generate,
            "end_strings": cfg.end_strings,
        }
        if s.seed is not None:
            self.base["random_seed"] = s.seed
        self.base.update(cfg.engine.extra_body)

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1) -> dict:
        """n > 1: each prompt n times (a row's rollouts as copies: NeMo has no n), all under one seed."""
        body = dict(self.base, sentences=prompts if n == 1 else [p for p in prompts for _ in range(n)])
        if seed is not None:
            body["random_seed"] = seed
        if tokens_to_generate is not None:
            body["tokens_to_generate"] = tokens_to_generate
            body["min_tokens_to_generate"] = 0
        return body

    def parse(self, status: int, body: Any, prompts: list[str], n: int = 1) -> list[Completion]:
        if n > 1:  # the copies payload sent
            prompts = [p for p in prompts for _ in range(n)]
        _status(status, body)
        if not isinstance(body, dict):  # NeMo answers a validation failure with a bare string and 200
            raise RejectedError(f"engine rejected the request: {str(body)[:500]}")
        sentences = body.get("sentences")
        if not isinstance(sentences, list) or len(sentences) != len(prompts):
            raise MalformedAnswer(f"malformed NeMo response: expected {len(prompts)} sentences")
        tokens = body.get("tokens") or [None] * len(prompts)
        if not isinstance(tokens, list) or len(tokens) != len(prompts):
            raise MalformedAnswer(f"malformed NeMo response: expected {len(prompts)} token lists")
        out = []
        for i, (text, tok, prompt) in enumerate(zip(sentences, tokens, prompts)):
            if tok is not None and not (isinstance(tok, list) and all(isinstance(t, str) for t in tok)):
                raise MalformedAnswer(f"malformed NeMo response: tokens[{i}] is {str(tok)[:50]}, not a list of strings")
            out.append(Completion(_text(text, f"sentences[{i}]"), _count_output_tokens(tok, prompt) if tok else None))
        return out


class OpenAICodec:
    """`/v1/completions` (the card's prompt format, rendered here) or `/v1/chat/completions` (the
    tokenizer's chat template, rendered by the engine)."""

    name = "openai"
    method = "POST"
    echoes_prompt = False
    takes_seed = True

    def __init__(self, cfg: Config, info: EngineInfo | None = None):
        self.chat = (info.api if info else openai_api(cfg)) == "chat"
        self.path = "/v1/chat/completions" if self.chat else "/v1/completions"
        self.batch_size = 1
        rollouts = cfg.sampling.rollouts
        self.max_n = rollouts if rollouts > 1 and rollouts_in_one_request(cfg) else 1  # answers one request may ask for
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
        self.base.update(cfg.engine.extra_body)

    def payload(self, prompts: list, tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1) -> dict:
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
        if seed is not None:
            body["seed"] = seed
        if n > 1:
            body["n"] = n
            body["return_token_ids"] = True
        if tokens_to_generate is not None:
            body["max_tokens"] = tokens_to_generate
            body["min_tokens"] = 0
        return body

    def parse(self, status: int, body: Any, prompts: list[str], n: int = 1) -> list[Completion]:
        if status != 200:
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else (body.get("detail") if isinstance(body, dict) else body)
            _status(status, body, message)
        if n > 1:
            return self._parse_choices(body, n)
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise MalformedAnswer(f"malformed OpenAI response: no choices[0].{'message.content' if self.chat else 'text'}") from None
        usage = body.get("usage")
        if usage is not None and not isinstance(usage, dict):
            raise MalformedAnswer(f"malformed OpenAI response: usage is {type(usage).__name__}")
        return [Completion(_text(text, "choices[0].text"), _tokens((usage or {}).get("completion_tokens"),
                                                                  "usage.completion_tokens"))]

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
        out = []
        for choice in sorted(choices, key=lambda c: c["index"]):
            i = choice["index"]
            try:
                text = choice["message"]["content"] if self.chat else choice["text"]
            except (KeyError, TypeError):
                raise MalformedAnswer(f"malformed OpenAI response: no choices[{i}].{'message.content' if self.chat else 'text'}") from None
            ids = choice.get("token_ids")
            if ids is not None and not isinstance(ids, list):
                raise MalformedAnswer(f"malformed OpenAI response: choices[{i}].token_ids is {type(ids).__name__}")
            out.append(Completion(_text(text, f"choices[{i}].text"), len(ids) if ids is not None else None))
        return out


TRITON_MAX_LEN_INPUTS = ("max_output_len", "max_output_token", "max_tokens")


class TritonCodec:
    """KServe v2 over HTTP as NeMo's deploy_triton.py (PyTriton) serves it: `/infer` with named tensors,
    one row per prompt, sending only the inputs the model's metadata lists; or the generate extension
    (`/generate`, one prompt, `text_input` -> `text_output`) for TRT-LLM backend ensembles."""

    name = "triton"
    method = "POST"
    echoes_prompt = False

    def __init__(self, cfg: Config, info: EngineInfo | None = None):
        model = info.model_name if info else (cfg.engine.served_model_name or cfg.model.name)
        self.generate = bool(info and info.api == "generate")
        self.path = f"/v2/models/{model}/{'generate' if self.generate else 'infer'}"
        self.inputs = dict(info.inputs) if info and info.inputs else {
            "prompts": "BYTES", "max_output_len": "INT64", "top_k": "INT64", "top_p": "FP32", "temperature": "FP32"}
        limit = (info.max_batch_size if info else None) or cfg.engine.options.get("max_batch_size") or 128
        # NeMo's model reads sampling inputs from the first row only: one prompt a request when each has its seed
        self.batch_size = 1 if self.generate or cfg.sampling.rollouts > 1 else min(cfg.client.batch_size, limit)
        self.in_flight = cfg.client.max_in_flight or (2 * default_capacity(cfg) if self.generate else 2)
        self.sampling = cfg.sampling
        self.end_strings = list(cfg.end_strings)
        self.extra_body = dict(cfg.engine.extra_body)

    @property
    def takes_seed(self) -> bool:
        """Whether a request can carry its own seed: the model has a random_seed input (the generate route's
        TRT-LLM ensemble has one)."""
        return self.generate or "random_seed" in self.inputs

    def _tensors(self, n: int, tokens: int, seed: int | None = None) -> list[dict]:
        s = self.sampling
        values = {"top_k": 1 if s.greedy else s.top_k, "top_p": s.top_p, "temperature": s.temperature,
                  "random_seed": s.seed if seed is None else seed, **{name: tokens for name in TRITON_MAX_LEN_INPUTS}}
        out = []
        for name, value in values.items():  # each with the datatype the model's metadata gives
            if name in self.inputs and value is not None:
                out.append({"name": name, "datatype": self.inputs[name], "shape": [n, 1], "data": [value] * n})
        if self.end_strings and "stop_words_list" in self.inputs:
            out.append({"name": "stop_words_list", "datatype": "BYTES", "shape": [n, len(self.end_strings)],
                        "data": self.end_strings * n})
        return out

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1) -> dict:
        if n != 1:
            raise ValueError("Triton has no n: send one request per answer")
        tokens = tokens_to_generate or self.sampling.tokens_to_generate
        if self.generate:
            s = self.sampling
            body = {"text_input": prompts[0], "max_tokens": tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "top_k": 1 if s.greedy else s.top_k}
            if self.end_strings:
                body["stop_words"] = self.end_strings
            if seed is not None:  # a rollout's own seed (the ensemble's random_seed input)
                body["random_seed"] = seed
            return dict(body, **self.extra_body)
        prompt = {"name": "prompts", "datatype": "BYTES", "shape": [len(prompts), 1], "data": list(prompts)}
        return {"inputs": [prompt] + self._tensors(len(prompts), tokens, seed)}

    def parse(self, status: int, body: Any, prompts: list[str], n: int = 1) -> list[Completion]:
        if status != 200:
            _status(status, body, body.get("error") if isinstance(body, dict) else body)
        if not isinstance(body, dict):
            raise MalformedAnswer(f"malformed Triton response: {str(body)[:200]}")
        if self.generate:
            return [Completion(_text(body.get("text_output"), "text_output"), None)]
        outputs = body.get("outputs")
        found = [o for o in outputs if isinstance(o, dict) and o.get("name") == "outputs"] if isinstance(outputs, list) else []
        data = found[0].get("data") if found else None
        if not isinstance(data, list) or len(data) != len(prompts):
            raise MalformedAnswer(f"malformed Triton response: expected an 'outputs' tensor of {len(prompts)} rows")
        return [Completion(_text(text, f"outputs[{i}]"), None) for i, text in enumerate(data)]


CODECS = {"nemo": NemoCodec, "openai": OpenAICodec, "triton": TritonCodec}


def openai_api(cfg: Config) -> str:
    """completions for the cards' prompt formats; chat where the tokenizer's template renders the prompt."""
    return cfg.engine.api or ("chat" if cfg.model.prompt.format == "chat_template" else "completions")


def make_codec(cfg: Config, info: EngineInfo | None = None, protocol: str | None = None):
    name = info.protocol if info else (protocol or cfg.engine.protocol or "nemo")
    return CODECS[name](cfg, info)
