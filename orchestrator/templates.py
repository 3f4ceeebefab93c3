"""Prompts built from input columns (data.prompt_template): a sandboxed Jinja2 template, checked when the
config is read (its syntax) and when the run is planned (the columns it names), and rendered per row, where a
row it cannot render is that row's error, never a crash (see row_prompts).

Jinja2's defaults apply (the syntax chat templates use), but the template's text is kept as written (a
trailing newline too), a name that is not a column is an error (StrictUndefined), and printing a null value
is an error rather than the text "None" (test it with `{% if x is none %}`, or `{{ x | default('', true) }}`).
"""
from __future__ import annotations

from functools import lru_cache

from .errors import ConfigError


class NullValue(ValueError):
    """The template printed a null (None) value."""


def _finalize(value):
    if value is None:
        raise NullValue("the template prints a null value; test for it ({% if x is none %}) or give a default "
                        "({{ x | default('', true) }})")
    return value


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, finalize=_finalize,
                                         autoescape=False)


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The compiled template; a syntax error is a ConfigError with its line and Jinja's message."""
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as exc:
        lines = source.splitlines()
        shown = lines[exc.lineno - 1] if 0 < (exc.lineno or 0) <= len(lines) else ""
        raise ConfigError(f"data.prompt_template has a Jinja2 syntax error on line {exc.lineno}: {exc.message}"
                          + (f" (the line: {shown.strip()!r})" if shown.strip() else "")
                          + "; fix the template (columns by name: 'Question: {{ question }}')") from None


def check_keys(data) -> None:
    """data.prompt_template's syntax, and what it and data.system_column cannot be combined with (DataConfig
    checks them when the config is read)."""
    conversation = [f"data.{k}={getattr(data, k)!r}" for k in ("messages_column", "turns_column") if getattr(data, k)]
    if data.prompt_template is not None:
        if not data.prompt_template.strip():
            raise ConfigError("data.prompt_template is empty; give a template (e.g. data.prompt_template="
                              "'Question: {{ question }}') or leave it unset to send data.prompt_column")
        if conversation:
            raise ConfigError(f"data.prompt_template cannot be combined with {' and '.join(conversation)}: a "
                              f"template builds one prompt per row, a conversation column is sent as its "
                              f"messages. Drop data.prompt_template, or the conversation column")
        compile_template(data.prompt_template)
    if data.system_column and conversation:
        raise ConfigError(f"data.system_column={data.system_column!r} cannot be combined with "
                          f"{' and '.join(conversation)}: a conversation's system prompt is its first message "
                          f"(role system) in data.messages_column. Drop data.system_column, or put the system "
                          f"message first in each row's messages")


@lru_cache(maxsize=8)
def template_names(source: str) -> tuple[str, ...]:
    """The names the template reads that it does not set itself, sorted: the input columns it needs (Jinja's
    own globals, such as range or namespace, are needed only when the input has such a column)."""
    from jinja2 import meta

    compile_template(source)  # a syntax error is named there
    return tuple(sorted(meta.find_undeclared_variables(_environment().parse(source))))


def template_columns(source: str, columns: list[str]) -> tuple[list[str], list[str]]:
    """(the input columns the template reads, the names it needs that the input lacks)."""
    globals_ = _environment().globals
    names = template_names(source)
    return ([n for n in names if n in columns],
            [n for n in names if n not in columns and n not in globals_])


def render_row(template, values: dict) -> tuple[str | None, str | None]:
    """(the prompt, None), or (None, why this row cannot be rendered)."""
    try:
        return template.render(values), None
    except Exception as exc:  # the template is the user's: anything it raises is this row's error
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        if isinstance(exc, NullValue):
            nulls = [name for name, value in values.items() if value is None]
            message += f" (null in this row: {', '.join(nulls)})" if nulls else ""
        else:
            message = f"{type(exc).__name__}: {message}"
        return None, f"data.prompt_template cannot be rendered for this row: {message}"


def row_prompts(part, plan) -> list[tuple]:
    """(prompt, system, problem) per row of a record batch: the prompt column's value or the rendered template
    (plan.prompt_template over plan.template_columns), the row's system prompt (plan.system_column; None: the
    model's), and why the row cannot be sent (None when it can: the prompt itself is checked later)."""
    n = part.num_rows
    systems = part.column(plan.system_column).to_pylist() if plan.system_column else [None] * n
    if plan.prompt_template is None:
        prompts, problems = part.column(plan.prompt_column).to_pylist(), [None] * n
    else:
        template = compile_template(plan.prompt_template)
        columns = {name: part.column(name).to_pylist() for name in plan.template_columns}
        rendered = [render_row(template, {name: values[r] for name, values in columns.items()}) for r in range(n)]
        prompts, problems = [p for p, _ in rendered], [why for _, why in rendered]
    out = []
    for prompt, system, problem in zip(prompts, systems, problems):
        if problem is None and system is not None and not isinstance(system, str):
            problem = f"the system prompt (data.system_column={plan.system_column!r}) is not text " \
                      f"({type(system).__name__})"
        out.append((prompt, system, problem))
    return out
