"""Readiness: learn what a running engine speaks and prove it with one real one-token generation.

A connect is not proof of a working model (NeMo's card polls with a connect); a generation is.
"""
from __future__ import annotations

from typing import Any

import requests

from ..config import Config
from ..errors import EngineError
from .codecs import EngineInfo, RejectedError, TransientError, make_codec, openai_api

PROBE_PROMPT = "Hello"


def _json(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


def normalise_url(url: str) -> str:
    """http://host:port from what a user may paste: a trailing slash or an OpenAI base URL (/v1)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def detect_protocol(url: str) -> str:
    """Which protocol a server speaks, from its routes: OpenAI's /v1/models, Triton's /v2/health/ready,
    else NeMo's PUT /generate (its only route in the 2024 containers)."""
    if requests.get(url + "/v1/models", timeout=10).status_code == 200:  # a connection error: not up yet
        return "openai"
    try:
        if requests.get(url + "/v2/health/ready", timeout=10).status_code == 200:
            return "triton"
    except requests.RequestException:
        pass
    return "nemo"


def discover(cfg: Config, url: str, protocol: str) -> EngineInfo:
    """The engine's model name, API and limits, read from its own routes."""
    info = EngineInfo(url=url, protocol=protocol, model_name=cfg.engine.served_model_name or cfg.model.name)
    if protocol == "openai":
        resp = requests.get(url + "/v1/models", timeout=10)
        body = _json(resp)
        if resp.status_code != 200:
            raise TransientError(f"GET /v1/models: HTTP {resp.status_code}: {str(body)[:200]}")
        try:
            model = body["data"][0]
            info.model_name = model["id"]
        except (KeyError, IndexError, TypeError):
            raise RejectedError(f"GET /v1/models lists no model: {str(body)[:200]}") from None
        info.max_model_len = model.get("max_model_len") if isinstance(model.get("max_model_len"), int) else None
        info.api = openai_api(cfg)
        if cfg.engine.use_tokenizer:
            info.can_tokenize = _tokenize_works(url, info.model_name)
    elif protocol == "triton":
        resp = requests.get(url + "/v2/health/ready", timeout=10)
        if resp.status_code != 200:
            raise TransientError(f"GET /v2/health/ready: HTTP {resp.status_code}")
        resp = requests.get(f"{url}/v2/models/{info.model_name}", timeout=10)
        meta = _json(resp)
        if resp.status_code != 200 or not isinstance(meta, dict):
            raise RejectedError(f"GET /v2/models/{info.model_name}: HTTP {resp.status_code}: {str(meta)[:300]}; "
                                f"set engine.served_model_name to the name the server was deployed with")
        info.inputs = {i.get("name"): i.get("datatype") for i in meta.get("inputs") or [] if isinstance(i, dict)}
        names = list(info.inputs)
        info.api = "generate" if "text_input" in names else "infer"
        config = _json(requests.get(f"{url}/v2/models/{info.model_name}/config", timeout=10))
        if isinstance(config, dict) and isinstance(config.get("max_batch_size"), int) and config["max_batch_size"] > 0:
            info.max_batch_size = config["max_batch_size"]
        if info.api == "infer" and "prompts" not in names:
            raise RejectedError(f"Triton model {info.model_name!r} takes inputs {names}, neither 'prompts' (NeMo's "
                                f"deploy_triton.py) nor 'text_input' (the generate extension)")
    return info


def _tokenize_works(url: str, model: str) -> bool:
    try:
        resp = requests.post(url + "/tokenize", json={"model": model, "prompt": PROBE_PROMPT}, timeout=10)
        body = _json(resp)
        return resp.status_code == 200 and isinstance(body, dict) and isinstance(body.get("count"), int)
    except requests.RequestException:
        return False


def generate_once(cfg: Config, info: EngineInfo) -> None:
    """One real one-token generation, through the codec the client will use."""
    codec = make_codec(cfg, info)
    resp = requests.request(codec.method, info.url + codec.path, timeout=60,
                            json=codec.payload([PROBE_PROMPT], tokens_to_generate=1))
    body = _json(resp)
    if resp.status_code == 404 and info.protocol != "openai" and isinstance(body, dict) and "detail" in body:
        raise EngineError(f"{info.url} answered {codec.method} {codec.path} with HTTP 404 {body}: the server "
                          f"speaks the OpenAI API, not {info.protocol}; use engine.protocol=openai (or leave "
                          f"engine.protocol unset with engine=endpoint to detect it)")
    codec.parse(resp.status_code, body, [PROBE_PROMPT])


def ready(cfg: Config, url: str, protocol: str | None) -> EngineInfo:
    """Detect (when protocol is None), discover and prove the engine at url; raises what the caller retries
    (requests' errors, TransientError) or EngineError / RejectedError for what is final."""
    info = discover(cfg, url, protocol or detect_protocol(url))
    generate_once(cfg, info)
    return info
