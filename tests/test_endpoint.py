"""engine=endpoint against faithful servers (the embedded engine limited to one protocol family), and the
bugs found against a real vLLM: a /v1 URL, a protocol mismatch, the engine named in the summary."""
import json
import subprocess
import sys
import time
from contextlib import contextmanager

import pandas as pd
import pytest

from orchestrator.config import compose
from orchestrator.engines.server import EngineServer, free_port
from orchestrator.errors import EngineError, OrchestratorError
from orchestrator.frontend import run
from tests.conftest import write_prompts


@contextmanager
def faithful_server(tmp_path, routes: str, *extra: str, port: int = 0):
    """The embedded engine serving only `routes` (nemo, openai or triton), as a separate process."""
    port_file = tmp_path / f"{routes}.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.simulator", "--port", str(port), "--port-file",
                             str(port_file), "--routes", routes, "--model-name", "served-model", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the faithful server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{int(port_file.read_text())}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def endpoint_run(tmp_path, url, *overrides, rows=40):
    src = write_prompts(tmp_path / "in.parquet", rows)
    cfg = compose(["engine=endpoint", f"engine.url={url}", f"data.input={src}", f"run_dir={tmp_path / 'run'}",
                   "data.unit_rows=16", "sampling.tokens_to_generate=8", "engine.ready_timeout_s=30", *overrides])
    summary = run(cfg, show_progress=False)
    return summary, pd.read_parquet(tmp_path / "run" / "results")


@pytest.mark.parametrize("routes", ["openai", "nemo", "triton"])
def test_endpoint_finds_the_protocol_from_the_routes(tmp_path, routes):
    with faithful_server(tmp_path, routes) as url:
        summary, df = endpoint_run(tmp_path, url, "engine.served_model_name=served-model")
    assert summary["complete"] and (df["status"] == "ok").all()
    assert sorted(df["id"]) == sorted(f"q{i}" for i in range(40))
    assert f"protocol {routes}" in (tmp_path / "run" / "run.log").read_text()


def test_an_openai_base_url_with_v1_works(tmp_path):
    with faithful_server(tmp_path, "openai") as url:
        summary, df = endpoint_run(tmp_path, url + "/v1/")
    assert summary["complete"] and (df["status"] == "ok").all()


def test_the_summary_and_log_name_the_endpoint_not_the_embedded_engine(tmp_path):
    with faithful_server(tmp_path, "openai") as url:
        summary, _ = endpoint_run(tmp_path, url)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"] == saved["engine"] == "endpoint"
    log = (tmp_path / "run" / "run.log").read_text()
    assert f"connecting to the engine at {url}" in log and "mock" not in log


def test_a_wrong_protocol_says_the_server_speaks_openai(tmp_path):
    with faithful_server(tmp_path, "openai") as url:
        with pytest.raises(OrchestratorError, match="speaks the OpenAI API, not nemo; use engine.protocol=openai"):
            endpoint_run(tmp_path, url, "engine.protocol=nemo")


def test_a_closed_port_fails_fast_and_names_the_url(tmp_path):
    port = free_port()
    cfg = compose(["engine=endpoint", f"engine.url=http://127.0.0.1:{port}", "engine.ready_timeout_s=600"])
    server = EngineServer(cfg, tmp_path / "e.log", tmp_path / "e.port")
    started = time.monotonic()
    with pytest.raises(EngineError, match=f"nothing answers at engine.url=http://127.0.0.1:{port}"):
        server.wait_ready()
    assert time.monotonic() - started < 60  # not the 600 s readiness deadline


def test_engine_url_without_engine_endpoint_is_refused_with_the_fix(tmp_path):
    from orchestrator.errors import ConfigError
    from orchestrator.preflight import prepare

    src = write_prompts(tmp_path / "in.parquet", 5)
    cfg = compose(["engine.url=http://127.0.0.1:1", f"data.input={src}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="use engine=endpoint engine.url=http://127.0.0.1:1"):
        prepare(cfg)


def test_chat_template_prompts_go_to_the_chat_api(tmp_path):
    with faithful_server(tmp_path, "openai") as url:
        summary, df = endpoint_run(tmp_path, url, "model.prompt.format=chat_template")
    assert summary["complete"] and (df["status"] == "ok").all()
    assert df["output_tokens"].notna().all()  # OpenAI engines report usage


def test_triton_infer_sends_only_the_inputs_the_model_lists(tmp_path):
    with faithful_server(tmp_path, "triton", "--triton-max-len-input", "max_output_token") as url:
        summary, df = endpoint_run(tmp_path, url, "engine.served_model_name=served-model")
    assert summary["complete"] and (df["status"] == "ok").all()


def test_truncation_cuts_by_the_engines_own_token_count(tmp_path):
    """With /tokenize, a too-long prompt is refused by the engine itself (its message), and
    data.truncate_prompts=true keeps the longest start that the engine counts as fitting."""
    long = "a " * 6000  # 2 bytes a token: the 4-bytes-per-token estimate would keep twice too much
    src = write_prompts(tmp_path / "in.parquet", 2, prompts=["short question", long])
    with faithful_server(tmp_path, "openai", "--max-model-len", "1024") as url:
        def go(name, *extra):
            cfg = compose(["engine=endpoint", f"engine.url={url}", f"data.input={src}", f"run_dir={tmp_path / name}",
                           "sampling.tokens_to_generate=8", "model.prompt.format=raw", *extra])
            run(cfg, show_progress=False)
            return pd.read_parquet(tmp_path / name / "results").sort_values("id").reset_index(drop=True)

        refused = go("refused")
        kept = go("kept", "data.truncate_prompts=true")
    assert list(refused["status"]) == ["ok", "error"]
    assert "This model's maximum context length is 1024 tokens" in refused.loc[1, "error"]
    assert list(kept["status"]) == ["ok", "ok"]
