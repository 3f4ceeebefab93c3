"""The contract every cluster adapter passes (as tests/test_engine_contract.py is for engines): its executor
returns a `Job` (orchestrator/clusters/base.py), the adapter reads a job's state while it runs and once it
ended, cancels it, says which jobs are live, words a failure as a RunError with the job's last words, and
reads the job's environment through its name map. Slurm and allocation cases run on the real local cluster
(an allocation's case runs inside `salloc`, as `orchestrator run` does inside the user's job)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from orchestrator.clusters.base import ACTIVE_STATES, ClusterAdapter, Job, adapter_named, cluster_for
from orchestrator.clusters.environment import JobEnvironment, job_environment
from orchestrator.config import compose
from orchestrator.errors import RunError
from orchestrator.frontend import TERMINAL_STATES
from orchestrator.rundir import RunPaths

ROOT = Path(__file__).resolve().parent.parent
# pytest imports this file as `test_cluster_contract`, which a job cannot import: submitit's cloudpickle sends
# Task by value instead (an allocation's case imports it as tests.test_cluster_contract, as its step does)
cloudpickle.register_pickle_by_value(sys.modules[__name__])
CLUSTERS = ["local", pytest.param("slurm", marks=pytest.mark.slurm),
            pytest.param("allocation", marks=pytest.mark.slurm)]
READS_RECORDED = {"local": True, "slurm": True, "allocation": False}  # allocation: its steps end with the front-end
ENDED = TERMINAL_STATES | {"ENDED"}  # ENDED: a local job's end as read from its pid (no record of how it ended)


class Task:
    """A trivial job any cluster runs: submitit calls it; an allocation's step runs run_node0() (and reads
    the replica and attempt from args, as it does from a NodeJob's)."""

    def __init__(self, what: str, value=None, attempt: str = "contract"):
        self.what, self.value = what, value
        self.args = (None, None, attempt, None, 0)

    def __call__(self):
        return self.run_node0()

    def run_node0(self):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a NodeJob stops on SIGTERM too
        if self.what == "fail":
            raise ValueError(f"the task's last words: {self.value}")
        if self.what == "sleep":
            time.sleep(self.value)  # the long job that cancel stops
        if self.what == "deaf":  # a job that ignores SIGTERM, with a child of its own (an engine)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); time.sleep(600)"])
            time.sleep(600)
        if self.what == "env":
            env = job_environment()
            return {"job_id": env.job_id, "global_rank": env.global_rank, "nodelist": env.get("nodelist")}
        return self.value

    def _request_stop(self, why: str) -> None:
        sys.exit(why)


def until(predicate, timeout_s: float, what: str):
    """Poll the cluster until predicate() holds (the state is the cluster's, read fresh each time)."""
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def setup(cluster: str, root: Path, partition: str):
    overrides = [f"cluster={cluster}", f"run_dir={root}", "model=llama2_70b_steerlm_chat"]
    if cluster == "slurm":
        overrides += [f"cluster.partition={partition}", "cluster.cpus_per_task=1"]
    cfg = compose(overrides)
    paths = RunPaths(root)
    adapter = cluster_for(cfg)
    return adapter, paths, adapter.executor(cfg, paths)


def recorded(adapter: ClusterAdapter, job, paths: RunPaths) -> str:
    """The job's state as status and cancel read it: from its id alone."""
    states = adapter.job_states([str(job.job_id)], socket.gethostname(), paths)
    assert list(states) == [str(job.job_id)]
    return states[str(job.job_id)]


def check_result(cluster: str, root: Path, partition: str = "") -> None:
    adapter, paths, executor = setup(cluster, root, partition)
    job = executor.submit(Task("value", [1, 2, 3]))
    assert isinstance(job, Job) and str(job.job_id)
    assert adapter.result(job, paths) == [1, 2, 3]
    assert job.done()
    until(lambda: adapter.states([job])[0] in TERMINAL_STATES, 120, "the job's end (its live state)")
    assert adapter.state(job) == "COMPLETED"
    if READS_RECORDED[cluster]:
        until(lambda: recorded(adapter, job, paths) in ("COMPLETED", "ENDED"), 120, "the job's end (recorded)")
        until(lambda: adapter.live_jobs([str(job.job_id)], socket.gethostname()) == [], 60, "no live job")
    else:
        assert recorded(adapter, job, paths).startswith("UNKNOWN")
        assert adapter.live_jobs([str(job.job_id)], socket.gethostname()) is None


def check_failure(cluster: str, root: Path, partition: str = "") -> None:
    adapter, paths, executor = setup(cluster, root, partition)
    job = executor.submit(Task("fail", "it's $(broken)"))
    with pytest.raises(RunError) as failed:
        adapter.result(job, paths)
    text = str(failed.value)
    assert text.startswith(f"job {job.job_id} failed; logs in {paths.logs}"), text
    assert "ValueError: the task's last words: it's $(broken)" in text, text
    assert "Traceback" not in text and 'File "' not in text, text  # its last words, not its frames
    until(lambda: adapter.states([job])[0] in TERMINAL_STATES, 120, "the failed job's end")


def _started(adapter: ClusterAdapter, job, paths: RunPaths, cluster: str) -> None:
    until(lambda: adapter.state(job) == "RUNNING", 120, "the long job running (live state)")
    if READS_RECORDED[cluster]:
        until(lambda: recorded(adapter, job, paths) == "RUNNING", 120, "the long job running (recorded)")
        assert adapter.live_jobs([str(job.job_id)], socket.gethostname()) == [str(job.job_id)]


def check_job_cancel(cluster: str, root: Path, partition: str = "") -> None:
    adapter, paths, executor = setup(cluster, root, partition)
    job = executor.submit(Task("sleep", 600))
    _started(adapter, job, paths, cluster)
    job.cancel(check=False)
    until(lambda: adapter.states([job])[0] in TERMINAL_STATES, 120, "the cancelled job's end")
    if READS_RECORDED[cluster]:
        until(lambda: recorded(adapter, job, paths) in ("CANCELLED", "ENDED"), 120, "the cancelled job's end")
        until(lambda: adapter.live_jobs([str(job.job_id)], socket.gethostname()) == [], 60, "no live job")


def check_adapter_cancel(cluster: str, root: Path, partition: str = "") -> None:
    """What `orchestrator cancel` does with the ids a run dir records."""
    adapter, paths, executor = setup(cluster, root, partition)
    job = executor.submit(Task("sleep", 600))
    _started(adapter, job, paths, cluster)
    if not READS_RECORDED[cluster]:
        with pytest.raises(RunError, match=f"cannot cancel cluster={cluster} job\\(s\\) {job.job_id} from here; "
                                           "stop them where they run"):
            adapter.cancel([str(job.job_id)], socket.gethostname(), paths)
        job.cancel(check=False)
        return
    adapter.cancel([str(job.job_id)], socket.gethostname(), paths)
    until(lambda: recorded(adapter, job, paths) in ("CANCELLED", "ENDED"), 120, "the cancelled job's end")
    # a process stopping leaves its command line before its pid (ps still lists it): live_jobs follows
    until(lambda: adapter.live_jobs([str(job.job_id)], socket.gethostname()) == [], 60, "no live job")
    adapter.cancel([str(job.job_id)], socket.gethostname(), paths)  # a job already gone is no error
    until(lambda: adapter.states([job])[0] in TERMINAL_STATES, 120, "the cancelled job's end (live state)")


def check_environment(cluster: str, root: Path, partition: str = "") -> None:
    adapter, paths, executor = setup(cluster, root, partition)
    job = executor.submit(Task("env"))
    found = adapter.result(job, paths)
    assert found["global_rank"] == 0
    if cluster == "slurm":
        assert found["job_id"] == str(job.job_id) and found["nodelist"]
    else:  # the job runs in the front-end's environment: an allocation's, or none
        assert found["job_id"] == os.environ.get("SLURM_JOB_ID")
    if cluster == "allocation":
        assert str(job.job_id) == f"{found['job_id']}.r0" and found["nodelist"]


def in_allocation(check: str, root: Path, partition: str) -> None:
    """Run check inside a one-node allocation, as `orchestrator run` runs in the user's sbatch job."""
    code = (f"from pathlib import Path; from tests.test_cluster_contract import {check}; "
            f"{check}('allocation', Path({str(root)!r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["salloc", "-N1", "--exclusive", f"--partition={partition}", "--job-name=contract",
                           sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


CHECKS = [check_result, check_failure, check_job_cancel, check_adapter_cancel, check_environment]


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_cluster_contract(cluster, check, tmp_path, request):
    partition = request.getfixturevalue("slurm_cluster") if cluster != "local" else ""
    root = tmp_path / "run"
    if cluster == "allocation":
        in_allocation(check.__name__, root, partition)
    else:
        check(cluster, root, partition)


@pytest.mark.parametrize("cluster", ["local", "slurm", "allocation"])
def test_the_environment_map_reads_the_clusters_variables(cluster):
    adapter = adapter_named(cluster)
    env = adapter.environment({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2", "SLURM_PROCID": "3",
                               "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
                               "SLURM_NODELIST": "n[1-2]", "SLURM_STEP_NODELIST": "n2", "SLURM_GPUS_ON_NODE": "",
                               "SLURM_GPUS_PER_NODE": "gpu:4", "SLURM_CPUS_ON_NODE": "16"})
    assert isinstance(env, JobEnvironment)
    assert env.job_id == "77" and env.get("restart_count") == "2" and env.global_rank == 3
    assert [env.get(n) for n in ("local_rank", "node", "num_tasks", "step_nodelist", "cpus_on_node")] == \
        ["1", "1", "8", "n2", "16"]
    assert env.job_name == "77"  # not a task of an array: the job id
    task = adapter.environment({"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"})
    assert task.job_name == "77_3" and task.job_id == "80"  # an array's task: as squeue and scancel name it
    assert env.get("nodelist") == "n[1-2]"  # SLURM_JOB_NODELIST is unset: the older name answers
    assert env.gpus_on_node == 4  # SLURM_GPUS_ON_NODE is empty: --gpus-per-node's gpu:4 answers
    empty = adapter.environment({})
    assert empty.job_id is None and empty.job_name is None and empty.global_rank == 0 and empty.gpus_on_node is None
    assert empty.get("restart_count", "0") == "0"
    with pytest.raises(KeyError, match="'nodes' is not a name of the job environment"):
        empty.get("nodes")


def test_a_cluster_a_run_dir_names_without_an_adapter_reads_unknown_and_cancels_nothing(tmp_path):
    for name in ("", "gone", "../local", "base"):
        adapter = adapter_named(name)
        assert adapter.name == name and type(adapter) is ClusterAdapter
        assert adapter.job_states(["1", "2"], socket.gethostname()) == {"1": "UNKNOWN", "2": "UNKNOWN"}
        assert adapter.live_jobs(["1"], socket.gethostname()) is None and adapter.live_jobs([], "") == []
        with pytest.raises(RunError, match=f"cannot cancel cluster={name} job\\(s\\) 1 from here"):
            adapter.cancel(["1"], socket.gethostname(), RunPaths(tmp_path))
    assert adapter_named("local") is cluster_for(compose(["cluster=local"]))


def test_a_local_job_on_another_host_is_unknown_here_and_cancelled_there(tmp_path):
    adapter, paths = adapter_named("local"), RunPaths(tmp_path)
    assert adapter.job_states([str(os.getpid())], "elsewhere", paths) == \
        {str(os.getpid()): "UNKNOWN (runs on elsewhere)"}
    assert adapter.live_jobs([str(os.getpid())], "elsewhere") is None
    with pytest.raises(RunError, match=f"run on elsewhere, not here; run `orchestrator cancel {tmp_path}` on"):
        adapter.cancel([str(os.getpid())], "elsewhere", paths)
    # a live pid that is not this run's submitit job (a pid reused) is not the run's job
    assert adapter.job_states([str(os.getpid())], socket.gethostname(), paths) == {str(os.getpid()): "ENDED"}
    assert adapter.live_jobs([str(os.getpid())], socket.gethostname()) == [str(os.getpid())]  # no run: pid alone
    assert ACTIVE_STATES >= {"RUNNING", "PENDING"} and not ACTIVE_STATES & ENDED
    assert adapter.job_states([], socket.gethostname(), paths) == {}


def test_a_local_job_deaf_to_sigterm_is_killed_with_its_children_after_the_grace(tmp_path, monkeypatch):
    """LocalCluster.stop: SIGTERM, then after client.grace_s (and the margin) SIGKILL to the job's whole process
    tree, a child ignoring SIGTERM too; it returns once all of them have ended (issue 19, item 1)."""
    from orchestrator.clusters import local
    from tests.conftest import alive_processes, process_tree

    monkeypatch.setattr(local, "STOP_MARGIN_S", 1.0)
    cfg = compose(["cluster=local", f"run_dir={tmp_path}", "client.grace_s=1"])
    adapter, paths = cluster_for(cfg), RunPaths(tmp_path)
    job = adapter.executor(cfg, paths).submit(Task("deaf"))
    until(lambda: len(alive_processes(process_tree(job._process.pid))) >= 2, 60, "the job and its child")
    under = process_tree(job._process.pid) | {job._process.pid}
    assert adapter.stop([job], cfg) == [] and job.done()
    assert alive_processes(under) == []
