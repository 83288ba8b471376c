"""Chat templates: render a list of messages to text the way transformers does, and find assistant spans.

Rendering copies transformers' Jinja setup (sandboxed, `trim_blocks`, `lstrip_blocks`, `loopcontrols`,
`raise_exception`, its `tojson`, and the `{% generation %}` tag), so a template renders to the same string
here and in `AutoTokenizer.apply_chat_template`. The `{% generation %}` tag marks the text a model must
learn to produce; we record its character spans to build the assistant loss mask.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmcycle.errors import LlmcycleError

CHAT_ROLES = ("system", "user", "assistant", "tool")
END_OF_TURN_TOKEN = "<|end|>"

# One line, so trim_blocks/lstrip_blocks (which transformers turns on) have no newlines to eat; the
# newlines we want are written as '\n' string literals. The assistant's content and its <|end|> sit in
# {% generation %}: those are exactly the tokens the assistant mask marks.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    # Tools (transformers' `tools`: OpenAI function dicts) come first, in a system turn of their own.
    "{% if tools %}"
    "{{ '<|system|>\\nYou may call these tools:\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ 'To call one, answer with <tool_call>\\n{\"name\": ..., \"arguments\": {...}}\\n</tool_call>.<|end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Chat message role must be system, user, assistant or tool, got '"
    " ~ message['role'] ~ '.') }}"
    "{% endif %}"
    # A tool's result is shown to the model as a user turn, as Hermes and Qwen templates do: no new token.
    "{% if message['role'] == 'tool' %}"
    "{{ '<|user|>\\n<tool_response>\\n' ~ message['content'] ~ '\\n</tool_response><|end|>\\n' }}"
    "{% else %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if call['function'] is defined %}{% set call = call['function'] %}{% endif %}"
    "{% if loop.first and message['content'] %}{{ '\\n' }}{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if call['arguments'] is string %}"
    "{{ '<tool_call>\\n{\"name\": ' ~ (call['name'] | tojson) ~ ', \"arguments\": ' ~ call['arguments'] ~ '}\\n</tool_call>' }}"
    "{% else %}"
    "{{ '<tool_call>\\n' ~ ({'name': call['name'], 'arguments': call['arguments']} | tojson) ~ '\\n</tool_call>' }}"
    "{% endif %}"
    "{% endfor %}"
    "<|end|>{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class _Recorder:
    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.spans: list[tuple[int, int]] = []


# The recorder of the render in progress. A ContextVar (not extension state, as in transformers) keeps
# concurrent renders in different threads apart and keeps the recorder invisible to template code.
_RECORDER: ContextVar[_Recorder | None] = ContextVar("llmcycle_chat_recorder", default=None)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and records where it landed."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller) -> str:
        text = caller()
        rec = _RECORDER.get()
        if rec is not None:
            # Everything rendered before this block has already been yielded into rec.chunks.
            start = sum(len(c) for c in rec.chunks)
            rec.spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise LlmcycleError(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Same as transformers' override: Jinja's own tojson HTML-escapes, which would change the text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LlmcycleError(f"The chat template is not valid Jinja (line {e.lineno}: {e.message}).") from None


def check_messages(messages: list[dict], strict_roles: bool) -> list[dict]:
    """Each message must be a mapping with a string role; None values are dropped, as transformers does."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LlmcycleError("A chat must be a non-empty list of {'role': ..., 'content': ...} messages.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise LlmcycleError(f"Chat message {i} must be a dict with a string 'role', got {m!r:.80}.")
        if strict_roles and m["role"] not in CHAT_ROLES:
            raise LlmcycleError(
                f"Chat message {i} has role {m['role']!r}; roles must be one of {', '.join(CHAT_ROLES)}."
            )
        if strict_roles and not isinstance(m.get("content"), str) and not (
                m["role"] == "assistant" and m.get("tool_calls") and m.get("content") is None):
            raise LlmcycleError(f"Chat message {i} must have a string 'content'.")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool, variables: dict, tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` (with `tools`, OpenAI function dicts, where the template lists them); return the
    text and the character spans of `{% generation %}` blocks."""
    compiled = compile_template(template)
    rec = _Recorder()
    token = _RECORDER.set(rec)
    try:
        for chunk in compiled.generate(
            messages=messages, tools=tools or None, documents=None, add_generation_prompt=add_generation_prompt,
            **variables,
        ):
            rec.chunks.append(chunk)
    except jinja2.TemplateError as e:
        raise LlmcycleError(f"The chat template failed to render: {e}.") from None
    finally:
        _RECORDER.reset(token)
    return "".join(rec.chunks), rec.spans


def find_assistant_spans(
    text: str, messages: list[dict], end_tokens: list[str],
    render_prefix: Callable[[int], str | None] | None = None,
) -> list[tuple[int, int]]:
    """For templates without `{% generation %}`: the character span of each assistant turn's content in
    the rendered `text`, extended over an end-of-turn token that directly follows it.

    Each turn is looked for only after everything before it: after the end of the rendered prefix
    `render_prefix(i)` (messages[:i] with the generation prompt, TRL's way) when `text` starts with it,
    and in any case after the earlier messages' own content. So an answer that repeats text from the
    system prompt, the question or an earlier turn ("What is 10 plus 0?" -> "10") is never found there.
    """
    spans, pos = [], 0
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str):
            continue
        if m["role"] != "assistant":
            # The first match after `pos` cannot lie past the real one, so this never skips too far.
            found = text.find(content, pos) if content else -1
            pos = found + len(content) if found >= 0 else pos
            continue
        prefix = render_prefix(i) if render_prefix is not None else None
        if prefix and text.startswith(prefix):
            pos = max(pos, len(prefix))
        start = text.find(content, pos)
        if start < 0:
            raise LlmcycleError(
                f"Chat message {i} (assistant) does not appear verbatim in the rendered chat template, so "
                "its tokens cannot be masked; add {% generation %} tags to the template."
            )
        end = start + len(content)
        for tok in end_tokens:
            if tok and text.startswith(tok, end):
                end += len(tok)
                break
        spans.append((start, end))
        pos = end
    return spans
