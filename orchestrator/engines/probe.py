"""Readiness: learn what a running engine speaks and prove it with one real one-token generation.

A connect is not proof of a working model (NeMo's card polls with a connect); a generation is.
"""
from __future__ import annotations

from typing import Any

import requests

from ..config import Config
from ..errors import EngineError
from . import auth
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


class Http:
    """The probe's requests to one engine: the key's header (engine.api_key_env) and TLS verification
    (engine.verify_tls, engine.ca_bundle) on every one; a 401 or 403 is final (KeyRefused)."""

    def __init__(self, cfg: Config, url: str):
        self.cfg, self.url = cfg, url
        self.headers = auth.headers(cfg)
        self.verify = auth.requests_verify(cfg)
        if self.verify is False:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # asked for: not a warning per request

    def __call__(self, method: str, path: str, timeout: float = 10, **kwargs) -> requests.Response:
        resp = requests.request(method, self.url + path, headers=self.headers, verify=self.verify, timeout=timeout,
                                **kwargs)
        if resp.status_code in auth.REFUSED:
            raise auth.refused(self.cfg, self.url, resp.status_code, f"{method} {path}")
        return resp


def detect_protocol(http: Http) -> str:
    """Which protocol a server speaks, from its routes: OpenAI's /v1/models, Triton's /v2/health/ready,
    else NeMo's PUT /generate (its only route in the 2024 containers)."""
    if http("GET", "/v1/models").status_code == 200:  # a connection error: not up yet
        return "openai"
    try:
        if http("GET", "/v2/health/ready").status_code == 200:
            return "triton"
    except requests.RequestException:
        pass
    return "nemo"


def discover(cfg: Config, url: str, protocol: str, http: Http | None = None) -> EngineInfo:
    """The engine's model name, API and limits, read from its own routes."""
    http = http or Http(cfg, url)
    info = EngineInfo(url=url, protocol=protocol, model_name=cfg.engine.served_model_name or cfg.model.name)
    if protocol == "openai":
        resp = http("GET", "/v1/models")
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
            info.can_tokenize = _tokenize_works(http, info.model_name)
    elif protocol == "triton":
        resp = http("GET", "/v2/health/ready")
        if resp.status_code != 200:
            raise TransientError(f"GET /v2/health/ready: HTTP {resp.status_code}")
        resp = http("GET", f"/v2/models/{info.model_name}")
        meta = _json(resp)
        if resp.status_code != 200 or not isinstance(meta, dict):
            raise RejectedError(f"GET /v2/models/{info.model_name}: HTTP {resp.status_code}: {str(meta)[:300]}; "
                                f"set engine.served_model_name to the name the server was deployed with")
        info.inputs = {i.get("name"): i.get("datatype") for i in meta.get("inputs") or [] if isinstance(i, dict)}
        names = list(info.inputs)
        info.api = "generate" if "text_input" in names else "infer"
        config = _json(http("GET", f"/v2/models/{info.model_name}/config"))
        if isinstance(config, dict) and isinstance(config.get("max_batch_size"), int) and config["max_batch_size"] > 0:
            info.max_batch_size = config["max_batch_size"]
        if info.api == "infer" and "prompts" not in names:
            raise RejectedError(f"Triton model {info.model_name!r} takes inputs {names}, neither 'prompts' (NeMo's "
                                f"deploy_triton.py) nor 'text_input' (the generate extension)")
    return info


def _tokenize_works(http: Http, model: str) -> bool:
    try:
        resp = http("POST", "/tokenize", json={"model": model, "prompt": PROBE_PROMPT})
        body = _json(resp)
        return resp.status_code == 200 and isinstance(body, dict) and isinstance(body.get("count"), int)
    except requests.RequestException:
        return False


def generate_once(cfg: Config, info: EngineInfo, http: Http | None = None) -> None:
    """One real one-token generation, through the codec the client will use."""
    http = http or Http(cfg, info.url)
    codec = make_codec(cfg, info)
    resp = http(codec.method, codec.path, timeout=60, json=codec.payload([PROBE_PROMPT], tokens_to_generate=1))
    body = _json(resp)
    if resp.status_code == 404 and info.protocol != "openai" and isinstance(body, dict) and "detail" in body:
        raise EngineError(f"{info.url} answered {codec.method} {codec.path} with HTTP 404 {body}: the server "
                          f"speaks the OpenAI API, not {info.protocol}; use engine.protocol=openai (or leave "
                          f"engine.protocol unset with engine=endpoint to detect it)")
    codec.parse(resp.status_code, body, [PROBE_PROMPT])


def ready(cfg: Config, url: str, protocol: str | None) -> EngineInfo:
    """Detect (when protocol is None), discover and prove the engine at url; raises what the caller retries
    (requests' errors, TransientError) or EngineError / RejectedError for what is final (KeyRefused: a 401
    or 403 on any route). Every request carries the key's header and checks TLS as configured."""
    http = Http(cfg, url)
    info = discover(cfg, url, protocol or detect_protocol(http), http)
    generate_once(cfg, info, http)
    return info
