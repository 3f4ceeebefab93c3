"""Embedded engine: a real aiohttp server that simulates an LLM inference engine.

It speaks three protocol families, each the way the real server answers (status codes, error bodies,
field names), with a deterministic generation model (:func:`simulate`) and a latency/capacity
model; ``GET /stats`` exposes counters. It stands in for a GPU engine in tests and benchmarks:

- ``nemo``: NeMo Megatron's text-generation server, ``PUT /generate``.
- ``openai``: vLLM's OpenAI-compatible server, ``POST /v1/completions``, ``POST /v1/chat/completions``
  (Nemotron-4 chat template), ``POST /tokenize``, ``GET /v1/models``, ``GET /health``; unknown
  routes answer FastAPI's ``{"detail": "Not Found"}``.
- ``triton``: Triton's KServe v2 HTTP API in front of NeMo's ``deploy_triton.py`` (PyTriton) model
  (or, with ``--triton-model trtllm``, a TensorRT-LLM backend ensemble): ``GET /v2/health/ready``,
  ``/v2/health/live``, ``/v2/models/{name}[/versions/1]`` (metadata), ``.../ready``, ``.../config``,
  ``POST .../infer`` and the generate extension ``POST .../generate``.

``--routes`` picks the families served (default all), so a test can stand up a server that looks
like a real vLLM, NeMo or Triton server and no other:

    python -m orchestrator.engines.embedded --port 0 --port-file /tmp/engine.port --routes openai

``--require-key-env NAME`` makes every route require ``Authorization: Bearer $NAME`` (401
``{"error": "Unauthorized"}`` otherwise, as vLLM's ``--api-key``), ``--revoke-key-after N`` refuses the
key after N requests (a key revoked mid-run), and ``--tls-cert``/``--tls-key`` serve HTTPS.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
import zlib
from bisect import bisect_left, bisect_right
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from functools import lru_cache, partial
from itertools import accumulate
from pathlib import Path
from typing import Callable

from aiohttp import web

MARKER = "[simulated]"
EOS = "<|endoftext|>"
TURN_END = "<extra_id_1>"         # a Nemotron chat model's end of turn (a special token)
MAX_SENTENCES = 128
VOCAB_SIZE = 256000
ROUTE_FAMILIES = ("nemo", "openai", "triton")
VOCABULARY = tuple(
    "the a an and or but of to in on at for with from by about into over after before under is are "
    "was were be been has have had do does did can could will would should may might time year people "
    "way day man thing woman life child world school state family student group country problem hand "
    "part place case week company system program question work number night point home water room "
    "mother area money story fact month lot right study book eye job word good new first last long "
    "great little own other old big high different small large next early young important few public "
    "bad same able simple clear quick green blue answer model text".split()
)
_VOCAB_TOKENS = tuple(" " + w for w in VOCABULARY)
# Special tokens (<extra_id_N>, <|endoftext|>) are single tokens, as in the real tokenizers; every
# other token is optional whitespace and a run of non-space characters, or trailing whitespace.
_SPECIAL = r"<(?:extra_id_\d+|\|endoftext\|)>"
_NOT_SPECIAL = r"<(?!extra_id_\d+>|\|endoftext\|>)"
_TOKEN_RE = re.compile(rf"{_SPECIAL}|\s*(?:[^\s<]|{_NOT_SPECIAL})[^\s<]*(?:{_NOT_SPECIAL}[^\s<]*)*|\s+")
_SPECIAL_RE = re.compile(_SPECIAL)
_dumps = partial(json.dumps, separators=(",", ":"))


@dataclass
class EngineSettings:
    """Configuration of one simulated engine."""

    host: str = "127.0.0.1"          # never 0.0.0.0 unless told
    port: int = 0                    # 0 = pick a free port
    request_latency_s: float = 0.0   # fixed time per request (per batch on the NeMo and Triton routes)
    token_latency_s: float = 0.0     # time per generated token
    capacity: int = 256              # sequences worked on at once (OpenAI routes); more wait FIFO
    error_rate: float = 0.0          # fraction of requests answered with HTTP 500 (deterministic from seed)
    seed: int = 0                    # output is a pure function of (prompt, seed, request params)
    max_natural_tokens: int = 512    # a prompt's natural answer length is 1..max_natural_tokens
    model_name: str = "mock"         # the OpenAI model id and the Triton model name
    max_model_len: int = 4096
    stall_rate: float = 0.0          # fraction of requests that hang for stall_s before being served (timeouts)
    stall_s: float = 30.0
    routes: str = "nemo,openai,triton"          # protocol families served (comma-separated)
    triton_model: str = "nemo"                  # "nemo" (deploy_triton.py, PyTriton) or "trtllm" (TRT-LLM ensemble)
    triton_max_len_input: str = "max_output_len"  # NeMo's name for the length input ("max_output_token" in 2023)
    triton_max_batch_size: int = 8              # deploy_triton.py --max_batch_size (its default is 8)
    require_key_env: str = ""        # every route requires Authorization: Bearer <this variable's value> (vLLM's --api-key)
    revoke_key_after: int = -1       # with require_key_env: the key is refused after this many requests (a key revoked mid-run)
    tls_cert: str = ""               # serve HTTPS with this PEM certificate (chain) ...
    tls_key: str = ""                # ... and this PEM private key


def tokenize(text: str) -> list[str]:
    """Split text into token strings whose concatenation is exactly ``text``."""
    return _TOKEN_RE.findall(text)


def is_special(token: str) -> bool:
    """True for special tokens (``<extra_id_N>``, ``<|endoftext|>``): vLLM drops them from the text
    under ``skip_special_tokens`` (its default)."""
    return _SPECIAL_RE.fullmatch(token) is not None


@lru_cache(maxsize=1 << 16)
def token_id(token: str) -> int:
    """A stable id for a token string."""
    return zlib.crc32(token.encode("utf-8", "surrogatepass")) % VOCAB_SIZE


def _logprob(token: str) -> float:
    return -((token_id(token) % 997) + 1) / 250.0


@lru_cache(maxsize=1024)
def _stop_tokens(end_strings: tuple[str, ...]) -> frozenset[str]:
    ends = set(end_strings)
    return frozenset(t for t in (MARKER, *_VOCAB_TOKENS) if t in ends or t.strip() in ends)


def _rng(*parts) -> random.Random:
    key = "\x00".join(map(str, parts)).encode("utf-8", "surrogatepass")
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))


def simulate(
    prompt: str, tokens_to_generate: int, end_strings: list[str], seed: int, max_natural_tokens: int
) -> tuple[list[str], list[str]]:
    """Pure and deterministic. Returns (prompt_tokens, generated_tokens): token strings whose
    concatenation is exactly the prompt / exactly the generated text.

    The generation is ``[simulated]`` then vocabulary words (each ``" word"``), at most
    ``tokens_to_generate`` tokens in all. Its natural length L (1..max_natural_tokens) comes from a
    blake2b hash of (seed, prompt); when L <= tokens_to_generate (and L >= 2) the model ends its turn
    in the last token: with ``<extra_id_1>`` (a chat model's end of turn) when that is one of the
    end strings, after a ``"\\n"`` as in the Nemotron chat format, else with ``end_strings[0]``. A
    token equal to an end string (after stripping) ends the generation right after it.
    """
    prompt_tokens = _TOKEN_RE.findall(prompt)
    rng = _rng(seed, prompt)
    natural = rng.randrange(max(1, max_natural_tokens)) + 1
    n = min(natural, tokens_to_generate)
    if n <= 0:
        return prompt_tokens, []
    generated = [MARKER]
    generated += rng.choices(_VOCAB_TOKENS, k=n - 1)
    if end_strings:
        stops = _stop_tokens(tuple(end_strings))
        if stops:
            for i, tok in enumerate(generated):
                if tok in stops:
                    return prompt_tokens, generated[: i + 1]
        if natural <= tokens_to_generate and n >= 2:
            if TURN_END in end_strings:
                generated[-1] = TURN_END
                if n >= 3:
                    generated[-2] = "\n"
            else:
                generated[-1] = end_strings[0]
    return prompt_tokens, generated


def _continuation(prompt: str, seed: int, max_natural_tokens: int) -> list[str]:
    """What the model writes when its end of turn (``<extra_id_1>``) did not stop it: a made-up next
    user turn, then its EOS."""
    rng = _rng(seed, prompt, "next turn")
    words = rng.randrange(max(1, min(24, max_natural_tokens))) + 1
    return ["User", "\n", *rng.choices(_VOCAB_TOKENS, k=words), EOS]


@dataclass
class _Generation:
    text: str               # what the engine returns (no prompt)
    completion_tokens: int  # usage.completion_tokens
    finish_reason: str      # "stop" or "length"
    stop_reason: str | int | None  # the stop string or stop token id that fired (vLLM's stop_reason)
    generated: int          # tokens the model produced (for the latency model)
    token_ids: tuple = ()   # the ids of the completion_tokens tokens (vLLM's return_token_ids)


def generate_text(prompt: str, max_tokens: int, stop: list[str], seed: int, max_natural_tokens: int, *,
                  skip_special_tokens: bool, stop_token_ids=(), include_stop_str: bool = False) -> _Generation:
    """See _generate_text; with the ids of the tokens it counts."""
    g, gen = _generate_text(prompt, max_tokens, stop, seed, max_natural_tokens, skip_special_tokens=skip_special_tokens,
                            stop_token_ids=stop_token_ids, include_stop_str=include_stop_str)
    g.token_ids = tuple(map(token_id, gen[:g.completion_tokens]))
    return g


def _generate_text(prompt: str, max_tokens: int, stop: list[str], seed: int, max_natural_tokens: int, *,
                   skip_special_tokens: bool, stop_token_ids=(), include_stop_str: bool = False
                   ) -> tuple[_Generation, list[str]]:
    """One completion as an OpenAI-style server (and Triton) returns it: no prompt echo, EOS ends the
    generation and is never shown, stop strings are matched on the detokenized text.

    With ``skip_special_tokens`` (vLLM's default) special tokens are left out of the text, so a stop
    string such as ``<extra_id_1>`` can never match: when the model ends its turn with it the
    generation runs on into a made-up next turn (``"User\\n..."``) until EOS or ``max_tokens``,
    as a real vLLM does. ``stop_token_ids`` stop on the token itself, skipped or not.
    """
    stop = [s for s in stop if s]
    ends = stop + [EOS]
    if token_id(TURN_END) in stop_token_ids:
        ends.append(TURN_END)  # the client names the end of turn by its id: the model ends its turn with it
    _, gen = simulate(prompt, max_tokens, ends, seed, max_natural_tokens)
    if (len(gen) >= 2 and gen[-1] == TURN_END and len(gen) < max_tokens and skip_special_tokens
            and token_id(TURN_END) not in stop_token_ids):
        gen += _continuation(prompt, seed, max_natural_tokens)[: max_tokens - len(gen)]
    eos = gen.index(EOS) if EOS in gen else -1
    limit = eos if eos >= 0 else len(gen)
    stop_at = -1
    if stop_token_ids:
        stop_at = next((i for i, tok in enumerate(gen[:limit]) if token_id(tok) in stop_token_ids), -1)
        limit = stop_at + 1 if stop_at >= 0 else limit
    pieces = gen[:limit]
    if skip_special_tokens:
        pieces = ["" if tok[:1] == "<" and is_special(tok) else tok for tok in pieces]
    text = "".join(pieces)
    if stop:
        offsets = list(accumulate(map(len, pieces)))  # where each token's text ends
        first = None  # (token that completes it, start, stop string): the first stop string completed wins
        for s in stop:
            j = text.find(s)
            if j >= 0 and (first is None or (bisect_left(offsets, j + len(s)), j) < first[:2]):
                first = (bisect_left(offsets, j + len(s)), j, s)
        if first is not None and (stop_at < 0 or first[0] < stop_at):
            done, j, s = first
            cut = j + len(s) if include_stop_str else j
            return _Generation(text[:cut], min(bisect_right(offsets, cut), done + 1), "stop", s, done + 1), gen
    if stop_at >= 0:
        return _Generation(text, stop_at + 1, "stop", token_id(gen[stop_at]), stop_at + 1), gen
    if eos >= 0:
        return _Generation(text, eos, "stop", None, eos + 1), gen
    return _Generation(text, len(gen), "length" if len(gen) >= max_tokens else "stop", None, len(gen)), gen


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The Nemotron-4 chat format: ``<extra_id_0>System\\n{system}\\n`` then one
    ``<extra_id_1>User|Assistant\\n{content}\\n`` per turn, then ``<extra_id_1>Assistant\\n``.
    ``messages`` must have passed :func:`_check_messages`."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = _content(messages[0]), messages[1:]
    parts = [f"<extra_id_0>System\n{system}\n"]
    parts += [f"<extra_id_1>{m['role'].capitalize()}\n{_content(m)}\n" for m in messages]
    if add_generation_prompt:
        parts.append("<extra_id_1>Assistant\n")
    return "".join(parts)


def _content(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


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


@dataclass(frozen=True)
class _Tensor:
    name: str
    datatype: str
    dims: tuple[int, ...]        # without the batch dimension (the models batch: max_batch_size > 0)
    optional: bool = True
    role: str | None = None      # prompt, max_tokens, seed, stop: what the simulation reads from it


@dataclass(frozen=True)
class _TritonModel:
    platform: str
    backend: str
    inputs: tuple[_Tensor, ...]
    output: _Tensor
    first_value: bool        # NeMo's @first_value: sampling inputs are read from the first row only
    default_max_tokens: int


def _triton_model(s: EngineSettings) -> _TritonModel:
    if s.triton_model == "nemo":
        # nemo/export/tensorrt_llm.py get_triton_input: Tensor(shape=(-1,)), np.int_ (INT64), np.single
        # (FP32), bytes (BYTES), all optional but the prompts; PyTriton's python backend.
        inputs = (
            _Tensor("prompts", "BYTES", (-1,), False, "prompt"),
            _Tensor(s.triton_max_len_input, "INT64", (-1,), role="max_tokens"),
            _Tensor("top_k", "INT64", (-1,)),
            _Tensor("top_p", "FP32", (-1,)),
            _Tensor("temperature", "FP32", (-1,)),
            _Tensor("random_seed", "INT64", (-1,), role="seed"),
            _Tensor("stop_words_list", "BYTES", (-1,), role="stop"),
            _Tensor("bad_words_list", "BYTES", (-1,)),
            _Tensor("no_repeat_ngram_size", "FP32", (-1,)),
            _Tensor("task_id", "BYTES", (-1,)),
            _Tensor("lora_uids", "BYTES", (-1,)),
        )
        return _TritonModel("python", "python", inputs, _Tensor("outputs", "BYTES", (-1,)), True, 64)
    if s.triton_model == "trtllm":
        # tensorrtllm_backend's inflight_batcher_llm ensemble (text in, text out).
        inputs = (
            _Tensor("text_input", "BYTES", (1,), False, "prompt"),
            _Tensor("max_tokens", "INT32", (1,), False, "max_tokens"),
            _Tensor("bad_words", "BYTES", (-1,)),
            _Tensor("stop_words", "BYTES", (-1,), role="stop"),
            _Tensor("end_id", "INT32", (1,)),
            _Tensor("pad_id", "INT32", (1,)),
            _Tensor("top_k", "INT32", (1,)),
            _Tensor("top_p", "FP32", (1,)),
            _Tensor("temperature", "FP32", (1,)),
            _Tensor("length_penalty", "FP32", (1,)),
            _Tensor("repetition_penalty", "FP32", (1,)),
            _Tensor("min_length", "INT32", (1,)),
            _Tensor("presence_penalty", "FP32", (1,)),
            _Tensor("frequency_penalty", "FP32", (1,)),
            _Tensor("random_seed", "UINT64", (1,), role="seed"),
            _Tensor("return_log_probs", "BOOL", (1,)),
            _Tensor("beam_width", "INT32", (1,)),
            _Tensor("stream", "BOOL", (1,)),
        )
        return _TritonModel("ensemble", "", inputs, _Tensor("text_output", "BYTES", (-1,)), False, 16)
    raise ValueError(f"triton_model must be 'nemo' or 'trtllm', not {s.triton_model!r}")


_INT_RANGES = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64}
_UINT_RANGES = {"UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64}
_TRITON_JSON_TYPES = {"BOOL", "FP32", "FP64", "BYTES", *_INT_RANGES, *_UINT_RANGES}
_BATCH_NOTE = ("NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be "
               "prepended to each input shape. If you want to specify the full shape including the batch dim "
               "in your input dims config, try setting max_batch_size to zero. See the model configuration "
               "docs for more info on max_batch_size.")


class _TritonError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _dims(dims) -> str:
    return "[" + ",".join(map(str, dims)) + "]"


def _flatten(data) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _read_json_data(name: str, datatype: str, data, count: int) -> list:
    """Triton's HTTP front end reading one JSON input's 'data' (http_server.cc ReadDataFromJson)."""
    values = _flatten(data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise _TritonError(500, "Unable to parse JSON bytes array: attempt to access JSON non-string as string")
        return values  # the element count is checked later, by the core
    if datatype in ("FP16", "BF16"):
        raise _TritonError(400, f"receiving {datatype} data via JSON is not supported. Please use the binary "
                                f"data format for input {name}")
    if datatype not in _TRITON_JSON_TYPES:
        raise _TritonError(400, f"invalid datatype for input {name}")
    for i, v in enumerate(values):
        if i >= count:
            raise _TritonError(500, "Unable to parse 'data': Shape does not match true shape of 'data' field")
        if datatype == "BOOL":
            ok, what = _is_bool(v), "boolean as boolean"
        elif datatype in _INT_RANGES:
            ok, what = _is_int(v) and -(2 ** 63) <= v < 2 ** 63, "signed-integer as signed-integer"
        elif datatype in _UINT_RANGES:
            ok, what = _is_int(v) and 0 <= v < 2 ** 64, "unsigned-integer as unsigned-integer"
        else:
            ok, what = _is_num(v), "number as double"
        if not ok:
            raise _TritonError(500, f"Unable to parse 'data': attempt to access JSON non-{what}")
    if len(values) != count:
        raise _TritonError(500, "Failed to parse 'data' field: shape does not match true shape")
    return values


class _Engine:
    def __init__(self, settings: EngineSettings):
        self.s = settings
        self.lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(settings.capacity)
        self.fail_rng = random.Random(settings.seed)
        self.started, self.created = time.monotonic(), int(time.time())
        self.counters = dict.fromkeys(("requests", "prompts", "errors", "stalls", "bad_requests", "generated_tokens",
                                       "active", "waiting", "peak_active", "peak_waiting", "authorized",
                                       "unauthorized"), 0)
        self.busy_s = 0.0
        self.triton = _triton_model(settings)

    def _count(self, key: str, n: int = 1) -> None:
        c = self.counters
        c[key] += n
        if key in ("active", "waiting"):
            c["peak_" + key] = max(c["peak_" + key], c[key])

    def _fail(self) -> bool:
        if self.s.error_rate > 0 and self.fail_rng.random() < self.s.error_rate:
            self._count("errors")
            return True
        return False

    async def _maybe_stall(self) -> None:
        if self.s.stall_rate > 0 and self.fail_rng.random() < self.s.stall_rate:
            self._count("stalls")
            await asyncio.sleep(self.s.stall_s)

    @asynccontextmanager
    async def _hold(self, gate):
        self._count("waiting")
        try:
            await gate.acquire()
        finally:
            self._count("waiting", -1)
        self._count("active")
        try:
            yield
        finally:
            self._count("active", -1)
            gate.release()

    async def _serialised(self, longest: int) -> None:
        """One generation at a time (NeMo's global lock, a PyTriton model instance): the batch takes
        as long as its longest sequence."""
        service = self.s.request_latency_s + longest * self.s.token_latency_s
        if service > 0:
            async with self._hold(self.lock):
                await asyncio.sleep(service)
                self.busy_s += service

    # ------------------------------------------------------------ NeMo: PUT /generate

    async def generate(self, request: web.Request) -> web.Response:
        self._count("requests")
        body = await _read_object(request)
        if body is None:
            self._count("bad_requests")
            return _json("request body must be a JSON object")
        sentences = body.get("sentences")
        if isinstance(sentences, list) and len(sentences) > MAX_SENTENCES:
            self._count("bad_requests")
            return _json(f"Maximum number of sentences is {MAX_SENTENCES}", 400)
        message, _, p = _check(body, _NEMO_RULES)
        if not _is_str_list(sentences):
            message = "sentences is not a list of strings"
        if message is not None:
            self._count("bad_requests")
            return _json(message)
        await self._maybe_stall()
        if self._fail():
            return _json({"error": "simulated engine failure"}, 500)

        s, logprob = self.s, p["compute_logprob"]
        seed = s.seed if p["random_seed"] is None else p["random_seed"]
        out = {"sentences": [], "tokens": [], "token_ids": [], "offsets": [], "logprob": [] if logprob else None}
        longest, copies = 0, {}
        for prompt in sentences:
            # NeMo samples a batch from one random stream: copies of a prompt in one request differ (unless
            # greedy); here copy j > 0 draws with a hash of (seed, j), not with seed + j
            j = copies[prompt] = copies.get(prompt, -1) + 1
            drawn = seed if j == 0 or p["greedy"] else _rng("copy", seed, j).randrange(2 ** 31)
            prompt_tokens, gen = simulate(prompt, p["tokens_to_generate"], p["end_strings"], drawn,
                                          s.max_natural_tokens)
            tokens = prompt_tokens + gen
            out["sentences"].append(prompt + "".join(gen))
            out["tokens"].append(tokens)
            out["token_ids"].append(list(map(token_id, tokens)))
            out["offsets"].append(list(accumulate(map(len, tokens[:-1]), initial=0)) if tokens else [])
            if logprob:
                out["logprob"].append(list(map(_logprob, gen)))
            longest = max(longest, len(gen))
            self.counters["generated_tokens"] += len(gen)
        await self._serialised(longest)
        self._count("prompts", len(sentences))
        if p["all_probs"]:
            out["full_logprob"] = None
        return _json(out)

    # ------------------------------------------------------------ OpenAI (vLLM)

    async def _occupy(self, service: float) -> None:
        async with self._hold(self.slots):
            await asyncio.sleep(service)
            self.busy_s += service / self.s.capacity

    def _check_model(self, body: dict):
        model = body.get("model")
        if model is not None and model != self.s.model_name:
            return _oai_error(f"The model `{model}` does not exist. Valid aliases: {self.s.model_name}.",
                              404, "model", "NotFoundError")
        return None

    def _budget(self, n_prompt: int, max_tokens: int | None):
        """vLLM's context checks for one prompt: the number of tokens it may generate, or the error."""
        limit = self.s.max_model_len
        if n_prompt > limit:
            # vLLM tokenizes at most max_model_len + 1 tokens, so it only knows "at least" that many.
            n = min(n_prompt, limit + 1)
            qualifier = "at least " if n == limit + 1 else ""
            return _oai_error(
                f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                f"{qualifier}{n} input tokens, which exceeds this limit even without any output tokens. "
                f"Please reduce the length of the input prompt. (parameter=input_tokens, value={n})",
                param="input_tokens")
        room = limit - n_prompt
        budget = room if max_tokens is None else min(max_tokens, room)  # vLLM shortens, silently
        if budget < 1:
            return _oai_error(f"max_tokens must be at least 1, got {budget}. (parameter=max_tokens, value={budget})",
                              param="max_tokens")
        return budget

    async def _oai_generate(self, prompts: list[tuple[str, int, int]], p: dict) -> list[_Generation]:
        """Generate n completions for each (prompt, prompt_tokens, max_tokens) row, each a sequence on the
        engine: prompt by prompt, completion i sampled with seed + i, as vLLM serves n (its parallel sampling
        makes n child requests, child i with seed + i), so one request with n answers what n requests with
        seeds seed, seed + 1, ... do."""
        s = self.s
        seed = s.seed if p["seed"] is None else p["seed"]
        n = p["n"] or 1
        stop = [p["stop"]] if isinstance(p["stop"], str) else p["stop"] or []
        skip = _OAI_DEFAULTS["skip_special_tokens"] if p["skip_special_tokens"] is None else p["skip_special_tokens"]
        include = bool(p["include_stop_str_in_output"])
        stop_ids = frozenset(p["stop_token_ids"] or ())
        gens = [generate_text(prompt, budget, stop, seed + i, s.max_natural_tokens, skip_special_tokens=skip,
                              stop_token_ids=stop_ids, include_stop_str=include)
                for prompt, _, budget in prompts for i in range(n)]
        for g in gens:
            self.counters["generated_tokens"] += g.generated
        if s.request_latency_s > 0 or s.token_latency_s > 0:
            await asyncio.gather(*(self._occupy(s.request_latency_s + g.generated * s.token_latency_s) for g in gens))
        self._count("prompts", len(prompts))
        return gens

    @staticmethod
    def _usage(prompts, gens) -> dict:
        n_prompt, n_completion = sum(n for _, n, _ in prompts), sum(g.completion_tokens for g in gens)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}

    async def _oai_answer(self, request: web.Request, check):
        """What both OpenAI routes do before answering: count, validate, stall or fail as configured, generate.
        Returns (prompts, generations (n per prompt, prompt by prompt), the request's fields), or the error
        response."""
        self._count("requests")
        body = await _read_object(request)
        if body is None:
            checked = _oai_error("request body must be a JSON object")
        else:
            checked = self._check_model(body) or check(body)
        if isinstance(checked, web.Response):
            self._count("bad_requests")
            return checked
        prompts, p = checked
        await self._maybe_stall()
        if self._fail():
            return _oai_error("simulated engine failure", 500, kind="server_error")
        return prompts, await self._oai_generate(prompts, p), p

    async def completions(self, request: web.Request) -> web.Response:
        answered = await self._oai_answer(request, self._check_completion)
        if isinstance(answered, web.Response):
            return answered
        prompts, gens, p = answered
        ids = bool(p["return_token_ids"])
        n = len(gens) // len(prompts)
        choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason,
                    **({"prompt_token_ids": list(map(token_id, _TOKEN_RE.findall(prompts[i // n][0]))),
                        "token_ids": list(g.token_ids)} if ids else {})}
                   for i, g in enumerate(gens)]
        return _json({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.s.model_name, "choices": choices, "usage": self._usage(prompts, gens),
        })

    def _rows(self, texts: list[str], max_tokens):
        """(text, prompt tokens, token budget) per prompt, or the context error of the first that does not fit."""
        rows = []
        for text in texts:
            n = len(_TOKEN_RE.findall(text))
            budget = self._budget(n, max_tokens)
            if isinstance(budget, web.Response):
                return budget
            rows.append((text, n, budget))
        return rows

    def _check_completion(self, body: dict):
        prompt = body.get("prompt")
        prompt = [prompt] if isinstance(prompt, str) else prompt
        if not prompt or not _is_str_list(prompt):
            return _oai_error("prompt must be a string or a non-empty list of strings", param="prompt")
        message, param, p = _check(body, _OAI_RULES)
        if message is not None:
            return _oai_error(message, param=param)
        rows = self._rows(prompt, p["max_tokens"])
        return rows if isinstance(rows, web.Response) else (rows, p)

    async def chat_completions(self, request: web.Request) -> web.Response:
        answered = await self._oai_answer(request, self._check_chat)
        if isinstance(answered, web.Response):
            return answered
        prompts, gens, p = answered
        ids = bool(p["return_token_ids"])

        def message(g: _Generation) -> dict:
            return {"role": "assistant", "content": g.text, "refusal": None, "annotations": None, "audio": None,
                    "function_call": None, "reasoning": None}

        return _json({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.s.model_name,
            "choices": [{"index": i, "message": message(g), "logprobs": None, "finish_reason": g.finish_reason,
                         "stop_reason": g.stop_reason, "token_ids": list(g.token_ids) if ids else None}
                        for i, g in enumerate(gens)],
            "service_tier": None, "system_fingerprint": None,
            "usage": {**self._usage(prompts, gens), "prompt_tokens_details": None},
            "prompt_logprobs": None,
            "prompt_token_ids": list(map(token_id, _TOKEN_RE.findall(prompts[0][0]))) if ids else None,
            "kv_transfer_params": None,
        })

    def _check_chat(self, body: dict):
        messages = body.get("messages")
        if (message := _check_messages(messages)) is not None:
            return _oai_error(message, param="messages")
        message, param, p = _check(body, _CHAT_RULES)
        if message is not None:
            return _oai_error(message, param=param)
        rows = self._rows([render_chat(messages)], p["max_completion_tokens"] or p["max_tokens"])
        return rows if isinstance(rows, web.Response) else (rows, p)

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /tokenize``: ``{"prompt": str}`` or ``{"messages": [...]}`` (rendered with
        the chat template) -> ``{"count", "max_model_len", "tokens", "token_strs"}``."""
        body = await _read_object(request)
        if body is None:
            return _oai_error("request body must be a JSON object")
        if (error := self._check_model(body)) is not None:
            return error
        if "messages" in body:
            messages = body["messages"]
            if (message := _check_messages(messages)) is not None:
                return _oai_error(message, param="messages")
            add = body.get("add_generation_prompt", True)
            if not _is_bool(add):
                return _oai_error("add_generation_prompt must be a boolean", param="add_generation_prompt")
            text = render_chat(messages, add)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return _oai_error("prompt must be a string (or give messages)", param="prompt")
        want_strs = body.get("return_token_strs") or False
        if not _is_bool(want_strs):
            return _oai_error("return_token_strs must be a boolean", param="return_token_strs")
        tokens = _TOKEN_RE.findall(text)
        return _json({"count": len(tokens), "max_model_len": self.s.max_model_len,
                      "tokens": list(map(token_id, tokens)), "token_strs": tokens if want_strs else None})

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{
            "id": self.s.model_name, "object": "model", "created": self.created,
            "owned_by": "orchestrator", "max_model_len": self.s.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def stats(self, request: web.Request) -> web.Response:
        return _json({**self.counters, "busy_s": self.busy_s, "uptime_s": time.monotonic() - self.started})

    # ------------------------------------------------------------ Triton / KServe v2

    def _triton_lookup(self, request: web.Request) -> str:
        """The model name, or _TritonError(404) like Triton's model repository."""
        name, version = request.match_info["name"], request.match_info.get("version")
        if name != self.s.model_name:
            raise _TritonError(404, f"Request for unknown model: '{name}' is not found")
        if version is not None and int(version) != 1:
            raise _TritonError(404, f"Request for unknown model: '{name}' version {int(version)} is not found")
        return name

    @staticmethod
    def _triton_error(exc: _TritonError) -> web.Response:
        return _json({"error": exc.message}, exc.status)

    async def triton_health(self, request: web.Request) -> web.Response:
        return web.Response()  # 200, empty body: live and ready

    async def triton_server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": "triton", "version": "2.48.0", "extensions": [
            "classification", "sequence", "model_repository", "model_repository(unload_dependents)",
            "schedule_policy", "model_configuration", "system_shared_memory", "cuda_shared_memory",
            "binary_tensor_data", "parameters", "statistics", "trace", "logging"]})

    async def triton_model_ready(self, request: web.Request) -> web.Response:
        try:
            self._triton_lookup(request)
        except _TritonError as exc:
            return self._triton_error(exc)
        return web.Response()

    async def triton_metadata(self, request: web.Request) -> web.Response:
        try:
            name = self._triton_lookup(request)
        except _TritonError as exc:
            return self._triton_error(exc)
        m = self.triton
        io = [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.dims]} for t in m.inputs]
        return _json({"name": name, "versions": ["1"], "platform": m.platform or m.backend, "inputs": io,
                      "outputs": [{"name": m.output.name, "datatype": m.output.datatype,
                                   "shape": [-1, *m.output.dims]}]})

    async def triton_config(self, request: web.Request) -> web.Response:
        try:
            name = self._triton_lookup(request)
        except _TritonError as exc:
            return self._triton_error(exc)
        m = self.triton
        kind = {"BYTES": "TYPE_STRING"}

        def io(t: _Tensor, output: bool = False) -> dict:
            entry = {"name": t.name, "data_type": kind.get(t.datatype, "TYPE_" + t.datatype),
                     "format": "FORMAT_NONE", "dims": list(t.dims), "is_shape_tensor": False}
            return entry if output else {**entry, "allow_ragged_batch": False, "optional": t.optional}

        config = {"name": name, "platform": m.platform if m.platform == "ensemble" else "",
                  "backend": m.backend, "version_policy": {"latest": {"num_versions": 1}},
                  "max_batch_size": self.s.triton_max_batch_size,
                  "input": [io(t) for t in m.inputs], "output": [io(m.output, True)]}
        if m.platform != "ensemble":
            config["dynamic_batching"] = {}
        return _json(config)

    def _triton_parse_infer(self, body) -> tuple[list[tuple[str, str, list[int], list]], list[str], str]:
        """The HTTP front end's reading of an infer request: (inputs, requested outputs, request id)."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            reason = ("attempt to access JSON non-array as array" if isinstance(body, dict) and "inputs" in body
                      else "attempt to access non-existing object member 'inputs'")
            raise _TritonError(500, f"Unable to parse 'inputs': {reason}")
        request_id = body.get("id") if isinstance(body.get("id"), str) else ""
        prefix = f"[request id: {request_id or '<id_unknown>'}] "
        tensors, seen = [], set()
        for item in body["inputs"]:
            for key in ("name", "datatype"):
                if not isinstance(item, dict) or not isinstance(item.get(key), str):
                    raise _TritonError(500, f"Unable to parse '{key}': attempt to access JSON non-string as string")
            name, datatype = item["name"], item["datatype"]
            shape = item.get("shape")
            if not isinstance(shape, list):
                raise _TritonError(500, "Unable to parse 'shape': attempt to access JSON non-array as array")
            if not all(_is_int(d) and d >= 0 for d in shape):
                raise _TritonError(500, "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as "
                                        "unsigned-integer")
            if name in seen:
                raise _TritonError(400, f"{prefix}input '{name}' already exists in request")
            seen.add(name)
            if "data" not in item:
                raise _TritonError(400, "Input must set only one of the following fields: 'data', 'binary_data_size' "
                                        "in 'parameters', 'shared_memory_region' in 'parameters'. But no field is set")
            count = math.prod(shape)
            if count == 0:
                values = []
            elif not isinstance(item["data"], list):
                raise _TritonError(500, "Unable to parse 'data': attempt to access JSON non-array as array")
            else:
                values = _read_json_data(name, datatype, item["data"], count)
            tensors.append((name, datatype, shape, values))
        outputs = []
        for item in body.get("outputs") or []:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _TritonError(500, "Unable to parse 'name': attempt to access JSON non-string as string")
            if item["name"] != self.triton.output.name:
                raise _TritonError(400, f"unexpected inference output '{item['name']}' for model "
                                        f"'{self.s.model_name}'")
            outputs.append(item["name"])
        return tensors, outputs, request_id

    def _triton_validate(self, tensors, request_id: str) -> int:
        """Triton core's InferenceRequest::Normalize for a batching model; returns the batch size."""
        model, m = self.s.model_name, self.triton
        prefix = f"[request id: {request_id or '<id_unknown>'}] "
        names = [t[0] for t in tensors]
        required = [t.name for t in m.inputs if not t.optional]
        missing = [r for r in required if r not in names]
        if len(tensors) > len(m.inputs) or len(tensors) < len(required) or missing:
            got = "[" + ",".join(f"'{n}'" for n in names) + "]" if names else "[]"
            lacking = "[" + ",".join(f"'{n}'" for n in missing) + "]" if missing else "]"
            expected = (f"expected {len(m.inputs)} inputs" if len(required) == len(m.inputs)
                        else f"expected number of inputs between {len(required)} and {len(m.inputs)}")
            raise _TritonError(400, f"{prefix}{expected} but got {len(tensors)} inputs for model '{model}'. Got "
                                    f"input(s) {got}, but missing required input(s) {lacking}. Please provide all "
                                    f"required input(s).")
        specs = {t.name: t for t in m.inputs}
        batch = 0
        for name, _, shape, _ in tensors:
            if name not in specs:
                raise _TritonError(400, f"unexpected inference input '{name}' for model '{model}'")
            if not shape:
                raise _TritonError(400, f"{prefix}input '{name}' has no shape but model requires batch dimension "
                                        f"for '{model}'")
            if batch == 0:
                batch = shape[0]
            elif shape[0] != batch:
                raise _TritonError(400, f"{prefix}input '{name}' batch size does not match other inputs for "
                                        f"'{model}'")
        if batch > self.s.triton_max_batch_size:
            raise _TritonError(400, f"{prefix}inference request batch-size must be <= "
                                    f"{self.s.triton_max_batch_size} for '{model}'")
        for name, datatype, shape, values in tensors:
            spec = specs[name]
            if datatype != spec.datatype:
                raise _TritonError(400, f"{prefix}inference input '{name}' data-type is '{datatype}', but model "
                                        f"'{model}' expects '{spec.datatype}'")
            dims = shape[1:]
            if len(dims) != len(spec.dims) or any(c not in (-1, d) for c, d in zip(spec.dims, dims)):
                raise _TritonError(400, f"{prefix}unexpected shape for input '{name}' for model '{model}'. "
                                        f"Expected {_dims([-1, *spec.dims])}, got {_dims(shape)}. {_BATCH_NOTE}")
            count = math.prod(shape)
            if datatype == "BYTES" and len(values) > count:
                raise _TritonError(400, f"{prefix}unexpected number of string elements {count + 1} for inference "
                                        f"input '{name}' for model '{model}', expecting {count}")
            if datatype == "BYTES" and len(values) < count:
                raise _TritonError(400, f"{prefix}expected {count} string elements for inference input '{name}' "
                                        f"for model '{model}', got {len(values)}")
        return batch

    async def _triton_run(self, tensors, batch: int) -> list[str]:
        """The model: one generation per row, no prompt echo, special tokens kept in the text, the stop
        word kept at the end (TensorRT-LLM stops after it), EOS dropped."""
        m, s = self.triton, self.s
        by_role = {spec.role: spec.name for spec in m.inputs if spec.role}
        rows = {name: shape for name, _, shape, _ in tensors}
        data = {name: values for name, _, _, values in tensors}

        def row_values(role: str, row: int) -> list:
            name = by_role[role]
            if name not in data or not data[name]:
                return []
            width = len(data[name]) // max(1, rows[name][0])
            row = 0 if m.first_value else row
            return data[name][row * width:(row + 1) * width]

        outputs, longest = [], 0
        for row in range(batch):
            width = len(data[by_role["prompt"]]) // batch
            prompt = "".join(data[by_role["prompt"]][row * width:(row + 1) * width])
            max_tokens = (row_values("max_tokens", row) or [m.default_max_tokens])[0]
            seed = (row_values("seed", row) or [s.seed])[0]
            stop = [w for w in row_values("stop", row) if w]
            g = generate_text(prompt, max(0, int(max_tokens)), stop, int(seed), s.max_natural_tokens,
                              skip_special_tokens=False, include_stop_str=True)
            outputs.append(g.text)
            longest = max(longest, g.generated)
            self.counters["generated_tokens"] += g.generated
        await self._serialised(longest)
        self._count("prompts", batch)
        return outputs

    async def triton_infer(self, request: web.Request) -> web.Response:
        self._count("requests")
        try:
            name = self._triton_lookup(request)
            tensors, _, request_id = self._triton_parse_infer(await self._triton_body(request))
            batch = self._triton_validate(tensors, request_id)
        except _TritonError as exc:
            self._count("bad_requests")
            return self._triton_error(exc)
        await self._maybe_stall()
        if self._fail():
            return _json({"error": "simulated engine failure"}, 500)
        texts = await self._triton_run(tensors, batch)
        out = {"model_name": name, "model_version": "1", "outputs": [{
            "name": self.triton.output.name, "datatype": "BYTES", "shape": [batch, 1], "data": texts}]}
        return _json({"id": request_id, **out} if request_id else out)

    async def triton_generate(self, request: web.Request) -> web.Response:
        """Triton's generate extension: top-level JSON keys (and those under "parameters") that name a
        model input become a one-row tensor, the others request parameters; the response maps each
        output to a key (a lone element unwrapped)."""
        self._count("requests")
        try:
            name = self._triton_lookup(request)
            body = await self._triton_body(request, allow_empty=True)
            if not isinstance(body, dict):
                raise _TritonError(500, "attempt to get members for non-object")
            fields_ = dict(body)
            nested = fields_.pop("parameters", None)
            if nested is not None:
                if not isinstance(nested, dict):
                    raise _TritonError(500, "Expected JSON object for keyword: 'parameters': attempt to access "
                                            "JSON non-object as object")
                fields_.update(nested)
            specs = {t.name: t for t in self.triton.inputs}
            tensors = []
            for key, value in fields_.items():
                spec = specs.get(key)
                if spec is None:
                    if not isinstance(value, (str, int, float, bool)):
                        raise _TritonError(400, f"parameter '{key}' has invalid type. It should be either 'int', "
                                                f"'bool', or 'string'.")
                    continue  # a request parameter: the model ignores it
                count = len(value) if isinstance(value, list) else 1
                values = _read_json_data(key, spec.datatype, value, count)
                shape = [1, *(d if d != -1 else 1 for d in spec.dims)]
                if spec.dims and spec.dims[-1] == -1:
                    shape[-1] = count
                elif count != math.prod(shape):
                    raise _TritonError(400, f"The schema can not convert input '{key}' to tensor with proper shape")
                tensors.append((key, spec.datatype, shape, values))
            batch = self._triton_validate(tensors, "")
        except _TritonError as exc:
            self._count("bad_requests")
            return self._triton_error(exc)
        await self._maybe_stall()
        if self._fail():
            return _json({"error": "simulated engine failure"}, 500)
        (text,) = await self._triton_run(tensors, batch)
        return _json({"model_name": name, "model_version": "1", self.triton.output.name: text})

    @staticmethod
    async def _triton_body(request: web.Request, allow_empty: bool = False):
        raw = await request.read()
        if not raw.strip():
            if allow_empty:
                return {}
            raise _TritonError(400, "failed to parse the request JSON buffer: The document is empty. at 0")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _TritonError(400, f"failed to parse the request JSON buffer: Invalid value. at "
                                    f"{getattr(exc, 'pos', 0)}") from None


ENGINE_KEY = web.AppKey("engine", _Engine)


def parse_routes(routes: str) -> frozenset[str]:
    """``"nemo,openai"`` -> the families; ValueError for an unknown or empty one."""
    chosen = frozenset(r.strip() for r in routes.split(",") if r.strip())
    unknown = chosen - set(ROUTE_FAMILIES)
    if unknown or not chosen:
        raise ValueError(f"routes must be a comma-separated subset of {','.join(ROUTE_FAMILIES)}, got {routes!r}")
    return chosen


def _not_found_middleware(families: frozenset[str]):
    """Unknown routes and wrong methods answer the way the server being imitated does: FastAPI's
    ``{"detail": ...}`` for vLLM, Triton's ``{"error": ...}`` under /v2 (or when Triton is the only
    JSON server), aiohttp's default otherwise (NeMo's Flask server answers HTML)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            reason = "Not Found" if exc.status == 404 else "Method Not Allowed"
            triton = "triton" in families and (request.path.startswith("/v2") or "openai" not in families)
            if triton:
                return _json({"error": reason}, exc.status)
            if "openai" in families:
                return _json({"detail": reason}, exc.status)
            raise

    return middleware


def required_key(settings: EngineSettings) -> str | None:
    """The key every request must bear (``--require-key-env NAME``: the value of $NAME), None when none is;
    ValueError when the variable is unset or empty (the value itself never appears anywhere)."""
    name = settings.require_key_env
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ValueError(f"--require-key-env {name}: the environment variable {name} is unset or empty; "
                         f"export {name}=<the key the engine requires>")
    return key


def _auth_middleware(engine: _Engine, key: str):
    """vLLM's ``--api-key``: a request without ``Authorization: Bearer <key>`` (or with another key) is
    answered 401 ``{"error": "Unauthorized"}``; here on every route. With ``revoke_key_after`` N, the key is
    refused from the (N+1)-th request on, as if revoked while a run goes on."""
    expected = f"Bearer {key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler):
        given = request.headers.get("Authorization", "").encode()
        revoked = 0 <= engine.s.revoke_key_after <= engine.counters["authorized"]
        if revoked or not hmac.compare_digest(given, expected):
            engine._count("unauthorized")
            return _json({"error": "Unauthorized"}, 401)
        engine._count("authorized")
        return await handler(request)

    return middleware


def build_app(settings: EngineSettings) -> web.Application:
    """The aiohttp application serving the families in ``settings.routes`` (see the module doc),
    plus ``GET /stats``."""
    if settings.capacity < 1:
        raise ValueError("capacity must be at least 1")
    if settings.triton_max_batch_size < 1:
        raise ValueError("triton_max_batch_size must be at least 1")
    families = parse_routes(settings.routes)
    key = required_key(settings)
    engine = _Engine(settings)
    middlewares = [_not_found_middleware(families)]
    if key is not None:
        middlewares.insert(0, _auth_middleware(engine, key))  # outermost: before any route, known or not
    app = web.Application(client_max_size=1 << 30, middlewares=middlewares)
    app[ENGINE_KEY] = engine
    add = app.router.add_route
    if "nemo" in families:
        add("PUT", "/generate", engine.generate)
    if "openai" in families:
        add("POST", "/v1/completions", engine.completions)
        add("POST", "/v1/chat/completions", engine.chat_completions)
        add("POST", "/tokenize", engine.tokenize)
        add("GET", "/v1/models", engine.models)
        add("GET", "/health", engine.health)
    if "triton" in families:
        add("GET", "/v2", engine.triton_server_metadata)
        add("GET", "/v2/health/live", engine.triton_health)
        add("GET", "/v2/health/ready", engine.triton_health)
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version:[0-9]+}"):
            add("GET", base, engine.triton_metadata)
            add("GET", base + "/ready", engine.triton_model_ready)
            add("GET", base + "/config", engine.triton_config)
            add("POST", base + "/infer", engine.triton_infer)
            add("POST", base + "/generate", engine.triton_generate)
    add("GET", "/stats", engine.stats)
    return app


def tls_context(settings: EngineSettings):
    """The server's TLS context (``--tls-cert`` and ``--tls-key``), None for plain HTTP."""
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def serve(settings: EngineSettings, port_file: str | None = None,
                ready: asyncio.Event | None = None, on_bound: Callable[[int], None] | None = None) -> None:
    """Bind, write the bound port to ``port_file`` (atomically) if given, set ``ready`` (and call
    ``on_bound(port)``), then serve until SIGTERM/SIGINT (signals only on the main thread) or
    cancellation; shuts down cleanly."""
    runner = web.AppRunner(build_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    loop, stop, handled = asyncio.get_running_loop(), asyncio.Event(), []
    try:
        await web.TCPSite(runner, settings.host, settings.port, ssl_context=tls_context(settings)).start()
        port = runner.addresses[0][1]
        if port_file:
            tmp = f"{port_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{port}\n")
            os.replace(tmp, port_file)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if ready is not None:
            ready.set()
        if on_bound is not None:
            on_bound(port)
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


class EngineThread:
    """Serve an engine from a background thread with its own event loop (for tests, benchmarks):
    ``with EngineThread(EngineSettings()) as engine: requests.get(engine.url + "/health")``."""

    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-engine", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.settings.tls_cert else 'http'}://{self.settings.host}:{self.port}"

    def _bound(self, port: int) -> None:
        self.port = port
        self._started.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(serve(self.settings, on_bound=self._bound))
        try:
            self._loop.run_until_complete(self._task)
        except BaseException as exc:
            if self.port is None:
                self._error = exc
        finally:
            self._started.set()
            self._loop.close()

    def start(self) -> "EngineThread":
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()


def _write_rank(folder: Path, rank: int) -> None:
    env = os.environ
    record = {"rank": rank, "local_rank": int(env.get("SLURM_LOCALID", "0")), "node_rank": int(env.get("SLURM_NODEID", "0")),
              "world_size": int(env.get("SLURM_NTASKS", "1")), "node": env.get("SLURMD_NODENAME", socket.gethostname()),
              "gpus": env.get("CUDA_VISIBLE_DEVICES", env.get("SLURM_STEP_GPUS", "")), "pid": os.getpid()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank-{rank}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"rank-{rank}.json")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m orchestrator.engines.embedded --port 0 --port-file F ...``."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.engines.embedded",
                                     description="Simulated LLM inference engine (NeMo, vLLM and Triton protocols).")
    defaults = EngineSettings()
    for f in fields(EngineSettings):
        value = getattr(defaults, f.name)
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--port-file", help="write the bound port number here (atomically)")
    parser.add_argument("--rank-dir", help="each rank writes rank-<SLURM_PROCID>.json (its Slurm placement) here")
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank exits with status 1 at once (tests)")
    args = vars(parser.parse_args(argv))
    port_file = args.pop("port_file")
    rank_dir, fail_rank = args.pop("rank_dir"), args.pop("fail_rank")
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # Slurm's time-limit warning is for the orchestrator, not us
    if rank == fail_rank:
        print(f"rank {rank}: simulated failure (--fail-rank)", file=sys.stderr, flush=True)
        return 1
    if rank_dir:
        _write_rank(Path(rank_dir), rank)
        world = int(os.environ.get("SLURM_NTASKS", "1"))
        while rank == 0 and len(list(Path(rank_dir).glob("rank-*.json"))) < world:
            time.sleep(0.05)  # like torch.distributed's rendezvous: no rank serves until all have joined
    if rank != 0:  # like NeMo's non-zero ranks: no HTTP, stay up and join generations until stopped
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return 0
    settings = EngineSettings(**args)
    if min(settings.capacity, settings.max_natural_tokens, settings.max_model_len, settings.triton_max_batch_size) < 1:
        parser.error("--capacity, --max-natural-tokens, --max-model-len and --triton-max-batch-size must be at least 1")
    try:
        parse_routes(settings.routes)
        _triton_model(settings)
        required_key(settings)
        tls_context(settings)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if not 0.0 <= settings.error_rate <= 1.0 or min(settings.request_latency_s, settings.token_latency_s) < 0:
        parser.error("--error-rate must be in [0, 1] and latencies non-negative")
    try:
        asyncio.run(serve(settings, port_file))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
