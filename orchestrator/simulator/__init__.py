"""The embedded engine: a real aiohttp server that simulates an LLM inference engine (NeMo, vLLM, Triton protocols).

``model`` holds the deterministic generation model, ``validation`` the request rules, ``triton_tensors`` Triton's
tensors, ``routes_nemo``, ``routes_openai`` and ``routes_triton`` each protocol's routes, ``faults`` capacity and
fault injection, ``engine`` the state they share, ``app`` the aiohttp app, auth, TLS and :class:`EngineThread`,
``cli`` the command line (``python -m orchestrator.simulator``).
"""
