"""Request/response codecs: a re-export shim. Each protocol's codec now lives with its readiness in its own
module of orchestrator.protocols (nemo.py, openai.py, triton.py; shared types in base.py, make_codec in the
package's registry)."""
from __future__ import annotations

from ..protocols import CODECS, make_codec  # noqa: F401
from ..protocols.base import (Completion, EngineInfo, MalformedAnswer, RejectedError, TransientError,  # noqa: F401
                              _status, _text, _tokens, rollouts_in_one_request)
from ..protocols.nemo import NEMO_MAX_SENTENCES, NemoCodec, _count_output_tokens, nemo_copies  # noqa: F401
from ..protocols.openai import OpenAICodec, openai_api  # noqa: F401
from ..protocols.triton import TRITON_MAX_LEN_INPUTS, TritonCodec  # noqa: F401
