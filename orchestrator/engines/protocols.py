"""Request/response codecs: how each engine protocol wants prompts sent and answers read.

NeMo (`PUT /generate`): one generation at a time on the server, so throughput comes from up to 128
prompts per request and a next request always waiting. OpenAI (`POST /v1/completions`, vLLM and
TRT-LLM): continuous batching, so one prompt per request and many requests in flight.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from ..config import Config

NEMO_MAX_SENTENCES = 128


class TransientError(Exception):
    """Worth retrying: 5xx, 429, connection reset, timeout."""


class RejectedError(Exception):
    """The engine refused the request; retrying the same request cannot help."""


@dataclass
class Completion:
    text: str  # the engine's output for one prompt, echo included where the engine echoes
    output_tokens: int | None


def _count_output_tokens(tokens: list[str], prompt: str) -> int:
    """Tokens past the echoed prompt: NeMo returns tokens for prompt + generation. (A sentencepiece
    token's "\u2581" stands for one space, so token lengths are text lengths.)"""
    if not prompt:
        return len(tokens)
    ends = list(accumulate(map(len, tokens)))
    return len(tokens) - min(len(tokens), bisect_left(ends, len(prompt)) + 1)


class NemoProtocol:
    name = "nemo"
    method = "PUT"
    path = "/generate"
    echoes_prompt = True

    def __init__(self, cfg: Config):
        self.batch_size = min(cfg.client.batch_size, NEMO_MAX_SENTENCES)
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

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None) -> dict:
        body = dict(self.base, sentences=prompts)
        if tokens_to_generate is not None:
            body["tokens_to_generate"] = tokens_to_generate
            body["min_tokens_to_generate"] = 0
        return body

    def parse(self, status: int, body: Any, prompts: list[str]) -> list[Completion]:
        if status >= 500 or status == 429:
            raise TransientError(f"HTTP {status}: {str(body)[:200]}")
        if status != 200:
            raise RejectedError(f"HTTP {status}: {str(body)[:500]}")
        if not isinstance(body, dict):  # NeMo answers a validation failure with a bare string and 200
            raise RejectedError(f"engine rejected the request: {str(body)[:500]}")
        sentences = body.get("sentences")
        if not isinstance(sentences, list) or len(sentences) != len(prompts):
            raise RejectedError(f"malformed NeMo response: expected {len(prompts)} sentences")
        tokens = body.get("tokens") or [None] * len(prompts)
        return [Completion(text, _count_output_tokens(tok, prompt) if isinstance(tok, list) else None)
                for text, tok, prompt in zip(sentences, tokens, prompts)]


class OpenAIProtocol:
    name = "openai"
    method = "POST"
    path = "/v1/completions"
    echoes_prompt = False

    def __init__(self, cfg: Config, model_name: str = "mock"):
        self.batch_size = 1
        self.in_flight = cfg.client.max_in_flight or 2 * cfg.engine.capacity
        s = cfg.sampling
        self.base: dict[str, Any] = {
            "model": model_name,
            "max_tokens": s.tokens_to_generate,
            "temperature": 0.0 if s.greedy else s.temperature,
            "top_p": s.top_p if not s.greedy else 1.0,
            "stop": cfg.end_strings,
            "min_tokens": s.min_tokens_to_generate,
            "repetition_penalty": s.repetition_penalty,
        }
        if s.top_k > 0:
            self.base["top_k"] = s.top_k
        if s.seed is not None:
            self.base["seed"] = s.seed

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None) -> dict:
        body = dict(self.base, prompt=prompts[0])
        if tokens_to_generate is not None:
            body["max_tokens"] = tokens_to_generate
            body["min_tokens"] = 0
        return body

    def parse(self, status: int, body: Any, prompts: list[str]) -> list[Completion]:
        if status >= 500 or status == 429:
            raise TransientError(f"HTTP {status}: {str(body)[:200]}")
        if status != 200:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else body
            raise RejectedError(f"HTTP {status}: {str(message)[:500]}")
        try:
            text = body["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise RejectedError("malformed OpenAI response: no choices[0].text") from None
        usage = body.get("usage") or {}
        return [Completion(text, usage.get("completion_tokens"))]


def make_protocol(cfg: Config, model_name: str = "mock"):
    if cfg.engine.protocol == "nemo":
        return NemoProtocol(cfg)
    return OpenAIProtocol(cfg, model_name)
