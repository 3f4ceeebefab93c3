"""`orchestrator run -m`: every member submitted at once, one run_dir per member named from its swept
overrides, a rerun skips finished members and resumes the others, a table at the end."""
import json
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import alive_processes, process_tree, write_prompts

EXE = shutil.which("orchestrator")


def sweep(*args, timeout=300):
    return subprocess.run([EXE, "run", "-m", *args], capture_output=True, text=True, timeout=timeout)


def log_times(run_dir: Path, text: str) -> list[datetime]:
    return [datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in (run_dir / "run.log").read_text().splitlines()
            if text in line]


def test_a_sweep_runs_its_members_at_once_and_a_rerun_resumes_only_the_unfinished(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 160)
    sweep_dir = tmp_path / "sweep"
    args = [f"data.input={src}", "sampling.temperature=0.2,0.7", "model=nemotron3_8b_base,nemotron_mini_4b_instruct",
            "data.unit_rows=20", "client.batch_size=5", "engine.simulator.request_latency_s=0.5",
            "sampling.tokens_to_generate=4",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = sweep(*args)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert names == sorted(f"model={m},sampling.temperature={t}"
                           for m in ("nemotron3_8b_base", "nemotron_mini_4b_instruct") for t in ("0.2", "0.7"))
    members = json.loads((sweep_dir / "sweep.json").read_text())["members"]
    assert len(members) == 4 and all(f"data.input={src}" in m["overrides"] for m in members)
    for name in names:
        df = pd.read_parquet(sweep_dir / name / "results")
        assert sorted(df["id"]) == sorted(f"q{i}" for i in range(160))
        config = (sweep_dir / name / "config.yaml").read_text()
        assert f"temperature: {name.split('temperature=')[1]}" in config  # no member mixed with another's settings
    # every member started before any of them finished: they ran at the same time, not one after another
    starts = [t for name in names for t in log_times(sweep_dir / name, "starting the mock engine")]
    ends = [t for name in names for t in log_times(sweep_dir / name, ": finished; ")]
    assert len(starts) == 4 and max(starts) <= min(ends)
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s+complete\s+160\s", proc.stdout, re.M)  # the table
    # rerun: finished members are skipped; a member missing some units resumes just those
    unfinished = sweep_dir / names[1]
    for part in sorted((unfinished / "results").iterdir())[:2]:
        part.unlink()
    again = sweep(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("nothing left to do") == 3
    assert f"resuming {unfinished}: 120/160 rows already committed" in again.stdout
    assert len(pd.read_parquet(unfinished / "results")) == 160
    status = subprocess.run([EXE, "status", str(sweep_dir), "--json"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)["members"]
    assert sorted(m["member"] for m in found) == names and {m["status"] for m in found} == {"complete"}


def test_a_sweep_member_with_a_bad_setting_is_reported_and_the_others_run(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    proc = sweep(f"data.input={src}", "layout.tensor_parallel=8,3", "model=nemotron_mini_4b_instruct",
                 "layout.nodes=1", "layout.gpus_per_node=8", "sampling.tokens_to_generate=4",
                 f"hydra.sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 1
    assert "sweep member layout.tensor_parallel=3" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(r"^layout.tensor_parallel=8\s+complete", proc.stdout, re.M)
    assert re.search(r"^layout.tensor_parallel=3\s+failed", proc.stdout, re.M)


def test_run_dir_in_a_sweep_is_refused_with_the_sweep_dir_key(tmp_path):
    proc = sweep("sampling.temperature=0.2,0.7", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and "hydra.sweep.dir=DIR" in proc.stderr


@pytest.mark.parametrize("swept,bad,good", [("client.grace_s=-1,5", "client.grace_s=-1", "client.grace_s=5"),
                                            ("replicas=abc,1", "replicas=abc", "replicas=1")],
                         ids=["out-of-range", "wrong-type"])
def test_a_bad_value_of_one_member_is_its_error_and_the_others_run(tmp_path, swept, bad, good):
    """A value the config checks (out of range) or Hydra (a wrong type) refuse used to abort the whole sweep:
    now that member's error is in sweep.json and the table, the others run, and the exit status is 1
    (issue 19, item 5)."""
    src = write_prompts(tmp_path / "in.parquet", 20)
    sweep_dir = tmp_path / "s"
    proc = sweep(f"data.input={src}", swept, "sampling.tokens_to_generate=2", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    members = {m["name"]: m for m in json.loads((sweep_dir / "sweep.json").read_text())["members"]}
    assert set(members) == {bad, good}
    assert members[bad]["error"] and bad.split("=")[1] in members[bad]["error"] and not members[bad]["jobs"]
    assert members[good]["error"] is None and members[good]["jobs"]
    assert re.search(rf"^{re.escape(bad)}\s+failed", proc.stdout, re.M)
    assert re.search(rf"^{re.escape(good)}\s+complete\s+20\s", proc.stdout, re.M)
    assert sorted(pd.read_parquet(sweep_dir / good / "results")["id"]) == sorted(f"q{i}" for i in range(20))


def test_a_second_start_of_a_running_sweep_keeps_its_record_and_an_interrupt_stops_every_member(tmp_path):
    """The same sweep started again while it runs is refused and leaves sweep.json as the first wrote it (it
    used to overwrite it with members that had no jobs). SIGTERM to the first, started as a script's `&` does
    (SIGINT ignored), names every member's jobs, leaves none of their processes, and no member reads
    "running" afterwards (issue 19, items 1 and 5)."""
    src = write_prompts(tmp_path / "in.parquet", 3000)
    sweep_dir = tmp_path / "s"
    args = [EXE, "run", "-m", f"data.input={src}", "sampling.temperature=0.2,0.7", "data.unit_rows=20",
            "client.batch_size=10", "engine.simulator.request_latency_s=0.2", "client.grace_s=5",
            "sampling.tokens_to_generate=2", f"hydra.sweep.dir={sweep_dir}"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    names = ["sampling.temperature=0.2", "sampling.temperature=0.7"]
    deadline = time.monotonic() + 120
    while not all(list((sweep_dir / n / "results").glob("*.parquet")) for n in names if (sweep_dir / n).is_dir()) \
            or not all((sweep_dir / n / "results").is_dir() for n in names):
        assert first.poll() is None and time.monotonic() < deadline, "the members did not both commit"
        time.sleep(0.1)
    record = (sweep_dir / "sweep.json").read_bytes()
    jobs = {m["name"]: m["jobs"] for m in json.loads(record)["members"]}
    assert sorted(jobs) == names and all(jobs.values())
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "this sweep is already running" in second.stderr, second.stderr
    assert (sweep_dir / "sweep.json").read_bytes() == record
    under = process_tree(first.pid)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=180)
    assert first.returncode == 1, out + err
    for name in names:
        assert re.search(rf"cancelled job\(s\) {' '.join(jobs[name])}\b", out + err), (name, out + err)
    assert alive_processes(under) == []
    status = subprocess.run([EXE, "status", str(sweep_dir), "--json"], capture_output=True, text=True, timeout=60)
    found = {m["member"]: m["status"] for m in json.loads(status.stdout)["members"]}
    assert found == {name: "interrupted" for name in names}, found
