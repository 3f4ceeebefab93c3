"""layout.data_parallel=D on an engine without data parallelism of its own: D servers per replica, each pinned to
its own GPUs and port, each with a client that claims work on its own (orchestrator/instances.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError
from orchestrator.instances import instance_config, instances, owner_replica
from tests.conftest import write_prompts

EXE = [sys.executable, "-m", "orchestrator.cli"]
MINI = ["model=nemotron_mini_4b_instruct", "layout.nodes=1", "layout.gpus_per_node=8", "layout.pipeline_parallel=1"]


def adapter(cfg):
    from orchestrator.engines.base import adapter_for

    return adapter_for(cfg)


def test_instances_tile_the_replicas_gpus_inside_a_node_or_as_whole_nodes():
    cfg = compose([*MINI, "layout.tensor_parallel=2", "layout.data_parallel=4"])
    got = instances(cfg, adapter(cfg))
    assert [(i.first_node, i.nodes, i.gpus, i.per_node) for i in got] == [
        (0, 1, "0,1", 4), (0, 1, "2,3", 4), (0, 1, "4,5", 4), (0, 1, "6,7", 4)]
    two_nodes = compose([*MINI, "layout.nodes=2", "layout.tensor_parallel=4", "layout.data_parallel=4"])
    assert [(i.first_node, i.gpus) for i in instances(two_nodes, adapter(two_nodes))] == [
        (0, "0,1,2,3"), (0, "4,5,6,7"), (1, "0,1,2,3"), (1, "4,5,6,7")]
    big = compose(["layout.nodes=4", "layout.gpus_per_node=8", "layout.tensor_parallel=8", "layout.pipeline_parallel=2",
                   "layout.data_parallel=2", "layout.gpu=h200_141gb"])
    assert [(i.first_node, i.nodes, i.gpus) for i in instances(big, adapter(big))] == [(0, 2, ""), (2, 2, "")]


def test_an_instances_config_is_one_instances_layout_with_its_gpus_port_and_node_values():
    cfg = compose([*MINI, "layout.nodes=2", "layout.tensor_parallel=4", "layout.data_parallel=4", "engine.port=9000",
                   "cluster.cpus_per_task=32", "+engine.node_env.BIND=[a,b]"])
    third = instance_config(cfg, instances(cfg, adapter(cfg))[2])
    assert (third.layout.nodes, third.layout.gpus_per_node, third.layout.data_parallel) == (1, 4, 1)
    assert third.engine.node_env == {"BIND": ["b"], "CUDA_VISIBLE_DEVICES": ["0,1,2,3"]}
    assert third.engine.port == 9002 and third.cluster.cpus_per_task == 16
    assert cfg.engine.port == 9000 and cfg.layout.data_parallel == 4  # the replica's own config is unchanged


def test_owner_names_map_to_their_replica():
    assert [owner_replica(o) for o in ("r3", "r3i1", "r12i10", "r", "ri1", "r3i", "x3", "r1x")] == [
        3, 3, 12, None, None, None, None, None]


def test_pinned_instances_refuse_a_cuda_visible_devices_of_their_own():
    from orchestrator.engines.base import check_engine

    cfg = compose([*MINI, "layout.tensor_parallel=1", "layout.data_parallel=8", "engine=nemo",
                   "engine.checkpoint=/m.nemo", "+engine.node_env.CUDA_VISIBLE_DEVICES=[0]"])
    with pytest.raises(ConfigError, match="drop engine.node_env.CUDA_VISIBLE_DEVICES"):
        check_engine(cfg)


def test_a_slurm_instance_step_starts_on_its_own_node():
    from orchestrator.clusters.slurm import ADAPTER as SLURM

    cfg = compose([*MINI, "layout.nodes=2", "layout.tensor_parallel=8", "layout.data_parallel=2", "engine=nemo",
                   "engine.checkpoint=/m.nemo", "layout.gpu=h200_141gb"])
    second = instances(cfg, adapter(cfg))[1]
    prefix = SLURM.step_prefix(instance_config(cfg, second), adapter(cfg), second)
    assert prefix[:5] == ["srun", "--overlap", "--relative=1", "--nodes=1", "--ntasks=8"]


def run(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, "run", *args], capture_output=True, text=True, timeout=timeout)


def results(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results")


def test_four_pinned_instances_each_on_its_gpus_share_the_work_and_count_as_one_replica(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 240)
    run_dir = tmp_path / "run"
    done = run(f"data.input={src}", f"run_dir={run_dir}", *MINI, "layout.tensor_parallel=2", "layout.data_parallel=4",
               "data.unit_rows=10", "engine.simulator.request_latency_s=0.05", "engine.simulator.capacity=4")
    assert done.returncode == 0, done.stdout + done.stderr
    got = results(run_dir)
    assert sorted(got["id"]) == sorted(pd.read_parquet(src)["id"]) and (got["status"] == "ok").all()
    placed = sorted(json.loads(p.read_text())["gpus"] for p in run_dir.glob("work/ranks-*-r0i*/rank-0.json"))
    assert placed == ["0,1", "2,3", "4,5", "6,7"]  # each instance's engine saw only its own GPUs
    progress = {p.stem: json.loads(p.read_text()) for p in (run_dir / "work" / "progress").glob("*.json")}
    assert sorted(progress) == ["r0i0", "r0i1", "r0i2", "r0i3"]
    assert all(record["rows"] > 0 for record in progress.values())  # every instance served
    assert sum(record["rows"] for record in progress.values()) == 240
    status = json.loads(subprocess.run([*EXE, "status", str(run_dir), "--json"], capture_output=True, text=True,
                                       timeout=120).stdout)
    (replica,) = status["replicas"]
    assert replica["replica"] == "r0" and replica["rows"] == 240
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gpus"] == 8 and summary["gpu_hours"] > 0
    log = (run_dir / "run.log").read_text()
    assert "starting the mock engine as 4 pinned instances" in log and log.count("http://127.0.0.1:") >= 4


def test_an_instance_whose_engine_dies_loses_only_its_requests_in_flight(tmp_path):
    """Instance 1's engine is killed once the run is under way: instance 0 finishes its units and, after the
    lease, the units instance 1 held, from their journals; every row is committed once and the run succeeds."""
    src = write_prompts(tmp_path / "in.parquet", 300)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*EXE, "run", f"data.input={src}", f"run_dir={run_dir}", *MINI, "layout.tensor_parallel=4",
                             "layout.data_parallel=2", "data.unit_rows=30", "client.batch_size=5", "client.lease_s=4",
                             "engine.simulator.request_latency_s=0.1", "engine.simulator.capacity=4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank = None
    deadline = time.monotonic() + 120
    while True:  # once instance 1 has journaled answers of a unit it holds, kill its engine
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "instance 1 never journaled an answer"
        ranks = list(run_dir.glob("work/ranks-*-r0i1/rank-0.json"))
        journals = [p for p in (run_dir / "work" / "journal").glob("*.r0i1.jsonl")] \
            if (run_dir / "work" / "journal").is_dir() else []
        if ranks and any(p.stat().st_size > 200 for p in journals):
            rank = json.loads(ranks[0].read_text())
            break
        time.sleep(0.05)
    os.kill(rank["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err
    got = results(run_dir)
    assert sorted(got["id"]) == sorted(pd.read_parquet(src)["id"]) and (got["status"] == "ok").all()
    log = (run_dir / "run.log").read_text()
    assert "instance 1 (http://127.0.0.1:" in log and "lost its engine" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["committed"] == 300 and summary["failed"] == 0
    # instance 0 committed what instance 1 left, replaying the rows instance 1 had answered (not sent again)
    progress = {p.stem: json.loads(p.read_text()) for p in (run_dir / "work" / "progress").glob("*.json")}
    assert progress["r0i0"]["rows"] + progress["r0i1"]["rows"] == 300 and progress["r0i0"]["rows"] > 150


def test_an_endpoint_with_two_servers_runs_a_client_for_each(tmp_path):
    servers, urls = [], []
    try:
        for k in range(2):
            port_file = tmp_path / f"port{k}"
            servers.append(subprocess.Popen([sys.executable, "-m", "orchestrator.simulator", "--port", "0",
                                             "--port-file", str(port_file), "--request-latency-s", "0.05",
                                             "--model-name", "nemotron_mini_4b_instruct"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for k in range(2):
            port_file = tmp_path / f"port{k}"
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text().strip():
                assert time.monotonic() < deadline, "the simulator did not start"
                time.sleep(0.05)
            urls.append(f"http://127.0.0.1:{port_file.read_text().strip()}")
        src = write_prompts(tmp_path / "in.parquet", 200)
        run_dir = tmp_path / "run"
        done = run(f"data.input={src}", f"run_dir={run_dir}", "engine=endpoint", "engine.protocol=nemo",
                   f"engine.url='{','.join(urls)}'", "model=nemotron_mini_4b_instruct", "data.unit_rows=10")
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(results(run_dir)["id"]) == sorted(pd.read_parquet(src)["id"])
        progress = {p.stem: json.loads(p.read_text()) for p in (run_dir / "work" / "progress").glob("*.json")}
        assert sorted(progress) == ["r0i0", "r0i1"] and all(r["rows"] > 0 for r in progress.values())
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def test_plan_says_a_replica_runs_pinned_instances():
    done = subprocess.run([*EXE, "plan", *MINI, "layout.tensor_parallel=2", "engine=nemo", "engine.checkpoint=/m.nemo"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TP=2 PP=1 DP=4" in done.stdout
    assert "engine:     nemo, 4 pinned instances per replica, each its own server, port and client: 2 task(s) each " \
           "on GPUs 0,1 of node 0 for instance 0" in done.stdout
