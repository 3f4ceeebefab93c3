"""Embedded engine: a real aiohttp server that simulates an LLM inference engine.

It speaks the NeMo Megatron text-generation protocol (``PUT /generate``) and the OpenAI-compatible
protocol of vLLM/TRT-LLM (``POST /v1/completions``, ``GET /v1/models``, ``GET /health``), with a
deterministic generation model (:func:`simulate`) and a latency/capacity model; ``GET /stats``
exposes counters. It stands in for a GPU engine in tests and benchmarks:

    python -m orchestrator.engines.embedded --port 0 --port-file /tmp/engine.port
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from functools import lru_cache, partial
from itertools import accumulate
from pathlib import Path
from typing import Callable

from aiohttp import web

MARKER = "[simulated]"
EOS = "<|endoftext|>"
MAX_SENTENCES = 128
VOCAB_SIZE = 256000
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
_TOKEN_RE = re.compile(r"\s*\S+|\s+")
_dumps = partial(json.dumps, separators=(",", ":"))


@dataclass
class EngineSettings:
    """Configuration of one simulated engine."""

    host: str = "127.0.0.1"          # never 0.0.0.0 unless told
    port: int = 0                    # 0 = pick a free port
    request_latency_s: float = 0.0   # fixed time per request (per batch on the NeMo route)
    token_latency_s: float = 0.0     # time per generated token
    capacity: int = 256              # sequences worked on at once (OpenAI route); more wait FIFO
    error_rate: float = 0.0          # fraction of requests answered with HTTP 500 (deterministic from seed)
    seed: int = 0                    # output is a pure function of (prompt, seed, request params)
    max_natural_tokens: int = 512    # a prompt's natural answer length is 1..max_natural_tokens
    model_name: str = "mock"
    max_model_len: int = 4096
    stall_rate: float = 0.0          # fraction of requests that hang for stall_s before being served (timeouts)
    stall_s: float = 30.0


def tokenize(text: str) -> list[str]:
    """Split text into token strings whose concatenation is exactly ``text``."""
    return _TOKEN_RE.findall(text)


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


def simulate(
    prompt: str, tokens_to_generate: int, end_strings: list[str], seed: int, max_natural_tokens: int
) -> tuple[list[str], list[str]]:
    """Pure and deterministic. Returns (prompt_tokens, generated_tokens): token strings whose
    concatenation is exactly the prompt / exactly the generated text.

    The generation is ``[simulated]`` then vocabulary words (each ``" word"``), at most
    ``tokens_to_generate`` tokens in all. Its natural length L (1..max_natural_tokens) comes from a
    blake2b hash of (seed, prompt); when L <= tokens_to_generate (and L >= 2) the last token is
    ``end_strings[0]`` (the model emits its end of turn). A token equal to an end string (after
    stripping) ends the generation right after it.
    """
    prompt_tokens = _TOKEN_RE.findall(prompt)
    digest = hashlib.blake2b(f"{seed}\x00{prompt}".encode("utf-8", "surrogatepass"), digest_size=8)
    rng = random.Random(int.from_bytes(digest.digest(), "big"))
    natural = rng.randrange(max(1, max_natural_tokens)) + 1
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
            generated[-1] = end_strings[0]
    return prompt_tokens, generated


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return type(v) in (int, float)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# NeMo's checks in the order of its text_generation_server.py: (field, default, valid, message).
_NEMO_RULES = (
    ("tokens_to_generate", 64, lambda v: _is_int(v) and v >= 1,
     "tokens_to_generate must be an integer greater than 0"),
    ("all_probs", False, _is_bool, "all_probs must be a boolean value"),
    ("temperature", 1.0, lambda v: _is_num(v) and 0.0 < v <= 100.0,
     "temperature must be a positive number less than or equal to 100.0"),
    ("add_BOS", False, _is_bool, "add_BOS must be a boolean value"),
    ("greedy", False, _is_bool, "greedy must be a boolean value"),
    ("top_k", 0, lambda v: _is_num(v) and v >= 0, "top_k must be a positive integer number"),
    ("top_p", 0.9, lambda v: _is_num(v) and 0.0 <= v <= 1.0,
     "top_p must be a positive number less than or equal to 1.0"),
    ("repetition_penalty", 1.0, lambda v: _is_num(v) and v >= 1.0,
     "repetition_penalty must be a positive number no less than 1.0"),
    ("end_strings", [EOS], _is_str_list, "expect end_strings to be a list of strings"),
    ("min_tokens_to_generate", 0, lambda v: _is_int(v) and v >= 0,
     "min_tokens_to_generate must be an integer no less than 0"),
    ("compute_logprob", False, _is_bool, "compute_logprob must be a boolean value"),
    ("random_seed", None, lambda v: v is None or (_is_int(v) and v >= 0),
     "random_seed must be a positive integer number or None"),
)

# OpenAI /v1/completions optional fields; null means the default (max_tokens: the rest of the context).
_OAI_RULES = tuple((name, default, lambda v, ok=ok: v is None or ok(v), message) for name, default, ok, message in (
    ("max_tokens", 16, lambda v: _is_int(v) and v >= 1, "max_tokens must be at least 1"),
    ("temperature", 1.0, lambda v: _is_num(v) and v >= 0, "temperature must be a non-negative number"),
    ("top_p", 1.0, lambda v: _is_num(v) and 0 < v <= 1, "top_p must be in (0, 1]"),
    ("top_k", -1, lambda v: _is_int(v) and v >= -1, "top_k must be -1 (disable), or at least 1"),
    ("stop", None, lambda v: isinstance(v, str) or _is_str_list(v), "stop must be a string or a list of strings"),
    ("seed", None, _is_int, "seed must be an integer"),
    ("n", 1, lambda v: _is_int(v) and v == 1, "n must be 1: only one completion per prompt is supported"),
    ("min_tokens", 0, lambda v: _is_int(v) and v >= 0, "min_tokens must be greater than or equal to 0"),
    ("repetition_penalty", 1.0, lambda v: _is_num(v) and v > 0, "repetition_penalty must be greater than zero"),
    ("logprobs", None, lambda v: _is_int(v) and v >= 0, "logprobs must be a non-negative integer"),
))


def _check(body: dict, rules) -> tuple[str | None, str | None, dict]:
    params = {}
    for name, default, valid, message in rules:
        value = params[name] = body.get(name, default)
        if name in body and not valid(value):
            return message, name, params
    return None, None, params


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(data).encode(), status=status, content_type="application/json")


def _oai_error(message: str, status: int = 400, param: str | None = None, kind: str = "BadRequestError"):
    return _json({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


async def _read_object(request: web.Request) -> dict | None:
    try:
        body = json.loads(await request.read())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class _Engine:
    def __init__(self, settings: EngineSettings):
        self.s = settings
        self.lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(settings.capacity)
        self.fail_rng = random.Random(settings.seed)
        self.started, self.created = time.monotonic(), int(time.time())
        self.counters = dict.fromkeys(("requests", "prompts", "errors", "stalls", "bad_requests", "generated_tokens",
                                       "active", "waiting", "peak_active", "peak_waiting"), 0)
        self.busy_s = 0.0

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
        longest = 0
        for prompt in sentences:
            prompt_tokens, gen = simulate(prompt, p["tokens_to_generate"], p["end_strings"], seed,
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
        service = s.request_latency_s + longest * s.token_latency_s
        if service > 0:
            async with self._hold(self.lock):
                await asyncio.sleep(service)
                self.busy_s += service
        self._count("prompts", len(sentences))
        if p["all_probs"]:
            out["full_logprob"] = None
        return _json(out)

    async def _occupy(self, service: float) -> None:
        async with self._hold(self.slots):
            await asyncio.sleep(service)
            self.busy_s += service / self.s.capacity

    async def completions(self, request: web.Request) -> web.Response:
        self._count("requests")
        checked = self._check_completion(await _read_object(request))
        if isinstance(checked, web.Response):
            self._count("bad_requests")
            return checked
        prompts, p = checked
        await self._maybe_stall()
        if self._fail():
            return _oai_error("simulated engine failure", 500, kind="server_error")

        s = self.s
        seed = s.seed if p["seed"] is None else p["seed"]
        stop = [p["stop"]] if isinstance(p["stop"], str) else p["stop"] or []
        ends = [x for x in stop if x] + [EOS]
        choices, services, n_prompt, n_completion = [], [], 0, 0
        for index, (prompt, n_prompt_tokens) in enumerate(prompts):
            room = s.max_model_len - n_prompt_tokens
            max_tokens = room if p["max_tokens"] is None else min(p["max_tokens"], room)
            _, gen = simulate(prompt, max_tokens, ends, seed, s.max_natural_tokens)
            text = "".join(gen)
            cut = min((i for i in map(text.find, ends) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                count = sum(1 for end in accumulate(map(len, gen)) if end <= cut)
            else:
                count, reason = len(gen), "length" if len(gen) >= max_tokens else "stop"
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": reason})
            services.append(s.request_latency_s + len(gen) * s.token_latency_s)
            n_prompt += n_prompt_tokens
            n_completion += count
            self.counters["generated_tokens"] += len(gen)
        if s.request_latency_s > 0 or s.token_latency_s > 0:
            await asyncio.gather(*map(self._occupy, services))
        self._count("prompts", len(prompts))
        return _json({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": s.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion},
        })

    def _check_completion(self, body: dict | None):
        if body is None:
            return _oai_error("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.s.model_name:
            return _oai_error(f"The model `{model}` does not exist.", 404, "model", "NotFoundError")
        prompt = body.get("prompt")
        prompt = [prompt] if isinstance(prompt, str) else prompt
        if not prompt or not _is_str_list(prompt):
            return _oai_error("prompt must be a string or a non-empty list of strings", param="prompt")
        message, param, p = _check(body, _OAI_RULES)
        if message is not None:
            return _oai_error(message, param=param)
        prompts = [(text, len(_TOKEN_RE.findall(text))) for text in prompt]
        for _, n in prompts:
            if n >= self.s.max_model_len:
                return _oai_error(
                    f"This model's maximum context length is {self.s.max_model_len} tokens. However, "
                    f"your request has {n} input tokens. Please reduce the length of the input messages.",
                    param="prompt")
        return prompts, p

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{
            "id": self.s.model_name, "object": "model", "created": self.created,
            "owned_by": "orchestrator", "max_model_len": self.s.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def stats(self, request: web.Request) -> web.Response:
        return _json({**self.counters, "busy_s": self.busy_s, "uptime_s": time.monotonic() - self.started})


ENGINE_KEY = web.AppKey("engine", _Engine)


def build_app(settings: EngineSettings) -> web.Application:
    """The aiohttp application: ``PUT /generate`` (NeMo), ``POST /v1/completions``,
    ``GET /v1/models``, ``GET /health`` (OpenAI-compatible) and ``GET /stats``."""
    if settings.capacity < 1:
        raise ValueError("capacity must be at least 1")
    engine = _Engine(settings)
    app = web.Application(client_max_size=1 << 30)
    app[ENGINE_KEY] = engine
    app.router.add_route("PUT", "/generate", engine.generate)
    app.router.add_post("/v1/completions", engine.completions)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_get("/health", engine.health)
    app.router.add_get("/stats", engine.stats)
    return app


async def serve(settings: EngineSettings, port_file: str | None = None,
                ready: asyncio.Event | None = None, on_bound: Callable[[int], None] | None = None) -> None:
    """Bind, write the bound port to ``port_file`` (atomically) if given, set ``ready`` (and call
    ``on_bound(port)``), then serve until SIGTERM/SIGINT (signals only on the main thread) or
    cancellation; shuts down cleanly."""
    runner = web.AppRunner(build_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    loop, stop, handled = asyncio.get_running_loop(), asyncio.Event(), []
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        port = runner.addresses[0][1]
        if port_file:
            tmp = f"{port_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{port}\n")
            os.replace(tmp, port_file)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if ready is not None:
            ready.set()
        if on_bound is not None:
            on_bound(port)
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


class EngineThread:
    """Serve an engine from a background thread with its own event loop (for tests, benchmarks):
    ``with EngineThread(EngineSettings()) as engine: requests.get(engine.url + "/health")``."""

    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-engine", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def _bound(self, port: int) -> None:
        self.port = port
        self._started.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(serve(self.settings, on_bound=self._bound))
        try:
            self._loop.run_until_complete(self._task)
        except BaseException as exc:
            if self.port is None:
                self._error = exc
        finally:
            self._started.set()
            self._loop.close()

    def start(self) -> "EngineThread":
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()


def _write_rank(folder: Path, rank: int) -> None:
    env = os.environ
    record = {"rank": rank, "local_rank": int(env.get("SLURM_LOCALID", "0")), "node_rank": int(env.get("SLURM_NODEID", "0")),
              "world_size": int(env.get("SLURM_NTASKS", "1")), "node": env.get("SLURMD_NODENAME", socket.gethostname()),
              "gpus": env.get("CUDA_VISIBLE_DEVICES", env.get("SLURM_STEP_GPUS", "")), "pid": os.getpid()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank-{rank}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"rank-{rank}.json")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m orchestrator.engines.embedded --port 0 --port-file F ...``."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.engines.embedded",
                                     description="Simulated LLM inference engine (NeMo and OpenAI protocols).")
    defaults = EngineSettings()
    for f in fields(EngineSettings):
        value = getattr(defaults, f.name)
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--port-file", help="write the bound port number here (atomically)")
    parser.add_argument("--rank-dir", help="each rank writes rank-<SLURM_PROCID>.json (its Slurm placement) here")
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank exits with status 1 at once (tests)")
    args = vars(parser.parse_args(argv))
    port_file = args.pop("port_file")
    rank_dir, fail_rank = args.pop("rank_dir"), args.pop("fail_rank")
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # Slurm's time-limit warning is for the orchestrator, not us
    if rank == fail_rank:
        print(f"rank {rank}: simulated failure (--fail-rank)", file=sys.stderr, flush=True)
        return 1
    if rank_dir:
        _write_rank(Path(rank_dir), rank)
        world = int(os.environ.get("SLURM_NTASKS", "1"))
        while rank == 0 and len(list(Path(rank_dir).glob("rank-*.json"))) < world:
            time.sleep(0.05)  # like torch.distributed's rendezvous: no rank serves until all have joined
    if rank != 0:  # like NeMo's non-zero ranks: no HTTP, stay up and join generations until stopped
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return 0
    settings = EngineSettings(**args)
    if min(settings.capacity, settings.max_natural_tokens, settings.max_model_len) < 1:
        parser.error("--capacity, --max-natural-tokens and --max-model-len must be at least 1")
    if not 0.0 <= settings.error_rate <= 1.0 or min(settings.request_latency_s, settings.token_latency_s) < 0:
        parser.error("--error-rate must be in [0, 1] and latencies non-negative")
    try:
        asyncio.run(serve(settings, port_file))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
