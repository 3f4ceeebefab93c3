"""Codecs: every field of every answer is checked, and each protocol's request carries what it must."""
import re

import pytest

from orchestrator.config import compose
from orchestrator.protocols import make_codec
from orchestrator.protocols.base import EngineInfo, RejectedError, TransientError


def codec(protocol, *overrides, **info):
    cfg = compose(list(overrides))
    return make_codec(cfg, EngineInfo(url="http://x", protocol=protocol, model_name="m", **info))


@pytest.mark.parametrize("body", [
    {"choices": [{"text": None}]}, {"choices": [{"text": 7}]}, {"choices": []},
    {"choices": [{"text": "ok"}], "usage": {"completion_tokens": "many"}},
    {"choices": [{"text": "ok"}], "usage": "lots"}, "not json",
])
def test_openai_answers_that_cannot_be_used_are_rejected_not_crashes(body):
    with pytest.raises(RejectedError, match="malformed"):
        codec("openai").parse(200, body, ["p"])


@pytest.mark.parametrize("body", [
    {"sentences": ["a", "b"]}, {"sentences": "a"}, {"x": 1}, {"sentences": ["a"], "tokens": "oops"},
    {"sentences": ["a"], "tokens": [["a"], ["b"]]},
])
def test_nemo_answers_that_cannot_be_used_are_rejected(body):
    with pytest.raises(RejectedError, match="malformed"):
        codec("nemo").parse(200, body, ["p"])


@pytest.mark.parametrize("body, problem", [
    ({"sentences": [None]}, r"sentences\[0\] is NoneType"), ({"sentences": [3]}, r"sentences\[0\] is int"),
    ({"sentences": ["a"], "tokens": [["x", 1]]}, r"tokens\[0\] is \['x', 1\]"),
])
def test_an_unusable_nemo_sentence_is_its_rows_error(body, problem):
    [answer] = codec("nemo").parse(200, body, ["p"])
    assert answer.error is not None and re.search("malformed.*" + problem, answer.error), answer.error


def test_one_null_sentence_among_several_is_one_row_error_and_the_others_are_answers():
    """Issue 19.3: one bad sentence of 128 made the whole request (all 128 rows) errors."""
    body = {"sentences": ["p0 a", None, "p2 c", "p3 d"], "tokens": [["p0", " a"], ["p1"], ["p2", " c"], 7]}
    answers = codec("nemo").parse(200, body, ["p0", "p1", "p2", "p3"])
    assert [a.error is None for a in answers] == [True, False, True, False]
    assert [a.text for a in answers][::2] == ["p0 a", "p2 c"] and answers[0].output_tokens == 1
    assert answers[1].error == "malformed answer: sentences[1] is NoneType, not text"
    assert "tokens[3] is 7, not a list of strings" in answers[3].error


def test_triton_answers_that_cannot_be_used_are_rejected():
    c = codec("triton", inputs={"prompts": "BYTES", "max_output_len": "INT64"})
    for body in ({"outputs": []}, {"x": 1}, [], {"outputs": [{"name": "outputs", "data": ["a", "b"]}]}):
        with pytest.raises(RejectedError, match="malformed"):
            c.parse(200, body, ["p"])
    answers = c.parse(200, {"outputs": [{"name": "outputs", "data": ["a", None, "c"]}]}, ["p", "q", "r"])
    assert [a.text for a in answers][::2] == ["a", "c"] and answers[0].error is None is answers[2].error
    assert answers[1].error == "malformed answer: outputs[1] is NoneType, not text"
    with pytest.raises(TransientError):
        c.parse(503, {"error": "busy"}, ["p"])
    with pytest.raises(RejectedError, match="HTTP 400: unknown input"):
        c.parse(400, {"error": "unknown input"}, ["p"])


def test_one_unusable_choice_of_n_is_that_answers_error():
    cfg = compose(["sampling.rollouts=3", "sampling.greedy=false"])
    c = make_codec(cfg, EngineInfo(url="http://x", protocol="openai", model_name="m"), one_request=True)
    assert c.max_n == 3
    body = {"choices": [{"index": 0, "text": "a", "token_ids": [1]}, {"index": 2, "text": "c", "token_ids": [1, 2]},
                        {"index": 1, "text": None}]}
    answers = c.parse(200, body, ["p"], n=3)
    assert [a.text for a in answers][::2] == ["a", "c"] and [a.output_tokens for a in answers][::2] == [1, 2]
    assert answers[0].error is None is answers[2].error
    assert answers[1].error == "malformed answer: choices[1].text is NoneType, not text"
    with pytest.raises(RejectedError, match="expected 3 choices"):  # the body as a whole: the request's error
        c.parse(200, {"choices": body["choices"][:2]}, ["p"], n=3)


def test_openai_errors_keep_the_engine_message():
    c = codec("openai")
    msg = "This model's maximum context length is 4096 tokens. However, your prompt contains at least 4097"
    with pytest.raises(RejectedError, match="HTTP 400: This model's maximum context length is 4096"):
        c.parse(400, {"error": {"message": msg, "type": "BadRequestError", "param": None, "code": 400}}, ["p"])
    with pytest.raises(RejectedError, match="Not Found"):
        c.parse(404, {"detail": "Not Found"}, ["p"])
    with pytest.raises(TransientError):
        c.parse(500, {"error": {"message": "engine dead"}}, ["p"])


def test_special_token_end_strings_are_not_skipped_by_the_engine():
    body = codec("openai").payload(["hi"])  # the 340B card's end strings include <extra_id_1>
    assert body["skip_special_tokens"] is False and "<extra_id_1>" in body["stop"]
    assert "skip_special_tokens" not in codec("openai", "sampling.end_strings=[]").payload(["hi"])
    assert codec("openai", "engine.skip_special_tokens=true").payload(["hi"])["skip_special_tokens"] is True


def test_chat_api_sends_messages_with_the_system_prompt():
    c = codec("openai", "model.prompt.format=chat_template", "model.prompt.system=Be brief.", api="chat")
    body = c.payload(["What is 2+2?"])
    assert c.path == "/v1/chat/completions" and "prompt" not in body
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    answer = {"choices": [{"message": {"role": "assistant", "content": "4"}}], "usage": {"completion_tokens": 1}}
    assert c.parse(200, answer, ["What is 2+2?"])[0].text == "4"


def test_greedy_and_seed_map_to_each_protocol():
    o = codec("openai", "sampling.greedy=true", "sampling.seed=7").payload(["p"])
    assert o["temperature"] == 0.0 and o["seed"] == 7
    n = codec("nemo", "sampling.greedy=true", "sampling.seed=7").payload(["p"])
    assert n["greedy"] is True and n["random_seed"] == 7


def test_every_protocol_is_one_module_in_the_registry():
    from orchestrator import protocols
    from orchestrator.config import PROTOCOLS

    assert set(protocols.BY_NAME) == set(PROTOCOLS)  # config.py keeps the choices: it sits below protocols
    for name, module in protocols.BY_NAME.items():
        assert module.NAME == name and module.Codec.name == name and protocols.CODECS[name] is module.Codec
        assert callable(module.detect) and callable(module.discover)


class Routes:
    """An Http stand-in: each GET path answers its status, or raises it when it is an exception."""

    def __init__(self, **answers):
        self.answers, self.asked = answers, []

    def __call__(self, method, path, **kwargs):
        self.asked.append(path)
        answer = self.answers.get(path.strip("/").replace("/", "_"), 404)
        if isinstance(answer, Exception):
            raise answer
        return type("Resp", (), {"status_code": answer})()


def test_detection_tries_openai_then_triton_then_takes_nemo():
    import requests

    from orchestrator.protocols import detect_protocol

    assert detect_protocol(Routes(v1_models=200)) == "openai"
    assert detect_protocol(Routes(v2_health_ready=200)) == "triton"
    http = Routes()
    assert detect_protocol(http) == "nemo" and http.asked == ["/v1/models", "/v2/health/ready"]
    assert detect_protocol(Routes(v2_health_ready=requests.ConnectionError("reset"))) == "nemo"
    with pytest.raises(requests.ConnectionError):  # not up yet: readiness retries
        detect_protocol(Routes(v1_models=requests.ConnectionError("refused")))


def test_nemo_discovery_takes_the_configured_model_name():
    from orchestrator.protocols import discover

    info = discover(compose(["engine.served_model_name=served"]), "http://x", "nemo", Routes())
    assert (info.protocol, info.model_name, info.url) == ("nemo", "served", "http://x")


def test_readiness_is_not_proven_by_an_unusable_answer():
    """The probe asks for one answer: an unusable one (now a row's error, not a raise) still fails readiness."""
    from orchestrator.protocols import generate_once
    from orchestrator.protocols.base import MalformedAnswer

    class Resp:
        status_code = 200

        def json(self):
            return {"sentences": [None]}

    cfg = compose([])
    with pytest.raises(MalformedAnswer, match=r"sentences\[0\] is NoneType"):
        generate_once(cfg, EngineInfo(url="http://x", protocol="nemo", model_name="m"), lambda *a, **k: Resp())


def test_triton_discovery_waits_while_the_model_loads():
    """PyTriton's server says ready before its model is bound: /v2/models/m/ready answers 400 and the
    metadata 404 ("not found", then "has no available versions") until the model has loaded. That is a
    wait (TransientError, retried by readiness), not a refusal; it used to be a RejectedError."""
    from orchestrator.protocols import discover

    class Resp:
        def __init__(self, status, body):
            self.status_code, self.body = status, body

        def json(self):
            return self.body

    loading = {"/v2/health/ready": Resp(200, ""), "/v2/models/m/ready": Resp(400, {"error": "Model version not ready"}),
               "/v2/models/m": Resp(404, {"error": "Request for unknown model: 'm' has no available versions"})}
    cfg = compose(["engine.served_model_name=m"])
    with pytest.raises(TransientError, match="'m' is not ready .*HTTP 400.*has no available versions.*"
                                             "engine.served_model_name"):
        discover(cfg, "http://x", "triton", lambda method, path, **kw: loading[path])


def test_triton_rows_answered_with_nemos_error_text_are_row_errors():
    """NeMo's deploy model answers its own exception as the text "An error occurred: ..." (HTTP 200)."""
    body = {"outputs": [{"name": "outputs", "datatype": "BYTES", "shape": [2, 1],
                         "data": ["fine", "An error occurred: the prompt is too long"]}]}
    good, bad = codec("triton").parse(200, body, ["a", "b"])
    assert (good.text, good.error) == ("fine", None)
    assert bad.error == "the Triton model answered an error: the prompt is too long"


def test_triton_sends_one_stop_word_a_row():
    """NeMo squeezes stop_words_list's last axis: [n, 1], the first end string (the client cuts at all of them)."""
    c = codec("triton", "sampling.end_strings=['<extra_id_1>','<|endoftext|>']",
              inputs={"prompts": "BYTES", "stop_words_list": "BYTES"})
    (stop,) = [t for t in c.payload(["a", "b"])["inputs"] if t["name"] == "stop_words_list"]
    assert stop == {"name": "stop_words_list", "datatype": "BYTES", "shape": [2, 1],
                    "data": ["<extra_id_1>", "<extra_id_1>"]}
