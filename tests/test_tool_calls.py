"""Tool calls: the parsers (Hermes/Qwen `<tool_call>` and Llama 3 JSON), the template's rendering of tools,
calls and results (the same text as transformers' for a Hermes-style template; the assistant mask covers the
calls, not the results), SFT data with tool calls, and the OpenAI API end to end with the official client:
forced calls (required, a named tool) from a random-weight model whose arguments follow the schemas,
streamed call deltas, tool_choice none, and the tool role sent back."""

import json

import httpx
import pytest
import torch

from conftest import make_serving_model
from llmcycle.serve.async_engine import AsyncLLMEngine
from llmcycle.serve.engine import LLMEngine
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread
from llmcycle.serve.tool_calls import ToolCallStream, held_from, parse, parser_for_template
from llmcycle.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"]}  # no additionalProperties: a forced call takes only the declared ones
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}

# A Hermes/Qwen-style template (tools in the system turn, calls in <tool_call>, results in a user turn)
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}{% set c = c.function %}\n<tool_call>\n"
    '{"name": "{{ c.name }}", "arguments": {{ c.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
    {"role": "assistant", "content": "It is 3 degrees."},
]


def test_parsers_find_calls_and_leave_malformed_text_alone():
    names = {"add", "get_weather"}
    text = 'Let me see.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>'
    content, calls = parse(text, "hermes", names)
    assert content == "Let me see." and [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]
    assert json.loads(calls[0].openai()["function"]["arguments"]) == {"a": 1, "b": 2}
    for bad in ('<tool_call>\n{"name": "add", "arguments": {"a": 1\n</tool_call>',   # broken JSON
                '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>',        # a tool not offered
                "no call at all"):
        assert parse(bad, "hermes", names) == (bad, [])
    content, calls = parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                           '{"name": "add", "parameters": {"a": 3, "b": 4}}', "llama3_json", names)
    assert content == "" and [c.arguments["a"] for c in calls] == [1, 3]
    assert parse("The answer is {1}", "llama3_json", names)[1] == []
    assert parser_for_template(DEFAULT_CHAT_TEMPLATE) == "hermes"
    assert parser_for_template("{{ '<|python_tag|>' }}") == "llama3_json"


def test_a_stream_holds_back_what_may_be_a_call():
    assert held_from("Sure <tool_ca", "hermes") == len("Sure ")
    assert held_from("Sure <tool_call>\n{", "hermes") == len("Sure ")
    assert held_from("a < b", "hermes") == len("a < b")
    s, text = ToolCallStream("hermes", {"add"}), 'Hi <tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    sent = [s.delta(text[:n], False, False)[0] for n in (2, 8, 20)]
    assert "".join(sent) == "Hi "
    content, calls = s.delta(text, True, True)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1})]
    plain = ToolCallStream("hermes", {"add"})
    assert plain.delta("x <tool", False, False)[0] == "x " and plain.delta("x <tool", True, True)[0] == "<tool"


def test_templates_render_tools_calls_and_results(tiny_data):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained(tiny_data["tokenizer"])
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    ids, mask = tok.encode_chat(CONVERSATION, tools=TOOLS)
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n'
                       "</tool_call><|end|>It is 3 degrees.<|end|>")  # the calls are trained, the result is not
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS)
    assert '"name": "get_weather"' in text.split("<|user|>")[0] and "<tool_response>\n{\"temp\": 3}" in text
    # A Hermes-style template renders as transformers renders it
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_data["tokenizer"] + "/tokenizer.json"))
    hf.chat_template = tok.chat_template = HERMES_TEMPLATE
    ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tools=TOOLS)
    assert ours == hf.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert parser_for_template(HERMES_TEMPLATE) == "hermes"


def test_sft_data_with_tool_calls(tiny_data, tmp_path):
    from llmcycle.train.posttrain.chat_data import Rejects, load_sft

    tok = Tokenizer.from_pretrained(tiny_data["tokenizer"])
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": CONVERSATION, "tools": TOOLS},
            {"messages": CONVERSATION[:2], "tools": json.dumps(TOOLS)},  # TRL may hold tools as JSON text
            {"messages": CONVERSATION[:2], "tools": "not json"},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rejects = Rejects()
    examples = load_sft([path], tok, max_length=4096, rejects=rejects)
    assert len(examples) == 2 and not any(e.truncated for e in examples)
    assert set(rejects.to_dict()["rejected_by_reason"]) == {"tools is not a list of function schemas",
                                                            "missing or non-string content"}
    first = examples[0]
    trained = tok.decode([t for t, m in zip(first.ids, first.trained) if m], skip_special_tokens=False)
    assert "<tool_call>" in trained and "temp" not in trained


@pytest.fixture(scope="module")
def server(tiny_data, tmp_path_factory):
    torch.set_num_threads(1)
    model_dir = make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("tools") / "model",
                                   max_positions=1024)
    with serve_in_thread(ServerState({"m": AsyncLLMEngine(LLMEngine(model_dir, block_size=8, num_blocks=512))})) as url:
        yield url


def test_forced_calls_from_a_random_model_follow_the_schemas(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    chat = [{"role": "user", "content": "What is 2 + 3, and the weather in Oslo?"}]
    for seed in range(4):
        r = client.chat.completions.create(model="m", messages=chat, tools=TOOLS, tool_choice="required", seed=seed,
                                           max_tokens=300, temperature=1.0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(model="m", messages=chat, tools=TOOLS, tool_choice=named, max_tokens=300,
                                       temperature=0)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"]
    jsonschema.validate(json.loads(calls[0].function.arguments), ADD)
    assert set(json.loads(calls[0].function.arguments)) == {"a", "b"}
    # streamed: the same call arrives as a tool_calls delta, and no call text leaks as content
    stream = client.chat.completions.create(model="m", messages=chat, tools=TOOLS, tool_choice=named, max_tokens=300,
                                            temperature=0, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        ("add", json.loads(calls[0].function.arguments))]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_the_tool_role(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    chat = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "c"})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"}]
    r = client.chat.completions.create(model="m", messages=chat, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    for body, needle in [({"tool_choice": "required"}, "tool_choice needs tools"),
                         ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}}, "rm"),
                         ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
                          "cannot be combined"),
                         ({"tools": [TOOLS[1], TOOLS[1]]}, "distinct")]:
        r = httpx.post(server + "/v1/chat/completions", json={"model": "m", "messages": chat, "max_tokens": 4, **body})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)


def test_a_transformers_qwen2_with_its_own_tool_template(tiny_data, tmp_path):
    """A checkpoint and tokenizer written by transformers (Qwen2 layout, bos_token null, a Hermes-style
    template of its own): served, offered tools, it answers forced calls in its format, parsed back."""
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=tiny_data["tokenizer"] + "/tokenizer.json",
                                                  eos_token="<|end_of_text|>", pad_token="<|pad|>")
    hf_tok.chat_template = HERMES_TEMPLATE
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True, eos_token_id=hf_tok.eos_token_id, bos_token_id=None)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    hf_tok.save_pretrained(tmp_path / "qwen")
    engine = AsyncLLMEngine(LLMEngine(str(tmp_path / "qwen"), block_size=8, num_blocks=256))
    with serve_in_thread(ServerState({"qwen": engine})) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "2 + 3?"}],
                                           tools=TOOLS, tool_choice="required", max_tokens=400, temperature=0)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and 1 <= len(calls) <= 8
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
