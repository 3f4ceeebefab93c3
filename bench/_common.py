"""Shared helpers for the benchmarks: input generation, an embedded engine in its own process, stats."""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent

_TEXT = ("Explain, step by step and with a short worked example, how a careful engineer would reason "
         "about the trade-offs between throughput, latency and memory when serving a large language "
         "model to many users at once on a small cluster of accelerators, and what they would measure first.")


def prompt_text(i: int) -> str:
    """A unique prompt of ~100-200 characters (the length varies with i)."""
    n = 90 + (i * 7919) % 100
    return f"Q{i}: {_TEXT[:n]}"


def write_prompts(path: Path, n: int, row_group_rows: int = 65536, chunk: int = 262144) -> Path:
    """A Parquet file of n rows (id: string, prompt: string), written chunk by chunk (bounded memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            table = pa.table({"id": [f"q{i}" for i in range(start, stop)],
                              "prompt": [prompt_text(i) for i in range(start, stop)]}, schema=schema)
            writer.write_table(table, row_group_size=row_group_rows)
    return path


class Engine:
    """The embedded engine as its own process (`python -m orchestrator.simulator`)."""

    def __init__(self, workdir: Path, **settings):
        self.workdir = workdir
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> "Engine":
        port_file = self.workdir / "engine.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "orchestrator.simulator", "--port", "0", "--port-file", str(port_file)]
        for key, value in self.settings.items():
            cmd += ["--" + key.replace("_", "-"), str(value)]
        self.log = open(self.workdir / "engine.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.command = cmd
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}; see {self.workdir / 'engine.log'}")
            if port_file.exists():
                self.url = f"http://127.0.0.1:{int(port_file.read_text().strip())}"
                try:
                    urllib.request.urlopen(self.url + "/health", timeout=2).read()
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("engine did not come up")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_orchestrator(overrides: list[str], timeout_s: float, env_extra: dict | None = None) -> tuple[float, str]:
    """`orchestrator run ...` as a subprocess; returns (wall seconds, combined output). Raises on failure."""
    cmd = ["orchestrator", "run", *overrides]
    env = dict(os.environ, **(env_extra or {}))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator run failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, out


def hydra_quote(value) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def cleanup(path: Path) -> None:
    if os.environ.get("BENCH_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}; code {revision()}"


def revision() -> str:
    """The commit measured, and whether orchestrator/ had uncommitted edits."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "orchestrator", "conf"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted edits in orchestrator/ or conf/' if dirty else ''}"


class CpuWatch:
    """CPU time the rest of the machine used while a benchmark ran: every busy jiffy in /proc/stat
    minus this process and its reaped descendants (the engine, `orchestrator run`, the clients).
    Call `report()` after every child has been waited for. A large figure means the result is skewed."""

    def __init__(self):
        self.t0, self.busy0, self.steal0, self.own0 = time.monotonic(), *self._machine(), self._own()

    @staticmethod
    def _machine() -> tuple[float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = v
        return (user + nice + system + irq + softirq) / tick, steal / tick

    @staticmethod
    def _own() -> float:
        import resource

        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            total += r.ru_utime + r.ru_stime
        return total

    def report(self, extra_own_s: float = 0.0) -> str:
        """extra_own_s: CPU of descendants reaped by a child that is still running (memory.py's launcher)."""
        wall = time.monotonic() - self.t0
        busy, steal = self._machine()
        own = self._own() - self.own0 + extra_own_s
        other = max(0.0, busy - self.busy0 - own)
        cores = os.cpu_count() or 1
        return (f"CPU over {wall:.0f} s: this benchmark {own:.1f} cpu-s, other processes {other:.1f} cpu-s "
                f"({100 * other / (wall * cores):.0f}% of {cores} cores), steal {steal - self.steal0:.1f} s")


def cpu_probe() -> str:
    """Seconds for a fixed pure-Python loop: this VM's speed drifts (0.6-1.1 s seen), so figures taken at
    different times differ; ratios measured in one run are what to compare."""
    t0 = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i * i
    return f"cpu probe {time.perf_counter() - t0:.3f} s"


def load() -> str:
    """The 1/5/15-minute load averages: other work on this small machine skews every figure."""
    return "load average %.2f %.2f %.2f" % os.getloadavg()
