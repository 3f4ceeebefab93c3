"""The engine process's one owner: starts the adapter's step, proves it can generate, always stops it.

    with EngineServer(cfg, log_path, port_file, launcher=step_prefix) as server:
        info = server.wait_ready()
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

from ..config import Config
from ..errors import EngineError
from ..protocols import auth, ready
from ..protocols.base import EngineInfo, RejectedError, TransientError, normalise_url
from ..protocols.openai import refusal_hint
from .base import Rendezvous, adapter_for

__all__ = ["EngineServer", "free_port"]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies (Linux), so no engine is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _only_zombies(group: int) -> bool:
    """Whether every process left in the group has exited (a zombie its new parent has not reaped yet); False
    where there is no /proc to tell."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in filter(str.isdigit, entries):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return False
    return True


def free_port() -> int:
    """A port free on this node now (the engine binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class EngineServer:
    """Starts the configured engine (its step, from this node) and waits until it has answered a real
    generation. An external engine (engine=endpoint) is only proven, never started or stopped."""

    def __init__(self, cfg: Config, log_path: Path, port_file: Path, launcher: list[str] | None = None,
                 rank_dir: Path | None = None, replica: int = 0, instance: int | None = None):
        self.cfg, self.log_path, self.port_file = cfg, log_path, port_file
        self.instance = instance  # which pinned instance of its replica it is (instances.py); None: the only one
        self.adapter = adapter_for(cfg)
        self.launcher = list(launcher or [])  # e.g. the srun step that starts the engine's tasks
        self.rank_dir = rank_dir
        self.proc: subprocess.Popen | None = None
        self.info: EngineInfo | None = None
        self.port: int | None = None
        if self.adapter.starts_process and cfg.engine.port:
            self.port = cfg.engine.port
        elif self.adapter.starts_process and self.picks_port_here:
            self.port = free_port()
        multi = cfg.layout.nodes > 1 or instance is not None  # a pinned instance's rendezvous is its own too
        self.rendezvous = Rendezvous(
            port=self.port if self.port is not None else 0,
            master_addr=cfg.engine.master_addr or socket.gethostname(),
            master_port=cfg.engine.master_port or (free_port() if multi else 0),
            port_file=None if self.picks_port_here else str(port_file),
            rank_dir=None if rank_dir is None else str(rank_dir), replica=replica)

    @property
    def picks_port_here(self) -> bool:
        """True: node 0 picks the port; False: the engine binds port 0 and writes it to port_file."""
        return not self.adapter.reports_port

    @property
    def model_name(self) -> str:
        return self.info.model_name if self.info else (self.cfg.engine.served_model_name or self.cfg.model.name)

    def command(self) -> list[str]:
        return self.launcher + self.adapter.step_command(self.cfg, self.rendezvous)

    @property
    def url(self) -> str:
        if not self.adapter.starts_process:
            return normalise_url(self.cfg.engine.url or "")
        host = self.cfg.engine.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> "EngineServer":
        """Starts the engine; one that fails to start raises here, and there is nothing to stop."""
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        """Always stops the engine, whatever ended the block (an error, a signal's exception, SystemExit from
        a requeue); the exception, if any, goes on."""
        self.stop()

    def start(self) -> None:
        if not self.adapter.starts_process:
            return
        cmd = self.command()
        env = dict(os.environ, **self.adapter.env(self.cfg))
        if self.instance is not None:
            env.update(self.adapter.instance_env(self.rendezvous))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as exc:
                raise EngineError(f"cannot start engine={self.adapter.name} ({exc.strerror}: {cmd[0]}); install it "
                                  f"or point engine.command at it. Command: {shlex.join(cmd)}") from None

    def alive(self) -> bool:
        """False once the engine process (or its srun step) has exited; an external engine counts as alive."""
        return self.proc is None or self.proc.poll() is None

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise EngineError(f"the engine exited with status {self.proc.returncode} before it was ready; "
                              f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, poll_s: float = 0.2, max_poll_s: float = 2.0) -> EngineInfo:
        """Poll until a one-token generation succeeds; fail fast when the process dies or a connection to an
        external engine is refused; bounded by engine.ready_timeout_s. The poll starts at poll_s and grows to
        max_poll_s: a big model loads for minutes, and each look is a stat on the shared filesystem."""
        deadline = time.monotonic() + self.cfg.engine.ready_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            if self.port is None and self.adapter.starts_process and self.port_file.exists():
                self.port = int(self.port_file.read_text().strip())
            if self.port is not None or not self.adapter.starts_process:
                try:
                    self.info = ready(self.cfg, self.url, self.adapter.protocol_for(self.cfg))
                    return self.info
                except requests.exceptions.SSLError as exc:  # before ConnectionError, its base: it answered
                    raise auth.tls_failure(self.cfg, self.url, exc) from None
                except requests.ConnectionError as exc:
                    if not self.adapter.starts_process:
                        tls = " (it closed the connection: if it speaks HTTPS, use an https:// engine.url)" \
                            if self.url.startswith("http://") and "Connection aborted" in str(exc) else ""
                        raise EngineError(f"nothing answers at engine.url={self.cfg.engine.url} (connection "
                                          f"refused or unreachable: {type(exc).__name__}){tls}; start the server, or "
                                          f"check the host and port") from None
                    last = f"{type(exc).__name__}: {exc}"
                except (requests.RequestException, TransientError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                except RejectedError as exc:
                    raise EngineError(f"the engine at {self.url} refused the readiness generation: {exc}"
                                      f"{refusal_hint(self.cfg, str(exc))}") from None
            time.sleep(poll_s)
            poll_s = min(max_poll_s, poll_s * 1.5)
        where = f"log {self.log_path}:\n{self.log_tail()}" if self.adapter.starts_process else f"engine.url={self.url}"
        raise EngineError(f"the engine did not answer a one-token generation within "
                          f"{self.cfg.engine.ready_timeout_s:.0f} s (engine.ready_timeout_s); last: {last}; {where}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the engine's whole process group (its own session), then SIGKILL to what is left after
        grace_s; returns once every process of the group is gone, not only the one it started (an engine's
        helpers, e.g. PyTriton's tritonserver and Python's resource tracker, exit after it), or the engine
        died and left some behind."""
        if self.proc is None:
            return
        group = self.proc.pid  # start_new_session: the group's id is the engine's pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if not self._group_alive(group):
                break
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while self._group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.proc.wait()

    def _group_alive(self, group: int) -> bool:
        """Whether a process of the group is still running (our own child reaped first: a zombie counts)."""
        self.proc.poll()
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _only_zombies(group)
