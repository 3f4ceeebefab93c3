"""engine=endpoint: a server that is already running (engine.url), of any protocol here. Nothing is
started or stopped; without engine.protocol, readiness finds the protocol from the server's routes."""
from __future__ import annotations

from ..config import Config
from .base import EngineAdapter, Rendezvous


class EndpointAdapter(EngineAdapter):
    name = "endpoint"
    starts_process = False

    def protocol_for(self, cfg: Config) -> str | None:
        return cfg.engine.protocol or ("reward" if cfg.model.attributes else None)  # a reward model: its server

    def tasks_per_node(self, cfg: Config) -> int:
        return 0

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        return []

    def problems(self, cfg: Config) -> list[str]:
        found = super().problems(cfg)
        if not cfg.engine.url:
            found.append("engine=endpoint needs engine.url=http://host:port (the running server's address)")
        return found


ADAPTER = EndpointAdapter()
