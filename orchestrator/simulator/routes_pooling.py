"""The simulator's pooling routes: vLLM's pooling runner (`vllm serve DIR --runner pooling`) on a
sequence-classification checkpoint with reward_attributes labels, served beside the OpenAI routes (a vLLM
server's /v1/models lists the model and its max_model_len).

- `POST /pooling` `{"model", "input": text or [text, ...], "use_activation"}`: per input `{"index", "object":
  "pooling", "data": [one value per label]}`; the raw head outputs with `use_activation: false`, else their
  softmax (the classifier's default activation).
- `POST /classify`, the same input: `{"index", "label", "probs", "num_classes"}`, probs the softmax (the raw
  outputs with `use_activation: false`), label the most likely one's (`LABEL_<k>`).

As vLLM does, a request with one input over max_model_len tokens is refused whole (HTTP 400, vLLM's message);
an unknown model is a 404. The raw outputs are routes_reward.reward_scores of the text: a pure function of it
(hashes in [0, 4), the last rising with the answer's length), so tests can check scores and rankings.
"""
from __future__ import annotations

import math
import time
import uuid

from aiohttp import web

from .model import tokenize
from .routes_reward import reward_scores
from .validation import _is_bool, _json, _oai_error, _read_object


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def pooling_outputs(text: str, labels: int, activation: bool) -> list[float]:
    """One input's values: the head's raw outputs, or their softmax (the classifier's activation)."""
    raw = reward_scores(text, labels)
    return softmax(raw) if activation and raw else raw


class _PoolingRoutes:
    """The handlers of one engine's pooling routes (its settings, counters and fault injection)."""

    def __init__(self, engine):
        self.engine = engine

    def _inputs(self, body) -> tuple[list[str], bool] | web.Response:
        """The request's texts and whether the activation applies, or vLLM's error answer."""
        engine = self.engine
        error = _oai_error
        if body is None:
            return error("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != engine.s.model_name:
            return error(f"The model `{model}` does not exist. Valid aliases: {engine.s.model_name}.", 404, "model",
                         "NotFoundError")
        given = body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return error("input: give a text or a non-empty list of texts (token ids are not simulated)",
                         param="input")
        activation = body.get("use_activation")
        if activation is not None and not _is_bool(activation):
            return error("use_activation: Input should be a valid boolean", param="use_activation")
        if "normalize" in body:
            return error("Parameter `normalize` was removed; use `use_activation` instead.", param="normalize")
        limit = engine.s.max_model_len
        for text in texts:
            n = len(tokenize(text))
            if n > limit:  # vLLM refuses the whole request
                n = min(n, limit + 1)
                qualifier = "at least " if n == limit + 1 else ""
                return error(f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                             f"{qualifier}{n} input tokens, which exceeds this limit even without any output tokens. "
                             f"Please reduce the length of the input prompt. (parameter=input_tokens, value={n})",
                             param="input_tokens")
        return texts, activation is not False

    async def _answer(self, request: web.Request, item) -> web.Response:
        engine = self.engine
        engine._count("requests")
        checked = self._inputs(await _read_object(request))
        if isinstance(checked, web.Response):
            engine._count("bad_requests")
            return checked
        texts, activation = checked
        await engine._maybe_stall()
        if engine._fail():
            return _oai_error("simulated engine failure", 500, kind="server_error")
        if engine.s.request_latency_s > 0:
            await engine._occupy(engine.s.request_latency_s)
        engine._count("prompts", len(texts))
        labels = engine.s.reward_attributes
        data = [item(i, pooling_outputs(text, labels, activation)) for i, text in enumerate(texts)]
        tokens = sum(len(tokenize(text)) for text in texts)
        return _json({"id": f"{request.path.strip('/')}-{uuid.uuid4().hex[:16]}", "object": "list",
                      "created": int(time.time()), "model": engine.s.model_name, "data": data,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    async def pooling(self, request: web.Request) -> web.Response:
        return await self._answer(request, lambda i, values: {"index": i, "object": "pooling", "data": values})

    async def classify(self, request: web.Request) -> web.Response:
        def item(i, values):
            best = max(range(len(values)), key=values.__getitem__) if values else None
            return {"index": i, "label": None if best is None else f"LABEL_{best}", "probs": values,
                    "num_classes": len(values)}

        return await self._answer(request, item)


def add_pooling_routes(app: web.Application, engine) -> None:
    """POST /pooling and POST /classify (the OpenAI family's /v1/models lists the model)."""
    routes = _PoolingRoutes(engine)
    app.router.add_route("POST", "/pooling", routes.pooling)
    app.router.add_route("POST", "/classify", routes.classify)
