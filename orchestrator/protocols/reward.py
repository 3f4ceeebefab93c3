"""NeMo-Aligner's reward server (serve_reward_model.py): KServe v2 over HTTP to PyTriton's `reward_model`
(nemo_aligner/servers/server_callables.py, RewardModelCallable): `sentences` (BYTES, [B, 1]) in, and, per
sentence, `rewards` (FP32, one value per attribute: [B, A]) and `exceeded` (the sentence is longer than the
model's context) out. Optional inputs (`tokens`, `sequence_lengths`, `add_EOS`) are never sent.

Detection: none; a scoring model (model.attributes) speaks this protocol. Discovery: the inputs the
model's metadata lists, its max_batch_size (GET .../config: rows one request may carry) and the width of
`rewards`; readiness scores one sentence, whose reward vector must have one value per model.attributes.
"""
from __future__ import annotations

import math
from typing import Any

from ..config import Config
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
    engine_info,
)
from .triton import error_message

NAME = "reward"
MODEL = "reward_model"  # the name NeMo-Aligner binds
SENTENCES, REWARDS, EXCEEDED = "sentences", "rewards", "exceeded"


def model_name(cfg: Config) -> str:
    return cfg.engine.served_model_name or MODEL


class RewardCodec:
    """One row a sentence; the answer of a row is its scores (Completion.scores), or its error when the server
    says the sentence exceeded the model's context."""

    name = NAME
    method = "POST"
    echoes_prompt = False
    takes_seed = False  # scoring is deterministic: no seed, no rollouts

    def __init__(self, cfg: Config, info: EngineInfo | None = None, one_request: bool | None = None):
        model = info.model_name if info else model_name(cfg)
        self.path = f"/v2/models/{model}/infer"
        self.attributes = list(cfg.model.attributes)
        self.context = cfg.model.architecture.max_seq_len
        limit = (info.max_batch_size if info else None) or cfg.engine.options.get("max_batch_size") or 128
        self.batch_size = min(cfg.client.batch_size, limit)
        self.in_flight = cfg.client.max_in_flight or 2  # PyTriton serves one batch at a time per instance

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1, row: RowSampling = DEFAULT_ROW) -> dict:
        """The sentences only (the optional inputs are the server's to fill); a row's sampling does not apply."""
        if n != 1:
            raise ValueError("a reward model gives one score vector per sentence: send one request per answer")
        return {"inputs": [{"name": SENTENCES, "datatype": "BYTES", "shape": [len(prompts), 1], "data": list(prompts)}],
                "outputs": [{"name": REWARDS}, {"name": EXCEEDED}]}

    def parse(self, status: int, body: Any, prompts: list[str], n: int = 1) -> list[Completion]:
        if status != 200:
            message = error_message(body)
            _status(status, message, message)
        outputs = body.get("outputs") if isinstance(body, dict) else None
        if not isinstance(outputs, list):
            raise MalformedAnswer(f"malformed reward answer: no 'outputs' list: {str(body)[:200]}")
        found = {o.get("name"): o for o in outputs if isinstance(o, dict)}
        rewards = found.get(REWARDS)
        if rewards is None:
            raise MalformedAnswer(f"malformed reward answer: no {REWARDS!r} output (it has {sorted(map(str, found))})")
        rows = len(prompts)
        shape, data = rewards.get("shape"), rewards.get("data")
        if not isinstance(shape, list) or not shape or shape[0] != rows or not isinstance(data, list):
            raise MalformedAnswer(f"malformed reward answer: {REWARDS!r} has shape {shape}, not [{rows}, "
                                  f"{len(self.attributes)}] for {rows} sentence(s)")
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        if width != len(self.attributes):
            raise MalformedAnswer(f"the reward model returns {width} value(s) per sentence, but model.attributes "
                                  f"names {len(self.attributes)} ({', '.join(self.attributes)}); list the model's "
                                  f"outputs in order in model.attributes ({width} names)")
        if len(data) != rows * width:
            raise MalformedAnswer(f"malformed reward answer: {REWARDS!r} has {len(data)} values, not {rows} x {width}")
        exceeded = found.get(EXCEEDED, {}).get("data") if isinstance(found.get(EXCEEDED), dict) else None
        flags = exceeded if isinstance(exceeded, list) and len(exceeded) == rows else [False] * rows
        return [self._too_long() if flags[i] is True or flags[i] == 1 else
                Completion.checked(lambda i=i: self._answer(data[i * width:(i + 1) * width], i)) for i in range(rows)]

    def _too_long(self) -> Completion:
        """`exceeded`: the row's own fault (asking again cannot help), not the engine's."""
        return Completion("", None, error=f"the sentence is longer than the reward model's context "
                                          f"(model.architecture.max_seq_len={self.context} tokens): the server marked "
                                          f"it exceeded; shorten the prompt or the response", engine_fault=False)

    def _answer(self, values: list, row: int) -> Completion:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise MalformedAnswer(f"malformed reward answer: rewards[{row}] is {str(values)[:120]}, not numbers")
        return Completion("", None, scores=[float(v) for v in values])


Codec = RewardCodec


def detect(http: Http) -> bool:
    """Never guessed from the routes (a reward server is a Triton server): a model that scores (model.attributes)
    speaks this protocol, which engine=endpoint chooses from the model config (EndpointAdapter.protocol_for)."""
    return False


def discover(cfg: Config, url: str, http: Http) -> EngineInfo:
    """The reward model's inputs and max_batch_size; refuses a model without `sentences` in or `rewards` out."""
    info = engine_info(cfg, url, NAME)
    info.model_name, info.api = model_name(cfg), "infer"
    name = info.model_name
    resp = http("GET", "/v2/health/ready")
    if resp.status_code != 200:
        raise TransientError(f"GET /v2/health/ready: HTTP {resp.status_code}")
    resp = http("GET", f"/v2/models/{name}/ready")
    if resp.status_code != 200:  # PyTriton binds the model after its server is up: loading
        raise TransientError(f"the reward model {name!r} is not ready (GET /v2/models/{name}/ready: HTTP "
                             f"{resp.status_code}); if it is served under another name, set engine.served_model_name")
    resp = http("GET", f"/v2/models/{name}")
    meta = _json(resp)
    if resp.status_code != 200 or not isinstance(meta, dict):
        raise RejectedError(f"GET /v2/models/{name}: HTTP {resp.status_code}: {str(meta)[:300]}; set "
                            f"engine.served_model_name to the reward model's Triton name (NeMo-Aligner: {MODEL})")
    info.inputs = {i.get("name"): i.get("datatype") for i in meta.get("inputs") or [] if isinstance(i, dict)}
    outputs = [o.get("name") for o in meta.get("outputs") or [] if isinstance(o, dict)]
    if SENTENCES not in info.inputs or REWARDS not in outputs:
        raise RejectedError(f"Triton model {name!r} takes {sorted(map(str, info.inputs))} and answers "
                            f"{sorted(map(str, outputs))}: not NeMo-Aligner's reward model ({SENTENCES!r} in, "
                            f"{REWARDS!r} out); point engine.url at serve_reward_model.py's server")
    config = _json(http("GET", f"/v2/models/{name}/config"))
    if isinstance(config, dict) and isinstance(config.get("max_batch_size"), int) and config["max_batch_size"] > 0:
        info.max_batch_size = config["max_batch_size"]
    return info
