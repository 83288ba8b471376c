"""OpenAI request bodies (pydantic) and their translation into `SamplingParams`.

Field names and defaults are OpenAI's, plus vLLM's sampling extras (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos). Unknown fields are refused (extra="forbid") so a typo such as `max_token`
is an error naming the field instead of a silently ignored setting; so are NaN and infinities.

`RequestLimits` are the server's bounds on what one request may ask for (n, stop lists, body size):
`check_limits` names the first one a request goes over, before any work is done for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmcycle.serve.config import ServeConfig
from llmcycle.serve.guided import StructuredOutputsParams
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.tool_calls import Tool, ToolRequest


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request, each refused with 400 (413 for the body) before anything is queued.

    Without them one request could wedge the engine for everyone: `n: 100000000` builds that many
    sequences, 20,000 prompts in one request stall the event loop for seconds, 50,000 stop strings are
    searched on every step of the request, a 20 MB body is read, parsed and tokenized whole. The defaults are generous next to OpenAI's (n <= 128, 4 stop strings).
    """

    max_n: int = ServeConfig.max_n  # n and best_of: sequences one prompt may fan out into
    max_prompts: int = ServeConfig.max_prompts  # prompts in one completion request (each is a request to the engine)
    max_stop: int = ServeConfig.max_stop  # stop strings per request
    max_stop_chars: int = 1024  # characters per stop string (each step compares the text's tail with it)
    max_stop_token_ids: int = 1024
    max_body_bytes: int = int(ServeConfig.max_body_mb * 2**20)  # 413 above; also bounds the prompt the server will tokenize
    max_json_depth: int = 64  # nesting of arrays/objects in a body (a chat body needs about 5)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of json (a schema), json_object, regex, choice, grammar (Lark)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    n: int = 1
    temperature: float | None = None  # None: 1.0 as in OpenAI
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's request metadata: up to 16 string pairs, kept with the request in the request log
    metadata: dict[str, str] | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata holds at most 16 pairs, keys of at most 64 characters and values of "
                             "at most 512")
        return v

    def trace_fields(self) -> tuple[str | None, dict[str, str] | None]:
        """(user, metadata) as the request log keeps them."""
        return self.user, self.metadata

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        extra_stop_token_ids: list[int] | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=self.stop or [],
            stop_token_ids=list(self.stop_token_ids or []) + list(extra_stop_token_ids or []),
            max_tokens=max_tokens,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            structured_outputs=self.structured(),
        )

    def structured(self) -> StructuredOutputsParams | None:
        """The constraint on the output, from response_format or structured_outputs (not both);
        ValueError naming the field."""
        if self.response_format is not None and self.structured_outputs is not None:
            if self.response_format.type != "text":
                raise ValueError("structured_outputs and response_format cannot both constrain the output")
        if self.structured_outputs is not None:
            so = self.structured_outputs
            return StructuredOutputsParams(json=so.json_, json_object=so.json_object, regex=so.regex,
                                           choice=so.choice, grammar=so.grammar)
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=(fmt.json_schema.schema_ if fmt.json_schema else None) or {"type": "object"})

    def check_limits(self, limits: RequestLimits) -> tuple[str, str] | None:
        """(field, message) for the first of the server's limits this request goes over, else None."""
        if self.n > limits.max_n:
            return "n", f"n must be <= {limits.max_n} on this server, got {self.n}"
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > limits.max_stop:
            return "stop", f"stop takes at most {limits.max_stop} strings on this server, got {len(stops)}"
        if any(len(s) > limits.max_stop_chars for s in stops):
            return "stop", f"a stop string may have at most {limits.max_stop_chars} characters on this server"
        if len(self.stop_token_ids or []) > limits.max_stop_token_ids:
            return "stop_token_ids", (f"stop_token_ids takes at most {limits.max_stop_token_ids} ids on this "
                                      f"server, got {len(self.stop_token_ids or [])}")
        return None

    def unsupported(self) -> str | None:
        """A message for a well-formed setting this server does not implement, else None."""
        if self.logit_bias:
            return "logit_bias is not supported"
        return None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check_limits(self, limits: RequestLimits) -> tuple[str, str] | None:
        if len(self.prompts()) > limits.max_prompts:
            return "prompt", (f"prompt takes at most {limits.max_prompts} prompts on this server, "
                              f"got {len(self.prompts())}")
        if self.best_of is not None and self.best_of > limits.max_n:
            return "best_of", f"best_of must be <= {limits.max_n} on this server, got {self.best_of}"
        return super().check_limits(limits)

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of other than n is not supported"
        return super().unsupported()


class ContentPart(BaseModel):
    """One part of a message's content list: text parts are used, other kinds (images) are ignored."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict = "{}"  # OpenAI sends a JSON string; Hugging Face chat data holds a dict


class ToolCallItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, ...: accepted, ignored by the template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallItem] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates take it: developer is system; a call's arguments as a dict
        (templates write `arguments | tojson`), where they parse."""
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(value: str | dict) -> str | dict:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_request(self) -> ToolRequest | None:
        """The tools offered and how the answer may use them; None without tools (or tool_choice none is
        then the only choice allowed). ValueError naming the field."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools")
            return None
        tools = [Tool(t.function.name, t.function.description, t.function.parameters
                      or {"type": "object", "properties": {}}) for t in self.tools]
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            choice = choice.function.name
        return ToolRequest(tools, choice, self.parallel_tool_calls is not False)
