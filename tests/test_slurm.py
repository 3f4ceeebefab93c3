"""The Slurm path on the real local cluster (scripts/local_slurm.sh): two slurmd nodes, 8 GRES GPUs each."""
import glob
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import hydra_value, write_prompts

pytestmark = pytest.mark.slurm
EXE = shutil.which("orchestrator") or "orchestrator"


def run_cli(*args, timeout=240):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


def job_ids(stdout: str) -> list[str]:
    match = re.search(r"submitted job\(s\) ([\d_ ]+)", stdout)
    assert match, stdout
    return match.group(1).split()


def sacct_state(job_id: str, deadline_s: float = 60) -> str:
    """The job's final state from accounting (it can lag the job's end by a few seconds)."""
    deadline = time.monotonic() + deadline_s
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True,
                             text=True).stdout
        state = out.strip().split("\n")[0].split()[0] if out.strip() else ""
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return state
        time.sleep(0.5)
    return state


def sacct_job_name(job_id: str, deadline_s: float = 30) -> str:
    """The job's name from accounting; right after a job ends sacct may still say "allocation"."""
    deadline = time.monotonic() + deadline_s
    name = ""
    while time.monotonic() < deadline:
        name = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName%200", "-j", job_id],
                              capture_output=True, text=True).stdout.strip()
        if name and name != "allocation":
            return name
        time.sleep(0.5)
    return name


def leftover(run_dir: Path) -> str:
    return subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout.strip()


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in glob.glob(f"{run_dir}/work/ranks-*/rank-*.json")]


def test_340b_layout_on_two_nodes_from_parquet_to_results(slurm_cluster, weird_tmp_path):
    src = write_prompts(weird_tmp_path / "in.parquet", 300)
    run_dir = weird_tmp_path / "run"
    proc = run_cli("run", "cluster=slurm", f"cluster.partition={slurm_cluster}", "engine=mock",
                   "model=nemotron4_340b_instruct", f"data.input={hydra_value(src)}", f"run_dir={hydra_value(run_dir)}",
                   "data.unit_rows=50", "sampling.tokens_to_generate=8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_ids(proc.stdout)
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(300)) and (df["status"] == "ok").all()
    placed = sorted((r["rank"], r["node"], r["node_rank"], r["local_rank"], r["world_size"]) for r in ranks(run_dir))
    assert placed == [(i, "n1" if i < 8 else "n2", i // 8, i % 8, 16) for i in range(16)]
    assert sacct_state(job) == "COMPLETED"
    assert leftover(run_dir) == ""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] == 300 and summary["cluster"] == "slurm"


def test_six_replicas_are_one_job_array_and_a_straggler_is_finished_by_a_backup_copy(slurm_cluster, tmp_path):
    """replicas=6 is one sbatch (a job array); replica 0's engine is 10x slower, so at the end an idle
    replica runs a backup copy of the unit it holds: the copy commits first, the straggler's rows are
    discarded, and every row is in the results once."""
    src = write_prompts(tmp_path / "in.parquet", 1200)
    run_dir = tmp_path / "run"
    proc = run_cli("run", "cluster=slurm", f"cluster.partition={slurm_cluster}", "model=nemotron_mini_4b_instruct",
                   "layout.nodes=1", "layout.gpus_per_node=1", "layout.tensor_parallel=1", "replicas=6",
                   f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=20", "client.batch_size=10",
                   "engine.simulator.request_latency_s=1", "sampling.tokens_to_generate=4", "client.lease_s=4",
                   "engine.simulator.slow_replicas=[0]", "engine.simulator.slow_factor=10", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = job_ids(proc.stdout)
    assert len(jobs) == 6 and len({j.split("_")[0] for j in jobs}) == 1, jobs  # one array
    assert all(sacct_state(j) == "COMPLETED" for j in jobs)
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 1200 and sorted(df["id"]) == sorted(f"q{i}" for i in range(1200))
    claims = {p.name: p.read_text() for p in (run_dir / "work" / "claims").glob("*/*")}
    assert {holder for holder in claims.values()} == {f"r{i}" for i in range(6)}, "every replica pulled units"
    ledger = {}
    for path in (run_dir / "work" / "ledger").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            unit = json.loads(line)["unit"]
            assert unit not in ledger, f"unit {unit} committed twice"
            ledger[unit] = path.stem
    assert sorted(ledger) == list(range(60))
    backups = [name for name in claims if ".b" in name]
    rescued = [int(name.split(".")[0]) for name in backups if claims[name.split(".")[0]] == "r0"]
    assert any(ledger[unit] != "r0" for unit in rescued), (backups, claims)  # the straggler's unit, by a copy
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backup_copies"] >= 1 and summary["complete"]
    assert leftover(run_dir) == ""
    logged = set(re.findall(r"replica \d+ \(job ([^,]+),", (run_dir / "run.log").read_text()))
    assert logged and logged <= set(jobs), (logged, jobs)  # run.log names tasks as squeue does: <array>_<task>


def test_a_rank_dying_before_readiness_fails_the_job_fast(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = run_cli("run", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}",
                   f"run_dir={run_dir}", "engine.simulator.fail_rank=11", "engine.ready_timeout_s=600", timeout=180)
    assert proc.returncode == 1
    assert "failed" in proc.stderr and "the engine exited with status" in proc.stderr
    assert time.monotonic() - started < 180
    (job,) = job_ids(proc.stdout)
    assert sacct_state(job) == "FAILED"
    assert leftover(run_dir) == ""
    assert not (run_dir / "results").exists() or not list((run_dir / "results").iterdir())


def test_wait_false_returns_job_ids_and_hostile_values_stay_values(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 20)
    run_dir = tmp_path / "run"
    marker = tmp_path / "pwned"
    hostile = f"x y; $(touch {marker}) 'q' `touch {marker}`"  # Slurm itself shows a double quote as a backtick
    proc = run_cli("run", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}",
                   f"run_dir={run_dir}", "wait=false", f"cluster.job_name={hydra_value(hostile)}",
                   "sampling.tokens_to_generate=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_ids(proc.stdout)
    assert f"squeue -j {job}" in proc.stdout
    assert sacct_state(job, deadline_s=120) == "COMPLETED"
    assert sacct_job_name(job) == hostile
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] == 20
    assert not marker.exists()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def committed_units(run_dir: Path) -> int:
    folder = run_dir / "results"
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


def start_run(*args) -> subprocess.Popen:
    return subprocess.Popen([EXE, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_job_id(run_dir: Path) -> str:
    wait_for(lambda: list((run_dir / "logs" / "submitit").glob("*/*_submitted.pkl")), 60, "the job to be submitted")
    return sorted(p.parent.name for p in (run_dir / "logs" / "submitit").glob("*/*_submitted.pkl"))[0]


SLOW_SLURM = ["engine.simulator.request_latency_s=0.3", "client.batch_size=10", "data.unit_rows=20",
              "sampling.tokens_to_generate=4", "model=nemotron_mini_4b_instruct", "layout.nodes=1",
              "layout.gpus_per_node=8", "layout.tensor_parallel=8"]


def journal_records(run_dir: Path) -> int:
    """Records of answered rows in the journals of units not committed yet (work/journal/)."""
    found = 0
    for path in (run_dir / "work" / "journal").glob("*.jsonl"):
        if not (run_dir / "results" / f"part-{int(path.name[:8]):08d}.parquet").exists():
            found += path.read_bytes().count(b'{"i":[')
    return found


def test_scontrol_requeue_of_a_running_job_resumes_with_exactly_once_results(slurm_cluster, tmp_path):
    """Requeued mid-unit (units of 100 rows, 30 or more of them answered): the rows answered before the
    requeue are kept in the unit's journal, so the requeued job asks again at most what was in flight
    (2 requests of 10 prompts), not the unit."""
    src = write_prompts(tmp_path / "in.parquet", 600)
    run_dir = tmp_path / "run"
    settings = [a for a in SLOW_SLURM if not a.startswith("data.unit_rows=")] + ["data.unit_rows=100"]
    run = start_run("cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}", f"run_dir={run_dir}",
                    *settings)
    job = first_job_id(run_dir)
    wait_for(lambda: committed_units(run_dir) >= 1 and journal_records(run_dir) >= 3, 120,
             "a committed unit and 30 answered rows of the next")
    subprocess.run(["scontrol", "requeue", job], check=True)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(600)) and (df["status"] == "ok").all()
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert re.search(r"Restarts=[1-9]", shown), shown
    log = (run_dir / "run.log").read_text()
    assert log.count("replica 0") >= 4 and "finished" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rows_this_attempt"] == 600 and summary["resumed_units"] == 0  # both segments, not the last
    assert summary["journal_rows"] >= 30  # the requeued job took the answered rows from the journal...
    records = [json.loads(line) for path in (run_dir / "work" / "requests").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert sum(r["ok"] for r in records) - 600 <= 2 * 10  # ...and had answered again at most what was in flight
    assert not list((run_dir / "work" / "journal").glob("*.jsonl"))  # removed with the commits
    assert leftover(run_dir) == ""


def test_a_job_reaching_its_time_limit_requeues_itself_and_finishes(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 1200)
    run_dir = tmp_path / "run"
    proc = run_cli("run", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}",
                   f"run_dir={run_dir}", "cluster.timeout_min=1", "cluster.signal_delay_s=30",
                   "cluster.max_requeues=10", *SLOW_SLURM, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(1200)) and (df["status"] == "ok").all()
    log = (run_dir / "run.log").read_text()
    # the last segment finishes the run (or, when the stop came after the last commit, finds it complete)
    assert "stopped (time limit or preemption signal)" in log and "run complete, 1200/1200 rows" in log
    assert json.loads((run_dir / "summary.json").read_text())["rows_this_attempt"] == 1200  # every segment
    assert sacct_state(first_job_id(run_dir)) == "COMPLETED"
    assert leftover(run_dir) == ""


def test_losing_one_replica_mid_run_still_completes(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 800)
    run_dir = tmp_path / "run"
    run = start_run("cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}", f"run_dir={run_dir}",
                    "replicas=2", "client.lease_s=4", *SLOW_SLURM)
    rank0 = lambda: glob.glob(f"{run_dir}/work/ranks-*-r0/rank-0.json")  # noqa: E731
    wait_for(lambda: rank0() and committed_units(run_dir) >= 4, 120, "replica 0 serving and some commits")
    victim = json.loads(Path(rank0()[0]).read_text())["pid"]
    subprocess.run(["kill", "-9", str(victim)], check=True)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "warning: job" in err and "the engine process exited during the run" in err
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(800)) and (df["status"] == "ok").all()
    log = (run_dir / "run.log").read_text()
    assert "replica 0" in log and "failed: the engine process exited" in log
    assert leftover(run_dir) == ""


def submitted_ids(run_dir: Path) -> list[str]:
    return sorted({p.parent.name for p in (run_dir / "logs" / "submitit").glob("*/*_submitted.pkl")},
                  key=lambda i: [int(x) for x in i.split("_")])  # a job array's tasks: <array>_<task>


def test_waiting_ends_when_the_run_is_complete_while_a_job_still_waits_in_the_queue(slurm_cluster, tmp_path):
    """As after a node crash: a job requeued with nothing left to do waits in the queue; `wait` must end
    when every unit is committed, cancelling it, not when the queue lets it run."""
    src = write_prompts(tmp_path / "in.parquet", 300)
    run_dir = tmp_path / "run"
    run = start_run("cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}", f"run_dir={run_dir}",
                    "replicas=3", *SLOW_SLURM)
    wait_for(lambda: len(submitted_ids(run_dir)) == 3, 60, "three submitted jobs")
    third = submitted_ids(run_dir)[-1]  # two replicas fill both nodes; the third waits for resources
    subprocess.run(["scontrol", "hold", third], check=True)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert f"cancelled job(s) {third}, which had nothing left to do" in out
    assert sacct_state(third) == "CANCELLED"
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(300))
    assert json.loads((run_dir / "summary.json").read_text())["complete"]


def test_a_second_start_while_the_first_ones_jobs_run_is_refused_naming_them(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 400)
    run_dir = tmp_path / "run"
    args = ["run", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}", f"run_dir={run_dir}",
            *SLOW_SLURM]
    proc = run_cli(*args, "wait=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_ids(proc.stdout)
    second = run_cli(*args)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"is in use by job(s) {job} (cluster=slurm" in second.stderr and "Traceback" not in second.stderr
    assert sacct_state(job, deadline_s=240) == "COMPLETED"
    commits = [json.loads(line)["unit"] for path in (run_dir / "work" / "ledger").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert sorted(commits) == list(range(20))  # one job computed each unit once
    assert "nothing left to do" in run_cli(*args).stdout  # its jobs are gone: the run_dir is free again


def test_slurm_down_is_a_sentence_with_the_fix(slurm_cluster, tmp_path):
    conf = tmp_path / "slurm.conf"
    lines = [line for line in Path("/etc/slurm/slurm.conf").read_text().splitlines()
             if not line.startswith("SlurmctldPort")]
    conf.write_text("\n".join(lines + ["SlurmctldPort=9"]) + "\n")  # nothing listens there: the controller is down
    src = write_prompts(tmp_path / "in.parquet", 10)
    proc = subprocess.run([EXE, "run", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, SLURM_CONF=str(conf)))
    assert proc.returncode == 1
    assert "Unable to contact slurm controller" in proc.stderr
    assert "rerun the same command once the cluster" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("choice", ["cancel", "leave"])
def test_ctrl_c_on_a_foreground_run_cancels_or_leaves_its_jobs_as_configured(slurm_cluster, tmp_path, choice):
    import signal

    src = write_prompts(tmp_path / "in.parquet", 400)
    run_dir = tmp_path / "run"
    run = start_run("cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}", f"run_dir={run_dir}",
                    f"cluster.on_interrupt={choice}", *SLOW_SLURM)
    job = first_job_id(run_dir)
    wait_for(lambda: committed_units(run_dir) >= 2, 120, "a few committed units")
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    if choice == "cancel":
        assert run.returncode == 1
        assert f"interrupted by Ctrl-C: cancelled job(s) {job}" in err and "Rerun the same command to resume" in err
        assert sacct_state(job) == "CANCELLED"
    else:
        assert run.returncode == 0, out + err
        assert f"job(s) {job} go on running (cluster.on_interrupt=leave)" in out
        assert f"squeue -j {job}" in out and f"orchestrator cancel {run_dir}" in out
        assert sacct_state(job, deadline_s=240) == "COMPLETED"
        assert sorted(pd.read_parquet(run_dir / "results")["id"]) == sorted(f"q{i}" for i in range(400))
    assert "Traceback" not in err


def test_a_sweep_on_slurm_submits_every_member_at_once(slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 300)
    args = ["run", "-m", "cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}",
            "sampling.temperature=0.2,0.7", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SLOW_SLURM]
    proc = run_cli(*args, "wait=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = re.findall(r"submitted job\(s\) ([\d_]+) for", proc.stdout)
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1 and all("_" in j for j in jobs)  # one array
    assert all(sacct_state(j, deadline_s=240) == "COMPLETED" for j in jobs)
    times = []
    for j in jobs:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "Start,End", "-j", j], capture_output=True, text=True)
        times.append(out.stdout.strip().split("|"))
    assert max(start for start, _ in times) < min(end for _, end in times)  # both members ran at the same time
    again = run_cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("nothing left to do") == 2
    assert re.search(r"^sampling.temperature=0.2\s+complete\s+300\s", again.stdout, re.M)
    assert re.search(r"^sampling.temperature=0.7\s+complete\s+300\s", again.stdout, re.M)
