"""The simulator's NeMo route: ``PUT /generate`` (megatron_gpt_eval.py's text generation server)."""
from __future__ import annotations

from itertools import accumulate

from aiohttp import web

from .model import MAX_SENTENCES, _logprob, _rng, simulate, token_id
from .validation import _NEMO_RULES, _check, _is_str_list, _json, _read_object


class _NemoRoutes:
    """NeMo's ``PUT /generate``: a batch of sentences, served one batch at a time."""

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
            if logprob:  # as NeMo's: one per token after the first, of prompt and generation alike
                out["logprob"].append(list(map(_logprob, tokens[1:])))
            longest = max(longest, len(gen))
            self.prefix_cache.query(prompt)
            self.counters["generated_tokens"] += len(gen)
        await self._serialised(longest)
        self._count("prompts", len(sentences))
        if p["all_probs"]:
            out["full_logprob"] = None
        return _json(out)
