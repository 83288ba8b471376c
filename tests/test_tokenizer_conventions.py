"""Prompts follow the tokenizer's own conventions, as transformers does.

Two tokenizers written by transformers: a Llama-style one whose post-processor adds BOS, and a
Qwen2-style one with `bos_token: null` that adds nothing. Prompt ids (`encode(add_special_tokens=True)`),
the engine's greedy output and plain-text training data must match what transformers does with the same
directory; llmcycle's own tokenizers carry a BOS post-processor so transformers tokenizes them like we do,
and explicit add_bos/add_eos (the data stage's shards) never doubles BOS.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import qwen2_byte_level_bpe  # noqa: E402
from llmcycle.serve.engine import LLM  # noqa: E402
from llmcycle.serve.sampling import SamplingParams  # noqa: E402
from llmcycle.tokenizer import Tokenizer  # noqa: E402
from llmcycle.train.posttrain.chat_data import Rejects, load_preferences, load_prompts, load_sft  # noqa: E402

TEXTS = ["hello there", "the cat sat on the mat", "what is 10 plus 0?", ""]
CHAT = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _backend(extra: list[str]):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    words = "hello there the cat sat on mat a b c d e what is 10 plus 0 ? yes no".split()
    vocab = {t: i for i, t in enumerate([*extra, "<unk>", *words, *[f"w{i}" for i in range(40)]])}
    tok = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _llama_style(path):
    """BOS added by a TemplateProcessing post-processor, as Llama's tokenizer.json does."""
    from tokenizers import processors

    tok = _backend(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    hf.save_pretrained(path)
    return hf


def _qwen2_style(path):
    """No BOS at all (bos_token null), end of text as eos and a ChatML template, as Qwen2 ships."""
    tok = qwen2_byte_level_bpe(["hello there, the cat sat on the mat. what is 10 plus 0? yes no"] * 20)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>")
    hf.chat_template = CHAT
    hf.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg.get("bos_token") is None
    return hf


STYLES = {"llama": (_llama_style, "LlamaConfig", "LlamaForCausalLM"),
          "qwen2": (_qwen2_style, "Qwen2Config", "Qwen2ForCausalLM")}


@pytest.fixture(scope="module", params=sorted(STYLES))
def hf_dir(request, tmp_path_factory):
    """A tiny random model and its tokenizer, both written by transformers' save_pretrained."""
    torch.set_num_threads(1)
    make_tok, cfg_name, model_name = STYLES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf_tok = make_tok(path)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=hf_tok.eos_token_id,
        bos_token_id=hf_tok.bos_token_id, pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():  # a wide spread: clear argmax winners, so greedy is not decided by rounding
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    return request.param, path


def test_prompt_ids_equal_transformers(hf_dir):
    style, path = hf_dir
    ours, theirs = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == theirs(text).input_ids
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
    assert ours.encode_batch(TEXTS, add_special_tokens=True) == [theirs(t).input_ids for t in TEXTS]
    assert ours.adds_bos == (style == "llama")


def test_engine_greedy_equals_transformers_generate(hf_dir):
    """`LLM(dir).generate(["hello there"])` works without a BOS token and matches transformers."""
    _, path = hf_dir
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = ["hello there", "the cat sat", "what is 10 plus 0?"]
    outs = LLM(str(path), block_size=4, num_blocks=64).generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              pad_token_id=hf_tok.eos_token_id)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref


def test_cli_generate_follows_the_tokenizer(hf_dir):
    """`llmcycle generate` (greedy) prints what transformers' generate continues the prompt with."""
    from conftest import run_cli

    _, path = hf_dir
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = hf_tok("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=hf_tok.eos_token_id)[0, ids.shape[1]:]
    proc = run_cli(["generate", str(path), "--prompt", "hello there", "--temperature", "0", "--max-new-tokens", "5"],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello there" + hf_tok.decode(new, skip_special_tokens=True) + "\n"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plain_text_training_data_follows_the_tokenizer(hf_dir, tmp_path):
    """Plain-text SFT, DPO and GRPO records tokenize their prompt as transformers (and TRL) do."""
    style, path = hf_dir
    tok, hf_tok = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    prompt_ids = hf_tok("what is 10 plus 0?").input_ids
    eos = hf_tok.eos_token_id
    rejects = Rejects()
    sft = load_sft(_write(tmp_path / "sft.jsonl", [{"prompt": "what is 10 plus 0?", "completion": "10"}]),
                   tok, 32, rejects)
    assert sft[0].ids == prompt_ids + hf_tok("10", add_special_tokens=False).input_ids + [eos]
    pairs = load_preferences(_write(tmp_path / "dpo.jsonl", [
        {"prompt": "what is 10 plus 0?", "chosen": "10", "rejected": "0"}]), tok, 32, rejects)
    assert pairs[0].prompt_ids == prompt_ids
    prompts = load_prompts(_write(tmp_path / "grpo.jsonl", [{"prompt": "what is 10 plus 0?", "answer": "10"}]),
                           tok, 32, rejects)
    assert prompts[0].prompt_ids == prompt_ids
    assert rejects.total() == 0
    assert (prompt_ids[0] == tok.bos_id) == (style == "llama")


# ---- llmcycle's own tokenizers ----


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    from llmcycle.tokenizer.train import train_tokenizer

    path = tmp_path_factory.mktemp("own")
    tok = train_tokenizer(["hello there, the cat sat on the mat. " * 4] * 40, kind="bpe", vocab_size=300)
    tok.save_pretrained(path)
    return path


def test_own_tokenizer_adds_bos_like_transformers(own_dir):
    ours, theirs = Tokenizer.from_pretrained(own_dir), transformers.AutoTokenizer.from_pretrained(own_dir)
    assert json.loads((own_dir / "tokenizer_config.json").read_text())["add_bos_token"] is True
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text).input_ids
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


def test_explicit_bos_eos_is_never_doubled(own_dir):
    """The data stage's shards (add_bos/add_eos) and rendered chats stay as before: one BOS."""
    tok = Tokenizer.from_pretrained(own_dir)
    bare = tok.encode("hello there")
    assert bare.count(tok.bos_id) == 0
    assert tok.encode("hello there", add_bos=True, add_eos=True) == [tok.bos_id, *bare, tok.eos_id]
    assert tok.encode_batch(["hello there"], add_bos=True, add_eos=True) == [[tok.bos_id, *bare, tok.eos_id]]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"}]
    ids, _ = tok.encode_chat(messages)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    theirs = transformers.AutoTokenizer.from_pretrained(own_dir)
    assert theirs.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids
    with pytest.raises(ValueError, match="add_special_tokens"):
        tok.encode("x", add_bos=True, add_special_tokens=True)


def test_old_llmcycle_tokenizer_dirs_keep_their_bos(own_dir, tmp_path):
    """A directory from before the post-processor (llmcycle_kind, no post-processor): prompts keep BOS."""
    tok = Tokenizer.from_pretrained(own_dir)
    tok.backend.post_processor = None
    tok.save_pretrained(tmp_path)
    old = Tokenizer.from_pretrained(tmp_path)
    bare = old.encode("hello there")
    assert old.encode("hello there", add_special_tokens=True) == [old.bos_id, *bare]
    assert old.encode_batch(["hello there"], add_bos=True, add_eos=True) == [[old.bos_id, *bare, old.eos_id]]


# ---- chat models stop at end of turn ----


def _end_loving_model(tok: Tokenizer, out):
    """A model whose greedy choice is always <|end|>: the residual stream is the token's embedding (every
    block's output projection is zero), whose first component dominates, and only <|end|>'s row reads it."""
    from llmcycle.model.config import ModelConfig
    from llmcycle.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = Transformer(cfg)
    end = tok.token_to_id(tok.end_of_turn_token)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[end] = 0
        model.lm_head.weight[end, 0] = 100.0
    model.save_pretrained(out)
    return end


def test_published_chat_model_stops_at_end_of_turn(own_dir, tmp_path):
    """transformers' generate and the engine (so /v1/completions) stop at <|end|>, not at max tokens."""
    from llmcycle.model.hf_io import generation_eos_ids
    from llmcycle.train.core.session import copy_tokenizer

    tok = Tokenizer.from_pretrained(own_dir)
    model_dir = tmp_path / "tuned"
    end = _end_loving_model(tok, model_dir)
    copy_tokenizer(own_dir, model_dir)  # how post-training publishes a model's tokenizer
    assert generation_eos_ids(model_dir) == [tok.eos_id, end]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)[0]])
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_id)[0, ids.shape[1]:]
    assert new.tolist() == [end]
    (out,) = LLM(str(model_dir), block_size=4, num_blocks=32).generate(
        "hello there", SamplingParams(temperature=0, max_tokens=8))
    assert out.outputs[0].token_ids == [end] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == ""


def test_completions_endpoint_stops_at_end_of_turn(own_dir, tmp_path):
    """/v1/completions on a published chat model stops at <|end|> like the offline engine (finish_reason stop)."""
    import httpx

    from llmcycle.serve.async_engine import AsyncLLMEngine
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.server import ServerState
    from llmcycle.serve.smoke import serve_in_thread
    from llmcycle.train.core.session import copy_tokenizer

    tok = Tokenizer.from_pretrained(own_dir)
    model_dir = tmp_path / "tuned"
    _end_loving_model(tok, model_dir)
    copy_tokenizer(own_dir, model_dir)
    engine = AsyncLLMEngine(LLMEngine(str(model_dir), block_size=4, num_blocks=32))
    with serve_in_thread(ServerState({"m": engine}, None)) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "hello there", "max_tokens": 8,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == 1
        # ignore_eos generates past it, as vLLM does
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "hello there", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True}, timeout=30)
        assert r.json()["choices"][0]["finish_reason"] == "length"
