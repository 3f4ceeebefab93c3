"""Per-model prompt formats (as in the model cards) and post-processing of the engine's output."""
from __future__ import annotations

from .config import PromptConfig

TEMPLATES = {
    "nemotron4_chat": "<extra_id_0>System\n{system}\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n",
    "steerlm": "<extra_id_0>System\n{system}\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n<extra_id_2>{attributes}\n",
    "nemotron_mini": "<extra_id_0>System\n{system}\n\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n",
    "raw": "{prompt}",
    "chat_template": "{prompt}",  # the engine's chat API renders it with the tokenizer's template
}


def format_prompt(prompt: str, cfg: PromptConfig) -> str:
    """The text the engine receives for one user prompt."""
    if cfg.format in ("raw", "chat_template"):
        return prompt
    return TEMPLATES[cfg.format].format(system=cfg.system, prompt=prompt, attributes=cfg.steerlm_attributes)


def postprocess(output: str, sent_prompt: str, end_strings: list[str], strip_echo: bool = True) -> str:
    """Strip the echoed prompt (NeMo returns prompt + generation), cut at the first end string, trim."""
    if strip_echo and output.startswith(sent_prompt):
        output = output[len(sent_prompt):]
    cut = len(output)
    for end in end_strings:
        if end:
            at = output.find(end)
            if 0 <= at < cut:
                cut = at
    return output[:cut].strip()
