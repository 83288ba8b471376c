"""Anthropic's Messages API over the same engines: POST /v1/messages and POST /v1/messages/count_tokens.

What an `anthropic` client sends works unchanged against `llmcycle serve` (`base_url` = the server):
a system prompt (a string or text blocks), user/assistant turns of text blocks, `max_tokens` (required, as
in Anthropic's API), `stop_sequences`, `temperature`, `top_p`, `top_k`, `metadata.user_id`, streaming with
Anthropic's events (`message_start`, `content_block_start`, `ping`, `content_block_delta`,
`content_block_stop`, `message_delta` with the output usage, `message_stop`), and errors in its shape
`{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}`, mid-stream as an `error`
event. Keys come as `x-api-key` (Anthropic's header) or `Authorization: Bearer`; `anthropic-version` is
accepted when it is a date, as the client sends it, and not required (curl users omit it).

Admission, keys, limits, budgets, safety checks, the request log and /metrics are the OpenAI routes' own
(`server.py`): one request log and one set of limits whichever API a client speaks.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from llmcycle.monitor.tracker import CLIENT_CLOSED, Trace
from llmcycle.serve import server as srv
from llmcycle.serve.guided import StructuredOutputsParams
from llmcycle.serve.protocol import RequestLimits
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.tool_calls import Tool, ToolCallStream, ToolRequest
from llmcycle.serve.tool_calls import parse as parse_tool_calls

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); 503 is its "overloaded".
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               415: "invalid_request_error", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations: accepted, no effect here
    type: Literal["text"]
    text: str


class ContentBlock(BaseModel):
    """Any block of a message's content: text, tool_use (an assistant's call: id, name, input) or
    tool_result (a user's answer to one: tool_use_id, content, is_error); other kinds are refused."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = None
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    def for_template(self, index: int) -> list[dict]:
        """The turn as chat templates take it: tool_use blocks become the assistant's `tool_calls`, each
        tool_result its own `tool` turn (before the user's text, as a client sends them first)."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        where = f"messages.{index}.content"
        text, calls, results = [], [], []
        for block in self.content:
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "tool_use" and self.role == "assistant" and block.name:
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": block.input or {}}})
            elif block.type == "tool_result" and self.role == "user":
                body = block.content if isinstance(block.content, str) else "".join(
                    b.text for b in block.content or [])
                results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                "content": f"Error: {body}" if block.is_error else body})
            else:
                raise srv.APIError(400, f"{where}: {block.type} blocks are not supported here.", where)
        turn = {"role": self.role, "content": "".join(text)}
        if calls:
            turn["tool_calls"] = calls
        return results + ([turn] if text or calls or not results else [])


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, strict: accepted
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    input_schema: dict | None = None
    type: str | None = None  # "custom"; Anthropic's server tools (web search, ...) are refused

    def tool(self) -> Tool:
        if self.type not in (None, "custom"):
            raise ValueError(f"tools: {self.type} is one of Anthropic's server tools, not supported here")
        return Tool(self.name, self.description, self.input_schema or {"type": "object", "properties": {}})


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class JsonFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: JsonFormat | None = None
    effort: str | None = None  # a reasoning setting of Anthropic's models; nothing to change here


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = Field(default=None, max_length=256)


class MessagesRequest(BaseModel):
    """A Messages API body. Unknown fields are refused, as the OpenAI routes do, so a misspelt setting is an
    error naming it rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stream: bool = False
    metadata: Metadata | None = None
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None

    def trace_fields(self) -> tuple[str | None, None]:
        """(user, metadata) as the request log keeps them: Anthropic's metadata holds only user_id."""
        return (self.metadata.user_id if self.metadata else None), None

    def chat(self) -> list[dict]:
        """The turns as the chat template takes them (the system prompt first)."""
        out = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": system})
        return out + [turn for i, m in enumerate(self.messages) for turn in m.for_template(i)]

    def tool_request(self) -> ToolRequest | None:
        """The tools offered and Anthropic's tool_choice as the OpenAI route's (any: required); ValueError."""
        choice = self.tool_choice
        if not self.tools:
            if choice is not None and choice.type != "none":
                raise ValueError("tool_choice needs tools")
            return None
        name = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type if choice else "auto")
        if choice is not None and choice.type == "tool":
            if not choice.name:
                raise ValueError("tool_choice of type tool needs the tool's name")
            name = choice.name
        parallel = not (choice and choice.disable_parallel_tool_use)
        return ToolRequest([t.tool() for t in self.tools], name or "auto", parallel)

    def sampling_params(self, stop_token_ids: list[int], forced_grammar: str | None = None) -> SamplingParams:
        structured = None
        if self.output_config and self.output_config.format:
            if forced_grammar:
                raise ValueError("output_config.format cannot be combined with a forced tool_choice (any, tool)")
            structured = StructuredOutputsParams(json=self.output_config.format.schema_)
        elif forced_grammar:
            structured = StructuredOutputsParams(grammar=forced_grammar)
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=-1 if self.top_k is None else self.top_k, stop=list(self.stop_sequences or []),
                              stop_token_ids=list(stop_token_ids), max_tokens=self.max_tokens,
                              structured_outputs=structured)

    def check_limits(self, limits: RequestLimits) -> tuple[str, str] | None:
        stops = self.stop_sequences or []
        if len(stops) > limits.max_stop:
            return "stop_sequences", f"stop_sequences takes at most {limits.max_stop} strings on this server"
        if any(len(s) > limits.max_stop_chars for s in stops):
            return "stop_sequences", f"a stop sequence may have at most {limits.max_stop_chars} characters"
        return None

    def unsupported(self) -> str | None:
        return None


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None

    stream: ClassVar[bool] = False
    chat = MessagesRequest.chat
    tool_request = MessagesRequest.tool_request

    def trace_fields(self) -> tuple[None, None]:
        return None, None

    def check_limits(self, limits: RequestLimits) -> None:
        return None

    def unsupported(self) -> None:
        return None


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_response(exc: srv.APIError) -> JSONResponse:
    # A body off the schema is Anthropic's 400 invalid_request_error (OpenAI's routes answer 422).
    status = 400 if exc.status == 422 else exc.status
    return JSONResponse(error_body(status, exc.message), status_code=status, headers=exc.headers)


async def answer(state: srv.ServerState, request: Request, route: str, handler: Any) -> Response:
    """Run a Messages route with every error in Anthropic's shape (the OpenAI routes answer OpenAI's)."""
    try:
        version = request.headers.get("anthropic-version")
        if version is not None and not VERSION.match(version):
            raise srv.APIError(400, f"anthropic-version: {version!r} is not a version date such as 2023-06-01.")
        return await srv._monitored(state, route, lambda trace: handler(state, request, trace))
    except srv.APIError as exc:
        return error_response(exc)
    except Exception as exc:  # noqa: BLE001 - logged by _engine_error, answered 500 in Anthropic's shape
        return error_response(srv._engine_error(exc))


async def _prompt(state: srv.ServerState, request: Request, model: type, trace: Trace) -> tuple:
    """Admit a request and render its chat: (key, request, base model, engine, LoRA adapter, prompt ids)."""
    try:
        key, req, base, engine, lora = await srv._admit(state, request, model, trace)
    except srv.APIError as exc:
        if exc.status == 422:  # the trace records what the client is answered
            raise srv.APIError(400, exc.message, exc.param) from None
        raise
    try:
        tools = req.tool_request()
    except ValueError as exc:
        raise srv.APIError(400, str(exc), "tools") from None
    ids = await srv._chat_prompt(state, trace, base, engine, req.chat(), tools)
    return key, req, base, engine, lora, ids, tools


async def count_tokens(state: srv.ServerState, request: Request, trace: Trace) -> Response:
    """POST /v1/messages/count_tokens: the prompt's length in tokens, as the template renders it."""
    ids = (await _prompt(state, request, CountTokensRequest, trace))[5]
    return JSONResponse({"input_tokens": len(ids)})


def stop_reason(finish_reason: str | None, matched: str | int | None, calls: list) -> str:
    """Anthropic's stop_reason for an engine's finish: tool calls `tool_use`; a stop string
    `stop_sequence`; eos or the template's end-of-turn token `end_turn`; the token limit `max_tokens`."""
    if finish_reason == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if isinstance(matched, str) else "end_turn"


def tool_use(call: Any) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": call.arguments}


async def messages(state: srv.ServerState, request: Request, trace: Trace) -> Response:
    """POST /v1/messages."""
    key, req, base, engine, lora, ids, tools = await _prompt(state, request, MessagesRequest, trace)
    tok = engine.engine.tokenizer
    parser = state.tool_parser_for(tok) if tools is not None else None
    forced = tools.grammar(parser) if tools is not None else None
    ids_list, params_list = await asyncio.to_thread(
        srv._check_params, engine, [ids], lambda n: req.sampling_params(tok.end_of_turn_ids, forced), "messages")
    mid = "msg_" + uuid.uuid4().hex
    gen = srv._Generation(state, request, engine, key, ids_list, params_list, lora, trace, mid)
    prompt_len = gen.prompt_lens[0]
    message = {"id": mid, "type": "message", "role": "assistant", "model": req.model}
    parsing = None if tools is None or tools.choice == "none" else (parser, tools.names)

    if not req.stream:
        c = (await gen.collect())[0].outputs[0]
        text, calls = c.text, []
        if parsing and c.finish_reason == "stop":
            text, calls = parse_tool_calls(c.text, *parsing)
        reason = "end_turn" if c.finish_reason == "content_filter" else stop_reason(c.finish_reason, c.stop_reason,
                                                                                    calls)
        content = ([{"type": "text", "text": text}] if text or not calls else []) + [tool_use(x) for x in calls]
        return JSONResponse({
            **message, "content": content, "stop_reason": reason,
            "stop_sequence": c.stop_reason if reason == "stop_sequence" else None,
            "usage": {"input_tokens": prompt_len, "output_tokens": len(c.token_ids)}})

    outputs = await gen.stream()

    def event(name: str, data: dict) -> str:
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        status, error_type = CLIENT_CLOSED, "ClientDisconnected"  # until the stream ends otherwise
        held = ToolCallStream(*parsing) if parsing else None
        blocks = 0  # content blocks opened so far; the text block, when there is one, is the first

        def text_delta(text: str) -> str:
            return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": text}})

        def open_text() -> str:
            return event("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}})

        try:
            yield event("message_start", {"type": "message_start", "message": {
                **message, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": prompt_len, "output_tokens": 0}}})
            yield event("ping", {"type": "ping"})
            sent, c, calls = 0, None, []
            async for _, out in outputs:
                c = out.outputs[0]
                finished = c.finish_reason is not None
                if held is not None:
                    delta, calls = held.delta(c.text, c.finish_reason == "stop", finished)
                else:
                    delta, sent = c.text[sent:], len(c.text)
                if delta:
                    if not blocks:
                        yield open_text()
                        blocks = 1
                    yield text_delta(delta)
            if state.monitor.safety:  # the text is out already: the checks count and flag
                srv._screen_completions(state, trace, gen.finals, can_change=False)
            if not blocks and not calls:  # an empty answer still has its (empty) text block
                yield open_text()
                blocks = 1
            if blocks:
                yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            for call in calls:
                block = tool_use(call)
                yield event("content_block_start", {"type": "content_block_start", "index": blocks,
                                                    "content_block": {**block, "input": {}}})
                yield event("content_block_delta", {"type": "content_block_delta", "index": blocks, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
                yield event("content_block_stop", {"type": "content_block_stop", "index": blocks})
                blocks += 1
            reason = stop_reason(c.finish_reason, c.stop_reason, calls)
            yield event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": c.stop_reason if reason == "stop_sequence" else None},
                "usage": {"output_tokens": len(c.token_ids)}})
            yield event("message_stop", {"type": "message_stop"})
            status, error_type = 200, None
        except (asyncio.CancelledError, GeneratorExit):
            raise  # the client went away: closing `outputs` below aborts the engine request
        except BaseException as exc:  # noqa: BLE001 - an error mid-stream is sent as an error event
            err = srv._engine_error(exc)
            status, error_type = err.status, srv.APIError.TYPES.get(err.status, "Error")
            yield event("error", error_body(err.status, err.message))
        finally:
            await outputs.aclose()
            trace.end(status, error_type)

    return gen.streamed(events())
