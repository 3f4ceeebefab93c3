"""NeMo (`PUT /generate`): one generation at a time on the server, so throughput comes from up to 128
prompts per request and a next request always waiting.

Detection: NeMo's 2024 containers have no route but PUT /generate, so a server that answers neither
OpenAI's nor Triton's probe is taken for NeMo (the registry tries this module last). Discovery learns
nothing more than the configured model name; the readiness generation proves the rest.
"""
from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from typing import Any

from ..config import Config
from ..errors import ConfigError
from .base import (
    DEFAULT_ROW,
    Completion,
    EngineInfo,
    Http,
    MalformedAnswer,
    RejectedError,
    RowSampling,
    _status,
    _text,
    engine_info,
    logprobs_problem,
    row_fields,
)

# RowSampling's fields, as NeMo's /generate names them
NEMO_FIELDS = {"max_tokens": "tokens_to_generate", "temperature": "temperature", "top_p": "top_p",
               "seed": "random_seed"}

NAME = "nemo"
NEMO_MAX_SENTENCES = 128


def _count_output_tokens(tokens: list[str], prompt: str) -> int:
    """Tokens past the echoed prompt: NeMo returns tokens for prompt + generation. (A sentencepiece
    token's "\u2581" stands for one space, so token lengths are text lengths.)"""
    if not prompt:
        return len(tokens)
    ends = list(accumulate(map(len, tokens)))
    return len(tokens) - min(len(tokens), bisect_left(ends, len(prompt)) + 1)


def _sentence(i: int, text: Any, tok: Any, prompt: str, logprob: Any = None, want: bool = False) -> Completion:
    """Sentence i of an answer with its tokens (and, want: their logprobs); raises MalformedAnswer when one
    is unusable."""
    if tok is not None and not (isinstance(tok, list) and all(isinstance(t, str) for t in tok)):
        raise MalformedAnswer(f"malformed NeMo response: tokens[{i}] is {str(tok)[:50]}, not a list of strings")
    if not tok:
        if want:
            raise MalformedAnswer(f"malformed NeMo response: no tokens[{i}] to place its logprobs "
                                  f"(compute_logprob=true)")
        return Completion(_text(text, f"sentences[{i}]"), None)
    generated = _count_output_tokens(tok, prompt)  # the rest of its tokens are the prompt's
    found = {}
    if want:
        # logprob[j] is token j + 1's, given the tokens before it (the first token has none): the generated
        # tokens' are the last `generated`. NeMo gives no alternatives without all_probs (top_logprobs: none)
        if not isinstance(logprob, list) or len(logprob) != len(tok) - 1 or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in logprob):
            raise MalformedAnswer(f"malformed NeMo response: logprob[{i}] is not one number per token after the "
                                  f"first ({len(tok) - 1})")
        chosen = [float(x) for x in logprob[len(logprob) - generated:]] if generated else []
        found = {"token_logprobs": chosen, "top_logprobs": [[] for _ in chosen]}
    return Completion(_text(text, f"sentences[{i}]"), generated, prompt_tokens=len(tok) - generated, **found)


def nemo_copies(cfg: Config) -> bool:
    """Whether a row's rollouts go to NeMo as copies of its prompt in one request under one seed: only with
    an explicit sampling.rollouts_in_one_request=true (never by default: its answers are not those of one
    request per rollout, so preflight.fingerprint records it)."""
    return cfg.sampling.rollouts > 1 and cfg.sampling.rollouts_in_one_request is True


class NemoCodec:
    name = "nemo"
    method = "PUT"
    path = "/generate"
    echoes_prompt = True
    takes_seed = True  # random_seed: one per request

    def __init__(self, cfg: Config, info: EngineInfo | None = None, one_request: bool | None = None):
        refused = logprobs_problem(cfg, cfg.engine.name, NAME)  # found only now where the protocol was detected
        if refused:
            raise ConfigError(refused)
        self.logprobs = cfg.sampling.logprobs is not None  # sampling.logprobs=0: compute_logprob
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
        if self.logprobs:
            self.base["compute_logprob"] = True
        self.base.update(cfg.engine.extra_body)

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1, row: RowSampling = DEFAULT_ROW) -> dict:
        """n > 1: each prompt n times (a row's rollouts as copies: NeMo has no n), all under one seed. row: the
        batch's own settings (every prompt of a batch has the same)."""
        body = dict(self.base, sentences=prompts if n == 1 else [p for p in prompts for _ in range(n)])
        if row != DEFAULT_ROW:
            body.update(row_fields(row, NEMO_FIELDS))
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
        logprobs = body.get("logprob") if self.logprobs else [None] * len(prompts)
        if not isinstance(logprobs, list) or len(logprobs) != len(prompts):
            raise MalformedAnswer(f"malformed NeMo response: expected {len(prompts)} logprob lists "
                                  f"(compute_logprob=true, sampling.logprobs=0)")
        # each sentence on its own: an unusable one is its row's error, the batch's others are answers
        return [Completion.checked(lambda i=i, text=text, tok=tok, prompt=prompt, lp=lp:
                                   _sentence(i, text, tok, prompt, lp, self.logprobs))
                for i, (text, tok, prompt, lp) in enumerate(zip(sentences, tokens, prompts, logprobs))]


Codec = NemoCodec


def detect(http: Http) -> bool:
    """Always: PUT /generate is NeMo's only route in the 2024 containers, and probing it would generate, so
    NeMo is what a server that speaks neither of the protocols tried before it is taken for."""
    return True


def discover(cfg: Config, url: str, http: Http) -> EngineInfo:
    """The configured model name: NeMo's server has no route that names its model or limits."""
    return engine_info(cfg, url, NAME)
