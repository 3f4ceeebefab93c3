"""One module per wire protocol, each with its codec (how it wants prompts sent and answers read) and its
readiness (whether a server speaks it, and what the server tells about its model): nemo.py, openai.py,
triton.py, reward.py (a reward model's scores on NeMo-Aligner's server), pooling.py (a reward or classifier
checkpoint's scores on vLLM's pooling runner), on the shared types of base.py. This registry picks a module
by name (make_codec, discover), detects a server's protocol by trying the modules in order, and proves an
engine ready with one real one-token generation (for a reward model: one scored sentence).

A new protocol is one module implementing base.WireProtocol (NAME, Codec, detect, discover) and its entry in
MODULES (plus engine.protocol's choices, config.PROTOCOLS, which config.py keeps itself: config sits below
this package).

A connect is not proof of a working model (NeMo's card polls with a connect); a generation is.
"""
from __future__ import annotations

from ..config import Config
from ..errors import EngineError
from . import nemo, openai, pooling, reward, triton
from .base import PROBE_PROMPT, EngineInfo, Http, MalformedAnswer, WireProtocol, _json

# in the order detect_protocol tries them; NeMo, taken by elimination (its detect is always true), last
MODULES: tuple[WireProtocol, ...] = (openai, reward, pooling, triton, nemo)
BY_NAME: dict[str, WireProtocol] = {module.NAME: module for module in MODULES}
CODECS = {module.NAME: module.Codec for module in MODULES}


def make_codec(cfg: Config, info: EngineInfo | None = None, protocol: str | None = None,
               one_request: bool | None = None):
    """The codec of the engine's protocol. one_request: whether a row's rollouts may go in one request (the
    caller asks the engine's adapter: engines.base.rollouts_in_one_request); NeMo and Triton decide
    without it."""
    name = info.protocol if info else (protocol or cfg.engine.protocol or "nemo")
    return CODECS[name](cfg, info, one_request=one_request)


def detect_protocol(http: Http) -> str:
    """Which protocol a server speaks, from its routes: OpenAI's /v1/models, Triton's /v2/health/ready,
    else NeMo's PUT /generate (its only route in the 2024 containers)."""
    return next(module.NAME for module in MODULES if module.detect(http))


def discover(cfg: Config, url: str, protocol: str, http: Http | None = None) -> EngineInfo:
    """The engine's model name, API and limits, read from its own routes."""
    http = http or Http(cfg, url)
    return BY_NAME[protocol].discover(cfg, url, http)


def generate_once(cfg: Config, info: EngineInfo, http: Http | None = None) -> None:
    """One real one-token generation, through the codec the client will use."""
    http = http or Http(cfg, info.url)
    codec = make_codec(cfg, info)
    resp = http(codec.method, codec.path, timeout=60, json=codec.payload([PROBE_PROMPT], tokens_to_generate=1))
    body = _json(resp)
    # (a pooling server is an OpenAI server: its codec says what a 404 on its route means)
    if resp.status_code == 404 and info.protocol not in ("openai", "pooling") and isinstance(body, dict) \
            and "detail" in body:
        raise EngineError(f"{info.url} answered {codec.method} {codec.path} with HTTP 404 {body}: the server "
                          f"speaks the OpenAI API, not {info.protocol}; use engine.protocol=openai (or leave "
                          f"engine.protocol unset with engine=endpoint to detect it)")
    for answer in codec.parse(resp.status_code, body, [PROBE_PROMPT]):
        if answer.error is not None:  # the one answer asked for is unusable: no proof the engine works
            raise MalformedAnswer(answer.error)


def ready(cfg: Config, url: str, protocol: str | None) -> EngineInfo:
    """Detect (when protocol is None), discover and prove the engine at url; raises what the caller retries
    (requests' errors, TransientError) or EngineError / RejectedError for what is final (KeyRefused: a 401
    or 403 on any route). Every request carries the key's header and checks TLS as configured."""
    http = Http(cfg, url)
    info = discover(cfg, url, protocol or detect_protocol(http), http)
    generate_once(cfg, info, http)
    return info
