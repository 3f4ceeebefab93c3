"""The commands (docs/index.md "Commands"), run as a user runs them: the installed `orchestrator` console script."""
import json
import shutil
import socket
import subprocess
import time

import pandas as pd
import pytest
import requests

from tests.conftest import alive_processes, hydra_value, process_tree, write_prompts

EXE = shutil.which("orchestrator")
pytestmark = pytest.mark.skipif(EXE is None, reason="`pip install -e .` puts `orchestrator` on PATH")


def cli(*args, cwd=None, check=True, timeout=300):
    proc = subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_run_with_no_arguments_runs_the_example_prompts(tmp_path):
    proc = cli("run", cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("results: ") and lines[-1].startswith("summary: 80/80 ok, 0 failed")
    results_dir = lines[-2].split(": ", 1)[1]
    run_dir = results_dir.rsplit("/results", 1)[0]
    assert run_dir.startswith(str(tmp_path / "runs" / "nemotron4_340b_instruct-"))
    df = pd.read_parquet(results_dir)
    assert sorted(df["id"]) == sorted(f"mt_bench_{i}" for i in range(81, 161))
    assert {"id", "response", "status", "error"} <= set(df.columns)
    summary = json.loads(open(f"{run_dir}/summary.json").read())
    for key in ("total", "ok", "failed", "duration_s", "generate_s", "prompts_per_s", "output_tokens_per_s"):
        assert key in summary
    assert summary["total"] == 80 and summary["ok"] == 80 and summary["failed"] == 0
    assert 0 < summary["generate_s"] <= summary["duration_s"]
    assert "tensor_parallel: 8" in open(f"{run_dir}/config.yaml").read()


def test_run_with_overrides_on_a_directory_in_a_weird_path(weird_tmp_path):
    write_prompts(weird_tmp_path / "in" / "a.parquet", 30)
    write_prompts(weird_tmp_path / "in" / "b.parquet", 20, start=30)
    run_dir = weird_tmp_path / "run 1"
    cli("run", f"data.input={hydra_value(weird_tmp_path / 'in')}", f"run_dir={hydra_value(run_dir)}",
        "model=nemotron_mini_4b_instruct", "sampling.tokens_to_generate=8", "data.unit_rows=16")
    df = pd.read_parquet(run_dir / "results")
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(50))
    assert (df["output_tokens"] <= 8).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] == 50 and summary["model"] == "nemotron_mini_4b_instruct"


def test_glob_input_and_rerun_resumes(tmp_path):
    write_prompts(tmp_path / "p1.parquet", 10)
    write_prompts(tmp_path / "p2.parquet", 10, start=10, ids=True)
    args = ("run", f"data.input={tmp_path}/p*.parquet", f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=4")
    cli(*args)
    again = cli(*args)
    assert "20/20 rows already committed" in again.stdout
    assert len(pd.read_parquet(tmp_path / "r" / "results")) == 20


def test_missing_input_exits_nonzero_with_the_fix(tmp_path):
    proc = cli("run", f"data.input={tmp_path / 'missing.parquet'}", f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_run_dir_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "file").write_text("")
    proc = cli("run", f"run_dir={tmp_path / 'file' / 'run'}", check=False)
    assert proc.returncode == 1 and "is not writable" in proc.stderr


def test_invalid_layout_fails_run_before_submitting(tmp_path):
    proc = cli("run", "layout.nodes=1", "layout.pipeline_parallel=1", f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 1 and "layout for nemotron4_340b_instruct is invalid" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_plan_prints_layout_memory_and_fit():
    out = cli("plan").stdout
    assert "TP=8 PP=2" in out and "2 node(s) x 8 h100_80gb" in out and "fits:       yes" in out
    assert "weights 42.6 GB" in out


def test_plan_of_an_invalid_layout_lists_valid_ones():
    proc = cli("plan", "layout.nodes=1", "layout.pipeline_parallel=1", check=False)
    assert proc.returncode == 1
    assert "fits:       no" in proc.stdout
    assert "layout.nodes=2 layout.gpus_per_node=8 layout.tensor_parallel=8 layout.pipeline_parallel=2" in proc.stdout


def test_plan_on_h200_fits_one_node():
    out = cli("plan", "layout.gpu=h200_141gb", "layout.nodes=1", "layout.pipeline_parallel=1").stdout
    assert "fits:       yes" in out


def test_serve_engine_runs_the_embedded_engine(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([EXE, "serve-engine", f"engine.port={port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                r = requests.put(f"http://127.0.0.1:{port}/generate",
                                 json={"sentences": ["Hi"], "tokens_to_generate": 1}, timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "engine did not come up"
                time.sleep(0.1)
        assert r.status_code == 200 and r.json()["sentences"][0].startswith("Hi")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_help_lists_the_commands():
    out = cli("--help").stdout
    assert "run" in out and "plan" in out and "serve-engine" in out


@pytest.mark.parametrize("signum,sigint_ignored", [("SIGTERM", False), ("SIGHUP", False), ("SIGTERM", True)],
                         ids=["SIGTERM", "SIGHUP", "SIGTERM-started-with-&"])
def test_stopping_the_front_end_stops_its_local_job_and_engine(tmp_path, signum, sigint_ignored):
    """Closing the terminal (SIGHUP) or SIGTERM used to leave the local job and its engine running on. A front-end
    started from a script with `&` (CI, cron, nohup) inherits SIGINT as ignored, and so do its jobs: they used to
    outlive "cancelled job(s)" (issue 19, item 1). When the front-end exits saying so, the job and its engine
    have ended, and nothing is committed after."""
    import signal as signals

    src = write_prompts(tmp_path / "in.parquet", 3000)
    run_dir = tmp_path / "run"
    ignore = (lambda: signals.signal(signals.SIGINT, signals.SIG_IGN)) if sigint_ignored else None
    proc = subprocess.Popen([EXE, "run", f"data.input={src}", f"run_dir={run_dir}", "data.unit_rows=20",
                             "client.batch_size=10", "engine.simulator.request_latency_s=0.2", "client.grace_s=5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
    deadline = time.monotonic() + 120
    while not (run_dir / "results").is_dir() or not list((run_dir / "results").glob("*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "no commit"
        time.sleep(0.1)
    while not any("orchestrator.simulator" in c for c in alive_processes(process_tree(proc.pid))):
        assert proc.poll() is None and time.monotonic() < deadline, "no engine process under the front-end"
        time.sleep(0.1)
    under = process_tree(proc.pid)  # the job's submitit controller, its task and the engine
    proc.send_signal(getattr(signals, signum))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and f"interrupted by {signum}: cancelled job(s)" in err and "Rerun" in err, err
    assert alive_processes(under) == [], "a process of the run outlived the front-end that said it was cancelled"
    assert not (run_dir / "work" / "frontend.json").exists()
    units = len(list((run_dir / "results").glob("*.parquet")))
    assert units < 150 and f"({units * 20}/3000 rows)" in err


def test_run_plan_and_render_take_a_pipeline_by_name_or_file(tmp_path):
    """`orchestrator run pipeline=NAME` runs a seed pipeline (examples/pipeline_NAME.yaml) as `orchestrator
    pipeline FILE` does; `plan` shows every stage; `render` writes every run stage's scripts; a name that is
    neither a file nor a seed is refused naming the seeds."""
    src = write_prompts(tmp_path / "in.parquet", 6)
    root = tmp_path / "sdg"
    proc = cli("run", "pipeline=sdg_local", f"run_dir={root}", f"data.input={src}")
    assert "score: 24/24 ok" in proc.stdout and (root / "pairs" / "results").is_dir()
    assert len(pd.read_parquet(root / "score" / "results")) == 24  # 6 prompts x 4 rollouts, each scored once
    plan = cli("plan", "pipeline=sdg_340b").stdout
    for line in ("stage generate (run", "stage score (run, from generate", "model:      nemotron4_340b_reward",
                 "stage keep (filter, from score", "helpfulness >= 3.5 and finish_reason == 'stop'",
                 "stage pairs (pairs, from score", "by helpfulness, min_margin 0.5"):
        assert line in plan, plan
    assert plan.count("fits:       yes") == 2
    file = tmp_path / "mine.yaml"
    file.write_text("stages:\n  - name: g\n    overrides: [engine=mock, cluster=slurm, cluster.partition=p]\n")
    rendered = cli("render", f"pipeline={file}", f"run_dir={tmp_path / 'r'}").stdout
    assert str(tmp_path / "r" / "g" / "render" / "job.sbatch") in rendered
    bad = cli("run", "pipeline=nope", check=False)
    assert bad.returncode == 2 and "pipeline=nope: no such file" in bad.stderr and "sdg_340b" in bad.stderr


def test_a_pipeline_inside_a_slurm_job_runs_in_its_allocation_unless_told(tmp_path, monkeypatch):
    from orchestrator.cli import pipeline_inside_allocation

    file = tmp_path / "p.yaml"
    file.write_text("stages:\n  - name: g\n    overrides: [engine=mock]\n")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert pipeline_inside_allocation(str(file), ["a=1"]) == ["a=1"]  # not inside a job
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert pipeline_inside_allocation(str(file), ["a=1"]) == ["a=1", "cluster=allocation"]
    assert pipeline_inside_allocation(str(file), ["cluster=slurm"]) == ["cluster=slurm"]
    file.write_text("stages:\n  - name: g\n    overrides: [engine=mock, cluster=local]\n")
    assert pipeline_inside_allocation(str(file), []) == []  # a stage chose its cluster
