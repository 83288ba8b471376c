"""Tool calls: the tools a request offers, the grammar that forces a call, and the parsers that find calls
in a model's text, per template family (vLLM's `--tool-call-parser` names).

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call: Hermes, Qwen2/2.5/3
  and llmcycle's own template (`tokenizer/chat.py`), which renders calls the same way.
- `llama3_json`: the whole answer is `{"name": ..., "parameters": {...}}` (several joined by `;`), optionally
  after `<|python_tag|>`: Llama 3.1/3.2's JSON tool calling.

`auto` picks by the chat template's text. With `tool_choice` "required" (Anthropic's "any") or a named tool,
the call is not hoped for but enforced: the answer is decoded under a grammar (`guided.py`) that admits
only calls of the offered tools with arguments that follow their JSON schemas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from llmcycle.serve.guided import JSON_OPTIONS
from llmcycle.serve.sampling import stop_holdback

PARSERS = ("auto", "hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MAX_CALLS = 8  # calls in one forced answer: a weak model would otherwise call until max_tokens
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class Tool:
    """One function a request offers: its name, description and JSON schema of its arguments."""

    name: str
    description: str | None = None
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def openai(self) -> dict:
        """The shape chat templates take (transformers passes OpenAI's function tools as they are)."""
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class ToolRequest:
    """What a request offers: its tools, the choice (`auto`, `none`, `required`, or a tool's name) and
    whether several calls may come in one answer."""

    tools: list[Tool]
    choice: str = "auto"
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct names")
        if self.choice not in ("auto", "none", "required") and self.choice not in names:
            raise ValueError(f"tool_choice names {self.choice!r}, which is not among the tools")

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.tools}

    def template_tools(self) -> list[dict]:
        return [t.openai() for t in self.tools]

    def grammar(self, parser: str) -> str | None:
        """The grammar that enforces a call (required, or a named tool); None where the model chooses."""
        if self.choice == "required":
            return forced_grammar(self.tools, parser, self.parallel)
        if self.choice not in ("auto", "none"):
            return forced_grammar([t for t in self.tools if t.name == self.choice], parser, parallel=False)
        return None


def parser_for_template(template: str | None) -> str:
    """The parser a chat template's own tool-call format needs: `auto` resolved."""
    if template and (PYTHON_TAG in template or "ipython" in template):
        return "llama3_json"
    return "hermes"  # Hermes/Qwen templates and llmcycle's own


def _call(obj: object, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def parse(text: str, parser: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(the text before the calls, the calls) in a finished answer; (text, []) where there is no well-formed
    call of an offered tool, so a malformed attempt stays visible as text instead of vanishing."""
    calls: list[ToolCall] = []
    if parser == "hermes":
        start = text.find(HERMES_OPEN)
        if start < 0:
            return text, []
        for body in _HERMES.findall(text[start:]):
            try:
                call = _call(json.loads(body), "arguments")
            except ValueError:
                return text, []
            if call is None or call.name not in names:
                return text, []
            calls.append(call)
        return text[:start].rstrip(), calls
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _call(obj, "parameters")
        if call is None or call.name not in names:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n;":
            pos += 1
    return "", calls


def held_from(text: str, parser: str) -> int:
    """Where a growing answer's text may begin a tool call: a stream sends the text before it as content
    and holds the rest until the answer ends (a partial marker at the end is held too)."""
    if parser == "hermes":
        start = text.find(HERMES_OPEN)
        return start if start >= 0 else len(text) - stop_holdback(text, [HERMES_OPEN])
    head = text.lstrip()  # llama3_json: a call is the whole answer
    if not head or head.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(head):
        return 0
    return len(text)


class ToolCallStream:
    """One streamed choice whose tool calls are parsed: `delta` gives what may be sent now."""

    def __init__(self, parser: str, names: set[str]) -> None:
        self.parser, self.names, self.sent = parser, names, 0

    def delta(self, text: str, stopped: bool, finished: bool) -> tuple[str, list[ToolCall]]:
        """(new content, the calls) for the text so far; calls only once the answer `stopped` (finished
        by a stop, not cut off by max_tokens); a `finished` answer without calls releases what was held."""
        if stopped:
            content, calls = parse(text, self.parser, self.names)
            if calls:
                out, self.sent = content[self.sent:], len(text)
                return out, calls
        end = len(text) if finished else held_from(text, self.parser)
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, []


def forced_grammar(tools: list[Tool], parser: str, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) of one call of `tools` (or up to MAX_CALLS, with `parallel`) in
    the parser's format, each call's arguments constrained by its tool's schema: tool_choice "required" or a
    named tool."""
    def call_schema(t: Tool, args_key: str) -> str:
        # Arguments are the declared parameters: where a schema does not say, no others (as OpenAI's strict
        # mode requires); JSON Schema's default would let a weak model invent keys until max_tokens.
        params = t.parameters if "additionalProperties" in t.parameters else {**t.parameters,
                                                                               "additionalProperties": False}
        return json.dumps({"type": "object", "properties": {"name": {"const": t.name}, args_key: params},
                           "required": ["name", args_key], "additionalProperties": False,
                           "x-guidance": JSON_OPTIONS})

    if parser == "hermes":
        rules = [f"call_{i}: %json {call_schema(t, 'arguments')}" for i, t in enumerate(tools)]
        alts = " | ".join(f"call_{i}" for i in range(len(tools)))
        start = f'start: call ("\\n" call){{0,{MAX_CALLS - 1}}}' if parallel else "start: call"
        return "\n".join([start, f'call: "{HERMES_OPEN}\\n" ({alts}) "\\n{HERMES_CLOSE}"', *rules])
    rules = [f"call_{i}: %json {call_schema(t, 'parameters')}" for i, t in enumerate(tools)]
    alts = " | ".join(f"call_{i}" for i in range(len(tools)))
    start = f'start: call ("; " call){{0,{MAX_CALLS - 1}}}' if parallel else "start: call"
    return "\n".join([start, f"call: {alts}", *rules])
