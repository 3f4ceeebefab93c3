from orchestrator.config import PromptConfig, compose
from orchestrator.prompts import cut_answer, format_prompt


def test_nemotron4_340b_instruct_template_matches_the_card():
    cfg = compose([]).model.prompt
    assert format_prompt("Write a poem on NVIDIA in the style of Shakespeare", cfg) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nWrite a poem on NVIDIA in the style of Shakespeare\n"
        "<extra_id_1>Assistant\n")


def test_llama2_70b_steerlm_template_has_the_attribute_line():
    cfg = compose(["model=llama2_70b_steerlm_chat"]).model.prompt
    assert format_prompt("Hi", cfg) == (
        "<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.\n"
        "<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
        "<extra_id_2>quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,"
        "complexity:4,verbosity:4\n")


def test_nemotron3_8b_steerlm_attributes_include_the_8b_card_extras():
    text = format_prompt("Hi", compose(["model=nemotron3_8b_chat_steerlm"]).model.prompt)
    attributes = text.split("<extra_id_2>")[1].strip()
    pairs = dict(item.split(":") for item in attributes.split(","))
    for key in ("understanding", "violence", "not_appropriate", "hate_speech", "sexual_content", "fails_task",
                "political_content", "moral_judgement"):
        assert key in pairs
    assert pairs["lang"] == "en"
    assert all(v.isdigit() and 0 <= int(v) <= 4 for k, v in pairs.items() if k != "lang")


def test_nemotron_mini_template_has_the_blank_line_after_system():
    cfg = compose(["model=nemotron_mini_4b_instruct"]).model.prompt
    assert format_prompt("Hello", cfg) == "<extra_id_0>System\n\n\n<extra_id_1>User\nHello\n<extra_id_1>Assistant\n"


def test_base_model_is_raw_completion():
    prompt = compose(["model=nemotron3_8b_base"]).model.prompt
    assert format_prompt("The capital of France is", prompt) == "The capital of France is"


def test_system_prompt_is_placed():
    cfg = PromptConfig(format="nemotron4_chat", system="Be brief.")
    assert format_prompt("Q", cfg).startswith("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nQ\n")


def answer(output, sent, ends, strip_echo=True):
    return cut_answer(output, sent, ends, strip_echo)[0]


def test_postprocess_strips_echo_cuts_at_first_end_string_and_trims():
    prompt = "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
    out = prompt + " Hello there.\n<extra_id_1>User\nmore"
    ends = ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]
    assert cut_answer(out, prompt, ends) == ("Hello there.", "<extra_id_1>")  # and the end string it stopped at


def test_postprocess_cuts_at_the_earliest_end_string_whatever_the_order():
    assert answer("abc\x11def<|endoftext|>", "", ["<|endoftext|>", "\x11"]) == "abc"


def test_postprocess_without_echo_keeps_text():
    assert answer("  answer  ", "question", ["<extra_id_1>"]) == "answer"
    assert answer("question answer", "question", [], strip_echo=False) == "question answer"
