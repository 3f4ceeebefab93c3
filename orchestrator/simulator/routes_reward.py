"""The simulator's reward routes: NeMo-Aligner's serve_reward_model.py, a PyTriton `reward_model`
(nemo_aligner/servers/server_callables.py, RewardModelCallable) on KServe v2: model metadata, config, ready and
infer. Inputs `sentences` (BYTES), `tokens`, `sequence_lengths` (INT64) and `add_EOS` (BOOL), all optional;
outputs `rewards` (FP32, one row of reward_attributes values per sentence) and `exceeded` (INT32, 1 where the
sentence has more than max_model_len tokens).

The scores are a pure function of the sentence: attribute k is a hash of (text, k) in [0, 4), but the last
(verbosity, for Nemotron-4-340B-Reward) rises with the length of the answer (the last assistant turn), so
tests can check a ranking.
"""
from __future__ import annotations

import math

from aiohttp import web

from .model import _rng, tokenize
from .triton_tensors import _read_json_data, _TritonError
from .validation import _is_int, _json

MODEL = "reward_model"
INPUTS = {"sentences": "BYTES", "tokens": "INT64", "sequence_lengths": "INT64", "add_EOS": "BOOL"}
OUTPUTS = {"rewards": "FP32", "exceeded": "INT32"}
ASSISTANT, LABEL = "<extra_id_1>Assistant\n", "<extra_id_2>"


def answer_of(sentence: str) -> str:
    """The last assistant turn of a SteerLM reward sentence (the whole text when it has none)."""
    text = sentence.rsplit(ASSISTANT, 1)[-1]
    return text[: -len(LABEL)] if text.endswith(LABEL) else text


def reward_scores(sentence: str, attributes: int) -> list[float]:
    """Deterministic scores of one sentence: hashes in [0, 4), the last rising with the answer's tokens."""
    rng = _rng("reward", sentence)
    scores = [round(rng.random() * 4, 4) for _ in range(attributes)]
    if attributes:
        scores[-1] = round(4 * (1 - math.exp(-len(tokenize(answer_of(sentence))) / 64)), 4)
    return scores


class _RewardRoutes:
    """A PyTriton reward_model, one batch at a time (NeMo-Aligner's lock around inference)."""

    async def reward_ready(self, request: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="text/plain")

    async def reward_metadata(self, request: web.Request) -> web.Response:
        # PyTriton reports the declared shapes: sentences (-1,), rewards (1,) although a row holds every attribute
        return _json({"name": MODEL, "versions": ["1"], "platform": "python",
                      "inputs": [{"name": n, "datatype": d, "shape": [-1, 1 if n == "add_EOS" else -1]}
                                 for n, d in INPUTS.items()],
                      "outputs": [{"name": n, "datatype": d, "shape": [-1, 1]} for n, d in OUTPUTS.items()]})

    async def reward_config(self, request: web.Request) -> web.Response:
        kind = {"BYTES": "TYPE_STRING"}
        return _json({
            "name": MODEL, "platform": "", "backend": "python", "max_batch_size": self.s.triton_max_batch_size,
            "input": [{"name": n, "data_type": kind.get(d, "TYPE_" + d), "dims": [1 if n == "add_EOS" else -1],
                       "optional": True} for n, d in INPUTS.items()],
            "output": [{"name": n, "data_type": "TYPE_" + d, "dims": [1]} for n, d in OUTPUTS.items()]})

    def _reward_sentences(self, body) -> list[str]:
        """The request's sentences, checked as Triton checks a batching model's inputs."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise _TritonError(500, "Unable to parse 'inputs': attempt to access non-existing object member 'inputs'")
        sentences = None
        for item in body["inputs"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _TritonError(500, "Unable to parse 'name': attempt to access JSON non-string as string")
            name, datatype, shape = item["name"], item.get("datatype"), item.get("shape")
            if name not in INPUTS:
                raise _TritonError(400, f"unexpected inference input '{name}' for model '{MODEL}'")
            if datatype != INPUTS[name]:
                raise _TritonError(400, f"inference input '{name}' data-type is '{datatype}', but model '{MODEL}' "
                                        f"expects '{INPUTS[name]}'")
            if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) and d >= 0 for d in shape):
                raise _TritonError(400, f"unexpected shape for input '{name}' for model '{MODEL}'. Expected [-1,-1], "
                                        f"got {shape}")
            if shape[0] > self.s.triton_max_batch_size:
                raise _TritonError(400, f"inference request batch-size must be <= {self.s.triton_max_batch_size} "
                                        f"for '{MODEL}'")
            values = _read_json_data(name, datatype, item.get("data") or [], math.prod(shape))
            if name == "sentences":
                if shape[1] != 1:  # NeMo-Aligner decodes one string a row
                    raise _TritonError(500, "ValueError: one sentence a row: shape [B, 1]")
                sentences = list(values)
        for item in body.get("outputs") or []:
            if not isinstance(item, dict) or item.get("name") not in OUTPUTS:
                raise _TritonError(400, f"unexpected inference output '{item}' for model '{MODEL}'")
        if sentences is None:  # the tokens path (pre-tokenized input) is not simulated
            raise _TritonError(500, "AttributeError: 'NoneType' object has no attribute 'shape' (send 'sentences')")
        return sentences

    async def reward_infer(self, request: web.Request) -> web.Response:
        self._count("requests")
        try:
            sentences = self._reward_sentences(await self._triton_body(request))
        except _TritonError as exc:
            self._count("bad_requests")
            return self._triton_error(exc)
        await self._maybe_stall()
        if self._fail():
            return _json({"error": "simulated engine failure"}, 500)
        width = self.s.reward_attributes
        exceeded = [int(len(tokenize(s)) > self.s.max_model_len) for s in sentences]
        rewards = [v for s, over in zip(sentences, exceeded) for v in
                   ([0.0] * width if over else reward_scores(s, width))]
        await self._serialised(1)
        self._count("prompts", len(sentences))
        return _json({"model_name": MODEL, "model_version": "1", "outputs": [
            {"name": "rewards", "datatype": "FP32", "shape": [len(sentences), width], "data": rewards},
            {"name": "exceeded", "datatype": "INT32", "shape": [len(sentences), 1], "data": exceeded}]})


def add_reward_routes(app: web.Application, engine) -> None:
    """The reward_model's routes (before Triton's /v2/models/{name} ones, which they take precedence over) and
    the server's health routes where the Triton family does not add them."""
    add = app.router.add_route
    for base in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
        add("GET", base, engine.reward_metadata)
        add("GET", base + "/ready", engine.reward_ready)
        add("GET", base + "/config", engine.reward_config)
        add("POST", base + "/infer", engine.reward_infer)
