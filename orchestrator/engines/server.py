"""The engine process's one owner: builds its command, starts it, proves it can generate, stops it."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from ..config import Config
from .protocols import RejectedError, TransientError, make_protocol


class EngineError(RuntimeError):
    """The engine died or never answered a generation; the message says which and where its log is."""


def mock_command(cfg: Config, port: int | str, port_file: Path | None, rank_dir: Path | None = None) -> list[str]:
    e = cfg.engine
    cmd = [sys.executable, "-m", "orchestrator.engines.embedded", "--host", e.host, "--port", str(port),
           "--request-latency-s", str(e.request_latency_s), "--token-latency-s", str(e.token_latency_s),
           "--capacity", str(e.capacity), "--error-rate", str(e.error_rate), "--seed", str(e.seed),
           "--max-natural-tokens", str(e.max_natural_tokens), "--model-name", cfg.model.name,
           "--max-model-len", str(cfg.model.architecture.max_seq_len),
           "--stall-rate", str(e.stall_rate), "--stall-s", str(e.stall_s)]
    if port_file is not None:
        cmd += ["--port-file", str(port_file)]
    if rank_dir is not None:
        cmd += ["--rank-dir", str(rank_dir)]
    if e.fail_rank >= 0:
        cmd += ["--fail-rank", str(e.fail_rank)]
    return cmd


def nemo_command(cfg: Config, port: int | str) -> list[str]:
    """The 340B card's megatron_gpt_eval.py line, from the layout (run on every rank)."""
    e, layout = cfg.engine, cfg.layout
    if not e.checkpoint:
        raise EngineError("engine=nemo needs engine.checkpoint=/path/to/model.nemo (inside the container)")
    return ["python3", e.script, f"gpt_model_file={e.checkpoint}", "pipeline_model_parallel_split_rank=0",
            "server=True", f"tensor_model_parallel_size={layout.tensor_parallel}",
            f"pipeline_model_parallel_size={layout.pipeline_parallel}", f"trainer.precision={e.precision}",
            f"trainer.devices={layout.gpus_per_node}", f"trainer.num_nodes={layout.nodes}",
            "web_server=False", f"port={port}", *e.extra_args]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies (Linux), so no engine is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A port free on this node now (the engine binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class EngineServer:
    """Starts the configured engine on this node and waits until it has answered a real generation."""

    def __init__(self, cfg: Config, log_path: Path, port_file: Path, launcher: list[str] | None = None,
                 rank_dir: Path | None = None):
        self.cfg, self.log_path, self.port_file = cfg, log_path, port_file
        self.launcher = list(launcher or [])  # e.g. the srun step that starts one rank per GPU
        self.rank_dir = rank_dir
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.model_name = cfg.model.name
        if cfg.engine.name != "mock" and not cfg.engine.url:
            self.port = cfg.engine.port or free_port()

    def command(self) -> list[str]:
        if self.cfg.engine.name == "mock":
            return self.launcher + mock_command(self.cfg, self.cfg.engine.port, self.port_file, self.rank_dir)
        return self.launcher + nemo_command(self.cfg, self.port)

    @property
    def url(self) -> str:
        if self.cfg.engine.url:
            return self.cfg.engine.url.rstrip("/")
        host = self.cfg.engine.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self.cfg.engine.url:
            return
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as exc:
                raise EngineError(f"cannot start the engine ({exc}): {shlex.join(cmd)}") from None

    def alive(self) -> bool:
        """False once the engine process (or its srun step) has exited; an external engine counts as alive."""
        return self.proc is None or self.proc.poll() is None

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_tail()
            raise EngineError(f"the engine exited with status {self.proc.returncode} before it was ready; "
                              f"log {self.log_path}:\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, poll_s: float = 0.2) -> str:
        """Poll until a one-token generation succeeds; fail fast when the process dies; bounded by the deadline."""
        deadline = time.monotonic() + self.cfg.engine.ready_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            if self.port is None and self.cfg.engine.url:
                self.port = -1
            if self.port is None and self.port_file.exists():
                self.port = int(self.port_file.read_text().strip())
            if self.port is not None:
                try:
                    self.probe()
                    return self.url
                except (requests.RequestException, TransientError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                except RejectedError as exc:
                    raise EngineError(f"the engine refused the readiness generation: {exc}") from None
            time.sleep(poll_s)
        raise EngineError(f"the engine did not answer a one-token generation within "
                          f"{self.cfg.engine.ready_timeout_s:.0f} s (engine.ready_timeout_s); last: {last}; "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def probe(self) -> None:
        """One real one-token generation, through the protocol the client will use."""
        protocol = make_protocol(self.cfg, self.model_name)
        if protocol.name == "openai":
            models = requests.get(self.url + "/v1/models", timeout=10).json()
            self.model_name = models["data"][0]["id"]
            protocol = make_protocol(self.cfg, self.model_name)
        resp = requests.request(protocol.method, self.url + protocol.path, timeout=60,
                                json=protocol.payload(["Hello"], tokens_to_generate=1))
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        protocol.parse(resp.status_code, body, ["Hello"])

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
