"""cluster=allocation on the real local cluster: an sbatch script whose only command is
`orchestrator run` uses its own allocation (no nested sbatch), one srun step per replica."""
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_prompts
from tests.test_slurm import SLOW_SLURM, ranks, sacct_state, wait_for

pytestmark = pytest.mark.slurm
EXE = shutil.which("orchestrator") or "orchestrator"


def submit(tmp_path: Path, partition: str, nodes: int, *overrides: str, command: str = "run") -> tuple[str, Path]:
    """The recipe of docs/slurm.md "Inside your own allocation": #SBATCH lines plus one `orchestrator run` line
    (or another command: `pipeline FILE`)."""
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text("\n".join([
        "#!/bin/bash",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        f"#SBATCH --partition={partition}",
        f"#SBATCH --output={out}",
        "#SBATCH --open-mode=append",
        f"exec {EXE} {command} " + " ".join(overrides),
    ]) + "\n")
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
    return job.stdout.strip().split(";")[0], out


def steps(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,JobName", "-j", job], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def test_an_sbatch_job_fills_its_allocation_with_replicas_and_submits_nothing(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 400)
    run_dir = tmp_path / "run"
    job, out = submit(tmp_path, slurm_cluster, 2, f"data.input={src}", f"run_dir={run_dir}", *SLOW_SLURM)
    assert sacct_state(job, deadline_s=240) == "COMPLETED", out.read_text()
    text = out.read_text()
    assert f"inside Slurm job {job}: running in its allocation" in text
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(400)) and (df["status"] == "ok").all()
    owners = {p.read_text() for p in (run_dir / "work" / "claims").glob("*/*")}
    assert owners == {"r0", "r1"}  # two replicas, one per node, shared the plan
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["cluster"] == "allocation" and summary["replicas"] == 2
    names = [line.split("|")[1] for line in steps(job)]
    assert "orchestrator-r0" in names and "orchestrator-r1" in names  # replicas are steps of this job
    assert not (run_dir / "logs" / "submitit").exists(), "a job was submitted from inside the allocation"


def test_a_requeued_allocation_resumes_from_its_commits_on_two_nodes_per_replica(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 600)
    run_dir = tmp_path / "run"
    job, out = submit(tmp_path, slurm_cluster, 2, "model=nemotron4_340b_instruct", "engine=mock",
                      f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=20", "client.batch_size=10",
                      "engine.simulator.request_latency_s=0.3", "sampling.tokens_to_generate=4")
    results = run_dir / "results"
    wait_for(lambda: results.is_dir() and len(list(results.glob("*.parquet"))) >= 3, 180, "a few committed units")
    subprocess.run(["scontrol", "requeue", job], check=True)
    deadline = time.monotonic() + 400
    while True:  # after the requeue the job runs again and must finish by itself
        state = sacct_state(job, deadline_s=10)
        if state == "COMPLETED":
            break
        assert time.monotonic() < deadline and state not in ("FAILED", "CANCELLED", "TIMEOUT"), (state, out.read_text())
    df = pd.read_parquet(results)
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(600)) and (df["status"] == "ok").all()
    text = out.read_text()
    assert "resuming" in text, text
    placed = {(r["node"], r["world_size"]) for r in ranks(run_dir)}
    assert {node for node, _ in placed} == {"n1", "n2"} and {w for _, w in placed} == {16}  # TP8 x PP2 on 2 nodes


def test_a_layout_that_does_not_fit_the_allocation_is_refused_with_the_arithmetic(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    job, out = submit(tmp_path, slurm_cluster, 1, "model=nemotron4_340b_instruct", "engine=mock",
                      f"data.input={src}", f"run_dir={tmp_path / 'run'}")
    assert sacct_state(job, deadline_s=120) == "FAILED"
    text = out.read_text()
    assert f"job {job} holds 1 node(s), and one replica of nemotron4_340b_instruct needs layout.nodes=2: " \
           f"1 // 2 = 0 replicas fit" in text
    assert "Traceback" not in text
    assert len(steps(job)) <= 2  # the job and its batch step: no engine was started


def test_one_replicas_engine_dying_loses_only_that_replica(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 600)
    run_dir = tmp_path / "run"
    job, out = submit(tmp_path, slurm_cluster, 2, f"data.input={src}", f"run_dir={run_dir}", "client.lease_s=4",
                      *SLOW_SLURM)
    rank0 = lambda: list(run_dir.glob("work/ranks-*-r0/rank-0.json"))  # noqa: E731
    results = run_dir / "results"
    wait_for(lambda: rank0() and results.is_dir() and len(list(results.glob("*.parquet"))) >= 4, 180,
             "replica 0 serving and some commits")
    subprocess.run(["kill", "-9", str(json.loads(rank0()[0].read_text())["pid"])], check=True)
    assert sacct_state(job, deadline_s=300) == "COMPLETED", out.read_text()
    text = out.read_text()
    assert f"warning: job {job}.r0 failed" in text and "the engine process exited during the run" in text
    df = pd.read_parquet(results)
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(600)) and (df["status"] == "ok").all()


def test_sigterm_to_the_batch_step_stops_the_replica_steps_with_grace_and_logs_it(slurm_cluster, tmp_path):
    """SIGTERM to the batch step (the front-end: `scancel --batch --signal=TERM`, a wrapper's kill) used to
    SIGTERM each replica's srun, which kills its step at once: nothing more committed, nothing logged. The
    front-end now signals the steps' tasks (`scancel --signal=TERM JOB.STEP`): every replica stops within
    client.grace_s (its log line says so), run.log tells the stop, and no step, engine steps included, is left
    running (issue 19, item 9)."""
    src = write_prompts(tmp_path / "in.parquet", 3000)
    run_dir = tmp_path / "run"
    job, out = submit(tmp_path, slurm_cluster, 2, f"data.input={src}", f"run_dir={run_dir}", "client.grace_s=20",
                      *SLOW_SLURM)
    results = run_dir / "results"
    wait_for(lambda: results.is_dir() and len(list(results.glob("*.parquet"))) >= 4, 180, "some commits")
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True)
    assert sacct_state(job, deadline_s=180) in ("FAILED", "COMPLETED", "CANCELLED"), out.read_text()
    log = (run_dir / "run.log").read_text()
    assert "front-end: interrupted by SIGTERM; stopping job(s)" in log, log
    assert re.search(rf"stopping replica step\(s\) {job}\.r0: scancel --ctld --signal=TERM {job}\.\d+", log), log
    stopped = set(re.findall(r"replica (\d) \(job [^)]*\): stopped \(SIGTERM\)", log))
    assert stopped == {"0", "1"}, log  # both replicas stopped themselves (their clients had their grace)
    assert "replica step(s) ended within their grace" in log, log
    states = lambda: subprocess.run(["sacct", "-n", "-P", "-o", "JobID,State", "-j", job],  # noqa: E731
                                    capture_output=True, text=True).stdout
    wait_for(lambda: "RUNNING" not in states(), 60, f"every step of job {job} ended (accounting lags)")
    assert len(states().splitlines()) >= 5  # the job, its batch step, two replica steps and their engine steps
    assert subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout.strip() == b""


def test_a_pipeline_in_one_allocation_runs_its_stages_at_once_each_on_its_own_node(slurm_cluster, tmp_path):
    """`sbatch -N 2` of `orchestrator pipeline`: generate and a run stage scoring it (`from: generate`) run at
    the same time, each on the node its cluster.nodes=1 gives it (docs/pipelines.md, "Inside one allocation")."""
    src = write_prompts(tmp_path / "in.parquet", 60)
    every = ["engine.simulator.request_latency_s=0.05", "client.batch_size=10", "data.unit_rows=10",
             "sampling.tokens_to_generate=4", "cluster.nodes=1"]
    stages = [{"name": "generate", "overrides": [f"data.input={src}", "sampling.rollouts=2", "sampling.greedy=false",
                                                 *every]},
              {"name": "score", "from": "generate", "overrides": ["data.prompt_column=response",
                                                                  "data.keep_columns=[rollout]", *every]}]
    file = tmp_path / "pipeline.yaml"
    file.write_text(json.dumps({"stages": stages}))
    root = tmp_path / "p"
    job, out = submit(tmp_path, slurm_cluster, 2, "cluster=allocation", *SLOW_SLURM[4:], "engine=mock",
                      f"run_dir={root}", command=f"pipeline {file}")
    assert sacct_state(job, deadline_s=120) == "COMPLETED", out.read_text()
    text = out.read_text()
    assert "stage generate: on node(s) n1 of job" in text and "stage score: on node(s) n2 of job" in text, text
    placed = {stage: {r["node"] for r in ranks(root / stage)} for stage in ("generate", "score")}
    assert placed == {"generate": {"n1"}, "score": {"n2"}}  # each stage's engine ran on its own node only
    names = {line.split("|")[1] for line in steps(job)}
    assert {"orchestrator-generate-r0", "orchestrator-score-r0"} <= names  # each stage's replica, a step of this job
    expected = sorted((f"q{i}", r) for i in range(60) for r in range(2))
    for stage in ("generate", "score"):
        df = pd.read_parquet(root / stage / "results")
        assert sorted(zip(df["id"], df["rollout"])) == expected and (df["status"] == "ok").all(), stage
    assert not (root / "generate" / "logs" / "submitit").exists(), "a job was submitted from inside the allocation"
