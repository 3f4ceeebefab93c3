"""A real Triton server (tritonserver 2.51.0 from PyTriton, scripts/install_triton.sh) serving NeMo's deploy
tensors with the tiny model behind them (tests/triton_deploy_server.py, a stand-in for NeMo's deploy_triton.py
launched with engine=triton's own command line), locally and as the engine step on the local Slurm cluster,
and the embedded engine's Triton routes checked against it.

Under CI=true a missing PyTriton venv fails these tests instead of skipping them.
"""
import json
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import requests

from orchestrator.config import compose
from orchestrator.engines.server import EngineServer
from orchestrator.errors import OrchestratorError
from orchestrator.frontend import run
from tests.conftest import TINY, TRITON_VENV, alive_processes, process_tree, write_prompts
from tests.test_slurm import committed_units, job_ids, leftover, run_cli, sacct_state, start_run, wait_for

pytestmark = pytest.mark.triton

SERVER = Path(__file__).resolve().parent / "triton_deploy_server.py"
END_STRINGS = ["<extra_id_1>", "<|endoftext|>"]  # Llama2-70B-SteerLM-Chat's, the card deployed with Triton
REJECT = "REJECT-THIS-ROW"  # the stand-in's model raises on a prompt holding it (TRITON_TEST_REJECT)


MODEL = ["model=hf", f"model.path={TINY}", "model.prompt.format=steerlm",
         f"model.end_strings=[{','.join(repr(s) for s in END_STRINGS)}]", "sampling.greedy=true",
         "sampling.tokens_to_generate=16"]


def triton(*extra: str, record: Path | None = None, **env: str) -> list[str]:
    """engine=triton launching the stand-in the way the card launches deploy_triton.py (the adapter's argv;
    only the program differs): the tiny model as the checkpoint, the card's prompt format and end strings."""
    env = {"TRITON_TEST_REJECT": REJECT, **({"TRITON_TEST_RECORD": str(record)} if record else {}), **env}
    return [*MODEL, "engine=triton", f"engine.command=[{TRITON_VENV / 'bin' / 'python'}]", f"engine.script={SERVER}",
            f"engine.checkpoint={TINY}", "engine.options.max_batch_size=4", "+engine.options.max_input_len=512",
            "engine.ready_timeout_s=300",
            *[f"+engine.env.{k}={v}" for k, v in env.items()], *extra]


def calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def results(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results").sort_values("id").reset_index(drop=True)


@pytest.fixture(scope="module")
def server(triton_python, tmp_path_factory):
    """One real Triton server (NeMo's tensors, max_batch_size 4), started by the orchestrator's own engine
    owner; its model records every call it gets."""
    tmp = tmp_path_factory.mktemp("triton")
    record = tmp / "calls.jsonl"
    cfg = compose(triton(record=record))
    with EngineServer(cfg, tmp / "engine.log", tmp / "engine.port") as engine:
        info = engine.wait_ready()
        assert info.protocol == "triton" and info.api == "infer" and info.max_batch_size == 4
        engine.record = record
        yield engine


def endpoint_rows(server, tmp_path, name, prompts, *overrides) -> pd.DataFrame:
    src = write_prompts(tmp_path / f"{name}.parquet", len(prompts) if prompts else 40, prompts=prompts)
    cfg = compose([*MODEL, "engine=endpoint", f"engine.url={server.url}", "engine.protocol=triton",
                   f"engine.served_model_name={server.model_name}", f"data.input={src}", f"run_dir={tmp_path / name}",
                   "data.unit_rows=20", *overrides])
    run(cfg, show_progress=False)
    return results(tmp_path / name)


def infer(url: str, model: str, prompts: list[str], tokens: int) -> list[str]:
    """A bare request, as NeMo's NemoQuery sends it (prompts and the length only)."""
    body = {"inputs": [{"name": "prompts", "datatype": "BYTES", "shape": [len(prompts), 1], "data": prompts},
                       {"name": "max_output_len", "datatype": "INT64", "shape": [len(prompts), 1],
                        "data": [tokens] * len(prompts)}]}
    answer = requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["outputs"][0]["data"]


def test_engine_triton_runs_locally_batched_as_the_model_config_says(triton_python, tmp_path):
    record = tmp_path / "calls.jsonl"
    src = write_prompts(tmp_path / "in.parquet", 120)
    run_dir = tmp_path / "run"
    proc = run_cli("run", *triton("client.batch_size=8", record=record), f"data.input={src}",
                   f"run_dir={run_dir}", "data.unit_rows=30", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = results(run_dir)
    assert list(df["id"]) == sorted(f"q{i}" for i in range(120)) and (df["status"] == "ok").all()
    assert not df["response"].str.contains("An error occurred").any()
    assert not df["response"].str.contains("<extra_id_1>", regex=False).any()  # cut at the end strings
    got = calls(record)
    readiness, work = got[0], got[1:]
    assert readiness["rows"] == 1 and readiness["first"]["max_output_len"] == [1]  # one real generation
    assert sum(c["rows"] for c in work) == 120
    assert max(c["rows"] for c in work) == 4  # client.batch_size=8, cut to the model config's max_batch_size
    metadata = {"prompts", "max_output_len", "top_k", "top_p", "temperature", "random_seed", "stop_words_list",
                "bad_words_list", "no_repeat_ngram_size", "task_id", "lora_uids"}
    for call in work:  # the sampling tensors the metadata lists, each as NeMo reads it (the first row's value)
        assert set(call["inputs"]) <= metadata and {"max_output_len", "top_k", "stop_words_list"} <= set(call["inputs"])
        assert call["first"]["max_output_len"] == [16] and call["first"]["top_k"] == [1]
        assert call["first"]["stop_words_list"] == ["<extra_id_1>"]  # one stop word a row: NeMo squeezes it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "triton" and summary["complete"]
    assert leftover(run_dir) == ""


def test_the_answers_are_the_models_for_each_row(server, tmp_path):
    """Greedy answers through the orchestrator equal the real server's answers to bare requests, row by row
    (raw prompts, no end strings: nothing to cut)."""
    prompts = [f"Tell me about the number {i}." for i in range(12)]
    df = endpoint_rows(server, tmp_path, "rows", prompts, "model.prompt.format=raw", "sampling.end_strings=[]")
    assert (df["status"] == "ok").all()
    direct = [text.strip() for i in range(0, 12, 4)  # the client trims each answer (prompts.cut_answer)
              for text in infer(server.url, server.model_name, prompts[i:i + 4], 16)]
    assert list(df.sort_values("id", key=lambda s: s.str[1:].astype(int))["response"]) == direct
    assert len(set(direct)) > 1  # the model's text, not an echo or a constant


def test_the_2023_length_input_max_output_token_is_sent_by_its_name_and_a_stop_leaves_no_process(
        triton_python, tmp_path):
    """A model whose length input has NeMo's 2023 name; then the engine owner's stop ends the stand-in and
    every process it started (tritonserver, PyTriton's proxies, Python's resource tracker) before it returns."""
    record = tmp_path / "calls.jsonl"
    cfg = compose(triton(record=record, TRITON_TEST_MAX_LEN_INPUT="max_output_token"))
    with EngineServer(cfg, tmp_path / "engine.log", tmp_path / "engine.port") as engine:
        engine.wait_ready()
        df = endpoint_rows(engine, tmp_path, "old", None, "sampling.tokens_to_generate=5")
        tree = process_tree(engine.proc.pid) | {engine.proc.pid}
        assert any("tritonserver" in line for line in alive_processes(tree)), alive_processes(tree)
    assert alive_processes(tree) == []
    assert (df["status"] == "ok").all() and len(df) == 40
    got = calls(record)  # the two readiness generations (the server's owner, then the run's) ask for 1 token
    assert [c["first"]["max_output_token"] for c in got[:2]] == [[1], [1]] and sum(c["rows"] for c in got[2:]) == 40
    assert all(c["first"]["max_output_token"] == [5] and "max_output_len" not in c["inputs"] for c in got[2:])


def test_bad_rows_are_row_errors_with_the_models_own_message(server, tmp_path):
    """A prompt too long for the engine: NeMo's model answers "An error occurred: ..." (HTTP 200); a prompt
    the model raises on: PyTriton's HTTP 500 with its traceback. Each is its row's error, the others answer."""
    long = " ".join(f"word{i}" for i in range(600))  # within the model's context, over --max_input_len 512
    # one request at a time: Triton's dynamic batcher merges concurrent requests into one model batch, and NeMo's
    # error answer (one string for the whole batch) then fails every request merged with the bad row (seen in CI)
    df = endpoint_rows(server, tmp_path, "bad", ["What is 2 + 2?", long, f"{REJECT} please", "Name a colour."],
                       "client.batch_size=1", "client.max_in_flight=1", "client.max_retries=1",
                       "client.retry_backoff_s=0.01")
    assert list(df["status"]) == ["ok", "error", "error", "ok"]
    assert df.loc[1, "error"].startswith("the Triton model answered an error: the prompt has ")
    assert "more than max_input_len" in df.loc[1, "error"]
    assert "HTTP 500" in df.loc[2, "error"] and "PyTritonBadParameterError: prompt 0 of the batch is refused" \
        in df.loc[2, "error"] and "Traceback" not in df.loc[2, "error"]


def test_the_generate_extension_on_a_tensorrt_llm_ensemble(triton_python, tmp_path):
    """The model takes text_input (a TRT-LLM ensemble's tensors): the codec uses /generate, one prompt a
    request with its stop words; an extra_body value Triton cannot map is its 400, found by the readiness
    generation before any row is sent."""
    record = tmp_path / "calls.jsonl"
    cfg = compose(triton(record=record, TRITON_TEST_MODEL="trtllm"))
    with EngineServer(cfg, tmp_path / "engine.log", tmp_path / "engine.port") as engine:
        info = engine.wait_ready()
        assert info.api == "generate"
        df = endpoint_rows(engine, tmp_path, "gen", None, "client.max_in_flight=4")
        with pytest.raises(OrchestratorError, match="refused the readiness generation: HTTP 400: parameter 'beam' "
                                                    "has invalid type. It should be either 'int', 'bool', or 'string'"):
            endpoint_rows(engine, tmp_path, "gen400", None, "+engine.extra_body.beam={a:1}")
    assert (df["status"] == "ok").all() and len(df) == 40 and (df["response"].str.len() > 0).any()
    work = calls(record)  # Triton's dynamic batcher merges the one-prompt requests into the model's batches
    assert sum(c["rows"] for c in work) == 2 + 40 and all("stop_words" in c["inputs"] for c in work)
    assert committed_units(tmp_path / "gen400") == 0  # refused before any row was sent


@pytest.mark.slurm
def test_on_slurm_the_engine_step_launches_it_and_a_killed_server_resumes_exactly_once(
        triton_python, slurm_cluster, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 400)
    run_dir = tmp_path / "run"
    # its own model name: the kill below must find this run's stand-in, not the module's local server
    args = [*triton("cluster=slurm", f"cluster.partition={slurm_cluster}", "layout.gpus_per_node=1",
                    "cluster.cpus_per_task=2", "engine.served_model_name=on-slurm"), f"data.input={src}",
            f"run_dir={run_dir}", "data.unit_rows=20"]
    first = start_run(*args)
    wait_for(lambda: committed_units(run_dir) >= 2, 400, "two committed units")
    found = subprocess.run(["pgrep", "-f", f"{SERVER} .*--triton_model_name on-slurm"], capture_output=True,
                           text=True)
    stand_in = [pid for pid in found.stdout.split()
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].split(b"/")[-1] == b"python"]
    assert stand_in, "no deploy_triton stand-in process"
    for pid in stand_in:  # the server goes down mid-run, as when its node fails
        os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 1, out + err
    assert "the engine process exited during the run" in err
    kept = committed_units(run_dir)
    assert 2 <= kept < 20
    log = next((run_dir / "logs").glob("engine-*.log")).read_text()
    assert "--triton_model_name on-slurm" in log and "--num_gpus 1" in log and "--max_batch_size 4" in log
    again = run_cli("run", *args, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    (job,) = job_ids(again.stdout)
    assert sacct_state(job) == "COMPLETED"
    df = results(run_dir)
    assert list(df["id"]) == sorted(f"q{i}" for i in range(400)) and (df["status"] == "ok").all()
    assert committed_units(run_dir) == 20  # the first run's units kept, none done twice
    assert leftover(run_dir) == ""


def _t(name: str, datatype: str, data: list, shape: list[int] | None = None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data), 1], "data": data}


# what the tests above send and what can go wrong with it: (method, path, JSON body or raw bytes)
AGREEMENT = {
    "server metadata": ("GET", "/v2", None),
    "server ready": ("GET", "/v2/health/ready", None),
    "server live": ("GET", "/v2/health/live", None),
    "model metadata": ("GET", "/v2/models/hf", None),
    "model ready": ("GET", "/v2/models/hf/ready", None),
    "version ready": ("GET", "/v2/models/hf/versions/1/ready", None),
    "unknown model ready": ("GET", "/v2/models/other/ready", None),
    "unknown model metadata": ("GET", "/v2/models/other", None),
    "unknown version": ("GET", "/v2/models/hf/versions/2", None),
    "unknown model infer": ("POST", "/v2/models/other/infer", {"inputs": [_t("prompts", "BYTES", ["a"])]}),
    "infer": ("POST", "/v2/models/hf/infer", {"inputs": [
        _t("prompts", "BYTES", ["Hello", "What is"]), _t("max_output_len", "INT64", [3, 3]),
        _t("top_k", "INT64", [1, 1]), _t("top_p", "FP32", [0.0, 0.0]), _t("temperature", "FP32", [1.0, 1.0]),
        _t("stop_words_list", "BYTES", ["<extra_id_1>", "<extra_id_1>"])]}),
    "batch over max_batch_size": ("POST", "/v2/models/hf/infer", {"inputs": [_t("prompts", "BYTES", ["a"] * 5)]}),
    "wrong datatype": ("POST", "/v2/models/hf/infer", {"inputs": [
        _t("prompts", "BYTES", ["a"]), _t("max_output_len", "INT32", [3])]}),
    "unknown input": ("POST", "/v2/models/hf/infer", {"inputs": [
        _t("prompts", "BYTES", ["a"]), _t("max_tokens", "INT64", [3])]}),
    "batch sizes differ": ("POST", "/v2/models/hf/infer", {"inputs": [
        _t("prompts", "BYTES", ["a", "b"]), _t("max_output_len", "INT64", [3])]}),
    "too few strings": ("POST", "/v2/models/hf/infer", {"inputs": [_t("prompts", "BYTES", ["a"], [2, 1])]}),
    "two stop words a row, one row": ("POST", "/v2/models/hf/infer", {"inputs": [
        _t("prompts", "BYTES", ["a"]), _t("max_output_len", "INT64", [3]),
        _t("stop_words_list", "BYTES", ["x", "y"], [1, 2])]}),
    "two stop words a row, two rows": ("POST", "/v2/models/hf/infer", {"inputs": [
        _t("prompts", "BYTES", ["a", "b"]), _t("max_output_len", "INT64", [3, 3]),
        _t("stop_words_list", "BYTES", ["x", "y", "x", "y"], [2, 2])]}),
    "no prompts": ("POST", "/v2/models/hf/infer", {"inputs": [_t("max_output_len", "INT64", [3])]}),
    "no inputs": ("POST", "/v2/models/hf/infer", {"parameters": {}}),
    "not JSON": ("POST", "/v2/models/hf/infer", b"{nope"),
    "generate": ("POST", "/v2/models/hf/generate", {"prompts": "Hello", "max_output_len": 3}),
}


@pytest.fixture(scope="module")
def imitation():
    """The embedded engine's Triton routes, set up as the real server above (NeMo's model, hf, max_batch_size 4)."""
    from orchestrator.simulator.app import EngineThread
    from orchestrator.simulator.model import EngineSettings

    with EngineThread(EngineSettings(model_name="hf", routes="triton", triton_max_batch_size=4)) as engine:
        yield engine


def _shape(answer: requests.Response):
    """What must agree: the status and, for an error, its text (a model's traceback reduced as the codec reduces
    it); for an answer, its JSON without the generated text (the two generators differ)."""
    from orchestrator.protocols.triton import error_message

    try:
        body = answer.json()
    except ValueError:
        return answer.status_code, answer.text
    if answer.status_code != 200:
        text = error_message(body)
        unparsed = "failed to parse the request JSON buffer: "  # then rapidjson's words, which are not imitated
        return answer.status_code, unparsed if text.startswith(unparsed) else text
    if isinstance(body, dict) and "model_name" in body and "outputs" in body:
        outputs = body["outputs"]
        if isinstance(outputs, list):  # infer: the text of an error answer is NeMo's, the others the model's
            outputs = [{**o, "data": [d if d.startswith("An error occurred") else "<text>" for d in o["data"]]}
                       for o in outputs]
        else:  # generate: one element, unwrapped
            outputs = "<text>"
        return 200, {**body, "outputs": outputs}
    if isinstance(body, dict) and "config" in answer.url:
        return 200, {k: body[k] for k in ("name", "max_batch_size", "input", "output")}
    return 200, body


@pytest.mark.parametrize("case", list(AGREEMENT))
def test_the_embedded_engine_answers_as_the_real_triton_server(server, imitation, case):
    method, path, body = AGREEMENT[case]
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    real = requests.request(method, server.url + path, timeout=120, **kwargs)
    imitated = requests.request(method, imitation.url + path, timeout=30, **kwargs)
    assert _shape(imitated) == _shape(real)


def test_a_400_from_triton_is_final_with_tritons_message(server):
    """The codec reads the real server's refusal of a batch over its max_batch_size as final (not retried),
    with Triton's own text: what the rows of that request record."""
    from orchestrator.protocols import make_codec
    from orchestrator.protocols.base import RejectedError

    codec = make_codec(compose(MODEL), server.info)
    prompts = ["a"] * 5
    answer = requests.post(server.url + codec.path, json=codec.payload(prompts), timeout=120)
    with pytest.raises(RejectedError) as refused:  # a TransientError (retried) would not be caught here
        codec.parse(answer.status_code, answer.json(), prompts)
    assert str(refused.value) == ("HTTP 400: [request id: <id_unknown>] inference request batch-size must be <= 4 "
                                  "for 'hf'")
