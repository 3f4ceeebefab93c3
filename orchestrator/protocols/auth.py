"""Engines behind authentication and TLS: engine.api_key_env, engine.verify_tls, engine.ca_bundle.

The key lives only in the environment variable that engine.api_key_env names. Configs, config.yaml,
logs, rendered scripts and summary.json hold that name, never the value: it is read from the environment
where a request is made (the readiness probe and the client, in the job) and sent as
`Authorization: Bearer <key>` on every request. A job gets the variable the way it gets the rest of the
submitting environment (the local executor's subprocess; sbatch's default --export=ALL on Slurm: an export that
drops the variable is refused by the Slurm adapter, clusters/slurm.py).

An answer of 401 or 403 is the key being refused (missing, wrong or revoked): final at readiness, and
during the run it stops the replica (no row is blamed) instead of turning every row into an error.
"""
from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Callable

from ..config import Config
from ..errors import ConfigError, EngineError

REFUSED = (401, 403)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class KeyRefused(EngineError):
    """The engine answered 401 or 403: it wants a key, or refused the one sent."""


class TLSFailure(EngineError):
    """The engine's HTTPS certificate could not be verified (or the TLS handshake failed)."""


def env_name_problem(key: str, name: str | None) -> str | None:
    """Why `name` cannot be an environment variable's name (None when it can). The value is never
    repeated: a key pasted in place of the name must not reach a message or a log."""
    if name is None or _ENV_NAME.match(name):
        return None
    return (f"{key} takes the NAME of an environment variable that holds the key (e.g. {key}=MY_KEY after "
            f"`export MY_KEY=...`), not the key itself; the value given is not a variable name (not shown)")


def missing_env(key: str, name: str | None) -> str | None:
    """The problem, with its fix, when the variable `name` (named by config key `key`) is unset or empty."""
    if not name or os.environ.get(name):
        return None
    state = "empty" if name in os.environ else "not set"
    return (f"{key}={name}, but the environment variable {name} is {state}: export {name}=<the API key> in the "
            f"shell that runs `orchestrator` (Slurm jobs inherit that environment), or drop {key} if the "
            f"server needs no key")


def ca_bundle_problem(ca_bundle: str) -> str | None:
    """Why engine.ca_bundle cannot be trusted as a CA (None when it can): not a file, or a file that
    Python's ssl cannot load as PEM certificates (a DER file, a key, a directory's listing...)."""
    path = Path(ca_bundle).expanduser()
    if not path.is_file():
        return (f"engine.ca_bundle={ca_bundle} is not a file: give the PEM file of the CA that signed the "
                f"server's certificate")
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return (f"engine.ca_bundle={ca_bundle} is not a PEM certificate file ({reason}): give the CA certificate "
                f"in PEM form (text starting with -----BEGIN CERTIFICATE-----; convert a DER file with "
                f"`openssl x509 -inform der -in {path.name} -out ca.pem`)")
    return None


def problems(cfg: Config) -> list[str]:
    """The auth and TLS settings' problems, each with its fix; checked before anything is submitted."""
    e, found = cfg.engine, []
    for key, name in (("engine.api_key_env", e.api_key_env),
                      ("engine.simulator.require_key_env", e.simulator.require_key_env)):
        problem = env_name_problem(key, name) or missing_env(key, name)
        if problem:
            found.append(problem)
    if e.ca_bundle:
        problem = ca_bundle_problem(e.ca_bundle)
        if problem:
            found.append(problem)
    return found


def api_key(cfg: Config) -> str | None:
    """The key from the environment (None without engine.api_key_env); ConfigError when it is missing."""
    name = cfg.engine.api_key_env
    if not name:
        return None
    problem = env_name_problem("engine.api_key_env", name) or missing_env("engine.api_key_env", name)
    if problem:
        raise ConfigError(problem)
    return os.environ[name]


def headers(cfg: Config) -> dict[str, str]:
    """The headers every request to the engine carries (never logged)."""
    key = api_key(cfg)
    return {"Authorization": f"Bearer {key}"} if key else {}


def requests_verify(cfg: Config) -> bool | str:
    """requests' `verify`: the CA bundle, True (the system's CAs) or False (engine.verify_tls=false)."""
    if not cfg.engine.verify_tls:
        return False
    return str(Path(cfg.engine.ca_bundle).expanduser()) if cfg.engine.ca_bundle else True


def client_ssl(cfg: Config) -> ssl.SSLContext | bool:
    """aiohttp's `ssl`: a context trusting engine.ca_bundle, True (the system's CAs) or False (no check)."""
    if not cfg.engine.verify_tls:
        return False
    if cfg.engine.ca_bundle:
        problem = ca_bundle_problem(cfg.engine.ca_bundle)
        if problem:
            raise TLSFailure(problem)
        return ssl.create_default_context(cafile=str(Path(cfg.engine.ca_bundle).expanduser()))
    return True


def refused(cfg: Config, url: str, status: int, what: str, during_run: bool = False) -> KeyRefused:
    """The message for a 401/403: which key (by its variable's name), which server, what to do."""
    name = cfg.engine.api_key_env
    when = "during the run" if during_run else "at the readiness check"
    after = (" The replica stopped; no row is recorded as an error, unfinished units go back to the pool: fix the "
             "key and rerun the same command to resume.") if during_run else ""
    if name:
        return KeyRefused(f"the engine at {url} refused the API key from engine.api_key_env={name} (HTTP {status} "
                          f"on {what}, {when}): check that ${name} holds a key this server accepts (it may be "
                          f"wrong, expired or revoked).{after}")
    return KeyRefused(f"the engine at {url} requires an API key (HTTP {status} on {what}, {when}) and none was sent: "
                      f"export the key in an environment variable and set engine.api_key_env=<its name>, e.g. "
                      f"engine.api_key_env=MY_KEY.{after}")


def stop_on_refusal(cfg: Config, url: str, halt: Callable[[Exception], None]):
    """aiohttp's `raise_for_status` hook for the client's session: a 401/403 on any request halts the
    replica with the KeyRefused message and fails that request as a connection-level error, so the rows
    in flight are abandoned (redone on resume), never recorded as errors."""
    import aiohttp

    async def check(resp: "aiohttp.ClientResponse") -> None:
        if resp.status in REFUSED:
            halt(refused(cfg, url, resp.status, f"{resp.method} {resp.url.path}", during_run=True))
            raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status,
                                              message="the API key was refused")

    return check


def tls_failure(cfg: Config, url: str, exc: BaseException) -> TLSFailure:
    """The TLS problem in words, with both fixes (a CA bundle, or no verification)."""
    text = str(exc)
    found = re.search(r"certificate verify failed: ([^(']+?)\s*(?:\(_ssl|'|$)", text) or \
        re.search(r"\[SSL: [A-Z0-9_]+\] ([^(']+?)\s*(?:\(_ssl|'|$)", text)
    reason = found.group(1).strip() if found else type(exc).__name__
    hint = (" (the server may speak plain HTTP: then use an http:// engine.url)"
            if "wrong version number" in text else "")
    e = cfg.engine
    trusted = f"the CA in engine.ca_bundle={e.ca_bundle}" if e.ca_bundle else "the system's CA certificates"
    return TLSFailure(f"TLS failed with the engine at {url}: {reason}{hint}; its certificate was checked against "
                      f"{trusted} (engine.verify_tls=true). Fix: set engine.ca_bundle=/path/to/ca.pem to the CA "
                      f"certificate that signed the server's certificate (for a self-signed server, that "
                      f"certificate itself), or, on a network you trust, engine.verify_tls=false to skip the check")
