"""Triton / KServe v2 (`POST /v2/models/{name}/infer` with named tensors, as NeMo's deploy_triton.py
serves it, or the generate extension `POST /v2/models/{name}/generate`).

Detection: GET /v2/health/ready answers 200. Discovery: the model's input tensors (GET
/v2/models/{name}), hence the route (infer or generate), and its max_batch_size (GET .../config).
"""
from __future__ import annotations

import re
from typing import Any

import requests

from ..config import Config, default_capacity
from ..errors import ConfigError
from .base import (
    DEFAULT_ROW,
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
    engine_info,
    logprobs_problem,
    row_fields,
)

# RowSampling's fields (max_tokens aside: the token budget) as NeMo's Triton model's input tensors name them;
# the generate extension's body takes the same names (each names an input of the TRT-LLM ensemble)
TRITON_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "random_seed"}

NAME = "triton"
TRITON_MAX_LEN_INPUTS = ("max_output_len", "max_output_token", "max_tokens")
NEMO_ERROR = "An error occurred: "  # how NeMo's deploy models (TensorRTLLM.triton_infer_fn) answer their exceptions


class TritonCodec:
    """KServe v2 over HTTP as NeMo's deploy_triton.py (PyTriton) serves it: `/infer` with named tensors,
    one row per prompt, sending only the inputs the model's metadata lists; or the generate extension
    (`/generate`, one prompt, `text_input` -> `text_output`) for TRT-LLM backend ensembles."""

    name = "triton"
    method = "POST"
    echoes_prompt = False

    def __init__(self, cfg: Config, info: EngineInfo | None = None, one_request: bool | None = None):
        model = info.model_name if info else (cfg.engine.served_model_name or cfg.model.name)
        self.generate = bool(info and info.api == "generate")
        # found only now where the protocol and the route were learnt (engine=endpoint): the generate route's
        # TRT-LLM ensemble returns the chosen tokens' logprobs (return_log_probs), NeMo's model none
        refused = logprobs_problem(cfg, cfg.engine.name, NAME, "generate" if self.generate else "infer")
        if refused:
            raise ConfigError(refused)
        self.logprobs = cfg.sampling.logprobs is not None
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

    def _tensors(self, n: int, tokens: int, seed: int | None = None, row: RowSampling = DEFAULT_ROW) -> list[dict]:
        s = self.sampling
        values = {"top_k": 1 if s.greedy else s.top_k, "top_p": s.top_p, "temperature": s.temperature,
                  "random_seed": s.seed, **row_fields(row, TRITON_FIELDS),
                  **{name: tokens for name in TRITON_MAX_LEN_INPUTS}}
        if seed is not None:  # a rollout's own
            values["random_seed"] = seed
        out = []
        for name, value in values.items():  # each with the datatype the model's metadata gives
            if name in self.inputs and value is not None:
                out.append({"name": name, "datatype": self.inputs[name], "shape": [n, 1], "data": [value] * n})
        if self.end_strings and "stop_words_list" in self.inputs:
            # NeMo's infer function reads this input with str_ndarray2list, which squeezes the last axis: one
            # stop word a row (row i stops at word i), and [n, 2] is an error answer. The first end string
            # stops generation; the client cuts the answer at every end string (prompts.cut_answer).
            out.append({"name": "stop_words_list", "datatype": "BYTES", "shape": [n, 1],
                        "data": self.end_strings[:1] * n})
        return out

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1, row: RowSampling = DEFAULT_ROW) -> dict:
        """row: the batch's own settings (every prompt of a batch has the same)."""
        if n != 1:
            raise ValueError("Triton has no n: send one request per answer")
        tokens = tokens_to_generate or row.max_tokens or self.sampling.tokens_to_generate
        if self.generate:
            s = self.sampling
            body = {"text_input": prompts[0], "max_tokens": tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "top_k": 1 if s.greedy else s.top_k, **row_fields(row, TRITON_FIELDS)}
            if self.end_strings:
                body["stop_words"] = self.end_strings
            if seed is not None:  # a rollout's own seed (the ensemble's random_seed input)
                body["random_seed"] = seed
            if self.logprobs:
                body["return_log_probs"] = True
            return dict(body, **self.extra_body)
        prompt = {"name": "prompts", "datatype": "BYTES", "shape": [len(prompts), 1], "data": list(prompts)}
        return {"inputs": [prompt] + self._tensors(len(prompts), tokens, seed, row)}

    def parse(self, status: int, body: Any, prompts: list[str], n: int = 1) -> list[Completion]:
        if status != 200:
            message = error_message(body)
            _status(status, message, message)
        if not isinstance(body, dict):
            raise MalformedAnswer(f"malformed Triton response: {str(body)[:200]}")
        if self.generate:
            return [Completion(_text(body.get("text_output"), "text_output"), None,
                               **(_log_probs(body.get("output_log_probs")) if self.logprobs else {}))]
        outputs = body.get("outputs")
        found = [o for o in outputs if isinstance(o, dict) and o.get("name") == "outputs"] \
            if isinstance(outputs, list) else []
        data = found[0].get("data") if found else None
        if not isinstance(data, list) or len(data) != len(prompts):
            raise MalformedAnswer(f"malformed Triton response: expected an 'outputs' tensor of {len(prompts)} rows")
        # each row on its own: an unusable one is its row's error, the others are answers
        return [Completion.checked(lambda i=i, text=text: _answer(text, i)) for i, text in enumerate(data)]


def _log_probs(found: Any) -> dict:
    """The ensemble's output_log_probs (return_log_probs): each generated token's logprob (a lone one is a
    number: Triton's generate extension unwraps one-element outputs); no alternatives."""
    found = [found] if isinstance(found, (int, float)) and not isinstance(found, bool) else found
    if not isinstance(found, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in found):
        raise MalformedAnswer(f"malformed Triton response: output_log_probs is {str(found)[:80]}, not the generated "
                              f"tokens' logprobs (return_log_probs=true, sampling.logprobs=0)")
    return {"token_logprobs": [float(x) for x in found], "top_logprobs": [[] for _ in found]}


def _answer(text: Any, row: int) -> Completion:
    """One row of NeMo's `outputs`. NeMo's deploy models catch their own exceptions and answer them as the
    text "An error occurred: ..." (HTTP 200, one row): that is the row's error, never an answer."""
    text = _text(text, f"outputs[{row}]")
    if text.startswith(NEMO_ERROR):
        raise MalformedAnswer(f"the Triton model answered an error: {text[len(NEMO_ERROR):][:500]}")
    return Completion(text, None)


def error_message(body: Any) -> str:
    """Triton's error text ({"error": ...}); a Python model's traceback (PyTriton answers a model's exception
    with one, HTTP 500) shortened to its first line and the exception it ends with."""
    text = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), str) else str(body)
    if "Traceback (most recent call last)" not in text:
        return text
    head = text.split("Traceback (most recent call last)")[0].rstrip(": ")
    raised = [line.strip() for line in text.splitlines()
              if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*:", line.strip())]
    return f"{head}: {raised[-1]}" if raised else head


Codec = TritonCodec


def detect(http: Http) -> bool:
    """GET /v2/health/ready answers 200; a connection error there counts as no (NeMo, tried next, has no such route)."""
    try:
        if http("GET", "/v2/health/ready").status_code == 200:
            return True
    except requests.RequestException:
        pass
    return False


def discover(cfg: Config, url: str, http: Http) -> EngineInfo:
    """The model's inputs, route and max_batch_size, read from the server's metadata."""
    info = engine_info(cfg, url, NAME)
    resp = http("GET", "/v2/health/ready")
    if resp.status_code != 200:
        raise TransientError(f"GET /v2/health/ready: HTTP {resp.status_code}")
    # PyTriton's server is ready before its model is bound, then unready while the model loads: until the
    # model's own route says ready, it is loading (or not the name it was deployed with, which the
    # message says; a server we started has the name we gave it)
    resp = http("GET", f"/v2/models/{info.model_name}/ready")
    if resp.status_code != 200:
        meta = http("GET", f"/v2/models/{info.model_name}")
        raise TransientError(f"the Triton model {info.model_name!r} is not ready (GET /v2/models/{info.model_name}"
                             f"/ready: HTTP {resp.status_code}; its metadata: HTTP {meta.status_code} "
                             f"{error_message(_json(meta))}); if it is deployed under another name, set "
                             f"engine.served_model_name to that name")
    resp = http("GET", f"/v2/models/{info.model_name}")
    meta = _json(resp)
    if resp.status_code != 200 or not isinstance(meta, dict):
        raise RejectedError(f"GET /v2/models/{info.model_name}: HTTP {resp.status_code}: {str(meta)[:300]}; "
                            f"set engine.served_model_name to the name the server was deployed with")
    info.inputs = {i.get("name"): i.get("datatype") for i in meta.get("inputs") or [] if isinstance(i, dict)}
    names = list(info.inputs)
    info.api = "generate" if "text_input" in names else "infer"
    config = _json(http("GET", f"/v2/models/{info.model_name}/config"))
    if isinstance(config, dict) and isinstance(config.get("max_batch_size"), int) and config["max_batch_size"] > 0:
        info.max_batch_size = config["max_batch_size"]
    if info.api == "infer" and "prompts" not in names:
        raise RejectedError(f"Triton model {info.model_name!r} takes inputs {names}, neither 'prompts' (NeMo's "
                            f"deploy_triton.py) nor 'text_input' (the generate extension)")
    return info
