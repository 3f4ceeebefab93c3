"""A real vLLM across the two nodes of the local Slurm cluster: vLLM's multi-node launch without Ray
(--nnodes/--node-rank/--master-addr, rank 1 --headless), one task per node."""
import glob
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, write_prompts
from tests.test_slurm import committed_units, job_ids, leftover, run_cli, sacct_state, start_run, wait_for
from tests.test_vllm import results, vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slurm]


@pytest.fixture
def two_node_vllm(tiny_model, slurm_cluster):
    """vLLM's own multi-node launch, PP=2 over n1 and n2 (both on this host). Each node gets its own core and
    its own compile cache: ranks sharing ~/.cache/vllm crashed PP start-up in 2 of 4 tries here."""
    cache = Path.home() / ".cache" / "orchestrator" / "vllm-compile"
    return vllm(tiny_model, "cluster=slurm", f"cluster.partition={slurm_cluster}", "layout.nodes=2",
                "layout.gpus_per_node=1", "layout.tensor_parallel=1", "layout.pipeline_parallel=2",
                "engine.master_addr=127.0.0.1", "cluster.cpus_per_task=1",
                "+engine.node_env.VLLM_CPU_OMP_THREADS_BIND=['0','1']",
                f"+engine.node_env.VLLM_CACHE_ROOT=['{cache}-node0','{cache}-node1']")


@pytest.mark.slurm
def test_vllm_across_two_slurm_nodes_every_row_exactly_once(two_node_vllm, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 200)
    run_dir = tmp_path / "run"
    proc = run_cli("run", *two_node_vllm, f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=50",
                   "sampling.tokens_to_generate=16", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_ids(proc.stdout)
    df = results(run_dir)
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(200)) and (df["status"] == "ok").all()
    log = next(iter(glob.glob(f"{run_dir}/logs/engine-*.log")))
    text = Path(log).read_text()
    assert "--nnodes 2" in text and "--node-rank" in text and "--headless" in text
    assert sacct_state(job) == "COMPLETED"
    steps = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,NodeList", "-j", job], capture_output=True,
                           text=True).stdout
    assert "n[1-2]" in steps  # the engine step spanned both nodes
    assert leftover(run_dir) == ""


@pytest.mark.slurm
def test_killing_the_vllm_rank_on_n2_fails_the_job_fast_with_the_engine_log(two_node_vllm, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 3000)
    run_dir = tmp_path / "run"
    run = start_run(*two_node_vllm, f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=20",
                    "sampling.tokens_to_generate=32")
    wait_for(lambda: committed_units(run_dir) >= 1, 500, "the first commit")
    found = subprocess.run(["pgrep", "-f", f"{TINY} .*--node-rank 1 .*--headless"], capture_output=True,
                           text=True).stdout.split()
    # the rank itself, not srun or the bash -c whose command line holds every node's line
    headless = [pid for pid in found if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].split(b"/")[-1]
                not in (b"srun", b"bash")]
    assert headless, "no headless vLLM rank found"
    killed_at = time.monotonic()
    for pid in headless:  # the rank and its worker processes, as when its node goes down
        os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 1, out + err
    assert time.monotonic() - killed_at < 120
    assert "the engine process exited during the run" in err and "engine log" in err
    assert committed_units(run_dir) < 150
    df = results(run_dir)
    assert (df["status"] == "ok").all() and df["id"].is_unique  # nothing blamed on the rows
    (job,) = {p.parent.name for p in (run_dir / "logs" / "submitit").glob("*/*_submitted.pkl")}
    assert sacct_state(job) == "FAILED"
    assert leftover(run_dir) == ""
    wait_for(lambda: not subprocess.run(["pgrep", "-f", "VLLM::"], capture_output=True).stdout.strip(), 60,
             "every vLLM process of the job to end")
