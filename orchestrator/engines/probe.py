"""Readiness: a re-export shim. Detection and discovery now live in each protocol's module of
orchestrator.protocols; detect_protocol, discover, generate_once and ready in its registry (__init__.py),
Http and the helpers in protocols/base.py."""
from __future__ import annotations

from ..protocols import detect_protocol, discover, generate_once, make_codec, ready  # noqa: F401
from ..protocols.base import (PROBE_PROMPT, EngineInfo, Http, RejectedError, TransientError, _json,  # noqa: F401
                              normalise_url)
from ..protocols.openai import _tokenize_works, openai_api  # noqa: F401
