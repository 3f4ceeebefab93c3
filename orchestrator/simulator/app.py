"""The simulator's aiohttp app: routes served, not-found and auth middleware, TLS, EngineThread."""
from __future__ import annotations

import asyncio
import hmac
import os
import signal
import ssl
import threading
from typing import Callable

from aiohttp import web

from .engine import _Engine
from .model import ROUTE_FAMILIES, EngineSettings
from .routes_pooling import add_pooling_routes
from .routes_reward import add_reward_routes
from .validation import _json

ENGINE_KEY = web.AppKey("engine", _Engine)


def parse_routes(routes: str) -> frozenset[str]:
    """``"nemo,openai"`` -> the families; ValueError for an unknown or empty one."""
    chosen = frozenset(r.strip() for r in routes.split(",") if r.strip())
    unknown = chosen - set(ROUTE_FAMILIES)
    if unknown or not chosen:
        raise ValueError(f"routes must be a comma-separated subset of {','.join(ROUTE_FAMILIES)}, got {routes!r}")
    return chosen


def _not_found_middleware(families: frozenset[str]):
    """Unknown routes and wrong methods answer the way the server being imitated does: FastAPI's
    ``{"detail": ...}`` for vLLM, Triton's ``{"error": ...}`` under /v2 (or when Triton is the only
    JSON server), aiohttp's default otherwise (NeMo's Flask server answers HTML)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            reason = "Not Found" if exc.status == 404 else "Method Not Allowed"
            kserve = bool({"triton", "reward"} & families)
            triton = kserve and (request.path.startswith("/v2") or "openai" not in families)
            if triton:
                return _json({"error": reason}, exc.status)
            if "openai" in families:
                return _json({"detail": reason}, exc.status)
            raise

    return middleware


def required_key(settings: EngineSettings) -> str | None:
    """The key every request must bear (``--require-key-env NAME``: the value of $NAME), None when none is;
    ValueError when the variable is unset or empty (the value itself never appears anywhere)."""
    name = settings.require_key_env
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ValueError(f"--require-key-env {name}: the environment variable {name} is unset or empty; "
                         f"export {name}=<the key the engine requires>")
    return key


def _auth_middleware(engine: _Engine, key: str):
    """vLLM's ``--api-key``: a request without ``Authorization: Bearer <key>`` (or with another key) is
    answered 401 ``{"error": "Unauthorized"}``; here on every route but ``/metrics``, which is open as vLLM's is
    (its key guards its /v1 routes only) and not counted. With ``revoke_key_after`` N, the key is refused from
    the (N+1)-th request on, as if revoked while a run goes on."""
    expected = f"Bearer {key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path == "/metrics":
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        revoked = 0 <= engine.s.revoke_key_after <= engine.counters["authorized"]
        if revoked or not hmac.compare_digest(given, expected):
            engine._count("unauthorized")
            return _json({"error": "Unauthorized"}, 401)
        engine._count("authorized")
        return await handler(request)

    return middleware


def build_app(settings: EngineSettings) -> web.Application:
    """The aiohttp application serving the families in ``settings.routes`` (see the module doc),
    plus ``GET /stats`` (and ``GET /metrics`` beside the NeMo and OpenAI routes)."""
    if settings.capacity < 1:
        raise ValueError("capacity must be at least 1")
    if settings.triton_max_batch_size < 1:
        raise ValueError("triton_max_batch_size must be at least 1")
    families = parse_routes(settings.routes)
    key = required_key(settings)
    engine = _Engine(settings)
    middlewares = [_not_found_middleware(families)]
    if key is not None:
        middlewares.insert(0, _auth_middleware(engine, key))  # outermost: before any route, known or not
    app = web.Application(client_max_size=1 << 30, middlewares=middlewares)
    app[ENGINE_KEY] = engine
    add = app.router.add_route
    if "nemo" in families:
        add("PUT", "/generate", engine.generate)
    if "openai" in families:
        add("POST", "/v1/completions", engine.completions)
        add("POST", "/v1/chat/completions", engine.chat_completions)
        if engine.dialect.serves_tokenize:
            add("POST", "/tokenize", engine.tokenize)
        add("GET", "/v1/models", engine.models)
        add("GET", "/health", engine.health)
        if engine.dialect.name == "vllm":  # vLLM's pooling runner: /pooling and /classify (routes_pooling)
            add_pooling_routes(app, engine)
    if "reward" in families:  # NeMo-Aligner's reward_model (routes_reward), ahead of Triton's /v2/models/{name}
        add_reward_routes(app, engine)
    if "triton" in families or "reward" in families:
        add("GET", "/v2", engine.triton_server_metadata)
        add("GET", "/v2/health/live", engine.triton_health)
        add("GET", "/v2/health/ready", engine.triton_health)
    if "triton" in families:
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version:[0-9]+}"):
            add("GET", base, engine.triton_metadata)
            add("GET", base + "/ready", engine.triton_model_ready)
            add("GET", base + "/config", engine.triton_config)
            add("POST", base + "/infer", engine.triton_infer)
            add("POST", base + "/generate", engine.triton_generate)
    if "openai" in families or "nemo" in families:  # vLLM's Prometheus names (routes_metrics)
        add("GET", "/metrics", engine.metrics)
    add("GET", "/stats", engine.stats)
    return app


def tls_context(settings: EngineSettings):
    """The server's TLS context (``--tls-cert`` and ``--tls-key``), None for plain HTTP."""
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def serve(settings: EngineSettings, port_file: str | None = None,
                ready: asyncio.Event | None = None, on_bound: Callable[[int], None] | None = None) -> None:
    """Bind, write the bound port to ``port_file`` (atomically) if given, set ``ready`` (and call
    ``on_bound(port)``), then serve until SIGTERM/SIGINT (signals only on the main thread) or
    cancellation; shuts down cleanly."""
    runner = web.AppRunner(build_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    loop, stop, handled = asyncio.get_running_loop(), asyncio.Event(), []
    try:
        await web.TCPSite(runner, settings.host, settings.port, ssl_context=tls_context(settings)).start()
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
        return f"{'https' if self.settings.tls_cert else 'http'}://{self.settings.host}:{self.port}"

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
