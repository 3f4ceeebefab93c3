"""Conversations (issue 9): messages rows rendered per model format or sent to the chat API, multi-turn
rollouts (turn k carries the model's answers to turns 1..k-1), kept input columns, and bad rows and bad
columns. The wire is checked with a recording server; the bundled example runs on the embedded engine."""
import asyncio
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from aiohttp import web

from orchestrator.client import Client
from orchestrator.config import PromptConfig, compose
from orchestrator.conversation import Conversation
from orchestrator.errors import ConfigError, InputError
from orchestrator.plan import build_plan
from orchestrator.preflight import prepare
from orchestrator.prompts import format_prompt, render_messages
from orchestrator.protocols.base import EngineInfo
from orchestrator.simulator.app import EngineThread
from orchestrator.simulator.model import EngineSettings
from tests.test_client import results, run_client

EXE = shutil.which("orchestrator")
ATTRS = "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ---------------------------------------------------------------- rendering per model format

TWO_TURNS = [user("Q1"), assistant("A1"), user("Q2")]


def test_nemotron4_chat_renders_a_multi_turn_conversation():
    cfg = compose([]).model.prompt
    assert render_messages(TWO_TURNS, cfg) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\nA1\n"
        "<extra_id_1>User\nQ2\n<extra_id_1>Assistant\n")
    assert render_messages([system("Be brief."), user("Q1")], cfg) == (
        "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n")


def test_steerlm_puts_the_attribute_line_after_every_assistant_header():
    cfg = compose(["model=llama2_70b_steerlm_chat"]).model.prompt
    head = f"<extra_id_0>System\n{cfg.system}\n"
    assert render_messages(TWO_TURNS, cfg) == (
        f"{head}<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n<extra_id_2>{ATTRS}\nA1\n"
        f"<extra_id_1>User\nQ2\n<extra_id_1>Assistant\n<extra_id_2>{ATTRS}\n")
    row = "quality:0,toxicity:0,humor:4,creativity:4,helpfulness:2,correctness:2,coherence:4,complexity:0,verbosity:0"
    assert render_messages([system("S"), user("Q1")], cfg, attributes=row) == (
        f"<extra_id_0>System\nS\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n<extra_id_2>{row}\n")


def test_nemotron_mini_keeps_its_blank_line_after_the_system_turn():
    cfg = compose(["model=nemotron_mini_4b_instruct"]).model.prompt
    assert render_messages(TWO_TURNS, cfg) == (
        "<extra_id_0>System\n\n\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\nA1\n"
        "<extra_id_1>User\nQ2\n<extra_id_1>Assistant\n")


def test_raw_joins_the_contents_by_lines():
    cfg = compose(["model=nemotron3_8b_base"]).model.prompt
    assert render_messages(TWO_TURNS, cfg) == "Q1\nA1\nQ2"


@pytest.mark.parametrize("model", ["nemotron4_340b_instruct", "llama2_70b_steerlm_chat", "nemotron3_8b_chat_steerlm",
                                   "nemotron_mini_4b_instruct", "nemotron3_8b_base"])
def test_one_user_message_renders_exactly_as_a_prompt(model):
    cfg = compose([f"model={model}"]).model.prompt
    assert render_messages([user("Hello there")], cfg) == format_prompt("Hello there", cfg)
    with_system = PromptConfig(format=cfg.format, system="From config", steerlm_attributes=cfg.steerlm_attributes)
    assert render_messages([user("Hi")], with_system) == format_prompt("Hi", with_system)


def test_attributes_column_needs_a_steerlm_model():
    with pytest.raises(ConfigError, match="data.attributes_column='attrs' needs a SteerLM model"):
        compose(["data.attributes_column=attrs"])


# ---------------------------------------------------------------- a recording engine

class Recorder:
    """A tiny engine on a thread that keeps every request body. Its answer names the last user turn, so a
    later request shows which answer it carries; a turn containing FAIL is refused (HTTP 400)."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.on_request = None  # called with each body, on the server's thread
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def answer(text: str) -> str:
        return f"answer to <{text[-12:]}>"

    def _keep(self, body):
        self.bodies.append(body)
        if self.on_request is not None:
            return self.on_request(body)
        return None

    async def chat(self, request):
        body = await request.json()
        override = self._keep(body)
        if override is not None:
            return override
        last = body["messages"][-1]["content"]
        if "FAIL" in last:
            return web.json_response({"error": {"message": "refused turn"}}, status=400)
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": self.answer(last)}}],
                                  "usage": {"completion_tokens": 3}})

    async def completions(self, request):
        body = await request.json()
        override = self._keep(body)
        if override is not None:
            return override
        asked = body["prompt"].rsplit("\n<extra_id_1>Assistant", 1)[0]
        return web.json_response({"choices": [{"text": self.answer(asked)}], "usage": {"completion_tokens": 2}})

    async def generate(self, request):  # NeMo: echoes the prompt
        body = await request.json()
        self._keep(body)
        return web.json_response({"sentences": [p + self.answer(p.rsplit("\n<extra_id_1>Assistant", 1)[0])
                                                for p in body["sentences"]]})

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_put("/generate", self.generate)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self):
        self.thread.start()
        self.ready.wait()
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture
def recorder():
    with Recorder() as r:
        yield r


def write_rows(path: Path, **columns) -> Path:
    n = len(next(iter(columns.values())))
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(n)], **columns}), path)
    return path


def run_against(recorder, cfg, protocol="openai", api="chat", attempt="a1", client_hook=None):
    plan, paths = prepare(cfg)
    info = EngineInfo(url=recorder.url, protocol=protocol, model_name="m", api=api)
    client = Client(cfg, plan, paths, recorder.url, attempt, "r0", info=info)
    if client_hook:
        client_hook(client)
    stats = asyncio.run(client.run())
    return paths, stats


TURNS = [["Name a colour.", "Why that one?"], ["Pick a number.", "Double it.", "Now halve it."]]


def test_turn_two_carries_the_models_answer_to_turn_one_on_the_chat_api(recorder, tmp_path):
    src = write_rows(tmp_path / "in.parquet", turns=TURNS, category=["writing", "math"])
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns",
                   "data.keep_columns=[category]", "model.prompt.format=chat_template", "model.prompt.system=Be brief.",
                   "engine.protocol=openai"])
    paths, stats = run_against(recorder, cfg)
    sent = [b["messages"] for b in recorder.bodies]
    a = Recorder.answer
    assert [system("Be brief."), user("Name a colour.")] in sent
    assert [system("Be brief."), user("Name a colour."), assistant(a("Name a colour.")), user("Why that one?")] in sent
    assert [system("Be brief."), user("Pick a number."), assistant(a("Pick a number.")), user("Double it."),
            assistant(a("Double it.")), user("Now halve it.")] in sent
    assert len(sent) == 5  # one request per turn, none twice
    df = results(paths).set_index("id")
    assert list(df.columns[:2]) == ["category", "response"] and list(df["category"]) == ["writing", "math"]
    assert list(df.loc["c0", "responses"]) == [a("Name a colour."), a("Why that one?")]
    assert list(df.loc["c1", "responses"]) == [a("Pick a number."), a("Double it."), a("Now halve it.")]
    assert df.loc["c1", "response"] == a("Now halve it.")
    assert list(df["output_tokens"]) == [6, 9] and list(df["attempts"]) == [2, 3] and (df["status"] == "ok").all()
    assert stats.rows.output_tokens == 15


def test_messages_go_to_the_chat_api_as_they_are_with_a_row_system_message_first(recorder, tmp_path):
    rows = [[system("Row system."), user("Hi"), assistant("Hello!"), user("Bye")], [user("Alone")]]
    src = write_rows(tmp_path / "in.parquet", messages=rows)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.messages_column=messages",
                   "engine.api=chat", "model.prompt.system=Config system."])
    paths, _ = run_against(recorder, cfg)
    sent = sorted((b["messages"] for b in recorder.bodies), key=len)
    assert sent == [[system("Config system."), user("Alone")], rows[0]]
    df = results(paths).set_index("id")
    assert "responses" not in df.columns  # one answer per row without turns
    assert df.loc["c0", "response"] == Recorder.answer("Bye") and df.loc["c1", "response"] == Recorder.answer("Alone")


def test_completions_get_the_conversation_in_the_models_format(recorder, tmp_path):
    src = write_rows(tmp_path / "in.parquet", turns=[["Q1", "Q2"]])
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns"])
    paths, _ = run_against(recorder, cfg, api="completions")
    a1 = Recorder.answer("<extra_id_0>System\n\n<extra_id_1>User\nQ1")
    assert [b["prompt"] for b in recorder.bodies] == [
        "<extra_id_0>System\n\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n",
        f"<extra_id_0>System\n\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n{a1}\n<extra_id_1>User\nQ2\n"
        f"<extra_id_1>Assistant\n"]
    assert list(results(paths)["responses"][0])[0] == a1


def test_nemo_batches_steerlm_turns_with_each_rows_attribute_line(recorder, tmp_path):
    attrs = ["quality:4,humor:0", "quality:0,humor:4", None]  # None: the model's attribute line
    src = write_rows(tmp_path / "in.parquet", turns=[["A", "B"], ["C", "D"], ["E", "F"]], attrs=attrs)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns",
                   "data.attributes_column=attrs", "model=llama2_70b_steerlm_chat", "model.prompt.system=S"])
    paths, _ = run_against(recorder, cfg, protocol="nemo")
    assert [len(b["sentences"]) for b in recorder.bodies] == [3, 3]  # turn 2 of every row in one batch
    second = recorder.bodies[1]["sentences"]
    a1 = Recorder.answer("<extra_id_0>System\nS\n<extra_id_1>User\nA")
    assert second[0] == ("<extra_id_0>System\nS\n<extra_id_1>User\nA\n<extra_id_1>Assistant\n"
                         "<extra_id_2>quality:4,humor:0\n"
                         f"{a1}\n<extra_id_1>User\nB\n<extra_id_1>Assistant\n<extra_id_2>quality:4,humor:0\n")
    assert "<extra_id_2>quality:0,humor:4\n" in second[1] and f"<extra_id_2>{ATTRS}\n" in second[2]
    df = results(paths)
    assert (df["status"] == "ok").all() and df["responses"].map(len).tolist() == [2, 2, 2]
    assert not df["response"].str.contains("extra_id").any()  # the echoed conversation is stripped


def test_a_failed_turn_makes_the_row_an_error_naming_the_turn(recorder, tmp_path):
    src = write_rows(tmp_path / "in.parquet", turns=[["fine", "FAIL here", "never sent"], ["ok", "ok too"]])
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns", "engine.api=chat"])
    paths, stats = run_against(recorder, cfg)
    df = results(paths).set_index("id")
    assert df.loc["c0", "status"] == "error" and df.loc["c0", "error"] == "turn 2 of 3: HTTP 400: refused turn"
    assert df.loc["c0", "responses"] is None and pd.isna(df.loc["c0", "response"])
    assert df.loc["c1", "status"] == "ok"
    assert not any(b["messages"][-1]["content"] == "never sent" for b in recorder.bodies)
    assert (stats.rows.ok, stats.rows.failed) == (1, 1)


def test_resume_after_a_partial_run_never_resends_a_committed_conversation(recorder, tmp_path):
    turns = [[f"row {i} turn 1", f"row {i} turn 2"] for i in range(6)]
    src = write_rows(tmp_path / "in.parquet", turns=turns)
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns", "engine.api=chat",
                   "data.unit_rows=2", "client.max_in_flight=1", "client.grace_s=0", "client.max_retries=0"])
    clients = []

    def stop_at_row_2_turn_2(body):  # the client stops while a conversation of unit 1 is half done
        if body["messages"][-1]["content"] == "row 2 turn 2":
            clients[0].request_stop("test: preempted")
            return web.json_response({"error": {"message": "going away"}}, status=503)
        return None

    recorder.on_request = stop_at_row_2_turn_2
    paths, _ = run_against(recorder, cfg, client_hook=clients.append)
    first = results(paths)
    assert sorted(first["id"]) == ["c0", "c1"] and first["responses"].map(len).tolist() == [2, 2]
    committed = (paths.results / "part-00000000.parquet").read_bytes()

    recorder.bodies.clear()
    recorder.on_request = None
    paths, _ = run_against(recorder, cfg, attempt="a2")
    resent = [b["messages"][-1]["content"] for b in recorder.bodies]
    assert sorted(resent) == sorted(f"row {i} turn {t}" for i in range(2, 6) for t in (1, 2))
    df = results(paths).set_index("id")
    assert sorted(df.index) == [f"c{i}" for i in range(6)] and (df["status"] == "ok").all()
    assert df["responses"].map(len).tolist() == [2] * 6
    assert (paths.results / "part-00000000.parquet").read_bytes() == committed


def test_conversation_settings_are_part_of_the_resume_fingerprint(tmp_path):
    src = write_rows(tmp_path / "in.parquet", prompt=["a", "b"], turns=[["a", "b"], ["c", "d"]])
    prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns"]))
    with pytest.raises(InputError, match="data.turns_column was 'turns', now None"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}"]))
    with pytest.raises(InputError, match=r"data.keep_columns was None, now \['prompt'\]"):
        prepare(compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns",
                         "data.keep_columns=[prompt]"]))


# ---------------------------------------------------------------- the embedded engine

def test_the_embedded_engines_chat_answers_depend_on_the_whole_conversation():
    def ask(url, messages):
        body = {"model": "mock", "messages": messages, "max_tokens": 30}
        answer = requests.post(url + "/v1/chat/completions", json=body, timeout=30).json()
        return answer["choices"][0]["message"]["content"]

    with EngineThread(EngineSettings()) as engine:
        one = ask(engine.url, [user("Q1"), assistant("A1"), user("Q2")])
        assert one == ask(engine.url, [user("Q1"), assistant("A1"), user("Q2")])  # deterministic
        assert one != ask(engine.url, [user("Q1"), assistant("another answer"), user("Q2")])
        assert one != ask(engine.url, [user("Q2")])


@pytest.mark.parametrize("protocol", ["nemo", "openai"])
def test_multi_turn_on_the_embedded_engine_with_kept_columns(tmp_path, protocol):
    src = write_rows(tmp_path / "in.parquet", turns=[["Same start", "Then A"], ["Same start", "Then B"]],
                     n=pa.array([7, 8], pa.int32()),
                     category=pa.array(["x", "y"]).dictionary_encode())
    overrides = [f"data.input={src}", "data.turns_column=turns", "data.keep_columns=[category,n]",
                 "sampling.tokens_to_generate=12", f"engine.protocol={protocol}"]
    if protocol == "openai":
        overrides.append("engine.api=chat")
    _, paths, _ = run_client(compose(overrides + [f"run_dir={tmp_path / 'r'}"]), tmp_path)
    table = pq.read_table(paths.results)
    assert table.schema.field("n").type == pa.int32() and table.schema.field("category").type == pa.string()
    df = table.to_pandas().set_index("id")
    assert list(df["category"]) == ["x", "y"] and list(df["n"]) == [7, 8]
    assert (df["status"] == "ok").all() and df["responses"].map(len).tolist() == [2, 2]
    first, second = df["responses"].map(list).tolist()
    assert first[0] == second[0] and first[1] != second[1]  # same first turn, the second differs
    assert all(r.startswith("[simulated]") for rs in (first, second) for r in rs)


# ---------------------------------------------------------------- bad rows and bad columns

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def test_bad_message_rows_become_recorded_errors(tmp_path):
    rows = [[user("fine")], None, [], [{"role": "tool", "content": "x"}], [{"role": "user", "content": None}],
            [user("a"), system("late")], [user("q"), assistant("a")], [user("   ")]]
    pq.write_table(pa.table({"id": [f"m{i}" for i in range(len(rows))], "messages": pa.array(rows, pa.list_(MESSAGE))}),
                   tmp_path / "in.parquet")
    cfg = compose([f"data.input={tmp_path / 'in.parquet'}", f"run_dir={tmp_path / 'r'}",
                   "data.messages_column=messages", "sampling.tokens_to_generate=5"])
    _, paths, _ = run_client(cfg, tmp_path)
    df = results(paths).set_index("id")
    assert df.loc["m0", "status"] == "ok" and len(df) == len(rows)
    assert list(df["error"][1:]) == [
        "messages is null", "messages is empty",
        "messages[0].role is 'tool'; it must be one of system, user, assistant",
        "messages[0].content is not text (NoneType)",
        "messages[1] is a system message; only the first message may be one",
        "the last message is the assistant's; end each row's messages with a user message",
        "messages[0] (the user's) is empty"]


def test_bad_turn_rows_become_recorded_errors(tmp_path):
    src = write_rows(tmp_path / "in.parquet", turns=pa.array([["ok", "fine"], None, [], ["ok", None], ["ok", " "]],
                                                              pa.list_(pa.string())))
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns",
                   "sampling.tokens_to_generate=5"])
    _, paths, _ = run_client(cfg, tmp_path)
    df = results(paths).set_index("id")
    assert df.loc["c0", "status"] == "ok"
    assert list(df["error"][1:]) == ["turns is null", "turns is empty", "turns[1] is not text (NoneType)",
                                     "turns[1] is empty"]


def test_a_conversation_longer_than_the_context_is_a_row_error(tmp_path):
    src = write_rows(tmp_path / "in.parquet", turns=[["short", "x" * 20_000], ["short", "short"]])
    cfg = compose([f"data.input={src}", f"run_dir={tmp_path / 'r'}", "data.turns_column=turns",
                   "sampling.tokens_to_generate=5"])
    _, paths, _ = run_client(cfg, tmp_path)
    df = results(paths).set_index("id")
    assert df.loc["c0", "error"].startswith("turn 2 of 2: the conversation is about 5")
    assert "4096-token context" in df.loc["c0", "error"] and df.loc["c1", "status"] == "ok"


@pytest.mark.parametrize("column,key,match", [
    (pa.array(['[{"role": "user", "content": "hi"}]']), "messages_column",
     r"column 'conv' \(data.messages_column\) has type string; it must be a list of \{role, content\} structs.*"
     r"json.loads"),
    (pa.array([["hi"]]), "messages_column", r"has type list<element: string>; it must be a list of \{role, content\}"),
    (pa.array([[{"role": "user", "text": "hi"}]]), "messages_column", r"it must be a list of \{role, content\}"),
    (pa.array([[{"role": "user", "content": 1}]]), "messages_column", r"with text values"),
    (pa.array(["hi"]), "turns_column", r"column 'conv' \(data.turns_column\) has type string; it must be a list of "
                                       r"user turns"),
])
def test_bad_conversation_column_types_are_refused_naming_the_file_and_column(tmp_path, column, key, match):
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "conv": column}), src)
    with pytest.raises(InputError, match=match) as info:
        build_plan(compose([f"data.{key}=conv"]).data, str(src))
    assert str(src) in str(info.value)


def test_missing_columns_are_refused_with_the_list_of_columns(tmp_path):
    src = write_rows(tmp_path / "in.parquet", turns=[["a"]])
    with pytest.raises(InputError,
                       match=r"no column 'msgs' \(data.messages_column\); the columns are \['id', 'turns'\]"):
        build_plan(compose(["data.messages_column=msgs"]).data, str(src))
    with pytest.raises(InputError, match=r"no column 'category' to keep \(data.keep_columns\); the columns are "
                                         r"\['id', 'turns'\]"):
        build_plan(compose(["data.turns_column=turns", "data.keep_columns=[category]"]).data, str(src))
    with pytest.raises(InputError, match="'status', which is a result column"):
        build_plan(compose(["data.turns_column=turns", "data.keep_columns=[status]"]).data, str(src))


def test_a_bad_messages_column_stops_the_run_before_anything_is_submitted(tmp_path):
    src = write_rows(tmp_path / "in.parquet", messages=['[{"role": "user", "content": "hi"}]'])
    proc = subprocess.run([EXE, "run", f"data.input={src}", f"run_dir={tmp_path / 'r'}",
                           "data.messages_column=messages"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert str(src) in proc.stderr and "data.messages_column" in proc.stderr and "json.loads" in proc.stderr
    assert not (tmp_path / "r" / "plan.json").exists()


def test_a_list_typed_prompt_column_points_at_the_conversation_keys(tmp_path):
    src = write_rows(tmp_path / "in.parquet", prompt=[["a", "b"]])
    with pytest.raises(InputError, match="data.turns_column=prompt"):
        build_plan(compose([]).data, str(src))


def test_conversation_start_checks():
    conv = Conversation.start(None, ["one", "two"], None, has_turns=True)
    assert conv.messages == [user("one")] and conv.total == 2
    conv.answered("A", 4, 0.5, 1)
    assert conv.messages == [user("one"), assistant("A"), user("two")] and not conv.done
    conv.answered("B", None, 0.5, 2)
    assert conv.done and (conv.tokens, conv.latency_s, conv.attempts) == (4, 1.0, 3)
    both = Conversation.start([system("S")], ["t1"], None, has_messages=True, has_turns=True)
    assert both.messages == [system("S"), user("t1")]


# ---------------------------------------------------------------- the bundled example

def test_the_bundled_example_runs_both_mt_bench_turns(tmp_path):
    proc = subprocess.run([EXE, "run", "data.turns_column=turns", "data.keep_columns=[category]",
                           f"run_dir={tmp_path / 'r'}", "sampling.tokens_to_generate=16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "80/80 ok" in proc.stdout
    df = pd.read_parquet(tmp_path / "r" / "results")
    assert len(df) == 80 and sorted(df["id"]) == sorted(f"mt_bench_{i}" for i in range(81, 161))
    assert (df["status"] == "ok").all() and df["responses"].map(len).eq(2).all()
    assert (df["response"] == df["responses"].map(lambda r: r[-1])).all()
    assert set(df["category"]) >= {"writing", "math", "coding", "reasoning"}
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] == 80
