"""Structured outputs from a random-weight model: every answer parses and follows its JSON schema (checked
with `jsonschema`), regexes, choices and Lark grammars hold, guided and free rows share a step without
changing each other, bad schemas are a 400 naming the problem, and the OpenAI client's response_format
and vLLM's structured_outputs work through the server, streamed too."""

import json
import re

import httpx
import pytest
import torch

from conftest import make_serving_model
from llmcycle.serve.async_engine import AsyncLLMEngine
from llmcycle.serve.engine import LLM, LLMEngine
from llmcycle.serve.guided import StructuredOutputsParams
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

# Bounded schemas: a weak model fills whatever room a schema leaves, so strings, numbers and arrays have
# limits here and every answer ends inside max_tokens.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", "eel"]}},
     "required": ["ok", "kind"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 99}, "y": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x", "y"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
     "required": ["point", "tags"], "additionalProperties": False},
    {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,5}$"}]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^2026-(0[1-9]|1[0-2])-[0-2][0-9]$"}},
     "required": ["date"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("guided") / "model", max_positions=512)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, block_size=8, num_blocks=512)


def _guided(max_tokens: int = 200, **kw) -> dict:
    return {"max_tokens": max_tokens, "structured_outputs": StructuredOutputsParams(**kw)}


def test_every_answer_follows_its_json_schema(llm):
    prompts = ["def add(a, b):", "The answer is", "import os"]
    params = [SamplingParams(temperature=t, seed=s, **_guided(json=schema))
              for schema in SCHEMAS for t, s in ((0.0, None), (1.0, 1), (1.0, 2))]
    outs = llm.generate([prompts[i % 3] for i in range(len(params))], params)
    for i, out in enumerate(outs):
        c = out.outputs[0]
        schema = SCHEMAS[i // 3]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
    assert len({o.outputs[0].text for o in outs}) > len(SCHEMAS)  # sampling still samples


def test_json_object_regex_choice_and_grammar(llm):
    cases = [
        (_guided(regex=r"[A-Z][a-z]{2,6} [0-9]{3}"), lambda t: re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{3}", t)),
        (_guided(choice=["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
        (_guided(grammar='start: "x = " NUM ("+" NUM)?\nNUM: /[0-9]{1,3}/'),
         lambda t: re.fullmatch(r"x = [0-9]{1,3}(\+[0-9]{1,3})?", t)),
        (_guided(grammar='start: "call: " obj\nobj: %json {"type": "object", "properties": {"n": {"type": '
                         '"integer", "minimum": 1, "maximum": 9}}, "required": ["n"], "additionalProperties": false}'),
         lambda t: t.startswith("call: ") and json.loads(t[6:])["n"] in range(1, 10)),
    ]
    for seed in (0, 1, 2):
        outs = llm.generate(["Say:"] * len(cases), [SamplingParams(temperature=1.0, seed=seed, **kw) for kw, _ in cases])
        for (kw, ok), out in zip(cases, outs):
            c = out.outputs[0]
            assert c.finish_reason == "stop" and ok(c.text), (kw, c.text)


def test_json_object_is_an_object_or_cut_off_by_max_tokens(llm):
    """Any JSON object leaves strings unbounded: a random-weight model may fill max_tokens inside one, and
    the answer then ends with finish reason "length", as OpenAI's does; one that stops is an object."""
    outs = llm.generate(["A:"] * 6, [SamplingParams(temperature=t, seed=s, **_guided(json_object=True, max_tokens=120))
                                     for t, s in ((0.0, None), (0.5, 1), (1.0, 1), (1.0, 2), (1.0, 3), (1.0, 4))])
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert stopped and all(isinstance(json.loads(c.text), dict) for c in stopped)
    assert all(o.outputs[0].text.startswith("{") for o in outs)


def test_guided_and_free_rows_share_a_step_unchanged(llm):
    free = SamplingParams(temperature=0.0, max_tokens=12)
    alone = llm.generate(["def f(x):", "import sys"], free)
    mixed = llm.generate(["def f(x):", "The", "import sys", "Hi"],
                         [free, SamplingParams(temperature=0.0, **_guided(json=SCHEMAS[0])), free,
                          SamplingParams(temperature=1.0, seed=3, n=2, **_guided(choice=["a", "b"]))])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == [o.outputs[0].token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS[0])
    assert {c.text for c in mixed[3].outputs} <= {"a", "b"}


def test_bad_constraints_are_refused_before_queuing(llm):
    engine = llm.engine
    bad = [dict(regex="("), dict(grammar="start: nope"), dict(json={"type": "object", "properties": 3})]
    for kw in bad:
        with pytest.raises(ValueError, match="structured_outputs"):
            engine.add_request("x", SamplingParams(**_guided(**kw)))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[""])
    assert engine.num_requests == 0 and not engine.runner.guided.matchers


def test_openai_client_response_format_and_structured_outputs(model_dir):
    schema = SCHEMAS[0]
    engine = AsyncLLMEngine(LLMEngine(model_dir, block_size=8, num_blocks=512))
    with serve_in_thread(ServerState({"m": engine})) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        chat = [{"role": "user", "content": "Who are you?"}]
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
        r = client.chat.completions.create(model="m", messages=chat, max_tokens=200, response_format=fmt, seed=1)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        stream = client.chat.completions.create(model="m", messages=chat, max_tokens=200, response_format=fmt,
                                                temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jsonschema.validate(json.loads(text), schema)
        r = client.chat.completions.create(model="m", messages=chat, max_tokens=300,
                                           response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        r = client.completions.create(model="m", prompt="Pick:", max_tokens=20,
                                      extra_body={"structured_outputs": {"choice": ["red", "green"]}})
        assert r.choices[0].text in ("red", "green")
        for body, needle in [
            ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
            ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
            ({"response_format": {"type": "xml"}}, "response_format"),
            ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}, "both"),
        ]:
            r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": chat, **body})
            assert r.status_code in (400, 422) and needle in r.json()["error"]["message"], (body, r.text)
