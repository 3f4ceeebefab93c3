"""The simulator's state and its routes for the three protocol families."""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from contextlib import asynccontextmanager
from itertools import accumulate

from aiohttp import web

from .model import (
    _TOKEN_RE,
    MAX_SENTENCES,
    EngineSettings,
    _Generation,
    _logprob,
    _rng,
    generate_text,
    render_chat,
    simulate,
    token_id,
)
from .triton_tensors import (
    _BATCH_NOTE,
    _dims,
    _read_json_data,
    _Tensor,
    _triton_model,
    _TritonError,
)
from .validation import (
    _CHAT_RULES,
    _NEMO_RULES,
    _OAI_DEFAULTS,
    _OAI_RULES,
    _check,
    _check_messages,
    _is_bool,
    _is_int,
    _is_str_list,
    _json,
    _oai_error,
    _read_object,
)


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
