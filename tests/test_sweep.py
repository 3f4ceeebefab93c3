"""`orchestrator run -m`: every member submitted at once, one run_dir per member named from its swept
overrides, a rerun skips finished members and resumes the others, a table at the end."""
import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pandas as pd

from tests.conftest import write_prompts

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
