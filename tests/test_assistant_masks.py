"""Assistant masks with a chat template without `{% generation %}` markers, against TRL 1.16.

The template is ChatML without markers (as most Hugging Face templates are), and every answer repeats
text that comes before it: the question ("What is 10 plus 0?" -> "10"), the system prompt or an earlier
turn. TRL's trainers tokenize the same records (SFT prompt-completion, DPO, KTO, reward) and the
completion must start where TRL's does, for each record, with no record rejected.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

from conftest import qwen2_byte_level_bpe  # noqa: E402
from llmcycle.tokenizer import Tokenizer  # noqa: E402
from llmcycle.tokenizer.chat import find_assistant_spans  # noqa: E402
from llmcycle.train.posttrain.chat_data import Rejects, load_preferences, load_sft, load_unpaired  # noqa: E402

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
SYSTEM = {"role": "system", "content": "Answer with a number such as 10 or 7."}
ARITH = [(10, 0), (3, 4), (0, 7), (7, 0), (5, 5)]


def _user(a, b):
    return {"role": "user", "content": f"What is {a} plus {b}?"}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _prompts():
    """Prompts whose answer appears earlier: in the question, the system prompt, or an earlier turn."""
    out = [[_user(a, b)] for a, b in ARITH]
    out += [[SYSTEM, _user(a, b)] for a, b in ARITH]
    out.append([_user(10, 0), _assistant("10"), _user(0, 10)])
    return out


def _answer(prompt):
    a, b = (int(w.rstrip("?")) for w in prompt[-1]["content"].split()[2::2])
    return str(a + b)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 model and a byte-level BPE tokenizer with a ChatML template, written by transformers."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("masks")
    tok = qwen2_byte_level_bpe([json.dumps(p) for p in _prompts()] * 10 + ["user assistant system"] * 10)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(path)
    cfg = transformers.Qwen2Config(vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trl(kind: str, model_dir, records, tmp_path):
    """TRL's own tokenization of `records`: the train_dataset its trainer builds at init."""
    import trl

    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                  save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    data = datasets.Dataset.from_list(records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "sft":
            args = trl.SFTConfig(**common, completion_only_loss=True, max_length=None)
            trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=hf_tok)
        elif kind == "dpo":
            trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common, max_length=None), train_dataset=data,
                                     processing_class=hf_tok)
        elif kind == "kto":
            trainer = trl.KTOTrainer(model=model, args=trl.KTOConfig(**common, max_length=None), train_dataset=data,
                                     processing_class=hf_tok)
        else:
            seq = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
            seq.config.pad_token_id = hf_tok.pad_token_id
            trainer = trl.RewardTrainer(model=seq, args=trl.RewardConfig(**common, max_length=None),
                                        train_dataset=data, processing_class=hf_tok)
    return list(trainer.train_dataset), hf_tok


def _tail_is_whitespace(hf_tok, ids) -> bool:
    # TRL's completion also holds what the template writes after the turn (here "\n"); ours stops at
    # <|im_end|>, as the model stops generating there.
    return hf_tok.decode(ids).strip() == ""


def test_sft_prompt_completion_matches_trl(model_dir, tmp_path):
    records = [{"prompt": p, "completion": [_assistant(_answer(p))]} for p in _prompts()]
    rejects = Rejects()
    ours = load_sft(_jsonl(tmp_path / "sft.jsonl", records), Tokenizer.from_pretrained(model_dir), 128, rejects)
    theirs, hf_tok = _trl("sft", model_dir, records, tmp_path)
    assert rejects.total() == 0 and len(ours) == len(records)
    for ex, row in zip(ours, theirs):
        assert ex.ids == row["input_ids"]
        # TRL 1.16 folds its completion mask into the labels (-100 where no loss is taken).
        trl_mask = row.get("completion_mask") or [int(x != -100) for x in row["labels"]]
        ours_mask = [int(t) for t in ex.trained]
        assert ours_mask.index(1) == trl_mask.index(1)  # the completion starts where TRL's does
        assert all(m <= t for m, t in zip(ours_mask, trl_mask))
        extra = [i for i, (m, t) in enumerate(zip(ours_mask, trl_mask)) if t and not m]
        assert _tail_is_whitespace(hf_tok, [ex.ids[i] for i in extra])
        assert hf_tok.decode([i for i, m in zip(ex.ids, ours_mask) if m]) == ex.reference + "<|im_end|>"


def test_sft_messages_mask_each_turn_after_its_own_prefix(model_dir, tmp_path):
    """Multi-turn messages: turn i is masked from the end of messages[:i] with the generation prompt on."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [SYSTEM, _user(10, 0), _assistant("10"), _user(0, 10), _assistant("10"), _user(7, 0),
                _assistant("7")]
    ex = load_sft(_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), Tokenizer.from_pretrained(model_dir),
                  128, Rejects())[0]
    starts = [i for i in range(len(ex.trained)) if ex.trained[i] and (i == 0 or not ex.trained[i - 1])]
    expected = [len(hf_tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
                for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert starts == expected
    assert hf_tok.decode([t for t, m in zip(ex.ids, ex.trained) if m]) == "10<|im_end|>10<|im_end|>7<|im_end|>"


def _pairs():
    return [{"prompt": p, "chosen": [_assistant(_answer(p))], "rejected": [_assistant(str(int(_answer(p)) + 1))]}
            for p in _prompts()]


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_preferences_match_trl(model_dir, tmp_path, kind):
    records = _pairs()
    rejects = Rejects()
    ours = load_preferences(_jsonl(tmp_path / "p.jsonl", records), Tokenizer.from_pretrained(model_dir), 128,
                            rejects)
    theirs, hf_tok = _trl(kind, model_dir, records, tmp_path)
    assert rejects.total() == 0 and len(ours) == len(records)
    for ex, row in zip(ours, theirs):
        if kind == "dpo":
            assert ex.prompt_ids == row["prompt_ids"]
            chosen, rejected = row["chosen_ids"], row["rejected_ids"]
        else:  # the reward model scores whole conversations
            chosen, rejected = row["chosen_ids"][len(ex.prompt_ids):], row["rejected_ids"][len(ex.prompt_ids):]
        for a, b in ((ex.chosen_ids, chosen), (ex.rejected_ids, rejected)):
            assert b[: len(a)] == a and _tail_is_whitespace(hf_tok, b[len(a):])


def test_kto_matches_trl(model_dir, tmp_path):
    records = [{"prompt": p, "completion": [_assistant(_answer(p))], "label": i % 2 == 0}
               for i, p in enumerate(_prompts())]
    rejects = Rejects()
    ours = load_unpaired(_jsonl(tmp_path / "k.jsonl", records), Tokenizer.from_pretrained(model_dir), 128, rejects)
    theirs, hf_tok = _trl("kto", model_dir, records, tmp_path)
    assert rejects.total() == 0 and len(ours) == len(records)
    for ex, row in zip(ours, theirs):
        assert ex.prompt_ids == row["prompt_ids"]
        c = row["completion_ids"]
        assert c[: len(ex.completion_ids)] == ex.completion_ids
        assert _tail_is_whitespace(hf_tok, c[len(ex.completion_ids):])


def test_find_assistant_spans_skips_earlier_occurrences():
    """Without a prefix renderer too: the answer is looked for after the question's own text."""
    messages = [{"role": "system", "content": "Say 10."}, _user(10, 0), _assistant("10")]
    text = "S: Say 10.\nU: What is 10 plus 0?\nA: 10<end>\n"
    (span,) = find_assistant_spans(text, messages, ["<end>"])
    assert text[span[0]:span[1]] == "10<end>" and span[0] == text.index("A: ") + 3


def test_the_300_arithmetic_chats_of_the_issue(model_dir, tmp_path):
    """"What is a plus b?" -> "a+b" for 300 (a, b): every answer is trained on, none is rejected."""
    tok = Tokenizer.from_pretrained(model_dir)
    prompts = [[_user(a, b)] for a in range(20) for b in range(15)]
    chats = [{"messages": [*p, _assistant(_answer(p))]} for p in prompts]
    pc = [{"prompt": p, "completion": [_assistant(_answer(p))]} for p in prompts]
    for records in (chats, pc):
        rejects = Rejects()
        examples = load_sft(_jsonl(tmp_path / "s.jsonl", records), tok, 128, rejects)
        assert rejects.total() == 0 and len(examples) == 300
        for ex in examples:
            assert tok.decode([t for t, m in zip(ex.ids, ex.trained) if m]) == ex.reference + "<|im_end|>"
    rejects = Rejects()
    assert len(load_preferences(_jsonl(tmp_path / "p.jsonl", [
        {"prompt": p, "chosen": [_assistant(_answer(p))], "rejected": [_assistant(str(int(_answer(p)) + 1))]}
        for p in prompts]), tok, 128, rejects)) == 300
    kto = [{"prompt": p, "completion": [_assistant(_answer(p))], "label": True} for p in prompts]
    assert len(load_unpaired(_jsonl(tmp_path / "k.jsonl", kto), tok, 128, rejects)) == 300
    assert rejects.total() == 0
