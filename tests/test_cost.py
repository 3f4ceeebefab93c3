"""GPU-hours and cost (report.gpu_usage): a local run on the embedded engine with known latencies checked
against its own records (run.log's engine lines, the progress files' generation segments, the result
files' output tokens), the identities between the fields, status and the report, a negative price refused
before submission, engine=endpoint (no GPUs of ours), and the windows of a requeued, killed or still
running replica from records written here."""
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError
from orchestrator.frontend import run
from orchestrator.html_report import write_report
from orchestrator.report import GPU_STATES, replica_windows
from orchestrator.status import collect, format_status
from tests.conftest import hydra_value, write_prompts
from tests.test_endpoint import faithful_server

ROWS, IN_FLIGHT, LATENCY_S, REPLICAS, GPUS_PER_REPLICA, PRICE = 64, 4, 0.2, 2, 2, 2.5
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) replica (\d+) \(job [^,]+, host [^)]*\): (.*)$")
HOUR = 3600.0


@pytest.fixture(scope="module")
def mock_run(tmp_path_factory) -> tuple[Path, dict]:
    """Two replicas of 2 (simulated) GPUs each, one request per row taking at least LATENCY_S."""
    tmp = tmp_path_factory.mktemp("cost run")
    src = write_prompts(tmp / "in.parquet", ROWS)
    run_dir = tmp / "run"
    cfg = compose(["model=nemotron_mini_4b_instruct", f"data.input={src}", f"run_dir={run_dir}",
                   f"replicas={REPLICAS}", "layout.gpus_per_node=2", "layout.tensor_parallel=2",
                   "engine.protocol=openai", f"engine.simulator.request_latency_s={LATENCY_S}",
                   f"client.max_in_flight={IN_FLIGHT}", "data.unit_rows=8", "sampling.tokens_to_generate=8",
                   f"cluster.gpu_hour_cost={PRICE}"])
    summary = run(cfg, show_progress=False)
    assert summary["complete"], summary
    return run_dir, summary


def engine_lines(run_dir: Path) -> dict[int, dict[str, list[float]]]:
    """The test's own reading of run.log: each replica's launch, ready and finished times."""
    found: dict[int, dict[str, list[float]]] = {}
    for line in (run_dir / "run.log").read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
        kind = next((k for k, start in (("launch", "starting the mock engine"), ("ready", "engine ready at"),
                                        ("end", "finished")) if m.group(3).startswith(start)), None)
        if kind:
            found.setdefault(int(m.group(2)), {}).setdefault(kind, []).append(at)
    return found


def test_the_fields_agree_with_each_other_and_with_the_results(mock_run):
    run_dir, summary = mock_run
    tokens = int(pd.read_parquet(run_dir / "results", columns=["output_tokens"])["output_tokens"].sum())
    assert tokens > 0 and summary["output_tokens"] == summary["output_tokens_this_attempt"] == tokens
    started = engine_lines(run_dir)
    assert summary["gpus_per_replica"] == GPUS_PER_REPLICA and summary["gpu_hours_basis"] == "simulated"
    assert summary["replicas_with_gpus"] == len(started) and summary["gpus"] == GPUS_PER_REPLICA * len(started)
    hours, states = summary["gpu_hours"], summary["gpu_hours_by_state"]
    assert set(states) == set(GPU_STATES) and all(v >= 0 for v in states.values())
    assert sum(states.values()) == pytest.approx(hours, abs=3e-6)
    assert summary["output_tokens_per_gpu_hour"] == pytest.approx(tokens / hours, rel=1e-3)
    assert summary["gpu_hours_per_million_output_tokens"] == pytest.approx(hours / tokens * 1e6, rel=1e-3)
    cost = summary["cost"]
    assert cost["gpu_hour_cost"] == PRICE and cost["total"] == pytest.approx(hours * PRICE, rel=1e-4)
    assert cost["per_million_output_tokens"] == pytest.approx(
        summary["gpu_hours_per_million_output_tokens"] * PRICE, rel=1e-4)
    assert json.loads((run_dir / "summary.json").read_text())["gpu_hours"] == hours


def test_the_states_follow_the_replicas_records(mock_run):
    """Each state against the run's own records, to the second run.log keeps; generation at least what
    the known latency makes it: every row is a request of >= LATENCY_S, IN_FLIGHT at a time per replica."""
    run_dir, summary = mock_run
    per_gpu_s = {k: v * HOUR / GPUS_PER_REPLICA for k, v in summary["gpu_hours_by_state"].items()}
    lines = engine_lines(run_dir)
    assert all(len(r.get("launch", [])) == len(r.get("ready", [])) == len(r.get("end", [])) == 1
               for r in lines.values()), lines
    startup = sum(r["ready"][0] - r["launch"][0] for r in lines.values())
    held = sum(r["end"][0] - r["launch"][0] for r in lines.values())
    segments = [s for p in (run_dir / "work" / "progress").glob("r*.json")
                for s in json.loads(p.read_text())["segments"]]
    generating = sum(end - start for start, end in segments)
    windows = len(lines)
    assert per_gpu_s["startup"] == pytest.approx(startup, abs=1.0 * windows)
    assert sum(per_gpu_s.values()) == pytest.approx(held, abs=1.0 * windows)
    assert per_gpu_s["generating"] == pytest.approx(generating, abs=0.05)
    assert per_gpu_s["generating"] >= ROWS * LATENCY_S / IN_FLIGHT
    assert per_gpu_s["generating"] <= sum(per_gpu_s.values())


def test_status_and_the_report_show_the_same_figures(mock_run):
    run_dir, summary = mock_run
    s = collect(run_dir)
    for key in ("gpus", "gpu_hours", "gpu_hours_by_state", "gpu_hours_per_million_output_tokens"):
        assert s["gpu"][key] == summary[key], key
    cost = s["gpu"]["cost"]  # with the price config.yaml holds now (test_a_new_price_is_not_a_new_run changes it)
    assert cost["total"] == pytest.approx(summary["gpu_hours"] * cost["gpu_hour_cost"], rel=1e-4)
    line = next(x for x in format_status(s).splitlines() if x.startswith("gpu-hours:"))
    assert "GPU-h per million output tokens" in line and "cost " in line and "simulated" in line, line
    assert f"on {summary['gpus']} GPU(s)" in line
    page = write_report(run_dir).read_text()
    assert 'id="gpu-hours"' in page and "GPU-hours per million output tokens" in page
    assert f"{summary['gpu_hours']:.6g}" in page


def test_a_new_price_is_not_a_new_run(mock_run, tmp_path):
    """cluster.gpu_hour_cost changes no answer: the run_dir takes another price (nothing left to do)."""
    run_dir, summary = mock_run
    src = run_dir.parent / "in.parquet"
    cfg = compose(["model=nemotron_mini_4b_instruct", f"data.input={src}", f"run_dir={run_dir}",
                   f"replicas={REPLICAS}", "layout.gpus_per_node=2", "layout.tensor_parallel=2",
                   "engine.protocol=openai", f"engine.simulator.request_latency_s={LATENCY_S}",
                   f"client.max_in_flight={IN_FLIGHT}", "data.unit_rows=8", "sampling.tokens_to_generate=8",
                   "cluster.gpu_hour_cost=4"])
    again = run(cfg, show_progress=False)
    assert again["complete"] and again["ok"] == ROWS


def test_a_negative_price_is_refused_before_submission(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.gpu_hour_cost=-1\.0"):
        compose(["cluster.gpu_hour_cost=-1"])
    with pytest.raises(ConfigError, match=r"cluster\.gpu_hour_cost"):
        compose(["cluster.gpu_hour_cost=nan"])
    exe = shutil.which("orchestrator")
    if exe is None:
        pytest.skip("`pip install -e .` puts `orchestrator` on PATH")
    run_dir = tmp_path / "never"
    proc = subprocess.run([exe, "run", f"run_dir={hydra_value(run_dir)}", "cluster.gpu_hour_cost=-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "cluster.gpu_hour_cost=-3" in proc.stderr, proc.stdout + proc.stderr
    assert not run_dir.exists()


def test_an_endpoint_has_no_gpus_of_ours(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 16)
    with faithful_server(tmp_path, "openai") as url:
        cfg = compose(["engine=endpoint", f"engine.url={url}", f"data.input={src}", f"run_dir={tmp_path / 'run'}",
                       "data.unit_rows=8", "sampling.tokens_to_generate=8", "engine.ready_timeout_s=30",
                       "cluster.gpu_hour_cost=3"])
        summary = run(cfg, show_progress=False)
    assert summary["complete"] and summary["output_tokens"] > 0
    assert summary["gpu_hours_basis"] == "endpoint" and summary["gpus"] == 0
    assert summary["gpu_hours"] is None and summary["gpu_hours_by_state"] is None and summary["cost"] is None
    assert summary["gpu_hours_per_million_output_tokens"] is None
    line = next(x for x in format_status(collect(tmp_path / "run")).splitlines() if x.startswith("gpu-hours:"))
    assert "not counted" in line and "endpoint" in line


def events(*lines: tuple[float, int, str]) -> list:
    return [(at, n, "local", "host", message) for at, n, message in lines]


def test_windows_of_a_requeued_a_killed_and_a_running_replica():
    found = replica_windows(events(
        # r0: stopped at its time limit and requeued
        (100, 0, "starting the mock engine"), (110, 0, "engine ready at http://x"), (200, 0, "stopped (SIGTERM)"),
        (300, 0, "starting the mock engine"), (305, 0, "engine ready at http://x"), (400, 0, "finished; 5 row(s)"),
        # r1: killed without a word, then started again
        (100, 1, "starting the mock engine"), (110, 1, "engine ready at http://x"),
        (300, 1, "starting the mock engine"), (301, 1, "engine ready at http://x"), (350, 1, "finished; 1 row(s)"),
        # r2: still running; r3: never ready; r4: its last commit after its (whole-second) end line
        (100, 2, "starting the mock engine"), (104, 2, "engine ready at http://x"),
        (100, 3, "starting the mock engine"), (160, 3, "failed: the engine exited"),
        (100, 4, "starting the mock engine"), (101, 4, "engine ready at http://x"), (120, 4, "finished; 3 row(s)")),
        {0: [[111, 190], [306, 390]], 1: [[111, 150], [302, 340]], 2: [[105, 120]], 4: [[101.5, 120.7]]},
        {2: 130.0}, now=1000.0)
    (a, b) = found[0]
    assert (a["startup_s"], a["generating_s"], a["idle_s"], a["end"]) == (10, 79, 11, 200)
    assert (b["startup_s"], b["generating_s"], b["idle_s"], b["end"]) == (5, 84, 11, 400)
    assert [w["end"] for w in found[1]] == [150, 350]  # the killed window ends at its last commit
    (running,) = found[2]
    assert (running["end"], running["generating_s"], running["idle_s"]) == (130.0, 15, 11)
    (never,) = found[3]
    assert (never["startup_s"], never["generating_s"], never["idle_s"]) == (60, 0, 0)
    (late,) = found[4]
    assert late["end"] == 120.7 and late["generating_s"] == pytest.approx(19.2) and late["idle_s"] == pytest.approx(0.5)


def test_a_short_run_keeps_its_figures_exact_to_six_significant_digits():
    """Rounding to 6 decimals turned 12.8 s on 1 GPU (0.0035596 h) into 0.00356 h, 1e-4 off total / price."""
    from orchestrator.report import GpuSettings, gpu_usage

    started = events((100, 0, "starting the mock engine"), (101, 0, "engine ready at http://x"),
                     (112.8146, 0, "finished; 8 row(s)"))
    usage = gpu_usage(None, GpuSettings("mock", 1, "simulated", PRICE), "a", 800, progress=[],
                      events=started, now=1000.0)
    exact = 12.8146 / HOUR
    assert usage["gpu_hours"] == pytest.approx(exact, rel=1e-6)
    assert usage["cost"]["total"] == pytest.approx(usage["gpu_hours"] * PRICE, rel=1e-6)
    assert usage["gpu_hours_per_million_output_tokens"] == pytest.approx(exact / 800 * 1e6, rel=1e-6)
