"""Shim until the redesign's import pass: the embedded engine now lives in the package ``orchestrator.simulator``.

``python -m orchestrator.engines.embedded`` still runs its command line.
"""
from __future__ import annotations

import sys

from orchestrator.simulator.model import (  # noqa: F401
    MARKER, EOS, TURN_END, MAX_SENTENCES, VOCAB_SIZE, ROUTE_FAMILIES, VOCABULARY, _VOCAB_TOKENS, _SPECIAL,
    _NOT_SPECIAL, _TOKEN_RE, _SPECIAL_RE, _dumps, EngineSettings, tokenize, is_special, token_id, _logprob,
    _stop_tokens, _rng, simulate, _continuation, _Generation, generate_text, _generate_text, render_chat, _content,
)
from orchestrator.simulator.validation import (  # noqa: F401
    _check_messages, _is_int, _is_num, _is_bool, _is_str_list, _NEMO_RULES, _nullable, _OAI_SAMPLING, _OAI_RULES,
    _CHAT_RULES, _OAI_DEFAULTS, _check, _json, _oai_error, _read_object,
)
from orchestrator.simulator.triton_tensors import (  # noqa: F401
    _Tensor, _TritonModel, _triton_model, _INT_RANGES, _UINT_RANGES, _TRITON_JSON_TYPES, _BATCH_NOTE, _TritonError,
    _dims, _flatten, _read_json_data,
)
from orchestrator.simulator.faults import _Faults  # noqa: F401
from orchestrator.simulator.routes_nemo import _NemoRoutes  # noqa: F401
from orchestrator.simulator.routes_openai import _OpenAIRoutes  # noqa: F401
from orchestrator.simulator.routes_triton import _TritonRequests, _TritonRoutes  # noqa: F401
from orchestrator.simulator.engine import (  # noqa: F401
    _Engine,
)
from orchestrator.simulator.app import (  # noqa: F401
    ENGINE_KEY, parse_routes, _not_found_middleware, required_key, _auth_middleware, build_app, tls_context, serve,
    EngineThread,
)
from orchestrator.simulator.cli import (  # noqa: F401
    _write_rank, main,
)


if __name__ == "__main__":
    sys.exit(main())
