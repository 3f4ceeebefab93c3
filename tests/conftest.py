import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import compose


@pytest.fixture
def weird_tmp_path(tmp_path: Path) -> Path:
    """A directory whose name has spaces and quotes, so quoting bugs surface."""
    path = tmp_path / "a dir with 'quotes' and \"double\" spaces"
    path.mkdir()
    return path


def hydra_value(value) -> str:
    """A value quoted for Hydra's override grammar (paths with spaces and quotes)."""
    return "'" + str(value).replace("'", "\\'") + "'"


def write_prompts(path: Path, n: int, start: int = 0, ids: bool = True, row_group_size: int | None = None,
                  prompts: list | None = None) -> Path:
    data = {"prompt": prompts if prompts is not None
            else [f"Question number {i}: what is {i} + {i}?" for i in range(start, start + n)]}
    if ids:
        data["id"] = [f"q{i}" for i in range(start, start + len(data["prompt"]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def make_cfg():
    def _make(*overrides: str):
        return compose(list(overrides))
    return _make


def committed(run_dir: Path) -> int:
    """Units committed in a run_dir."""
    folder = run_dir / "results"
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


def journaled(run_dir: Path) -> list[dict]:
    """The whole records of answered rows in the journals of units not committed yet (a torn last line is
    not one)."""
    import json

    records = []
    for path in (run_dir / "work" / "journal").glob("*.jsonl"):
        unit = int(path.name.split(".")[0])
        if (run_dir / "results" / f"part-{unit:08d}.parquet").exists():
            continue
        for line in path.read_bytes().splitlines(keepends=True):
            try:
                record = json.loads(line) if line.endswith(b"\n") else {}
            except ValueError:
                continue
            if isinstance(record.get("i"), list):
                records.append(record)
    return records


def job_pids(run_dir: Path) -> list[int]:
    """The local executor's job processes of a run_dir (each runs a client)."""
    out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {run_dir}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_jobs_when(first: subprocess.Popen, run_dir: Path, ready, sig: int = signal.SIGKILL,
                   front_end: bool = False, timeout_s: float = 120.0, also: tuple = ()) -> None:
    """Once ready() holds (polled, with a deadline; the run `first` must not end before), send sig to
    run_dir's job processes (and those of the run_dirs in `also`: a pipeline's other stages), SIGKILL the
    front-end too when front_end, and wait for the front-end to end."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert first.poll() is None, "the run ended before it could be stopped: " + first.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out waiting for the moment to stop the run"
        time.sleep(0.01)
    pids = job_pids(run_dir)
    assert pids, "the job process running the client was not found"
    for other in also:
        found = job_pids(other)
        assert found, f"no job process of {other} was found"
        pids += found
    for pid in pids:
        os.kill(pid, sig)
    if front_end:
        first.kill()
    first.communicate(timeout=timeout_s)


def orchestrator_cmd() -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli"]


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def slurm_available() -> tuple[bool, str]:
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        return False, "no sbatch on PATH: run `bash scripts/local_slurm.sh start`"
    script = Path(__file__).resolve().parent.parent / "scripts" / "local_slurm.sh"
    proc = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"the local Slurm cluster is not up (`bash scripts/local_slurm.sh start`): {proc.stdout[-300:]}"
    return True, ""


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real local Slurm cluster; a missing cluster fails the test under CI=true instead of skipping it."""
    ok, why = slurm_available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the Slurm cluster is unavailable: {why}")
        pytest.skip(why)
    return "debug"


ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("ORCHESTRATOR_VLLM_VENV", Path.home() / ".cache" / "orchestrator-vllm-venv"))
TINY = Path(os.environ.get("ORCHESTRATOR_TINY_MODEL", Path.home() / ".cache" / "orchestrator" / "tiny-nemotron"))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random-weight Nemotron built offline (idempotent: seconds when it exists)."""
    python = VENV / "bin" / "python"
    if not (VENV / "bin" / "vllm").exists():
        why = f"no vLLM venv at {VENV}: run `bash scripts/install_vllm.sh`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and vLLM is not installed: {why}")
        pytest.skip(why)
    subprocess.run([str(python), str(ROOT / "scripts" / "build_tiny_model.py"), str(TINY)], check=True,
                   capture_output=True, timeout=300)
    return TINY


TINY_REWARD = Path(os.environ.get("ORCHESTRATOR_TINY_REWARD_MODEL",
                                Path.home() / ".cache" / "orchestrator" / "tiny-reward"))


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_model) -> Path:
    """The tiny random-weight LlamaForSequenceClassification (helpfulness, correctness; the tiny model's
    tokenizer) built offline by scripts/build_tiny_reward_model.py (idempotent: seconds when it exists)."""
    script = ROOT / "scripts" / "build_tiny_reward_model.py"
    subprocess.run([str(VENV / "bin" / "python"), str(script), str(TINY_REWARD)], check=True, capture_output=True,
                   timeout=300)
    return TINY_REWARD


TRITON_VENV = Path(os.environ.get("ORCHESTRATOR_TRITON_VENV", Path.home() / ".cache" / "orchestrator-triton-venv"))


def triton_venv_python(imports: str = "pytriton") -> Path:
    """The PyTriton venv's python (scripts/install_triton.sh), once `import <imports>` works in it; a missing
    venv fails the test under CI=true instead of skipping it."""
    python = TRITON_VENV / "bin" / "python"
    check = subprocess.run([str(python), "-c", f"import {imports}"], capture_output=True, text=True) \
        if python.exists() else None
    if check is None or check.returncode != 0:
        why = f"no PyTriton venv at {TRITON_VENV}: run `bash scripts/install_triton.sh`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and Triton is not installed: {why}")
        pytest.skip(why)
    return python


@pytest.fixture(scope="session")
def triton_python(tiny_model) -> Path:
    """The PyTriton venv's python, with transformers and the tiny model built (triton_venv_python)."""
    return triton_venv_python("pytriton, transformers")


def process_tree(pid: int) -> set[int]:
    """pid's live descendants (not pid), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), list(children.get(pid, []))
    while todo:
        found.add(todo[-1])
        todo.extend(children.get(todo.pop(), []))
    return found


def alive_processes(pids: set[int]) -> list[str]:
    """Those of pids still running (not zombies), with their command lines."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            alive.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return alive
