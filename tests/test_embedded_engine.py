"""Tests of the embedded (simulated) engine: a real server, hit over HTTP with requests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from orchestrator.engines.embedded import (
    EOS,
    MARKER,
    VOCABULARY,
    EngineSettings,
    EngineThread,
    simulate,
    tokenize,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"<extra_id_1>User\nQuestion {i}: what is {i} plus {i}?\n<extra_id_1>Assistant\n" for i in range(40)]


@pytest.fixture(scope="module")
def engine():
    with EngineThread(EngineSettings()) as e:
        yield e


def put(engine, body, **kw):
    return requests.put(engine.url + "/generate", json=body, timeout=30, **kw)


def post(engine, body):
    return requests.post(engine.url + "/v1/completions", json=body, timeout=30)


def stats(engine):
    return requests.get(engine.url + "/stats", timeout=30).json()


def generated(sentence_tokens, prompt):
    """The generated tokens of a NeMo response sentence (the tokens after the prompt's)."""
    return sentence_tokens[len(tokenize(prompt)):]


# ---------------------------------------------------------------- simulate


def test_simulate_tokens_concatenate_and_deterministic():
    for prompt in PROMPTS[:10] + ["", "  leading and trailing  ", "a\n\nb\tc"]:
        p_tok, gen = simulate(prompt, 50, [EOS], 7, 512)
        assert "".join(p_tok) == prompt
        assert gen[0] == MARKER and 1 <= len(gen) <= 50
        assert all(t[0] == " " and t[1:] in VOCABULARY for t in gen[1:] if t != EOS)
        assert simulate(prompt, 50, [EOS], 7, 512) == (p_tok, gen)
    assert simulate(PROMPTS[0], 50, [EOS], 7, 512) != simulate(PROMPTS[0], 50, [EOS], 8, 512)


def test_simulate_natural_end_and_truncation():
    for prompt in PROMPTS:
        _, gen = simulate(prompt, 100, ["<extra_id_1>", EOS], 0, 20)  # natural length <= 20 < 100
        assert len(gen) <= 20
        if len(gen) >= 2:
            assert gen[-1] == "<extra_id_1>"
        _, short = simulate(prompt, 3, [EOS], 0, 512)
        long_ = simulate(prompt, 512, [EOS], 0, 512)[1]
        assert len(short) == min(3, len(long_))
        assert short == long_[: len(short)] or len(long_) <= 3
    assert simulate("x", 1, [EOS], 0, 512)[1] == [MARKER]


# ---------------------------------------------------------------- NeMo protocol


def test_nemo_response_shape(engine):
    r = put(engine, {"sentences": PROMPTS[:3], "tokens_to_generate": 24})
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"sentences", "tokens", "token_ids", "offsets", "logprob"}
    assert out["logprob"] is None
    for prompt, sentence, tokens, ids, offsets in zip(
        PROMPTS, out["sentences"], out["tokens"], out["token_ids"], out["offsets"]
    ):
        assert sentence.startswith(prompt)
        assert sentence[len(prompt):].startswith(MARKER)
        assert "".join(tokens) == sentence
        assert len(ids) == len(tokens) and all(isinstance(i, int) for i in ids)
        assert offsets == [sum(map(len, tokens[:k])) for k in range(len(tokens))]
        assert 1 <= len(generated(tokens, prompt)) <= 24


def test_nemo_logprob_and_all_probs(engine):
    out = put(engine, {"sentences": PROMPTS[:2], "compute_logprob": True, "all_probs": True}).json()
    assert "full_logprob" in out
    for prompt, tokens, logprob in zip(PROMPTS, out["tokens"], out["logprob"]):
        assert len(logprob) == len(generated(tokens, prompt))
        assert all(isinstance(x, float) and x < 0 for x in logprob)


def test_nemo_defaults_match_simulate(engine):
    out = put(engine, {"sentences": PROMPTS[:5]}).json()
    for prompt, tokens in zip(PROMPTS, out["tokens"]):
        assert tokens == sum(simulate(prompt, 64, [EOS], 0, 512), [])


def test_nemo_determinism_and_seed(engine):
    body = {"sentences": PROMPTS[:8], "tokens_to_generate": 32, "random_seed": 5}
    a, b = put(engine, body).json(), put(engine, body).json()
    c = put(engine, {**body, "random_seed": 6}).json()
    assert a == b
    assert all(x != y for x, y in zip(a["sentences"], c["sentences"]))
    with EngineThread(EngineSettings(seed=1)) as other:
        d = put(other, {**body, "random_seed": None}).json()
        e = put(engine, {**body, "random_seed": None}).json()
        assert d != e
        assert put(other, {**body, "random_seed": 1}).json() == d


def test_nemo_tokens_to_generate(engine):
    out = put(engine, {"sentences": PROMPTS, "tokens_to_generate": 1}).json()
    assert out["sentences"] == [p + MARKER for p in PROMPTS]
    out = put(engine, {"sentences": PROMPTS, "tokens_to_generate": 5}).json()
    lengths = [len(generated(t, p)) for p, t in zip(PROMPTS, out["tokens"])]
    assert max(lengths) == 5 and all(1 <= n <= 5 for n in lengths)


def test_nemo_end_strings_stop_generation(engine):
    word = "the"
    free = put(engine, {"sentences": PROMPTS, "tokens_to_generate": 400, "end_strings": []}).json()
    hits = 0
    for prompt, tokens in zip(PROMPTS, free["tokens"]):
        gen = generated(tokens, prompt)
        if " " + word in gen[:-1]:
            hits += 1
            cut = gen.index(" " + word) + 1
            out = put(engine, {"sentences": [prompt], "tokens_to_generate": 400, "end_strings": ["zz", word]}).json()
            assert generated(out["tokens"][0], prompt) == gen[:cut]
            assert out["sentences"][0].endswith(" the")
    assert hits >= 5


def test_nemo_natural_end_emits_first_end_string(engine):
    ends = ["<extra_id_1>", "\x11", EOS]
    out = put(engine, {"sentences": PROMPTS[:10], "tokens_to_generate": 600, "end_strings": ends}).json()
    for prompt, sentence, tokens in zip(PROMPTS, out["sentences"], out["tokens"]):
        gen = generated(tokens, prompt)
        assert len(gen) == 1 or (gen[-1] == "<extra_id_1>" and sentence.endswith("<extra_id_1>"))
    default = put(engine, {"sentences": PROMPTS[:10], "tokens_to_generate": 600}).json()
    assert sum(s.endswith(EOS) for s in default["sentences"]) >= 9


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("tokens_to_generate", 0, "tokens_to_generate must be an integer greater than 0"),
        ("tokens_to_generate", True, "tokens_to_generate must be an integer greater than 0"),
        ("tokens_to_generate", 1.5, "tokens_to_generate must be an integer greater than 0"),
        ("tokens_to_generate", "8", "tokens_to_generate must be an integer greater than 0"),
        ("temperature", 0, "temperature must be a positive number less than or equal to 100.0"),
        ("temperature", 100.5, "temperature must be a positive number less than or equal to 100.0"),
        ("temperature", "1", "temperature must be a positive number less than or equal to 100.0"),
        ("temperature", True, "temperature must be a positive number less than or equal to 100.0"),
        ("add_BOS", 1, "add_BOS must be a boolean value"),
        ("greedy", "true", "greedy must be a boolean value"),
        ("all_probs", 0, "all_probs must be a boolean value"),
        ("compute_logprob", None, "compute_logprob must be a boolean value"),
        ("top_k", -1, "top_k must be a positive integer number"),
        ("top_k", "5", "top_k must be a positive integer number"),
        ("top_p", 1.01, "top_p must be a positive number less than or equal to 1.0"),
        ("top_p", -0.1, "top_p must be a positive number less than or equal to 1.0"),
        ("repetition_penalty", 0.99, "repetition_penalty must be a positive number no less than 1.0"),
        ("repetition_penalty", None, "repetition_penalty must be a positive number no less than 1.0"),
        ("end_strings", "<|endoftext|>", "expect end_strings to be a list of strings"),
        ("end_strings", ["a", 1], "expect end_strings to be a list of strings"),
        ("min_tokens_to_generate", -1, "min_tokens_to_generate must be an integer no less than 0"),
        ("min_tokens_to_generate", 2.0, "min_tokens_to_generate must be an integer no less than 0"),
        ("random_seed", -1, "random_seed must be a positive integer number or None"),
        ("random_seed", "7", "random_seed must be a positive integer number or None"),
        ("random_seed", 1.0, "random_seed must be a positive integer number or None"),
        ("sentences", "just a string", "sentences is not a list of strings"),
        ("sentences", ["ok", 3], "sentences is not a list of strings"),
        ("sentences", None, "sentences is not a list of strings"),
    ],
)
def test_nemo_validation_errors(engine, field, value, message):
    r = put(engine, {"sentences": ["hello"], field: value})
    assert r.status_code == 200
    assert r.json() == message


@pytest.mark.parametrize(
    "field,value",
    [
        ("tokens_to_generate", 1), ("temperature", 100.0), ("temperature", 0.01), ("temperature", 2),
        ("add_BOS", True), ("greedy", True), ("top_k", 0), ("top_k", 40), ("top_p", 0.0), ("top_p", 1),
        ("repetition_penalty", 1), ("repetition_penalty", 1.2), ("end_strings", []),
        ("min_tokens_to_generate", 0), ("min_tokens_to_generate", 5), ("random_seed", None),
        ("random_seed", 0), ("random_seed", 1234), ("all_probs", False), ("compute_logprob", False),
    ],
)
def test_nemo_valid_values_accepted(engine, field, value):
    r = put(engine, {"sentences": ["hello"], field: value})
    assert r.status_code == 200
    assert isinstance(r.json(), dict) and r.json()["sentences"][0].startswith("hello" + MARKER)


def test_nemo_missing_sentences_and_bad_bodies(engine):
    assert put(engine, {"tokens_to_generate": 4}).json() == "sentences is not a list of strings"
    for raw in (b"[1, 2]", b"not json", b'"text"', b""):
        r = requests.put(engine.url + "/generate", data=raw, timeout=30)
        assert r.status_code == 200 and isinstance(r.json(), str)


def test_nemo_sentence_limit(engine):
    ok = put(engine, {"sentences": ["p"] * 128, "tokens_to_generate": 2})
    assert ok.status_code == 200 and len(ok.json()["sentences"]) == 128
    too_many = put(engine, {"sentences": ["p"] * 129, "tokens_to_generate": 2})
    assert too_many.status_code == 400
    assert too_many.json() == "Maximum number of sentences is 128"


def test_nemo_route_only_put(engine):
    assert requests.get(engine.url + "/generate", timeout=30).status_code == 405
    assert requests.post(engine.url + "/generate", json={"sentences": ["a"]}, timeout=30).status_code == 405


# ---------------------------------------------------------------- OpenAI protocol


def test_openai_completion_fields(engine):
    r = post(engine, {"model": "mock", "prompt": PROMPTS[0], "max_tokens": 5})
    assert r.status_code == 200
    out = r.json()
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert out["model"] == "mock" and isinstance(out["created"], int)
    (choice,) = out["choices"]
    _, gen = simulate(PROMPTS[0], 5, [EOS], 0, 512)
    assert choice == {"index": 0, "text": "".join(gen), "logprobs": None, "finish_reason": "length"}
    assert choice["text"].startswith(MARKER)
    n_prompt = len(tokenize(PROMPTS[0]))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}


def test_openai_list_prompt_natural_stop_and_default_max_tokens(engine):
    out = post(engine, {"prompt": PROMPTS[:6], "max_tokens": 1000, "seed": 3}).json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    completion = 0
    for prompt, choice in zip(PROMPTS, out["choices"]):
        _, gen = simulate(prompt, 1000, [EOS], 3, 512)
        assert choice["finish_reason"] == "stop"
        assert EOS not in choice["text"] and not choice["text"].startswith(prompt[:5])
        if len(gen) > 1:
            assert gen[-1] == EOS and choice["text"] == "".join(gen[:-1])
            completion += len(gen) - 1
        else:
            completion += 1
    assert out["usage"]["completion_tokens"] == completion
    default = post(engine, {"prompt": "hi"}).json()
    assert default["usage"]["completion_tokens"] <= 16


def test_openai_stop_strings(engine):
    hits = 0
    for prompt in PROMPTS:
        _, gen = simulate(prompt, 200, ["answer", EOS], 0, 512)
        text = "".join(gen)
        if gen[-1] != " answer" or "answer" in text[:-6]:
            continue
        hits += 1
        out = post(engine, {"prompt": prompt, "max_tokens": 200, "stop": ["answer"]}).json()
        (choice,) = out["choices"]
        assert choice["finish_reason"] == "stop"
        assert choice["text"] == text[: -len("answer")]
        assert out["usage"]["completion_tokens"] == len(gen) - 1
        assert post(engine, {"prompt": prompt, "max_tokens": 200, "stop": "answer"}).json()["choices"] == [choice]
    assert hits >= 1


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": ["a", 2]}, 400, "prompt"),
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "a", "max_tokens": "4"}, 400, "max_tokens"),
        ({"prompt": "a", "n": 2}, 400, "n"),
        ({"prompt": "a", "stop": 5}, 400, "stop"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"prompt": "a", "seed": "x"}, 400, "seed"),
        ({"prompt": "a", "model": "other"}, 404, "model"),
    ],
)
def test_openai_errors(engine, body, status, param):
    r = post(engine, body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and err["param"] == param and err["message"]
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


def test_openai_accepts_nulls_and_sampling_fields(engine):
    body = {"prompt": "a", "max_tokens": 3, "temperature": 0, "top_p": 1.0, "top_k": -1, "stop": None,
            "seed": None, "n": 1, "min_tokens": 0, "repetition_penalty": 1.0, "logprobs": None}
    assert post(engine, body).status_code == 200


def test_openai_prompt_too_long_and_bad_body():
    with EngineThread(EngineSettings(max_model_len=8)) as e:
        assert post(e, {"prompt": "one two three four five six seven"}).status_code == 200
        r = post(e, {"prompt": "one two three four five six seven eight nine"})
        assert r.status_code == 400 and "maximum context length is 8" in r.json()["error"]["message"]
        r = requests.post(e.url + "/v1/completions", data=b"[]", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_models_and_health(engine):
    models = requests.get(engine.url + "/v1/models", timeout=30).json()
    assert models["object"] == "list"
    (model,) = models["data"]
    assert model["id"] == "mock" and model["object"] == "model" and model["max_model_len"] == 4096
    assert model["owned_by"] == "orchestrator" and isinstance(model["created"], int)
    health = requests.get(engine.url + "/health", timeout=30)
    assert health.status_code == 200 and health.content == b""


# ---------------------------------------------------------------- stats, errors, latency model


def test_stats_counters():
    with EngineThread(EngineSettings(model_name="m")) as e:
        assert stats(e)["requests"] == 0
        put(e, {"sentences": ["a", "b", "c"]})
        put(e, {"sentences": ["d", "e", "f"]})
        post(e, {"prompt": ["g", "h"]})
        put(e, {"sentences": ["x"], "top_p": 2})
        s = stats(e)
        assert (s["requests"], s["prompts"], s["errors"], s["bad_requests"]) == (4, 8, 0, 1)
        assert s["busy_s"] == 0.0 and s["generated_tokens"] > 8


def test_error_rate_one_and_zero():
    with EngineThread(EngineSettings(error_rate=1.0)) as e:
        r = put(e, {"sentences": ["a"]})
        assert r.status_code == 500 and r.json() == {"error": "simulated engine failure"}
        r = post(e, {"prompt": "a"})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "simulated engine failure", "type": "server_error",
                                      "param": None, "code": 500}}
        assert stats(e)["errors"] == 2 and stats(e)["prompts"] == 0
    with EngineThread(EngineSettings(error_rate=0.0)) as e:
        assert all(put(e, {"sentences": ["a"], "tokens_to_generate": 2}).status_code == 200 for _ in range(30))
        assert all(post(e, {"prompt": "a", "max_tokens": 2}).status_code == 200 for _ in range(30))
        assert stats(e)["errors"] == 0


def test_error_rate_is_deterministic():
    runs = []
    for _ in range(2):
        with EngineThread(EngineSettings(error_rate=0.5, seed=11)) as e:
            runs.append([put(e, {"sentences": ["a"], "tokens_to_generate": 2}).status_code for _ in range(40)])
    assert runs[0] == runs[1] and {200, 500} == set(runs[0])


def concurrently(n, fn):
    threads = [threading.Thread(target=fn) for _ in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def test_nemo_route_serialises_generations():
    with EngineThread(EngineSettings(request_latency_s=0.3)) as e:
        codes = []
        elapsed = concurrently(2, lambda: codes.append(put(e, {"sentences": ["a", "b"]}).status_code))
        s = stats(e)
        assert codes == [200, 200]
        assert s["peak_active"] == 1 and s["peak_waiting"] >= 1
        assert s["busy_s"] == pytest.approx(0.6)
        assert elapsed >= 0.58


def test_nemo_batch_time_uses_longest_sentence():
    with EngineThread(EngineSettings(token_latency_s=0.01)) as e:
        out = put(e, {"sentences": PROMPTS[:4], "tokens_to_generate": 20}).json()
        longest = max(len(generated(t, p)) for p, t in zip(PROMPTS, out["tokens"]))
        assert stats(e)["busy_s"] == pytest.approx(longest * 0.01)


def test_openai_route_capacity():
    with EngineThread(EngineSettings(request_latency_s=0.4, capacity=2)) as e:
        codes = []
        elapsed = concurrently(3, lambda: codes.append(post(e, {"prompt": "a", "max_tokens": 2}).status_code))
        s = stats(e)
        assert codes == [200] * 3
        assert s["peak_active"] == 2 and s["peak_waiting"] >= 1
        assert s["busy_s"] == pytest.approx(3 * 0.4 / 2)
        assert elapsed >= 0.78  # the third waited for a free slot


# ---------------------------------------------------------------- command line


def test_subprocess_with_port_file(tmp_path):
    port_file = tmp_path / "engine.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.engines.embedded", "--port", "0", "--port-file", str(port_file),
         "--model-name", "cli-model", "--seed", "3"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "engine did not write its port file"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert requests.get(url + "/health", timeout=10).status_code == 200
        assert requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == "cli-model"
        out = requests.put(url + "/generate", json={"sentences": ["hi"], "tokens_to_generate": 9}, timeout=10).json()
        assert out["tokens"][0] == sum(simulate("hi", 9, [EOS], 3, 512), [])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not list(tmp_path.glob("*.tmp"))
