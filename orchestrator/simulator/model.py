"""The simulated model: tokenizer, vocabulary, deterministic generation, chat template, logprobs."""
from __future__ import annotations

import hashlib
import json
import random
import re
import zlib
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import accumulate

MARKER = "[simulated]"
EOS = "<|endoftext|>"
TURN_END = "<extra_id_1>"         # a Nemotron chat model's end of turn (a special token)
MAX_SENTENCES = 128
# a judge's prompt (MT-Bench's single-answer grading asks to rate 'by strictly following this format:
# "[[rating]]"'): the answer is `[simulated]`, up to JUDGE_WORDS words, then `Rating: [[N]]`, N in 1..10 a pure
# function of (seed, prompt), and the end of turn (simulate, _judgement)
JUDGE_CUE = "[[rating]]"
JUDGE_WORDS = 16
VOCAB_SIZE = 256000
ROUTE_FAMILIES = ("nemo", "openai", "triton", "reward")
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
    invalid_json_rate: float = 0.0   # fraction of guided (JSON-schema) answers that break their schema (tests)
    routes: str = "nemo,openai,triton,reward"   # protocol families served (comma-separated)
    openai_dialect: str = "vllm"                # whose OpenAI server: vllm, sglang or trtllm (simulator.dialects)
    reward_attributes: int = 9                  # the reward model's values per sentence (Nemotron-4-340B-Reward's 9)
    triton_model: str = "nemo"                  # "nemo" (deploy_triton.py, PyTriton) or "trtllm" (TRT-LLM ensemble)
    triton_max_len_input: str = "max_output_len"  # NeMo's name for the length input ("max_output_token" in 2023)
    triton_max_batch_size: int = 8              # deploy_triton.py --max_batch_size (its default is 8)
    # every route requires Authorization: Bearer <this variable's value> (vLLM's --api-key)
    require_key_env: str = ""
    # with require_key_env: the key is refused after this many requests (a key revoked mid-run)
    revoke_key_after: int = -1
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

    A prompt holding ``[[rating]]`` (JUDGE_CUE, MT-Bench's judge phrasing) is answered as a judge: see
    JUDGE_CUE. Otherwise the generation is ``[simulated]`` then vocabulary words (each ``" word"``), at most
    ``tokens_to_generate`` tokens in all. Its natural length L (1..max_natural_tokens) comes from a
    blake2b hash of (seed, prompt); when L <= tokens_to_generate (and L >= 2) the model ends its turn
    in the last token: with ``<extra_id_1>`` (a chat model's end of turn) when that is one of the
    end strings, after a ``"\\n"`` as in the Nemotron chat format, else with ``end_strings[0]``. A
    token equal to an end string (after stripping) ends the generation right after it.
    """
    prompt_tokens = _TOKEN_RE.findall(prompt)
    rng = _rng(seed, prompt)
    natural = rng.randrange(max(1, max_natural_tokens)) + 1
    if JUDGE_CUE in prompt:
        return prompt_tokens, _judgement(rng, tokens_to_generate, end_strings)
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


def _judgement(rng: random.Random, tokens_to_generate: int, end_strings: list[str]) -> list[str]:
    """A judge's answer (JUDGE_CUE): `[simulated]`, 1..JUDGE_WORDS words, ` Rating: [[N]]` (N in 1..10), then
    the end of turn (``<extra_id_1>`` when it is an end string, else the first end string); cut at
    tokens_to_generate, so a short budget leaves the rating out (a judgement without a score)."""
    words = rng.choices(_VOCAB_TOKENS, k=rng.randrange(JUDGE_WORDS) + 1)
    answer = [MARKER, *words, " Rating:", f" [[{rng.randrange(1, 11)}]]"]
    if end_strings:
        answer.append(TURN_END if TURN_END in end_strings else end_strings[0])
    return answer[:max(0, tokens_to_generate)]


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
    tokens: tuple = ()      # those tokens' text (for their logprobs)


def generate_text(prompt: str, max_tokens: int, stop: list[str], seed: int, max_natural_tokens: int, *,
                  skip_special_tokens: bool, stop_token_ids=(), include_stop_str: bool = False) -> _Generation:
    """See _generate_text; with the ids of the tokens it counts."""
    g, gen = _generate_text(prompt, max_tokens, stop, seed, max_natural_tokens, skip_special_tokens=skip_special_tokens,
                            stop_token_ids=stop_token_ids, include_stop_str=include_stop_str)
    g.tokens = tuple(gen[:g.completion_tokens])
    g.token_ids = tuple(map(token_id, g.tokens))
    return g


def top_logprobs(token: str, k: int) -> list[tuple[str, float]]:
    """The sampled token and k - 1 other vocabulary tokens, each less likely than the one before (the
    sampled token is the most likely: the simulated model is sure of itself)."""
    best = _logprob(token)
    others = [t for t in _VOCAB_TOKENS[: k + 1] if t != token][: max(0, k - 1)]
    return ([(token, best)] if k else []) + [(t, best - 0.5 * (j + 1)) for j, t in enumerate(others)]


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
