"""The embedded engine: a real aiohttp server that simulates an LLM inference engine (NeMo, vLLM, Triton protocols).

``model`` holds the deterministic generation model, ``validation`` the request rules, ``triton_tensors`` Triton's
tensors, ``engine`` the state and routes, ``app`` the aiohttp app, auth, TLS and :class:`EngineThread`, ``cli``
the command line (``python -m orchestrator.simulator``).
"""
