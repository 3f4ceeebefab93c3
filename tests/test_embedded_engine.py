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

from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import (
    EOS,
    MARKER,
    TURN_END,
    VOCABULARY,
    EngineSettings,
    generate_text,
    is_special,
    render_chat,
    simulate,
    token_id,
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


def chat(engine, body):
    return requests.post(engine.url + "/v1/chat/completions", json=body, timeout=30)


def infer(engine, body, model="mock"):
    return requests.post(f"{engine.url}/v2/models/{model}/infer", json=body, timeout=30)


def tensor(name, datatype, data, shape=None):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data), 1], "data": data}


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
    for tokens, logprob in zip(out["tokens"], out["logprob"]):
        # NeMo's sample_sequence_batch: log_softmax gathered at tokens[1:], the prompt's and the generation's
        assert len(logprob) == len(tokens) - 1
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
    # vLLM's CompletionResponseChoice: stop_reason is the stop string or token id that fired, else null
    assert choice == {"index": 0, "text": "".join(gen), "logprobs": None, "finish_reason": "length",
                      "stop_reason": None}
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
        ({"prompt": "a", "n": 0}, 400, "n"),  # n >= 1 is served: choice i with seed + i (test_rollouts.py)
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


# ---------------------------------------------------------------- tokenizer, special tokens


CARD_ENDS = ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]  # the 340B card's end strings


def test_tokenizer_keeps_special_tokens_whole():
    text = "<extra_id_0>System\n\n<extra_id_1>User\nIs a<b? x<extra_id_1>y <|endoftext|>"
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert tokens[:5] == ["<extra_id_0>", "System", "\n\n", "<extra_id_1>", "User"]
    assert "<extra_id_1>" in tokens and "<|endoftext|>" in tokens and " a<b?" in tokens
    assert is_special("<extra_id_1>") and is_special(EOS) and not is_special("User") and not is_special("<b>")
    specials = {token_id(t) for t in ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>", EOS)}
    assert not specials & {token_id(t) for t in (MARKER, "\n", "User", *(" " + w for w in VOCABULARY))}


def test_simulate_chat_turn_end_is_newline_then_extra_id_1():
    ended = 0
    for prompt in PROMPTS:
        _, gen = simulate(prompt, 600, CARD_ENDS, 0, 512)  # natural length <= 512 < 600: always ends its turn
        if len(gen) >= 3:
            ended += 1
            assert gen[-2:] == ["\n", TURN_END]
        # without <extra_id_1> among the end strings the turn ends with end_strings[0], as before
        assert simulate(prompt, 600, [EOS, "\x11"], 0, 512)[1][-1] in (EOS, MARKER)
    assert ended >= 35


def test_generate_text_special_tokens_skipped_or_kept():
    prompt = next(p for p in PROMPTS if len(simulate(p, 600, CARD_ENDS, 0, 512)[1]) >= 3)
    _, gen = simulate(prompt, 600, CARD_ENDS, 0, 512)
    answer = "".join(gen[:-1])  # up to the newline before <extra_id_1>
    kept = generate_text(prompt, 600, CARD_ENDS, 0, 512, skip_special_tokens=False)
    assert (kept.text, kept.finish_reason, kept.stop_reason) == (answer, "stop", TURN_END)
    assert kept.completion_tokens == len(gen) - 1
    included = generate_text(prompt, 600, CARD_ENDS, 0, 512, skip_special_tokens=False, include_stop_str=True)
    assert included.text == answer + TURN_END and included.completion_tokens == len(gen)
    skipped = generate_text(prompt, 600, CARD_ENDS, 0, 512, skip_special_tokens=True)
    assert skipped.text.startswith(answer + "User\n") and TURN_END not in skipped.text
    assert len(skipped.text) > len(answer) + 6 and skipped.stop_reason is None and skipped.finish_reason == "stop"
    assert skipped.completion_tokens > len(gen)
    by_id = generate_text(prompt, 600, CARD_ENDS, 0, 512, skip_special_tokens=True,
                          stop_token_ids={token_id(TURN_END)})
    assert (by_id.text, by_id.stop_reason) == (answer, token_id(TURN_END))
    short = generate_text(prompt, len(gen) + 2, CARD_ENDS, 0, 512, skip_special_tokens=True)
    assert short.finish_reason == "length" and short.text == answer + "User\n"


def test_nemo_route_keeps_special_tokens_and_stops_on_them(engine):
    out = put(engine, {"sentences": PROMPTS[:10], "tokens_to_generate": 600, "end_strings": CARD_ENDS}).json()
    ended = 0
    for prompt, sentence in zip(PROMPTS, out["sentences"]):
        generated_text = sentence[len(prompt):]
        assert generated_text.count(TURN_END) <= 1 and "User\n" not in generated_text
        ended += generated_text.endswith("\n" + TURN_END)
    assert ended >= 8


# ---------------------------------------------------------------- OpenAI: special tokens, context length


def test_openai_skip_special_tokens_default_runs_past_extra_id_1(engine):
    """vLLM drops special tokens from the text by default, so the stop string <extra_id_1> never
    matches and the model runs on into a made-up next turn; skip_special_tokens=false stops."""
    for prompt in PROMPTS[:8]:
        body = {"prompt": prompt, "max_tokens": 600, "stop": CARD_ENDS}
        default = post(engine, body).json()["choices"][0]
        kept = post(engine, {**body, "skip_special_tokens": False}).json()["choices"][0]
        assert default["text"] == generate_text(prompt, 600, CARD_ENDS, 0, 512, skip_special_tokens=True).text
        assert kept["text"] == generate_text(prompt, 600, CARD_ENDS, 0, 512, skip_special_tokens=False).text
        assert TURN_END not in default["text"] and TURN_END not in kept["text"]
        if kept["text"].endswith("\n"):  # the model ended its turn
            assert "\nUser\n" in default["text"] and default["text"].startswith(kept["text"])
            assert kept["finish_reason"] == default["finish_reason"] == "stop"
    ids = post(engine, {"prompt": PROMPTS[0], "max_tokens": 600, "stop_token_ids": [token_id(TURN_END)]}).json()
    kept = generate_text(PROMPTS[0], 600, CARD_ENDS, 0, 512, skip_special_tokens=False)
    assert ids["choices"][0]["text"] == kept.text


def test_openai_context_length_errors_are_vllms():
    with EngineThread(EngineSettings(max_model_len=8)) as e:
        r = post(e, {"prompt": "one two three four five six seven eight nine ten"})
        assert r.status_code == 400
        assert r.json() == {"error": {
            "message": "This model's maximum context length is 8 tokens. However, your prompt contains at least 9 "
                       "input tokens, which exceeds this limit even without any output tokens. Please reduce the "
                       "length of the input prompt. (parameter=input_tokens, value=9)",
            "type": "BadRequestError", "param": "input_tokens", "code": 400}}
        r = post(e, {"prompt": "one two three four five six seven eight"})  # exactly 8: no room left
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                                     "type": "BadRequestError", "param": "max_tokens", "code": 400}
        r = post(e, {"prompt": "one two three four five six", "max_tokens": 50})  # shortened silently
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        r = chat(e, {"messages": [{"role": "user", "content": "one two three"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_tokens"
        message = r.json()["error"]["message"]
        assert "maximum context length is 8 tokens. However, your prompt contains at least 9" in message


# ---------------------------------------------------------------- OpenAI chat


def test_render_chat_nemotron_format():
    assert render_chat([{"role": "user", "content": "Hi"}]) == \
        "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": [{"type": "text", "text": "Q2"}]}]
    assert render_chat(turns) == ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\nA1\n"
                                  "<extra_id_1>User\nQ2\n<extra_id_1>Assistant\n")
    assert render_chat(turns, add_generation_prompt=False).endswith("<extra_id_1>User\nQ2\n")


def test_chat_completion_shape(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    r = chat(engine, {"model": "mock", "messages": messages, "max_tokens": 5})
    assert r.status_code == 200
    out = r.json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == "mock" and isinstance(out["created"], int)
    (choice,) = out["choices"]
    prompt = render_chat(messages)
    expected = generate_text(prompt, 5, [], 0, 512, skip_special_tokens=True)
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == expected.text
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    n_prompt = len(tokenize(prompt))
    assert {k: out["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == \
        {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}


def test_chat_generates_like_completions_on_the_rendered_prompt(engine):
    for i in range(6):
        messages = [{"role": "user", "content": f"Question {i}"}]
        body = {"messages": messages, "stop": ["answer"], "seed": 4, "max_completion_tokens": 300, "max_tokens": 2}
        c = chat(engine, body).json()
        p = post(engine, {"prompt": render_chat(messages), "stop": ["answer"], "seed": 4, "max_tokens": 300}).json()
        assert c["choices"][0]["message"]["content"] == p["choices"][0]["text"]  # max_completion_tokens wins
        assert c["choices"][0]["finish_reason"] == p["choices"][0]["finish_reason"]
        assert c["usage"]["completion_tokens"] == p["usage"]["completion_tokens"]
        if c["choices"][0]["stop_reason"] is not None:
            assert c["choices"][0]["stop_reason"] == "answer"


def test_chat_default_max_tokens_is_rest_of_context(engine):
    messages = [{"role": "user", "content": "Tell me everything."}]
    out = chat(engine, {"messages": messages}).json()
    expected = generate_text(render_chat(messages), 4096, [], 0, 512, skip_special_tokens=True)
    assert out["choices"][0]["message"]["content"] == expected.text and out["choices"][0]["finish_reason"] == "stop"


def test_chat_special_tokens_and_stop(engine):
    messages = [{"role": "user", "content": "Question 3"}]
    prompt = render_chat(messages)
    base = {"messages": messages, "max_tokens": 600, "stop": CARD_ENDS}
    default = chat(engine, base).json()["choices"][0]
    kept = chat(engine, {**base, "skip_special_tokens": False}).json()["choices"][0]
    included = chat(engine, {**base, "skip_special_tokens": False, "include_stop_str_in_output": True}).json()
    assert default["message"]["content"] == generate_text(prompt, 600, CARD_ENDS, 0, 512,
                                                          skip_special_tokens=True).text
    assert "\nUser\n" in default["message"]["content"] and default["stop_reason"] is None
    assert kept["stop_reason"] == TURN_END and kept["message"]["content"].endswith("\n")
    assert included["choices"][0]["message"]["content"] == kept["message"]["content"] + TURN_END


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"messages": None}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": ["hi"]}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
        ({"messages": [{"role": "user"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400, "messages"),
        ({"n": 0}, 400, "n"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_completion_tokens": "5"}, 400, "max_completion_tokens"),
        ({"temperature": -1}, 400, "temperature"),
        ({"skip_special_tokens": "no"}, 400, "skip_special_tokens"),
        ({"stop_token_ids": ["1"]}, 400, "stop_token_ids"),
        ({"stop": 3}, 400, "stop"),
        ({"model": "other"}, 404, "model"),
    ],
)
def test_chat_errors(engine, body, status, param):
    r = chat(engine, {"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and err["param"] == param and err["message"]
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


def test_chat_accepts_vllm_fields_and_bad_body(engine):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, "top_p": 1.0,
            "top_k": -1, "seed": 1, "stop": None, "n": 1, "min_tokens": 0, "repetition_penalty": 1.0,
            "skip_special_tokens": True, "stop_token_ids": [], "logprobs": False, "max_completion_tokens": None}
    assert chat(engine, body).status_code == 200
    r = requests.post(engine.url + "/v1/chat/completions", data=b"[]", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert chat(engine, {"messages": [{"role": "user", "content": "hi"}], "model": "other"}).json()["error"][
        "message"] == "The model `other` does not exist. Valid aliases: mock."


# ---------------------------------------------------------------- vLLM /tokenize


def test_tokenize_prompt_and_messages(engine):
    prompt = PROMPTS[0]
    r = requests.post(engine.url + "/tokenize", json={"model": "mock", "prompt": prompt}, timeout=30)
    assert r.status_code == 200
    expected = tokenize(prompt)
    assert r.json() == {"count": len(expected), "max_model_len": 4096, "tokens": [token_id(t) for t in expected],
                        "token_strs": None}
    messages = [{"role": "user", "content": "Hi"}]
    out = requests.post(engine.url + "/tokenize", json={"messages": messages, "return_token_strs": True},
                        timeout=30).json()
    assert out["token_strs"] == tokenize(render_chat(messages)) and out["count"] == len(out["tokens"])
    no_gen = requests.post(engine.url + "/tokenize", json={"messages": messages, "add_generation_prompt": False},
                           timeout=30).json()
    assert no_gen["count"] == out["count"] - 3  # <extra_id_1>, Assistant, \n
    special = requests.post(engine.url + "/tokenize", json={"prompt": TURN_END}, timeout=30).json()
    assert special["tokens"] == [token_id(TURN_END)]  # what a client puts in stop_token_ids
    assert chat(engine, {"messages": messages, "max_tokens": 7}).json()["usage"]["prompt_tokens"] == out["count"]


@pytest.mark.parametrize(
    "body,status,param",
    [({}, 400, "prompt"), ({"prompt": 3}, 400, "prompt"), ({"messages": []}, 400, "messages"),
     ({"prompt": "a", "model": "x"}, 404, "model"),
     ({"prompt": "a", "return_token_strs": "y"}, 400, "return_token_strs")],
)
def test_tokenize_errors(engine, body, status, param):
    r = requests.post(engine.url + "/tokenize", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == param


# ---------------------------------------------------------------- routes: one protocol family per server


def test_openai_only_server_looks_like_vllm():
    with EngineThread(EngineSettings(routes="openai")) as e:
        r = put(e, {"sentences": ["a"]})
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
        r = requests.get(e.url + "/v2/health/ready", timeout=30)
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
        r = requests.get(e.url + "/v1/completions", timeout=30)
        assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}
        assert post(e, {"prompt": "a", "max_tokens": 2}).status_code == 200
        assert requests.get(e.url + "/health", timeout=30).status_code == 200
        assert requests.get(e.url + "/stats", timeout=30).status_code == 200


def test_triton_only_and_nemo_only_servers():
    with EngineThread(EngineSettings(routes="triton")) as e:
        for method, path in (("PUT", "/generate"), ("POST", "/v1/completions"), ("GET", "/health")):
            r = requests.request(method, e.url + path, json={}, timeout=30)
            assert r.status_code == 404 and r.json() == {"error": "Not Found"}
        assert requests.get(e.url + "/v2/health/ready", timeout=30).status_code == 200
    with EngineThread(EngineSettings(routes="nemo")) as e:
        assert put(e, {"sentences": ["a"], "tokens_to_generate": 2}).status_code == 200
        for path in ("/v1/models", "/health", "/v2/health/ready"):
            assert requests.get(e.url + path, timeout=30).status_code == 404
    with EngineThread(EngineSettings(routes=" nemo , openai ")) as e:
        assert put(e, {"sentences": ["a"], "tokens_to_generate": 2}).status_code == 200
        assert requests.get(e.url + "/v2/health/ready", timeout=30).json() == {"detail": "Not Found"}


@pytest.mark.parametrize("routes", ["", "nemo,grpc", "openai;triton"])
def test_unknown_routes_setting_is_refused(routes):
    with pytest.raises(ValueError, match="routes must be"):
        EngineThread(EngineSettings(routes=routes)).start()


# ---------------------------------------------------------------- Triton / KServe v2


NEMO_INPUTS = [
    {"name": "prompts", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "max_output_len", "datatype": "INT64", "shape": [-1, -1]},
    {"name": "top_k", "datatype": "INT64", "shape": [-1, -1]},
    {"name": "top_p", "datatype": "FP32", "shape": [-1, -1]},
    {"name": "temperature", "datatype": "FP32", "shape": [-1, -1]},
    {"name": "random_seed", "datatype": "INT64", "shape": [-1, -1]},
    {"name": "stop_words_list", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "bad_words_list", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "no_repeat_ngram_size", "datatype": "FP32", "shape": [-1, -1]},
    {"name": "task_id", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "lora_uids", "datatype": "BYTES", "shape": [-1, -1]},
]


def test_triton_health_and_server_metadata(engine):
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/mock/ready", "/v2/models/mock/versions/1/ready"):
        r = requests.get(engine.url + path, timeout=30)
        assert r.status_code == 200 and r.content == b"" and r.headers["Content-Type"] == "text/plain"
    meta = requests.get(engine.url + "/v2", timeout=30).json()
    assert meta == {"name": "triton", "version": "2.51.0", "extensions": [  # tritonserver 2.51.0 (PyTriton 0.7.0)
        "classification", "sequence", "model_repository", "model_repository(unload_dependents)", "schedule_policy",
        "model_configuration", "system_shared_memory", "cuda_shared_memory", "binary_tensor_data", "parameters",
        "statistics", "trace", "logging"]}
    r = requests.post(engine.url + "/v2/health/ready", timeout=30)
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}


def test_triton_model_metadata_and_config(engine):
    r = requests.get(engine.url + "/v2/models/mock", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"name": "mock", "versions": ["1"], "platform": "python", "inputs": NEMO_INPUTS,
                        "outputs": [{"name": "outputs", "datatype": "BYTES", "shape": [-1, -1]}]}
    assert requests.get(engine.url + "/v2/models/mock/versions/1", timeout=30).json() == r.json()
    config = requests.get(engine.url + "/v2/models/mock/config", timeout=30).json()
    assert config["max_batch_size"] == 8 and config["backend"] == "python"
    assert [(i["name"], i["optional"]) for i in config["input"]][:2] == [("prompts", False), ("max_output_len", True)]
    assert config["input"][0]["data_type"] == "TYPE_STRING" and config["input"][1]["data_type"] == "TYPE_INT64"
    # the keys (in order) and the tensors' entries of tritonserver 2.51's answer for a PyTriton model
    assert list(config) == ["name", "platform", "backend", "runtime", "version_policy", "max_batch_size", "input",
                            "output", "batch_input", "batch_output", "optimization", "dynamic_batching",
                            "instance_group", "default_model_filename", "cc_model_filenames", "metric_tags",
                            "parameters", "model_warmup"]
    assert config["input"][0] == {"name": "prompts", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [-1],
                                  "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False,
                                  "is_non_linear_format_io": False}
    assert config["output"] == [{"name": "outputs", "data_type": "TYPE_STRING", "dims": [-1], "label_filename": "",
                                 "is_shape_tensor": False, "is_non_linear_format_io": False}]
    assert config["dynamic_batching"]["preferred_batch_size"] == [8]
    assert [(g["name"], g["kind"], g["count"]) for g in config["instance_group"]] == [("mock_0", "KIND_CPU", 1)]


def test_triton_unknown_model_and_version(engine):
    for method, path in (("GET", "/v2/models/other"), ("GET", "/v2/models/other/config"),
                         ("POST", "/v2/models/other/infer"), ("POST", "/v2/models/other/generate")):
        r = requests.request(method, engine.url + path, json={"inputs": []}, timeout=30)
        assert r.status_code == 404 and r.json() == {"error": "Request for unknown model: 'other' is not found"}
    for path in ("/v2/models/other/ready", "/v2/models/mock/versions/2/ready"):  # the ready route says 400
        r = requests.get(engine.url + path, timeout=30)
        assert r.status_code == 400 and r.json() == {"error": "Model version not ready"}
    r = requests.get(engine.url + "/v2/models/mock/versions/2", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Request for unknown model: 'mock' version 2 is not found"}
    for path in ("/v2/models/mock/nothing", "/v2/nothing"):
        r = requests.get(engine.url + path, timeout=30)
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = requests.get(engine.url + "/v2/models/mock/infer", timeout=30)
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}


def test_triton_infer_batch(engine):
    prompts = PROMPTS[:3]
    body = {"inputs": [tensor("prompts", "BYTES", prompts), tensor("max_output_len", "INT64", [40] * 3),
                       tensor("top_k", "INT64", [1] * 3), tensor("top_p", "FP32", [0.0] * 3),
                       tensor("temperature", "FP32", [1.0] * 3), tensor("random_seed", "INT64", [7] * 3)]}
    r = infer(engine, body)
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"model_name", "model_version", "outputs"}
    assert (out["model_name"], out["model_version"]) == ("mock", "1")
    (output,) = out["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("outputs", "BYTES", [3, 1])
    for prompt, text in zip(prompts, output["data"]):
        assert text == generate_text(prompt, 40, [], 7, 512, skip_special_tokens=False).text
        assert text.startswith(MARKER)  # no echo of the prompt
    assert infer(engine, body).json() == out
    default = infer(engine, {"inputs": [tensor("prompts", "BYTES", ["hello"])]}).json()["outputs"][0]["data"]
    assert default == [generate_text("hello", 64, [], 0, 512, skip_special_tokens=False).text]


def test_triton_infer_stop_words_keep_special_tokens(engine):
    """NeMo's stop_words_list has one word a row (str_ndarray2list squeezes the last axis), each row
    its own (not the first row's, unlike the sampling inputs)."""
    prompts = PROMPTS[:4]
    stop = ["<extra_id_1>", "<extra_id_1>", "<extra_id_1>", "\x11"]
    body = {"inputs": [tensor("prompts", "BYTES", prompts), tensor("max_output_len", "INT64", [600] * 4),
                       tensor("stop_words_list", "BYTES", stop)]}
    data = infer(engine, body).json()["outputs"][0]["data"]
    for prompt, word, text in zip(prompts, stop, data):
        assert text == generate_text(prompt, 600, [word], 0, 512, skip_special_tokens=False,
                                     include_stop_str=True).text
        assert "User\n" not in text
    assert [text.endswith("\n" + TURN_END) for text in data] == [True, True, True, False]  # the card splits on
    assert data[3].endswith("\x11")                                                        # "\n<extra_id_1>"


def test_triton_sampling_inputs_are_first_value(engine):
    """NeMo's triton_infer_fn reads max_output_len and the other sampling inputs from the first row."""
    body = {"inputs": [tensor("prompts", "BYTES", PROMPTS[:2]), tensor("max_output_len", "INT64", [3, 50])]}
    data = infer(engine, body).json()["outputs"][0]["data"]
    assert data == [generate_text(p, 3, [], 0, 512, skip_special_tokens=False).text for p in PROMPTS[:2]]


def test_triton_request_id_is_echoed(engine):
    out = infer(engine, {"id": "req-7", "inputs": [tensor("prompts", "BYTES", ["a"])]}).json()
    assert out["id"] == "req-7" and out["model_name"] == "mock"
    r = infer(engine, {"id": "req-8", "inputs": [tensor("top_k", "FP32", [1.0])]})
    assert r.status_code == 400 and r.json()["error"].startswith("[request id: req-8] ")


P1 = tensor("prompts", "BYTES", ["hi"])
SHAPE_NOTE = ("NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be prepended "
              "to each input shape. If you want to specify the full shape including the batch dim in your input "
              "dims config, try setting max_batch_size to zero. See the model configuration docs for more info on "
              "max_batch_size.")


@pytest.mark.parametrize(
    "inputs,status,error",
    [
        ([P1, tensor("foo", "INT64", [1])], 400, "unexpected inference input 'foo' for model 'mock'"),
        ([], 400,
         "[request id: <id_unknown>] expected number of inputs between 1 and 11 but got 0 inputs for model 'mock'. "
         "Got input(s) [], but missing required input(s) ['prompts']. Please provide all required input(s)."),
        ([P1, tensor("max_output_len", "INT64", [8], shape=[1])], 400,
         "[request id: <id_unknown>] unexpected shape for input 'max_output_len' for model 'mock'. Expected [-1,-1], "
         f"got [1]. {SHAPE_NOTE}"),
        ([P1, tensor("max_output_len", "INT32", [8])], 400,
         "[request id: <id_unknown>] inference input 'max_output_len' data-type is 'INT32', but model 'mock' "
         "expects 'INT64'"),
        # Triton's map of the inputs goes newest first: its checks name the last bad input
        ([P1, tensor("top_k", "INT64", [1, 1])], 400,
         "[request id: <id_unknown>] input 'prompts' batch size does not match other inputs for 'mock'"),
        ([tensor("prompts", "BYTES", ["a", "b"]), tensor("top_k", "INT64", [1, 1]),
          tensor("random_seed", "INT64", [1])], 400,
         "[request id: <id_unknown>] input 'top_k' batch size does not match other inputs for 'mock'"),
        ([P1, tensor("aaa", "INT64", [1]), tensor("bbb", "INT64", [1])], 400,
         "unexpected inference input 'bbb' for model 'mock'"),
        ([P1, tensor("top_k", "INT32", [1]), tensor("random_seed", "INT32", [1])], 400,
         "[request id: <id_unknown>] inference input 'random_seed' data-type is 'INT32', but model 'mock' expects "
         "'INT64'"),
        # a batch of 0 is checked as a batch of 1
        ([tensor("prompts", "BYTES", [], shape=[0, 1])], 400,
         "[request id: <id_unknown>] expected 1 string elements for inference input 'prompts' for model 'mock', got 0"),
        ([tensor("prompts", "BYTES", [], shape=[0, 1]), tensor("top_k", "INT64", [], shape=[0, 1])], 400,
         "[request id: <id_unknown>] input byte size mismatch for input 'top_k' for model 'mock'. Expected 8, got 0"),
        ([tensor("prompts", "BYTES", ["a"] * 9)], 400,
         "[request id: <id_unknown>] inference request batch-size must be <= 8 for 'mock'"),
        ([tensor("prompts", "BYTES", ["a"], shape=[2, 1])], 400,
         "[request id: <id_unknown>] expected 2 string elements for inference input 'prompts' for model 'mock', got 1"),
        ([tensor("prompts", "BYTES", ["a", "b"], shape=[1, 1])], 400,
         "[request id: <id_unknown>] unexpected number of string elements 2 for inference input 'prompts' for model "
         "'mock', expecting 1"),
        ([P1, P1], 400, "[request id: <id_unknown>] input 'prompts' already exists in request"),
        ([P1, tensor("top_k", "INT64", [1, 2], shape=[1, 1])], 500,
         "Unable to parse 'data': Shape does not match true shape of 'data' field"),
        ([P1, tensor("top_k", "INT64", [1], shape=[1, 2])], 500,
         "Unable to parse 'data': Shape does not match true shape of 'data' field"),
        ([P1, tensor("top_k", "INT64", ["1"])], 500,
         "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer"),
        ([P1, tensor("top_p", "FP16", [0.5])], 400,
         "receiving FP16 data via JSON is not supported. Please use the binary data format for input top_p"),
        ([P1, tensor("top_p", "FLOAT", [0.5])], 400, "invalid datatype for input top_p"),
        ([tensor("prompts", "BYTES", [1])], 500,
         "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
        ([{"name": "prompts", "datatype": "BYTES", "shape": [-1, 1], "data": ["a"]}], 500,
         "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer"),
        ([{"name": "prompts", "datatype": "BYTES", "shape": [1, 1]}], 400,
         "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
         "'shared_memory_region' in 'parameters'. But no field is set"),
    ],
)
def test_triton_infer_errors(engine, inputs, status, error):
    r = infer(engine, {"inputs": inputs})
    assert r.status_code == status
    assert r.json() == {"error": error}


MODEL_ERROR = ("Failed to process the request(s) for model 'mock_0_0', message: TritonModelException: Model execute "
               "error: Traceback (most recent call last):\n")
SQUEEZE = "cannot select an axis to squeeze out which has size not equal to one"


def model_error(r, status, last_line):
    """A PyTriton model's exception as tritonserver answers it: its traceback, ending in the error."""
    error = r.json()["error"]
    assert r.status_code == status and error.startswith(MODEL_ERROR) and f"\n{last_line}\n" in error, error
    return r


@pytest.mark.parametrize(
    "inputs,last_line",
    [
        # Triton checks only the number of inputs; NeMo's infer function pops "prompts"
        ([tensor("max_output_len", "INT64", [8])], "KeyError: 'prompts'"),
        ([tensor("max_output_len", "INT64", [8, 8]), tensor("top_k", "INT64", [1, 1])], "KeyError: 'prompts'"),
        # str_ndarray2list squeezes the prompts' last axis
        ([tensor("prompts", "BYTES", ["a", "b"], shape=[1, 2])], f"ValueError: {SQUEEZE}"),
        # PyTriton cannot pass on a tensor without elements
        ([P1, tensor("stop_words_list", "BYTES", [], shape=[1, 0])],
         "ValueError: Iteration of zero-sized operands is not enabled"),
        ([tensor("prompts", "BYTES", [], shape=[1, 0])], "ValueError: Iteration of zero-sized operands is not enabled"),
        ([P1, tensor("top_k", "INT64", [], shape=[1, 0])],
         "TypeError: memoryview: cannot cast view with zeros in shape or strides"),
        # NeMo answers the stop words' squeeze with one row, and PyTriton refuses it for a batch of 2
        ([tensor("prompts", "BYTES", ["a", "b"]),
          tensor("stop_words_list", "BYTES", ["x", "y", "z", "w"], shape=[2, 2])],
         "ValueError: Received output tensors with different batch sizes: outputs: (1, 1). Expected batch size: 2. "),
    ],
)
def test_triton_model_errors_are_500_text(engine, inputs, last_line):
    r = model_error(infer(engine, {"inputs": inputs}), 500, last_line)
    assert r.headers["Content-Type"].startswith("text/plain")  # tritonserver's, for a model's error


def test_triton_nemo_answers_its_own_errors_as_one_row(engine):
    """NeMo's triton_infer_fn catches the stop words' squeeze: HTTP 200, its text the one answer."""
    body = {"inputs": [P1, tensor("stop_words_list", "BYTES", ["x", "y"], shape=[1, 2])]}
    r = infer(engine, body)
    assert r.status_code == 200
    assert r.json()["outputs"] == [{"name": "outputs", "datatype": "BYTES", "shape": [1, 1],
                                    "data": [f"An error occurred: {SQUEEZE}"]}]
    r = requests.post(engine.url + "/v2/models/mock/generate", json={"prompts": "hi", "stop_words_list": ["x", "y"]},
                      timeout=30)
    assert r.json() == {"model_name": "mock", "model_version": "1", "outputs": f"An error occurred: {SQUEEZE}"}


def test_triton_bad_json_is_a_500(engine):
    """tritonserver 2.51 answers a body it cannot parse 500 (its text after the prefix is rapidjson's, not imitated)."""
    for raw in (b"   ", b"{not json", b"[1 2]", b'"abc'):
        for route in ("infer", "generate"):
            r = requests.post(f"{engine.url}/v2/models/mock/{route}", data=raw, timeout=30)
            assert r.status_code == 500, (raw, r.text)
            assert r.json()["error"].startswith("failed to parse the request JSON buffer: ")
    r = requests.post(f"{engine.url}/v2/models/mock/generate", data=b"   ", timeout=30)
    assert r.json()["error"] == "failed to parse the request JSON buffer: The document is empty. at 3"


def test_triton_infer_bad_bodies(engine):
    for raw, status, error in (
        # no body: Triton reads it as the raw data of a model's lone input
        (b"", 400, "[request id: <id_unknown>] Raw request must only have 1 input (found 1) to be deduced but got 11 "
                   "inputs in 'mock' model configuration"),
        (b"{}", 500, "Unable to parse 'inputs': attempt to access non-existing object member 'inputs'"),
        (b'{"inputs": {}}', 500, "Unable to parse 'inputs': attempt to access JSON non-array as array"),
        (b'{"a": NaN, "b": -Infinity}', 500, "Unable to parse 'inputs': attempt to access non-existing object member "
                                             "'inputs'"),  # rapidjson takes them, as Triton parses
        (b"[]", 500, "Unable to parse 'inputs': attempt to access non-existing object member 'inputs'"),
    ):
        r = requests.post(engine.url + "/v2/models/mock/infer", data=raw, timeout=30)
        assert (r.status_code, r.json()) == (status, {"error": error})
    for raw in (b'{"inputs": []}\x00garbage', b'\xef\xbb\xbf{"inputs": []}'):  # a NUL ends the text; a BOM is skipped
        r = requests.post(engine.url + "/v2/models/mock/infer", data=raw, timeout=30)
        assert r.status_code == 400 and "but got 0 inputs for model 'mock'" in r.json()["error"]
    r = requests.post(engine.url + "/v2/models/mock/generate", data=b"", timeout=30)
    assert (r.status_code, r.json()) == (500, {"error": "failed to parse the request JSON buffer: The document is "
                                                        "empty. at 0"})
    r = infer(engine, {"inputs": [P1], "outputs": [{"name": "text"}]})
    assert r.status_code == 400 and r.json() == {"error": "unexpected inference output 'text' for model 'mock'"}
    assert infer(engine, {"inputs": [P1], "outputs": [{"name": "outputs"}]}).status_code == 200


def test_triton_generate_extension_on_the_nemo_model(engine):
    """Triton's generate route maps JSON keys onto the model's own inputs: NeMo's model takes
    "prompts", not TRT-LLM's "text_input"."""
    r = requests.post(engine.url + "/v2/models/mock/generate",
                      json={"prompts": "hi", "max_output_len": 5, "temperature": 0.5, "stop_words_list": ["x"]},
                      timeout=30)
    assert r.status_code == 200
    assert r.json() == {"model_name": "mock", "model_version": "1",
                        "outputs": generate_text("hi", 5, ["x"], 0, 512, skip_special_tokens=False,
                                                 include_stop_str=True).text}
    r = requests.post(engine.url + "/v2/models/mock/generate", json={"text_input": "hi", "max_tokens": 5}, timeout=30)
    assert r.status_code == 400 and "missing required input(s) ['prompts']" in r.json()["error"]
    # the model's own error, which generate answers 400 (infer: 500)
    model_error(requests.post(engine.url + "/v2/models/mock/generate", json={"max_output_len": 5}, timeout=30), 400,
                "KeyError: 'prompts'")
    model_error(requests.post(engine.url + "/v2/models/mock/generate", json={"prompts": ["a", "b"]}, timeout=30), 400,
                f"ValueError: {SQUEEZE}")
    r = requests.post(engine.url + "/v2/models/mock/generate", json={"prompts": "hi", "extra": [1]}, timeout=30)
    assert r.status_code == 400 and r.json() == {
        "error": "parameter 'extra' has invalid type. It should be either 'int', 'bool', or 'string'."}
    r = requests.post(engine.url + "/v2/models/mock/generate", json={"prompts": "hi", "max_output_len": 1.5},
                      timeout=30)
    assert r.status_code == 500 and "non-signed-integer" in r.json()["error"]


def test_triton_max_len_input_name_2023():
    with EngineThread(EngineSettings(triton_max_len_input="max_output_token", model_name="llama2-70b")) as e:
        meta = requests.get(e.url + "/v2/models/llama2-70b", timeout=30).json()
        assert [i["name"] for i in meta["inputs"]][:2] == ["prompts", "max_output_token"]
        ok = infer(e, {"inputs": [P1, tensor("max_output_token", "INT64", [4])]}, model="llama2-70b")
        assert ok.status_code == 200
        assert ok.json()["outputs"][0]["data"] == [generate_text("hi", 4, [], 0, 512, skip_special_tokens=False).text]
        r = infer(e, {"inputs": [P1, tensor("max_output_len", "INT64", [4])]}, model="llama2-70b")
        assert r.status_code == 400
        assert r.json() == {"error": "unexpected inference input 'max_output_len' for model 'llama2-70b'"}
        assert infer(e, {"inputs": [P1]}).status_code == 404


def test_triton_trtllm_ensemble_generate_and_infer():
    with EngineThread(EngineSettings(routes="triton", triton_model="trtllm", model_name="ensemble")) as e:
        meta = requests.get(e.url + "/v2/models/ensemble", timeout=30).json()
        assert meta["platform"] == "ensemble"
        assert meta["inputs"][:2] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
                                      {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]}]
        assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}]
        url = e.url + "/v2/models/ensemble/generate"
        r = requests.post(url, json={"text_input": PROMPTS[0], "max_tokens": 600, "temperature": 0.0,
                                     "stop_words": ["<extra_id_1>"], "bad_words": [""]}, timeout=30)
        assert r.status_code == 200
        expected = generate_text(PROMPTS[0], 600, ["<extra_id_1>"], 0, 512, skip_special_tokens=False,
                                 include_stop_str=True).text
        assert r.json() == {"model_name": "ensemble", "model_version": "1", "text_output": expected}
        nested = requests.post(url, json={"text_input": PROMPTS[0], "parameters": {"max_tokens": 600,
                                                                                   "stop_words": ["<extra_id_1>"]}},
                               timeout=30)
        assert nested.json()["text_output"] == expected
        r = requests.post(url, json={"text_input": "hi"}, timeout=30)
        assert r.status_code == 400 and r.json() == {"error": (
            "[request id: <id_unknown>] expected number of inputs between 2 and 18 but got 1 inputs for model "
            "'ensemble'. Got input(s) ['text_input'], but missing required input(s) ['max_tokens']. Please provide "
            "all required input(s).")}
        # a list for a (1,) input is a row an element
        r = requests.post(url, json={"text_input": "hi", "max_tokens": [1, 2]}, timeout=30)
        assert r.status_code == 400 and r.json() == {"error": (
            "[request id: <id_unknown>] input 'text_input' batch size does not match other inputs for 'ensemble'")}
        r = requests.post(url, json={"text_input": ["a", "b"], "max_tokens": [6, 6], "random_seed": [3, 4]},
                          timeout=30)
        assert r.json()["text_output"] == [generate_text(p, 6, [], seed, 512, skip_special_tokens=False).text
                                           for p, seed in (("a", 3), ("b", 4))]
        # two inputs pass Triton's count check without max_tokens: the model's default length
        top_k = tensor("top_k", "INT32", [1])
        r = infer(e, {"inputs": [tensor("text_input", "BYTES", ["a"]), top_k]}, model="ensemble")
        assert r.json()["outputs"][0]["data"] == [generate_text("a", 16, [], 0, 512, skip_special_tokens=False).text]
        r = infer(e, {"inputs": [tensor("max_tokens", "INT32", [4]), top_k]}, model="ensemble")
        assert r.status_code == 500 and "\nKeyError: 'text_input'\n" in r.json()["error"]
        body = {"inputs": [tensor("text_input", "BYTES", ["a", "b"]), tensor("max_tokens", "INT32", [6, 6]),
                           tensor("random_seed", "UINT64", [3, 4])]}  # per-row values in the ensemble
        data = infer(e, body, model="ensemble").json()["outputs"][0]["data"]
        assert data == [generate_text(p, 6, [], seed, 512, skip_special_tokens=False).text
                        for p, seed in (("a", 3), ("b", 4))]


def test_triton_error_rate_and_serialised_batches():
    with EngineThread(EngineSettings(error_rate=1.0, routes="triton")) as e:
        r = infer(e, {"inputs": [P1]})
        assert r.status_code == 500 and r.json() == {"error": "simulated engine failure"}
    with EngineThread(EngineSettings(request_latency_s=0.3, routes="triton")) as e:
        codes = []
        elapsed = concurrently(2, lambda: codes.append(infer(e, {"inputs": [P1]}).status_code))
        s = stats(e)
        assert codes == [200, 200] and s["peak_active"] == 1 and s["busy_s"] == pytest.approx(0.6)
        assert elapsed >= 0.58 and s["prompts"] == 2


def test_unknown_triton_model_kind_is_refused():
    with pytest.raises(ValueError, match="triton_model"):
        EngineThread(EngineSettings(triton_model="onnx")).start()


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


def _wait_for_port_file(proc, port_file) -> str:
    deadline = time.monotonic() + 20
    while not port_file.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "engine did not write its port file"
        time.sleep(0.02)
    return f"http://127.0.0.1:{int(port_file.read_text())}"


def test_subprocess_with_port_file(tmp_path):
    port_file = tmp_path / "engine.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.simulator", "--port", "0", "--port-file", str(port_file),
         "--model-name", "cli-model", "--seed", "3"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = _wait_for_port_file(proc, port_file)
        assert requests.get(url + "/health", timeout=10).status_code == 200
        assert requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == "cli-model"
        out = requests.put(url + "/generate", json={"sentences": ["hi"], "tokens_to_generate": 9}, timeout=10).json()
        assert out["tokens"][0] == sum(simulate("hi", 9, [EOS], 3, 512), [])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not list(tmp_path.glob("*.tmp"))


def test_subprocess_routes_flag(tmp_path):
    port_file = tmp_path / "engine.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.simulator", "--port", "0", "--port-file", str(port_file),
         "--routes", "triton", "--model-name", "steerlm", "--triton-max-len-input", "max_output_token",
         "--triton-max-batch-size", "2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = _wait_for_port_file(proc, port_file)
        assert requests.get(url + "/v2/health/ready", timeout=10).status_code == 200
        assert requests.get(url + "/health", timeout=10).json() == {"error": "Not Found"}
        meta = requests.get(url + "/v2/models/steerlm", timeout=10).json()
        assert meta["inputs"][1]["name"] == "max_output_token"
        assert requests.get(url + "/v2/models/steerlm/config", timeout=10).json()["max_batch_size"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("flags", [["--routes", "grpc"], ["--triton-model", "onnx"], ["--triton-max-batch-size", "0"]])
def test_subprocess_refuses_bad_flags(flags):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.simulator", *flags], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error:" in proc.stderr
