"""The simulator's OpenAI routes: ``/v1/completions``, ``/v1/chat/completions``, ``/tokenize``, ``/v1/models``
and ``/health``, as vLLM serves them; what SGLang's and trtllm-serve's servers do otherwise is their dialect's
(simulator.dialects: ``self.dialect``)."""
from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import web

from .model import _TOKEN_RE, _Generation, _logprob, generate_text, render_chat, token_id, top_logprobs
from .structured import guided_generation
from .validation import (
    _CHAT_RULES,
    _OAI_DEFAULTS,
    _OAI_RULES,
    _check,
    _check_messages,
    _is_bool,
    _is_str_list,
    _json,
    _read_object,
)


class _OpenAIRoutes:
    """vLLM's OpenAI-compatible server: completions and chat with n, seeds, stop strings and context checks,
    sequences served ``capacity`` at a time."""

    def _check_model(self, body: dict):
        model = body.get("model")
        if model is not None and model != self.s.model_name:
            return self.dialect.error(f"The model `{model}` does not exist. Valid aliases: {self.s.model_name}.",
                              404, "model", "NotFoundError")
        return None

    def _budget(self, n_prompt: int, max_tokens: int | None):
        """vLLM's context checks for one prompt: the number of tokens it may generate, or the error."""
        limit = self.s.max_model_len
        if n_prompt > limit:
            # vLLM tokenizes at most max_model_len + 1 tokens, so it only knows "at least" that many.
            n = min(n_prompt, limit + 1)
            qualifier = "at least " if n == limit + 1 else ""
            return self.dialect.error(
                f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                f"{qualifier}{n} input tokens, which exceeds this limit even without any output tokens. "
                f"Please reduce the length of the input prompt. (parameter=input_tokens, value={n})",
                param="input_tokens")
        room = limit - n_prompt
        budget = room if max_tokens is None else min(max_tokens, room)  # vLLM shortens, silently
        if budget < 1:
            return self.dialect.error(
                f"max_tokens must be at least 1, got {budget}. (parameter=max_tokens, value={budget})",
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
        guide = p.get("guide")  # structured outputs: an instance of the schema instead (simulator.structured)
        gens = [generate_text(prompt, budget, stop, seed + i, s.max_natural_tokens, skip_special_tokens=skip,
                              stop_token_ids=stop_ids, include_stop_str=include) if guide is None else
                guided_generation(guide, prompt, seed + i, budget, s.invalid_json_rate)
                for prompt, _, budget in prompts for i in range(n)]
        for prompt, _, _ in prompts:
            self.prefix_cache.query(prompt)
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
            checked = self.dialect.error("request body must be a JSON object")
        else:
            checked = self._check_model(body) or check(body)
        if isinstance(checked, web.Response):
            self._count("bad_requests")
            return checked
        prompts, p = checked
        await self._maybe_stall()
        if self._fail():
            return self.dialect.error("simulated engine failure", 500, kind="server_error")
        return prompts, await self._oai_generate(prompts, p), p

    async def _oai_respond(self, request: web.Request, check, body) -> web.Response:
        """What both OpenAI routes do: ``_oai_answer``, then the JSON of ``body(prompts, generations, whether
        token ids were asked for)``, or the error response."""
        answered = await self._oai_answer(request, check)
        if isinstance(answered, web.Response):
            return answered
        prompts, gens, p = answered
        return _json(body(prompts, gens, bool(p["return_token_ids"]), p))

    async def completions(self, request: web.Request) -> web.Response:
        return await self._oai_respond(request, self._check_completion, self._completion)

    def _completion(self, prompts, gens: list[_Generation], ids: bool, p: dict) -> dict:
        """The body of a ``/v1/completions`` answer."""
        n = len(gens) // len(prompts)
        k = p.get("logprobs")

        def logprobs(g: _Generation) -> dict | None:  # vLLM's completions form: K alternatives a token
            if k is None:
                return None
            offsets = [sum(len(t) for t in g.tokens[:j]) for j in range(len(g.tokens))]
            return {"text_offset": offsets, "token_logprobs": [_logprob(t) for t in g.tokens],
                    "tokens": list(g.tokens), "top_logprobs": [dict(top_logprobs(t, k)) for t in g.tokens]}

        choices = [{"index": i, "text": g.text, "logprobs": logprobs(g), "finish_reason": g.finish_reason,
                    self.dialect.stop_field: g.stop_reason,
                    **({"prompt_token_ids": list(map(token_id, _TOKEN_RE.findall(prompts[i // n][0]))),
                        "token_ids": list(g.token_ids)} if ids else {})}
                   for i, g in enumerate(gens)]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.s.model_name, "choices": choices, "usage": self._usage(prompts, gens),
        }

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
            return self.dialect.error("prompt must be a string or a non-empty list of strings", param="prompt")
        checked = self._check_fields(body, _OAI_RULES, chat=False)
        if isinstance(checked, web.Response):
            return checked
        rows = self._rows(prompt, checked["max_tokens"])
        return rows if isinstance(rows, web.Response) else (rows, checked)

    async def chat_completions(self, request: web.Request) -> web.Response:
        return await self._oai_respond(request, self._check_chat, self._chat_completion)

    def _chat_completion(self, prompts, gens: list[_Generation], ids: bool, p: dict) -> dict:
        """The body of a ``/v1/chat/completions`` answer."""

        def logprobs(g: _Generation) -> dict | None:  # the chat form: logprobs=true, top_logprobs=K
            if not p.get("logprobs"):
                return None
            k = p.get("top_logprobs") or 0

            def entry(token: str, logprob: float) -> dict:
                return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

            return {"content": [{**entry(t, _logprob(t)), "top_logprobs": [entry(*a) for a in top_logprobs(t, k)]}
                                for t in g.tokens]}

        def message(g: _Generation) -> dict:
            return {"role": "assistant", "content": g.text, **self.dialect.message_fields}

        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.s.model_name,
            "choices": [{"index": i, "message": message(g), "logprobs": logprobs(g), "finish_reason": g.finish_reason,
                         self.dialect.stop_field: g.stop_reason, "token_ids": list(g.token_ids) if ids else None}
                        for i, g in enumerate(gens)],
            "service_tier": None, "system_fingerprint": None,
            "usage": {**self._usage(prompts, gens), "prompt_tokens_details": None},
            "prompt_logprobs": None,
            "prompt_token_ids": list(map(token_id, _TOKEN_RE.findall(prompts[0][0]))) if ids else None,
            "kv_transfer_params": None,
        }

    def _check_chat(self, body: dict):
        messages = body.get("messages")
        if (message := _check_messages(messages)) is not None:
            return self.dialect.error(message, param="messages")
        p = self._check_fields(body, _CHAT_RULES, chat=True)
        if isinstance(p, web.Response):
            return p
        rows = self._rows([render_chat(messages)], p["max_completion_tokens"] or p["max_tokens"])
        return rows if isinstance(rows, web.Response) else (rows, p)

    def _check_fields(self, body: dict, rules, chat: bool):
        """The request's sampling fields and guided-decoding constraint (p["guide"]), or the dialect's 400:
        for a field its server refuses, a value out of range, or a malformed constraint."""
        refused = self.dialect.refused_fields(body, chat)
        if refused is not None:
            return refused
        message, param, p = _check(body, rules)
        if message is None:
            p["guide"], bad = self.dialect.guide(body, chat)
            message, param = bad or (None, None)
        return p if message is None else self.dialect.error(message, param=param)

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /tokenize``: ``{"prompt": str}`` or ``{"messages": [...]}`` (rendered with
        the chat template) -> ``{"count", "max_model_len", "tokens", "token_strs"}``."""
        body = await _read_object(request)
        if body is None:
            return self.dialect.error("request body must be a JSON object")
        if (error := self._check_model(body)) is not None:
            return error
        if "messages" in body:
            messages = body["messages"]
            if (message := _check_messages(messages)) is not None:
                return self.dialect.error(message, param="messages")
            add = body.get("add_generation_prompt", True)
            if not _is_bool(add):
                return self.dialect.error("add_generation_prompt must be a boolean", param="add_generation_prompt")
            text = render_chat(messages, add)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return self.dialect.error("prompt must be a string (or give messages)", param="prompt")
        want_strs = body.get("return_token_strs") or False
        if not _is_bool(want_strs):
            return self.dialect.error("return_token_strs must be a boolean", param="return_token_strs")
        tokens = _TOKEN_RE.findall(text)
        return _json({"count": len(tokens), "max_model_len": self.s.max_model_len,
                      "tokens": list(map(token_id, tokens)), "token_strs": tokens if want_strs else None})

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{
            "id": self.s.model_name, "object": "model", "created": self.created,
            "owned_by": "orchestrator",
            **({"max_model_len": self.s.max_model_len} if self.dialect.lists_max_model_len else {})}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()
