"""layout.data_parallel=4 pinned instances of the embedded engine in one Slurm job (the local cluster,
scripts/local_slurm.sh): each instance's srun step has its own GPU indices, and killing one mid-run loses only
its requests in flight."""
import json
import os
import signal
import time

import pandas as pd
import pytest

from tests.conftest import write_prompts
from tests.test_slurm import leftover, ranks, run_cli, start_run

pytestmark = pytest.mark.slurm


def test_four_pinned_instances_on_one_node_one_killed_mid_run_lose_only_their_requests_in_flight(slurm_cluster,
                                                                                                  tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 400)
    run_dir = tmp_path / "run"
    proc = start_run("cluster=slurm", f"cluster.partition={slurm_cluster}", f"data.input={src}", f"run_dir={run_dir}",
                     "model=nemotron_mini_4b_instruct", "layout.nodes=1", "layout.gpus_per_node=8",
                     "layout.tensor_parallel=2", "layout.pipeline_parallel=1", "layout.data_parallel=4",
                     "data.unit_rows=25", "client.batch_size=5", "client.lease_s=4", "sampling.tokens_to_generate=4",
                     "engine.simulator.request_latency_s=0.1", "engine.simulator.capacity=4")
    deadline = time.monotonic() + 240
    while True:  # every instance's two ranks have joined, and instance 2 has journaled answers of a unit it holds
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the instances did not all start and serve"
        journals = list((run_dir / "work" / "journal").glob("*.r0i2.jsonl")) \
            if (run_dir / "work" / "journal").is_dir() else []
        if len(ranks(run_dir)) == 8 and any(p.stat().st_size > 200 for p in journals):
            break
        time.sleep(0.1)
    placed = {}
    for record in ranks(run_dir):
        placed.setdefault(record["gpus"], []).append(record)
    # each instance is its own srun step of 2 ranks (TP2), its environment pinned to its own 2 GPUs of the node
    assert sorted(placed) == ["0,1", "2,3", "4,5", "6,7"]
    assert all(sorted(r["rank"] for r in group) == [0, 1] and {r["world_size"] for r in group} == {2}
               for group in placed.values())
    assert len({r["node"] for r in ranks(run_dir)}) == 1
    (victim,) = [r for r in placed["4,5"] if r["rank"] == 0]
    os.kill(victim["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    got = pd.read_parquet(run_dir / "results")
    assert sorted(got["id"]) == sorted(pd.read_parquet(src)["id"]) and (got["status"] == "ok").all()
    log = (run_dir / "run.log").read_text()
    assert "starting the mock engine as 4 pinned instances" in log
    assert "instance 2 (http://" in log and "lost its engine" in log, log
    progress = {p.stem: json.loads(p.read_text()) for p in (run_dir / "work" / "progress").glob("*.json")}
    assert sorted(progress) == ["r0i0", "r0i1", "r0i2", "r0i3"]
    assert sum(r["rows"] for r in progress.values()) == 400
    assert all(progress[o]["rows"] > 0 for o in ("r0i0", "r0i1", "r0i3"))
    status = json.loads(run_cli("status", str(run_dir), "--json", timeout=120).stdout)
    assert status["state"] == "complete" and [r["rows"] for r in status["replicas"]] == [400]
    assert leftover(run_dir) == ""
