"""One base for every domain error: the CLI catches `OrchestratorError` and prints its message.

Each message names the problem, the file or key, and the fix; none of them needs a traceback.
"""
from __future__ import annotations


class OrchestratorError(Exception):
    """A failure the user can act on; its message says what, where, and how to fix it."""


class ConfigError(OrchestratorError, ValueError):
    """A config value is wrong; the message names the key, the problem and the fix."""


class LayoutError(OrchestratorError, ValueError):
    """The layout cannot run the model; the message says why and which layouts would."""


class InputError(OrchestratorError, ValueError):
    """The input cannot be read as prompts; the message names the file and the fix."""


class EngineError(OrchestratorError, RuntimeError):
    """The engine died, never answered a generation, or answered in a way we cannot use."""


class RunError(OrchestratorError, RuntimeError):
    """The run could not start or did not finish; the message says why."""
