"""Engines behind authentication and TLS (docs/engines.md "Authenticated endpoints"): engine.api_key_env sends
`Authorization: Bearer <key>` on every request, a refused key stops the run at readiness (or stops the replica
mid-run) with a message instead of row errors, a missing variable is refused before anything is submitted, the
key is written nowhere, and https:// servers work with engine.verify_tls and engine.ca_bundle.

The servers are the embedded engine with --require-key-env (vLLM's --api-key: 401 without the right key on
every route) and --tls-cert/--tls-key, as the job's own engine (engine=mock) or a separate process
(engine=endpoint)."""
import datetime
import http.server
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import requests

from orchestrator.config import compose
from orchestrator.engines.base import check_engine
from orchestrator.engines.server import EngineServer
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.frontend import run
from orchestrator.preflight import check_launch, prepare
from orchestrator.protocols.auth import KeyRefused, TLSFailure
from orchestrator.render import render
from tests.conftest import ROOT, orchestrator_cmd, write_prompts

KEY_ENV = "ORCHESTRATOR_TEST_API_KEY"


def new_key() -> str:
    return "sk-test-" + secrets.token_hex(24)


@pytest.fixture
def key(monkeypatch) -> str:
    value = new_key()
    monkeypatch.setenv(KEY_ENV, value)
    return value


@contextmanager
def engine_process(tmp_path: Path, *extra: str, env: dict | None = None, routes: str = "openai",
                   scheme: str = "http"):
    """The embedded engine as a separate process (a server that is already running: engine=endpoint)."""
    port_file = tmp_path / f"engine-{secrets.token_hex(4)}.port"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.simulator", "--port", "0", "--port-file",
                             str(port_file), "--routes", routes, "--model-name", "served-model", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.05)
        yield f"{scheme}://127.0.0.1:{int(port_file.read_text())}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def endpoint_cfg(tmp_path: Path, url: str, *overrides: str, rows: int = 40, name: str = "run"):
    src = write_prompts(tmp_path / "in.parquet", rows)
    return compose(["engine=endpoint", f"engine.url={url}", f"data.input={src}", f"run_dir={tmp_path / name}",
                    "data.unit_rows=16", "sampling.tokens_to_generate=8", "engine.ready_timeout_s=30", *overrides])


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under root (binary ones too: pickles, Parquet) whose bytes contain the secret."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`orchestrator ARGS` as a user runs it (the console script's entry point, from this source tree)."""
    env = dict(env, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run([*orchestrator_cmd(), *args], capture_output=True, text=True, env=env, timeout=120)


# ---------------------------------------------------------------- the key: sent everywhere, written nowhere


def test_a_run_with_the_key_works_and_no_file_of_the_run_or_of_render_holds_it(tmp_path, key):
    """engine=mock requiring the key on every route (readiness, /v1/models, /tokenize, generations): any
    request without it would be refused and stop the run. Then every file of the run directory, and every
    file `render cluster=slurm` writes, is searched for the key's bytes."""
    long = "a " * 3000  # longer than the 1024-token context: truncation asks the engine's /tokenize mid-run
    src = write_prompts(tmp_path / "in.parquet", 30, prompts=[f"question {i}" for i in range(29)] + [long])
    run_dir = tmp_path / "run"
    engine = ["engine.protocol=openai", f"engine.simulator.require_key_env={KEY_ENV}", f"engine.api_key_env={KEY_ENV}"]
    cfg = compose(["model=nemotron_mini_4b_instruct", "model.architecture.max_seq_len=1024", f"data.input={src}",
                   f"run_dir={run_dir}", "data.unit_rows=8", "sampling.tokens_to_generate=8",
                   "data.truncate_prompts=true", *engine])
    summary = run(cfg, show_progress=False)
    df = pd.read_parquet(run_dir / "results")
    assert summary["complete"] and len(df) == 30 and (df["status"] == "ok").all(), df[df["status"] != "ok"]

    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.yaml", "summary.json", "run.log", "plan.json"} <= {p.name for p in written}
    assert any("logs" in p.parts for p in written) and any("work" in p.parts for p in written)
    assert files_holding(run_dir, key) == []
    assert f"api_key_env: {KEY_ENV}" in (run_dir / "config.yaml").read_text()  # the name, and only the name

    out = tmp_path / "render"
    rendered = render(compose(["cluster=slurm", "model=nemotron_mini_4b_instruct", f"run_dir={tmp_path / 'r2'}",
                               "data.input=/lustre/prompts", *engine]), out)
    assert {p.name for p in rendered} >= {"config.yaml", "job.sbatch", "engine_ranks.sh", "engine_job.sbatch",
                                          "client.yaml"}
    assert files_holding(out, key) == []
    plain = (out / "engine_job.sbatch").read_text()
    assert f'"${KEY_ENV}"' in plain  # curl's readiness poll sends the header, expanded in the job
    assert subprocess.run(["bash", "-n", str(out / "engine_job.sbatch")]).returncode == 0
    assert f"--require-key-env {KEY_ENV}" in (out / "engine_ranks.sh").read_text()
    assert f"api_key_env: {KEY_ENV}" in (out / "client.yaml").read_text()


# ---------------------------------------------------------------- refused before anything is submitted


@pytest.mark.parametrize("value", [None, ""])
def test_an_unset_or_empty_variable_is_refused_before_anything_is_submitted(tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    cfg = endpoint_cfg(tmp_path, "https://127.0.0.1:9", f"engine.api_key_env={KEY_ENV}")
    with pytest.raises(ConfigError, match=f"environment variable {KEY_ENV} is {'not set' if value is None else 'empty'}"
                                          f": export {KEY_ENV}=<the API key>"):
        run(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_a_key_given_in_place_of_the_name_is_refused_without_repeating_it(tmp_path):
    secret = new_key()
    with pytest.raises(ConfigError, match="takes the NAME of an environment variable") as caught:
        prepare(endpoint_cfg(tmp_path, "http://127.0.0.1:9", f"engine.api_key_env={secret}"))
    assert secret not in str(caught.value)
    assert not (tmp_path / "run").exists()  # config.yaml (which would hold it) was never written


def test_the_embedded_engines_own_variable_and_a_slurm_export_that_drops_the_key_are_refused(monkeypatch, key):
    monkeypatch.delenv("ORCHESTRATOR_TEST_ENGINE_KEY", raising=False)
    with pytest.raises(ConfigError, match="engine.simulator.require_key_env=ORCHESTRATOR_TEST_ENGINE_KEY, but the "
                                          "environment variable ORCHESTRATOR_TEST_ENGINE_KEY is not set"):
        check_engine(compose(["engine.simulator.require_key_env=ORCHESTRATOR_TEST_ENGINE_KEY"]))
    slurm = ["cluster=slurm", "engine=endpoint", "engine.url=https://127.0.0.1:9", f"engine.api_key_env={KEY_ENV}"]
    with pytest.raises(ConfigError, match=f"cluster.sbatch_args.export=NONE does not pass {KEY_ENV}"):
        check_launch(compose([*slurm, "+cluster.sbatch_args.export=NONE"]))
    check_launch(compose([*slurm, "+cluster.sbatch_args.export='ALL,X=1'"]))
    check_launch(compose([*slurm, f"+cluster.sbatch_args.export='PATH,{KEY_ENV}'"]))


# ---------------------------------------------------------------- a refused key stops the run, never the rows


def test_the_cli_exits_1_with_the_reason_for_a_wrong_key_no_key_and_an_unset_variable(tmp_path):
    """Three `orchestrator run`s at once against an engine that requires a key: a wrong key and no key stop at
    the readiness check, an unset variable before anything is submitted. Each exits 1 with the reason and
    without a traceback, and no row becomes an error."""
    good = new_key()
    src = write_prompts(tmp_path / "in.parquet", 20)
    without = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    with engine_process(tmp_path, "--require-key-env", KEY_ENV, env=dict(without, **{KEY_ENV: good})) as url:
        def start(name: str, env: dict, *extra: str) -> subprocess.Popen:
            env = dict(env, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
            return subprocess.Popen([*orchestrator_cmd(), "run", "engine=endpoint", f"engine.url={url}",
                                     f"data.input={src}", f"run_dir={tmp_path / name}", *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

        procs = {"wrong": start("wrong", dict(without, **{KEY_ENV: new_key()}), f"engine.api_key_env={KEY_ENV}"),
                 "none": start("none", without),
                 "unset": start("unset", without, f"engine.api_key_env={KEY_ENV}")}
        out = {name: proc.communicate(timeout=120) + (proc.returncode,) for name, proc in procs.items()}
    for name, (stdout, stderr, code) in out.items():
        assert code == 1 and "Traceback" not in stderr, stderr
        assert not list((tmp_path / name / "results").glob("*.parquet"))  # no row became an error
        assert good not in stdout + stderr
    wrong, none, unset = out["wrong"][1], out["none"][1], out["unset"][1]
    assert f"the engine at {url} refused the API key from engine.api_key_env={KEY_ENV} (HTTP 401 on GET " \
           f"/v1/models, at the readiness check): check that ${KEY_ENV} holds a key this server accepts" in wrong
    assert f"the engine at {url} requires an API key (HTTP 401 on GET /v1/models, at the readiness check) and " \
           f"none was sent" in none and "set engine.api_key_env=<its name>" in none
    assert f"engine.api_key_env={KEY_ENV}, but the environment variable {KEY_ENV} is not set: export " \
           f"{KEY_ENV}=<the API key>" in unset
    assert not (tmp_path / "unset").exists()  # refused before the run directory was made


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
        body = b'{"detail": "Forbidden"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args):
        pass


def test_a_403_at_readiness_is_final_and_names_the_variable_and_the_url(tmp_path, key):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cfg = compose(["engine=endpoint", f"engine.url={url}", f"engine.api_key_env={KEY_ENV}",
                       "engine.ready_timeout_s=600"])
        started = time.monotonic()
        with pytest.raises(KeyRefused, match=f"the engine at {url} refused the API key from "
                                             f"engine.api_key_env={KEY_ENV} \\(HTTP 403 on GET /v1/models"):
            EngineServer(cfg, tmp_path / "e.log", tmp_path / "e.port").wait_ready()
        assert time.monotonic() - started < 30  # not the readiness deadline
    finally:
        server.shutdown()


def test_a_key_revoked_mid_run_stops_the_replica_without_blaming_rows(tmp_path, key):
    """The engine refuses the key after 12 requests (4 of them readiness): the run stops with the message,
    the units answered before stay committed, and not one row is recorded as an error."""
    with engine_process(tmp_path, "--require-key-env", KEY_ENV, "--revoke-key-after", "12",
                        "--request-latency-s", "0.01") as url:
        cfg = endpoint_cfg(tmp_path, url, f"engine.api_key_env={KEY_ENV}", "client.max_in_flight=2", rows=400)
        started = time.monotonic()
        with pytest.raises(OrchestratorError) as caught:
            run(cfg, show_progress=False)
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert f"refused the API key from engine.api_key_env={KEY_ENV} (HTTP 401 on POST /v1/completions, during " \
           f"the run)" in message and "no row is recorded as an error" in message
    results = list((tmp_path / "run" / "results").glob("*.parquet"))
    df = pd.read_parquet(tmp_path / "run" / "results") if results else pd.DataFrame({"status": []})
    assert len(df) < 400 and (df["status"] == "ok").all()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] is False and summary["failed"] == 0
    assert "refused the API key" in (tmp_path / "run" / "run.log").read_text()


# ---------------------------------------------------------------- HTTPS


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and localhost) and its key, as PEM files."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        if not shutil.which("openssl"):
            pytest.skip("neither the cryptography package nor openssl is here to make a certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(private.public_key())
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


HTTPS_KEY = new_key()


@pytest.fixture(scope="module")
def https_engine(tmp_path_factory):
    """The embedded engine over HTTPS with a self-signed certificate, requiring HTTPS_KEY from KEY_ENV."""
    folder = tmp_path_factory.mktemp("tls")
    cert, private = _self_signed(folder)
    with engine_process(folder, "--tls-cert", str(cert), "--tls-key", str(private), "--require-key-env", KEY_ENV,
                        env=dict(os.environ, **{KEY_ENV: HTTPS_KEY}), scheme="https") as url:
        yield url, cert


def test_https_with_the_servers_ca_bundle_and_a_key_works_and_every_request_carries_the_key(
        tmp_path, monkeypatch, https_engine):
    url, cert = https_engine
    monkeypatch.setenv(KEY_ENV, HTTPS_KEY)

    def stats() -> dict:
        return requests.get(url + "/stats", headers={"Authorization": f"Bearer {HTTPS_KEY}"}, verify=str(cert),
                            timeout=10).json()

    before = stats()
    summary = run(endpoint_cfg(tmp_path, url, f"engine.api_key_env={KEY_ENV}", "engine.verify_tls=true",
                               f"engine.ca_bundle={cert}"), show_progress=False)
    after = stats()
    df = pd.read_parquet(tmp_path / "run" / "results")
    assert summary["complete"] and len(df) == 40 and (df["status"] == "ok").all()
    assert after["unauthorized"] == before["unauthorized"]  # readiness, /v1/models, /tokenize, every generation
    assert after["authorized"] - before["authorized"] >= 40 + 4
    assert files_holding(tmp_path / "run", HTTPS_KEY) == []


def test_https_without_the_ca_fails_naming_the_tls_problem_and_both_fixes(tmp_path, monkeypatch, https_engine):
    """The readiness check the job runs: final at once (not the readiness deadline), with the reason."""
    url, _ = https_engine
    monkeypatch.setenv(KEY_ENV, HTTPS_KEY)
    cfg = compose(["engine=endpoint", f"engine.url={url}", f"engine.api_key_env={KEY_ENV}", "engine.verify_tls=true",
                   "engine.ready_timeout_s=600"])
    started = time.monotonic()
    with pytest.raises(TLSFailure) as caught:
        EngineServer(cfg, tmp_path / "e.log", tmp_path / "e.port").wait_ready()
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert f"TLS failed with the engine at {url}: self-signed certificate" in message
    assert "engine.ca_bundle=/path/to/ca.pem" in message and "engine.verify_tls=false" in message


def test_https_with_verify_tls_false_works(tmp_path, monkeypatch, https_engine):
    url, _ = https_engine
    monkeypatch.setenv(KEY_ENV, HTTPS_KEY)
    summary = run(endpoint_cfg(tmp_path, url, f"engine.api_key_env={KEY_ENV}", "engine.verify_tls=false", rows=10),
                  show_progress=False)
    assert summary["complete"] and summary["ok"] == 10


def test_a_ca_bundle_that_is_not_a_file_is_refused_before_submission(tmp_path):
    with pytest.raises(ConfigError, match="engine.ca_bundle=.*nope.pem is not a file"):
        prepare(endpoint_cfg(tmp_path, "https://127.0.0.1:9", f"engine.ca_bundle={tmp_path / 'nope.pem'}"))


@pytest.mark.parametrize("content", [b"\x30\x82\x01\x0a\x02\x82\x01\x01\x00", b"not a certificate\n",
                                     b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
                         ids=["der", "text", "broken-pem"])
def test_a_ca_bundle_that_is_not_pem_is_refused_before_submission_naming_the_file(tmp_path, content):
    """A CA file Python's ssl cannot load (DER, stray text, a cut PEM) is refused by the checks, naming the key,
    the file and the PEM form wanted, instead of an SSLError from inside the job (issue 19, item 12)."""
    ca = tmp_path / "ca.crt"
    ca.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        prepare(endpoint_cfg(tmp_path, "https://127.0.0.1:9", f"engine.ca_bundle={ca}"))
    message = str(err.value)
    assert f"engine.ca_bundle={ca} is not a PEM certificate file" in message
    assert "-----BEGIN CERTIFICATE-----" in message and "openssl x509 -inform der" in message
