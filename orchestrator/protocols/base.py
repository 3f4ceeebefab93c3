"""What every wire protocol shares: the errors an answer can raise, the shapes readiness and the codecs
exchange (EngineInfo, Completion), the probe's HTTP (Http), the answer checks, and the interface a
protocol's module implements (WireProtocol).

Every field of every answer is checked: an answer we cannot use is a `RejectedError` for its rows
(recorded as row errors), never a crash. A body unusable as a whole (not the shape asked for, the wrong
number of answers) fails its request; one unusable element of a usable body (a null sentence) is the error
of its own row only (`Completion.error`).

Several answers per prompt (sampling.rollouts > 1): every request carries its own seed (`payload(...,
seed=)`), so NeMo and Triton get one prompt per request (one seed each); the OpenAI codec may ask for a
row's consecutive rollouts in one request (`n`, seed = the first one's), which vLLM serves as n requests
with seeds seed, seed + 1, ...: the answers of n separate requests. NeMo, with
sampling.rollouts_in_one_request=true, gets a row's rollouts as copies of its prompt in one request under
one seed (`copies`): rollout k is copy k, whose answer depends on the whole batch, so the client always
sends a row's copies together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol

import requests

from ..config import Config
from . import auth

PROBE_PROMPT = "Hello"


class TransientError(Exception):
    """Worth retrying: 5xx, 429, connection reset, timeout."""


class RejectedError(Exception):
    """The engine refused the request, or answered something unusable; retrying at once cannot help."""


class MalformedAnswer(RejectedError):
    """The engine answered something unusable: its fault, not the row's (retry_failed=true may recover it)."""


@dataclass
class Completion:
    """The engine's answer for one prompt of a request, or why that one answer is unusable (`error`): one bad
    element of an answer (a null sentence of 128) is its row's error, never the whole request's."""

    text: str  # the engine's output for one prompt, echo included where the engine echoes
    output_tokens: int | None
    error: str | None = None  # set: this answer is unusable (a MalformedAnswer's message), text and tokens unset
    finish_reason: str | None = None  # the engine's own word for why the answer ended (OpenAI's finish_reason)
    stop: str | None = None  # the stop string the engine says it matched (vLLM's stop_reason, when a string)
    prompt_tokens: int | None = None  # the prompt's tokens, from the engine's usage
    reasoning: str | None = None  # a reasoning model's thinking, sent apart from the answer (vLLM's reasoning)
    token_logprobs: list | None = None  # sampling.logprobs: each output token's logprob
    top_logprobs: list | None = None  # and per token its K most likely alternatives, [{token, logprob}, ...]
    scores: list[float] | None = None  # a reward model's answer: one value per model.attributes (no text)
    engine_fault: bool = True  # with error: the engine is to blame (retry_failed=true redoes the row); False: the row

    @classmethod
    def checked(cls, make: Callable[[], Completion]) -> Completion:
        """The completion `make` builds from one element of an answer, or, where that element is unusable
        (make raises MalformedAnswer), that row's error."""
        try:
            return make()
        except MalformedAnswer as exc:
            return cls("", None, error=str(exc))


@dataclass(frozen=True)
class RowSampling:
    """One row's own request settings, where they differ from the config's (None: the config's): from
    data.sampling_columns, an OpenAI batch line's body, or data.schema_column. Hashable, so that a batch of
    several prompts (NeMo, Triton) holds rows of one setting only. Each codec's payload() maps the fields
    into its own request."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    schema: str | None = None  # the row's JSON schema, as JSON text
    body: str | None = None  # an OpenAI batch line's other body fields, as JSON text (OpenAI engines)


DEFAULT_ROW = RowSampling()


def row_fields(row: RowSampling, names: dict[str, str]) -> dict:
    """A row's own values of the plain sampling fields, under the request field names a codec gives them
    ({RowSampling field: request field})."""
    return {wire: getattr(row, name) for name, wire in names.items() if getattr(row, name) is not None}


class Request(NamedTuple):
    """One prompt's request as the client's workers send it (a batch is a list of them, one HTTP request):
    its unit's buffer (unit_source.UnitBuffer), the row of its first answer, what is sent (the prompt, or a
    conversation's messages on the chat API), its seed (a rollout's; None: the config's), how many answers
    it asks for, and the row's own settings."""

    buf: Any
    first: int
    sent: Any
    seed: int | None = None
    answers: int = 1
    row: RowSampling = DEFAULT_ROW


@dataclass
class EngineInfo:
    """What readiness learnt about a running engine; codecs are built from it."""

    url: str
    protocol: str  # nemo, openai, triton or reward
    model_name: str
    api: str = "completions"  # openai: completions or chat; triton: infer or generate
    max_model_len: int | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # triton: the model's input tensors, name -> datatype
    can_tokenize: bool = False  # POST /tokenize counts tokens (vLLM, SGLang)
    max_batch_size: int | None = None  # triton: rows one request may carry (the model config's max_batch_size)


def logprobs_problem(cfg: Config, engine: str, protocol: str | None, api: str | None = None) -> str | None:
    """Why sampling.logprobs cannot be served by an engine of this protocol (and api, where readiness found
    it; None: not known yet), or None when it can. OpenAI servers give the chosen tokens' logprobs and the K
    best alternatives; NeMo's /generate (compute_logprob) and the TRT-LLM ensemble's generate route
    (return_log_probs) give the chosen tokens' only, so there K must be 0; NeMo's Triton model gives none."""
    k = cfg.sampling.logprobs
    if k is None or protocol in ("openai", None):
        return None
    fix = ("use an engine with the OpenAI API (vllm, sglang, trtllm, or engine=endpoint on one), or unset "
           "sampling.logprobs")
    if protocol == "nemo" or (protocol == "triton" and api == "generate"):
        if k == 0:
            return None
        alternatives = "all_probs, the whole vocabulary's distribution at every token" if protocol == "nemo" \
            else "no alternatives at all"
        return (f"sampling.logprobs={k}: engine={engine} ({protocol}{'' if api is None else ' ' + api}) returns "
                f"the chosen tokens' logprobs but not the {k} best alternatives (it has {alternatives}); set "
                f"sampling.logprobs=0 for the chosen tokens' logprobs (token_logprobs), or {fix}")
    if protocol == "triton" and api is None and engine != "triton" and k == 0:
        return None  # found at readiness: a TRT-LLM ensemble's generate route can, NeMo's model cannot
    return (f"sampling.logprobs={k}: engine={engine} speaks the {protocol} protocol"
            f"{' (NeMo deploy_triton.py model)' if protocol == 'triton' else ''}, whose answers carry no logprobs; "
            f"{fix}")


def _status(status: int, body: Any, message: Any = None) -> None:
    """5xx and 429 are worth a retry; any other non-200 is the engine refusing the request."""
    if status >= 500 or status == 429:
        raise TransientError(f"HTTP {status}: {str(body)[:200]}")
    if status != 200:
        raise RejectedError(f"HTTP {status}: {str(message if message is not None else body)[:500]}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedAnswer(f"malformed answer: {what} is {type(value).__name__}, not text")
    return value


def _tokens(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedAnswer(f"malformed answer: {what} is {value!r}, not a token count")
    return value


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


def engine_info(cfg: Config, url: str, protocol: str) -> EngineInfo:
    """What readiness knows of an engine before asking it: its url, protocol and the configured model name
    (engine.served_model_name, else model.name); each protocol's discover fills in the rest."""
    return EngineInfo(url=url, protocol=protocol, model_name=cfg.engine.served_model_name or cfg.model.name)


class WireProtocol(Protocol):
    """What a protocol's module (orchestrator/protocols/<name>.py) provides, as module attributes; the
    registry (orchestrator/protocols/__init__.py) lists the modules in the order detection tries them."""

    NAME: str  # engine.protocol's value, EngineInfo.protocol
    Codec: type  # built as Codec(cfg, info): batch_size, in_flight, max_n, method, path, payload(), parse()

    def detect(self, http: Http) -> bool:
        """Whether the server at readiness speaks this protocol, from its routes. Raises what readiness
        retries (requests' errors: not up yet) or what is final (KeyRefused)."""

    def discover(self, cfg: Config, url: str, http: Http) -> EngineInfo:
        """The engine's model name, API and limits, read from its own routes."""
