import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcycle.data.pycorpus import collect_python_corpus, split_heldout
from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer import KINDS, Tokenizer, bytes_per_token, train_tokenizer

VOCAB = 800
CHAT = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does len() return?"},
    {"role": "assistant", "content": "The number of items, e.g. len([1, 2]) == 2."},
    {"role": "user", "content": "And for a str?  Ünïcode ✓"},
    {"role": "assistant", "content": "  The number of code points:\n\nlen('é') == 1"},
]
EXPECTED_IDS = {
    "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|pad|>": 2, "<|mask|>": 3,
    "<|system|>": 4, "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7,
}


@pytest.fixture(scope="module")
def split():
    train, heldout = split_heldout(collect_python_corpus(max_bytes=500_000), heldout_fraction=0.2)
    return [d.text for d in train], [d.text for d in heldout]


@pytest.fixture(scope="module")
def toks(split):
    return {kind: train_tokenizer(split[0], kind=kind, vocab_size=VOCAB) for kind in KINDS}


@pytest.fixture(scope="module")
def saved(toks, tmp_path_factory):
    dirs = {}
    for kind, tok in toks.items():
        dirs[kind] = tmp_path_factory.mktemp(f"tok-{kind}")
        tok.save_pretrained(dirs[kind])
    return dirs


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_and_ids(toks, kind):
    tok = toks[kind]
    assert tok.vocab_size == VOCAB
    for text, i in EXPECTED_IDS.items():
        assert tok.token_to_id(text) == i
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.unk_id == (8 if kind == "wordpiece" else None)
    assert tok.end_of_turn_ids == [1, 7]
    assert tok.chat_template is not None
    # The backend never adds BOS/EOS itself; callers ask for them.
    ids = tok.encode("x = 1")
    assert 0 not in ids and 1 not in ids
    assert tok.encode("x = 1", add_bos=True, add_eos=True) == [0, *ids, 1]
    assert tok.decode([0, *ids, 1], skip_special_tokens=True) == tok.decode(ids)
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text())
def test_round_trip_any_unicode(toks, kind, text):
    tok = toks[kind]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Special-token text (e.g. "<|end|>") encodes to the special id, which counts 0 bytes.
    if not any(special in text for special in EXPECTED_IDS):
        assert sum(tok.token_bytes()[i] for i in ids) == len(text.encode("utf-8"))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_round_trip_real_text_and_edge_cases(toks, split, kind):
    tok = toks[kind]
    edge = ["", " ", "\r\n\t", "\x00\x7f", "😀👍🏽", "e\u0301", "日本語のテキスト", "\ufeffBOM"]
    texts = split[1][:20] + edge
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text


def test_wordpiece_normalizes_as_documented(toks):
    tok = toks["wordpiece"]
    # Whitespace runs collapse to one space, spaces before punctuation go, control characters vanish.
    assert tok.decode(tok.encode("def  f(x):\n\treturn x\x00 .")) == "def f ( x ) : return x."
    assert tok.token_to_id("<|unk|>") in tok.encode("\U0001d518")  # a character never seen in training


def test_token_bytes(toks, split):
    for tok in toks.values():
        tb = tok.token_bytes()
        assert len(tb) == tok.vocab_size
        assert all(tb[i] == 0 for i in EXPECTED_IDS.values())
        assert all(b > 0 for i, b in enumerate(tb) if i not in tok.special_ids)
    for kind in ("bpe", "unigram"):
        tok = toks[kind]
        for text, ids in zip(split[1], tok.encode_batch(split[1])):
            assert sum(tok.token_bytes()[i] for i in ids) == len(text.encode("utf-8"))


def test_compression_on_heldout(toks, split):
    for kind, tok in toks.items():
        assert bytes_per_token(tok, split[1]) > 1.5, kind
    with pytest.raises(LlmcycleError):
        bytes_per_token(toks["bpe"], [""])


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(toks, saved, split, kind):
    tok, back = toks[kind], Tokenizer.from_pretrained(saved[kind])
    assert back.content_hash() == tok.content_hash()
    assert back.encode_batch(split[1]) == tok.encode_batch(split[1])
    assert back.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)
    assert back.vocab_size == tok.vocab_size and back.unk_id == tok.unk_id
    assert back.end_of_turn_ids == tok.end_of_turn_ids
    assert back.token_bytes() == tok.token_bytes()
    config = json.loads((saved[kind] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == tok.chat_template
    assert config["added_tokens_decoder"]["7"]["content"] == "<|end|>"
    assert (saved[kind] / "special_tokens_map.json").is_file()


def test_content_hash_tells_tokenizers_apart(toks):
    hashes = {tok.content_hash() for tok in toks.values()}
    assert len(hashes) == len(KINDS)
    other = Tokenizer(toks["bpe"].backend, {**toks["bpe"].config, "chat_template": "{{ messages }}"})
    assert other.content_hash() != toks["bpe"].content_hash()


@pytest.mark.parametrize("kind", KINDS)
def test_encode_chat_matches_rendered_text(toks, kind):
    tok = toks[kind]
    for messages, gen in ((CHAT, False), (CHAT[:4], True)):
        ids, mask = tok.encode_chat(messages, add_generation_prompt=gen)
        assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=gen))
        assert len(mask) == len(ids)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.parametrize("kind", KINDS)
def test_assistant_mask(toks, kind):
    tok = toks[kind]
    text = tok.apply_chat_template(CHAT)
    assert text.startswith("<|begin_of_text|><|system|>\nYou answer")
    assert text.endswith("<|assistant|>\n  The number of code points:\n\nlen('é') == 1<|end|>\n")
    ids, mask = tok.encode_chat(CHAT)
    masked = [i for i, m in zip(ids, mask) if m]
    # Exactly the two assistant contents, each followed by its end-of-turn token.
    end = tok.token_to_id("<|end|>")
    assert masked.count(end) == 2 and masked[-1] == end
    headers = (tok.bos_id, *tok.encode("<|user|><|system|><|assistant|>"))
    assert not any(m for i, m in zip(ids, mask) if i in headers)
    if kind != "wordpiece":  # WordPiece drops whitespace, so only byte-level kinds decode back verbatim
        expected = "".join(m["content"] + "<|end|>" for m in CHAT if m["role"] == "assistant")
        assert tok.decode(masked) == expected
        unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
        assert "What does len() return?" in unmasked and "Ünïcode" in unmasked
        assert "number of" not in unmasked
    # Runs: header, first answer, user turn and header, second answer, then the final "\n" (which
    # WordPiece drops).
    runs = [m for k, m in enumerate(mask) if k == 0 or mask[k - 1] != m]
    assert runs == ([0, 1, 0, 1] if kind == "wordpiece" else [0, 1, 0, 1, 0])


def test_chat_role_errors(toks):
    tok = toks["bpe"]
    bad = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]
    with pytest.raises(LlmcycleError, match="role"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    assert "<tool_response>\nx\n</tool_response>" in tok.apply_chat_template(bad)  # our template takes tools
    with pytest.raises(LlmcycleError, match="role"):
        tok.encode_chat([{"content": "no role"}])
    # A custom template's raise_exception() surfaces as LlmcycleError too.
    custom = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    other = Tokenizer(tok.backend, {**tok.config, "chat_template": custom})
    assert other.apply_chat_template(CHAT[:2]) == CHAT[0]["content"] + CHAT[1]["content"]
    with pytest.raises(LlmcycleError, match="no tools here"):
        other.apply_chat_template(bad)
    # Without {% generation %} the mask falls back to finding the assistant text.
    ids, mask = other.encode_chat(CHAT)
    assert other.decode([i for i, m in zip(ids, mask) if m]) == CHAT[2]["content"] + CHAT[4]["content"]


def test_train_errors(split):
    with pytest.raises(LlmcycleError, match="bpe, unigram, wordpiece"):
        train_tokenizer(split[0][:5], kind="sentencepiece")
    with pytest.raises(LlmcycleError, match="too small"):
        train_tokenizer(split[0][:5], vocab_size=100)
    with pytest.raises(LlmcycleError, match="empty"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(LlmcycleError, match="strings"):
        train_tokenizer(["ok", b"bytes"], vocab_size=300)


def test_load_errors(tmp_path, saved):
    with pytest.raises(LlmcycleError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(LlmcycleError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlmcycleError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((saved["bpe"] / "tokenizer.json").read_text())
    with pytest.raises(LlmcycleError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(LlmcycleError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)


# ---- transformers interoperability ----


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_our_directory(toks, saved, split, kind):
    transformers = pytest.importorskip("transformers")
    tok = toks[kind]
    hf = transformers.AutoTokenizer.from_pretrained(saved[kind])
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (0, 1, 2, 3)
    texts = split[1][:10] + ["héllo wörld 😀 <|end|> tail"]
    for text in texts:
        # Both conventions agree: the tokenizer's own (BOS first) and the bare text.
        assert hf.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        if kind != "wordpiece":
            assert hf.decode(tok.encode(text)) == text
    for messages, gen in ((CHAT, False), (CHAT[:4], True)):
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert rendered == tok.apply_chat_template(messages, add_generation_prompt=gen)
    out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = tok.encode_chat(CHAT)
    assert list(out["input_ids"]) == ids
    if kind != "wordpiece":
        # transformers stops at a span starting on a character no WordPiece token covers (a dropped space).
        assert list(out["assistant_masks"]) == mask
    with pytest.raises(Exception, match="role must be"):
        hf.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    # tools, calls and results render as transformers renders them (its `tools` argument)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    calls = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]
    assert hf.apply_chat_template(calls, tools=tools, tokenize=False) == tok.apply_chat_template(calls, tools=tools)


@pytest.mark.parametrize("token_format", ["string", "dict"])
def test_we_load_a_transformers_directory(toks, split, tmp_path, token_format):
    transformers = pytest.importorskip("transformers")
    ours = toks["bpe"]
    # A newline after the role keeps header and content in separate tokens, so the mask is exact.
    template = "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|end|>\n{% endfor %}"
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=ours.backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|pad|>", chat_template=template,
    )
    hf.save_pretrained(tmp_path)
    if token_format == "dict":
        # Older transformers (LlamaTokenizerFast and friends) wrote special tokens as AddedToken dicts,
        # sometimes only in special_tokens_map.json, and kept the template in tokenizer_config.json.
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["bos_token"] = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False,
                               "normalized": False, "rstrip": False, "single_word": False}
        del config["eos_token"]
        config["chat_template"] = (tmp_path / "chat_template.jinja").read_text()
        (tmp_path / "chat_template.jinja").unlink()
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        smap = {"eos_token": {"content": "<|end_of_text|>"}}
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(smap))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.bos_token == "<|begin_of_text|>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, None)
    assert tok.end_of_turn_ids == [1, 7]
    assert tok.encode_batch(split[1][:10]) == ours.encode_batch(split[1][:10])
    assert tok.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False)
    ids, mask = tok.encode_chat(CHAT)
    expected = CHAT[2]["content"] + "<|end|>" + CHAT[4]["content"] + "<|end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == expected
    # Saving it again with our writer keeps it loadable by both.
    tok.save_pretrained(tmp_path / "again")
    assert Tokenizer.from_pretrained(tmp_path / "again").content_hash() == tok.content_hash()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").apply_chat_template(
        CHAT, tokenize=False) == tok.apply_chat_template(CHAT)
