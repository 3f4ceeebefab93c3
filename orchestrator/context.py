"""Fitting a prompt into the model's context: by the engine's own token count where it has one (a few
/tokenize calls), else estimated from the prompt's UTF-8 size (data.bytes_per_token); a too-long prompt is
cut to its start with data.truncate_prompts, else it is a row error (see ContextFit.fit)."""
from __future__ import annotations

import asyncio

import aiohttp

from .config import Config
from .prompts import format_prompt
from .protocols.base import EngineInfo, TransientError


def check_prompt(value) -> str | None:
    """Why a row's prompt cannot be sent, or None when it can."""
    if value is None:
        return "prompt is null"
    if not isinstance(value, str):
        return f"prompt is not text ({type(value).__name__})"
    if not value.strip():
        return "prompt is empty"
    return None


class ContextFit:
    """A row's prompt as it is to be sent within the model's `context` tokens, or why it cannot be.
    `exact_tokens`: the engine counts tokens itself (it refuses a too-long prompt with its own message, and
    truncation cuts by its exact count). `session` is set once the client has opened its HTTP session."""

    def __init__(self, cfg: Config, protocol, info: EngineInfo, url: str, context: int, exact_tokens: bool):
        self.cfg, self.protocol, self.info, self.url = cfg, protocol, info, url
        self.context, self.exact_tokens = context, exact_tokens
        self.session: aiohttp.ClientSession | None = None

    async def fit(self, prompt) -> tuple[str, str | None]:
        """(the prompt to send, None) or (the prompt, why the row cannot be sent)."""
        problem = check_prompt(prompt)
        if not problem and self.exact_tokens:
            if self.cfg.data.truncate_prompts:
                try:
                    prompt = await self._truncate_exact(prompt)
                except (TransientError, aiohttp.ClientError, asyncio.TimeoutError):
                    prompt, problem = self._fit_context(prompt)
        elif not problem:
            prompt, problem = self._fit_context(prompt)
        return prompt, problem

    async def _count_tokens(self, prompt: str) -> int:
        body = self.protocol.payload([format_prompt(prompt, self.cfg.model.prompt)], tokens_to_generate=1)
        request = {"model": self.info.model_name}
        request.update({"messages": body["messages"]} if "messages" in body else {"prompt": body["prompt"]})
        async with self.session.post(self.url + "/tokenize", json=request) as resp:
            answer = await resp.json(content_type=None)
        if resp.status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("count"), int):
            raise TransientError(f"/tokenize answered HTTP {resp.status}: {str(answer)[:200]}")
        return answer["count"]

    async def _truncate_exact(self, prompt: str) -> str:
        """The longest start of the prompt whose formatted text leaves room for one generated token, by the
        engine's own count (a few /tokenize calls, only for prompts that may be too long)."""
        limit = self.context - max(1, self.cfg.sampling.min_tokens_to_generate)
        if len(prompt.encode()) + 64 < limit or await self._count_tokens(prompt) <= limit:  # a token is >= 1 byte
            return prompt
        lo, hi = 0, len(prompt)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await self._count_tokens(prompt[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return prompt[:lo]

    def _fit_context(self, prompt: str) -> tuple[str, str | None]:
        """The prompt within the model's context (estimated from its UTF-8 size), truncated when allowed."""
        data, context = self.cfg.data, self.context
        size = len(prompt.encode())
        estimate = size / data.bytes_per_token
        if estimate <= context:
            return prompt, None
        if data.truncate_prompts:
            keep = int(context * data.bytes_per_token)
            return prompt.encode()[:keep].decode(errors="ignore"), None
        return prompt, (f"prompt is about {estimate:.0f} tokens ({size} bytes), longer than the model's "
                        f"{context}-token context; set data.truncate_prompts=true to keep its start")
