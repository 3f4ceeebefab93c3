"""vLLM's pooling runner (`vllm serve DIR --runner pooling`): a reward or sequence-classification checkpoint
(a `*ForSequenceClassification` head with one label per model.attributes) scores sentences, the SteerLM
reward sentences orchestrator.scoring builds, as the reward protocol does.

- `POST /pooling` (the default): `{"model", "input": [sentences], "use_activation": false}` answers, per
  input, `data[i].data`: the head's raw outputs (`use_activation: false` turns off the pooler's default
  activation, a softmax over the labels for a classifier: vLLM's PoolingCompletionRequest).
- `POST /classify` (`engine.options.pooling_route=classify`): the same input answers `data[i].probs`, the
  label probabilities (vLLM's ClassificationCompletionRequest; its own default activation).

Several sentences go in one request (client.batch_size). vLLM refuses a whole request (HTTP 400 "This model's
maximum context length is N tokens ...") when one of its inputs is too long, so a refused batch is sent again
one sentence a request (the codec's `resend_alone`: Client._send): only the bad sentence is its row's error.

Detection: none (the pooling runner's routes are an OpenAI server's): a scoring model on engine=vllm speaks
this protocol, and engine=endpoint with engine.protocol=pooling. Discovery: GET /v1/models (the served name and
max_model_len); readiness scores one sentence, whose width must be one value per model.attributes.
"""
from __future__ import annotations

import math
from typing import Any

from ..config import Config, default_capacity
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
from .openai import _error_message

NAME = "pooling"
ROUTES = {"pooling": "/pooling", "classify": "/classify"}  # engine.options.pooling_route -> the route
FIELDS = {"pooling": "data", "classify": "probs"}  # where each route's answer holds a sentence's values
ROUTE_KEY = "engine.options.pooling_route"


def pooling_route(cfg: Config) -> str:
    """engine.options.pooling_route (pooling or classify; pooling when unset); route_problem says what is wrong."""
    return str(cfg.engine.options.get("pooling_route") or "pooling")


def route_problem(cfg: Config) -> str | None:
    """Why engine.options.pooling_route is not a route this protocol knows, or None."""
    route = pooling_route(cfg)
    if route in ROUTES:
        return None
    return (f"{ROUTE_KEY}={route!r} is not a pooling route; choose one of: {', '.join(ROUTES)} (pooling: the "
            f"head's raw outputs; classify: the label probabilities)")


class PoolingCodec:
    """Several sentences a request; the answer of a row is its scores (Completion.scores), one per attribute."""

    name = NAME
    method = "POST"
    echoes_prompt = False
    takes_seed = False  # scoring is deterministic: no seed, no rollouts
    resend_alone = True  # a refused batch (one sentence over the context) is sent again one sentence a request

    def __init__(self, cfg: Config, info: EngineInfo | None = None, one_request: bool | None = None):
        self.route = pooling_route(cfg)
        if self.route not in ROUTES:
            raise RejectedError(route_problem(cfg))
        self.path = ROUTES[self.route]
        self.model = info.model_name if info else (cfg.engine.served_model_name or cfg.model.name)
        self.attributes = list(cfg.model.attributes)
        self.context = (info.max_model_len if info else None) or cfg.model.architecture.max_seq_len
        self.batch_size = cfg.client.batch_size
        # continuous batching: about 2 x capacity sentences in flight
        self.in_flight = cfg.client.max_in_flight or max(2, math.ceil(2 * default_capacity(cfg) / self.batch_size))

    def payload(self, prompts: list[str], tokens_to_generate: int | None = None, seed: int | None = None,
                n: int = 1, row: RowSampling = DEFAULT_ROW) -> dict:
        """The sentences only; a row's sampling does not apply to a score."""
        if n != 1:
            raise ValueError("a pooling model gives one score vector per sentence: send one request per answer")
        body: dict[str, Any] = {"model": self.model, "input": list(prompts)}
        if self.route == "pooling":
            body["use_activation"] = False  # the head's raw outputs, as the reward protocol's rewards
        return body

    def parse(self, status: int, body: Any, prompts: list[str], n: int = 1) -> list[Completion]:
        if status == 404:
            raise RejectedError(f"POST {self.path}: HTTP 404 {str(_error_message(body))[:200]}: the server does not "
                                f"serve {self.path}; start vLLM with --runner pooling on a checkpoint with a "
                                f"classification or reward head"
                                + (f", or set {ROUTE_KEY}=pooling" if self.route == "classify" else ""))
        if status != 200:
            message = _error_message(body)
            _status(status, message, message)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != len(prompts):
            raise MalformedAnswer(f"malformed pooling answer: {len(prompts)} sentence(s) sent, 'data' is "
                                  f"{str(data)[:200] if not isinstance(data, list) else f'{len(data)} item(s)'}")
        ordered: list[Any] = [None] * len(prompts)
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else position
            if isinstance(index, int) and 0 <= index < len(prompts) and ordered[index] is None:
                ordered[index] = item
        if any(item is None for item in ordered):
            raise MalformedAnswer(f"malformed pooling answer: the indexes of 'data' are not 0..{len(prompts) - 1}")
        widths = {self._width(item) for item in ordered}
        if len(widths) == 1 and (width := widths.pop()) is not None and width != len(self.attributes):
            raise MalformedAnswer(f"the pooling model returns {width} value(s) per sentence, but model.attributes "
                                  f"names {len(self.attributes)} ({', '.join(self.attributes)}); list the model's "
                                  f"labels in order in model.attributes ({width} names: its config.json id2label)")
        return [Completion.checked(lambda i=i: self._answer(ordered[i], i)) for i in range(len(prompts))]

    def _values(self, item: Any) -> Any:
        values = item.get(FIELDS[self.route]) if isinstance(item, dict) else None
        if isinstance(values, list) and len(values) == 1 and isinstance(values[0], list):
            values = values[0]  # one pooled vector, nested ([[...]])
        return values

    def _width(self, item: Any) -> int | None:
        values = self._values(item)
        return len(values) if isinstance(values, list) else None

    def _answer(self, item: Any, row: int) -> Completion:
        values = self._values(item)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                                                   math.isfinite(v) for v in values):
            raise MalformedAnswer(f"malformed pooling answer: data[{row}].{FIELDS[self.route]} is "
                                  f"{str(values)[:120]}, not numbers")
        if len(values) != len(self.attributes):
            raise MalformedAnswer(f"malformed pooling answer: data[{row}] has {len(values)} value(s), not "
                                  f"{len(self.attributes)} (model.attributes)")
        return Completion("", None, scores=[float(v) for v in values])


Codec = PoolingCodec


def detect(http: Http) -> bool:
    """Never guessed from the routes (a pooling server is an OpenAI server): engine=vllm with a scoring model
    (model.attributes) speaks it, and engine=endpoint with engine.protocol=pooling."""
    return False


def discover(cfg: Config, url: str, http: Http) -> EngineInfo:
    """The served model's name and max_model_len (GET /v1/models)."""
    info = engine_info(cfg, url, NAME)
    info.api = pooling_route(cfg)
    resp = http("GET", "/v1/models")
    body = _json(resp)
    if resp.status_code != 200:
        raise TransientError(f"GET /v1/models: HTTP {resp.status_code}: {str(body)[:200]}")
    try:
        models = [m for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        model = next((m for m in models if m["id"] == info.model_name), models[0])
    except (KeyError, IndexError, TypeError):
        raise RejectedError(f"GET /v1/models lists no model: {str(body)[:200]}") from None
    info.model_name = model["id"]
    info.max_model_len = model.get("max_model_len") if isinstance(model.get("max_model_len"), int) else None
    return info
