"""`llmcycle eval`: held-out bpb, multiple choice, exact match, decontamination and the regression gate."""

import argparse
import json
import math
import shutil

import pytest
import torch

from conftest import write_shards
from llmcycle.artifacts.hashing import sha256_file
from llmcycle.data.shards import ShardSet
from llmcycle.errors import LlmcycleError
from llmcycle.eval.cli import add_eval_arguments, eval_main, gate
from llmcycle.eval.suite import answer_logprobs, bpb_metrics, em_metrics, heldout_items, mc_metrics
from llmcycle.model.transformer import Transformer
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.posttrain.synthetic import Item
from tests.conftest import make_serving_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_eval(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    rc = eval_main(parser.parse_args(argv))
    return rc, capsys.readouterr().out


def test_bpb_matches_direct_computation(tiny_base_model, tmp_path):
    tok, model = Tokenizer.from_pretrained(tiny_base_model), Transformer.from_pretrained(tiny_base_model).eval()
    text = open(__file__).read()
    # Documents of exactly seq_len + 1 tokens: each is one packed row, so the direct sum needs no packing.
    ids = tok.encode(text)
    docs = [[tok.bos_id] + ids[i * 32: (i + 1) * 32] for i in range(3)]
    write_shards(tmp_path / "val", docs, tok.vocab_size, tok.content_hash(), tok.bos_id)
    got = bpb_metrics(model, tok, ShardSet(tmp_path / "val"), seq_len=32, sequences=256)
    token_bytes = tok.token_bytes()
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for d in docs:
            logp = torch.log_softmax(model(torch.tensor([d[:-1]]))[0].float(), -1)
            nats -= float(logp[torch.arange(32), torch.tensor(d[1:])].sum())
            nbytes += sum(token_bytes[t] for t in d[1:])
    assert got["heldout_bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert got["heldout_perplexity"] == pytest.approx(math.exp(nats / 96), rel=1e-5)
    assert got["heldout_tokens"] == 96


def test_mc_accuracy_equals_hand_computation(tiny_base_model):
    tok, model = Tokenizer.from_pretrained(tiny_base_model), Transformer.from_pretrained(tiny_base_model).eval()
    items = [Item("add", "What is 1 + 2?", "3", "4"), Item("upper", "Write 'sock' in uppercase.", "SOCK", "Sock"),
             Item("add", "What is 5 + 9?", "14", "15")]
    hand = {}
    with torch.no_grad():
        for it in items:
            for ans in (it.answer, it.wrong):
                ids, mask = tok.encode_chat([{"role": "user", "content": it.prompt},
                                             {"role": "assistant", "content": ans}])
                # The scored tokens are the answer and the end-of-turn token, nothing else.
                assert tok.decode([t for t, m in zip(ids, mask) if m]).strip() == ans + "<|end|>"
                logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
                hand[it.prompt, ans] = sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])
    got = answer_logprobs(model, tok, items, [it.answer for it in items])
    assert got == pytest.approx([hand[it.prompt, it.answer] for it in items], abs=1e-4)
    hits = [hand[it.prompt, it.answer] > hand[it.prompt, it.wrong] for it in items]
    res = mc_metrics(model, tok, items)
    assert res["mc_accuracy"] == pytest.approx(sum(hits) / 3)
    assert res["per_task"] == {"add": (hits[0] + hits[2]) / 2, "upper": float(hits[1])}


def test_exact_match_normalizes_and_splits_by_task():
    items = [Item("add", "q1", "42", "41"), Item("upper", "q2", "SOCK", "Sock"), Item("add", "q3", "7", "8")]
    res = em_metrics(items, [" 42\n", "Sock", "7"])
    assert res["exact_match"] == pytest.approx(2 / 3)
    assert res["per_task"] == {"add": 1.0, "upper": 0.0}


def test_gate_rules():
    assert gate({"heldout_bpb": 1.0}, {"heldout_bpb": 1.019}, 0.02) == []
    assert gate({"heldout_bpb": 1.0}, {"heldout_bpb": 1.021}, 0.02)[0].startswith("heldout_bpb")
    assert gate({"mc_accuracy": 0.5}, {"mc_accuracy": 0.49}, 0.02) == []
    assert gate({"exact_match": 0.5}, {"exact_match": 0.47}, 0.02)[0].startswith("exact_match")
    assert gate({"win_rate": 0.5}, {"win_rate": 0.4}, 0.02)[0].startswith("win_rate")


def test_compare_with_itself_passes(tiny_base_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc, text = run_eval(["--compare", tiny_base_model, tiny_base_model, "--heldout", tiny_data["val"],
                         "--limit", "6", "--out", str(out)], capsys)
    assert rc == 0 and "gate passed" in text
    res = json.loads(out.read_text())
    assert res["a"]["metrics"] == res["b"]["metrics"] and res["failed"] == []
    assert res["a"]["suite"] == "v1" and res["a"]["counts"]["mc_items"] == 6


def test_random_model_fails_the_gate(tiny_base_model, tiny_data, tmp_path, capsys):
    # Wide random weights make confident wrong predictions: far worse held-out bpb than a near-uniform model.
    bad = make_serving_model(tiny_data["tokenizer"], tmp_path / "bad", max_positions=256)
    rc, text = run_eval(["--compare", tiny_base_model, bad, "--heldout", tiny_data["val"], "--limit", "6",
                         "--no-decontam"], capsys)
    assert rc == 1
    assert "GATE FAILED heldout_bpb" in text


def test_manifest_chain_and_decontamination(tiny_base_model, tiny_data, tmp_path, capsys):
    """An SFT-like model whose manifest leads to a pre-training run; eval prompts planted in its data."""
    tok = Tokenizer.from_pretrained(tiny_base_model)
    items = heldout_items(6)
    run = tmp_path / "pre"
    shutil.copytree(tiny_data["val"], run / "data" / "val")
    planted = [tok.bos_id] + tok.encode("x = 1\n") + tok.encode(items[0].prompt) + tok.encode("\n") + [tok.eos_id]
    write_shards(run / "data" / "train", [[tok.bos_id] + tok.encode("def f():\n    pass\n"), planted], tok.vocab_size,
                 tok.content_hash(), tok.bos_id)
    (run / "model").mkdir()
    (run / "model" / "manifest.json").write_text(json.dumps(
        {"stage": "pretrain", "config": {"out_dir": str(run), "data": {}, "train": {"seq_len": 64}}}))
    data = tmp_path / "sft_data"
    data.mkdir()

    def chat(it):
        return json.dumps({"messages": [{"role": "user", "content": it.prompt},
                                        {"role": "assistant", "content": it.answer}]}) + "\n"
    (data / "sft_train.jsonl").write_text(chat(Item("add", "unrelated?", "1", "2")) + chat(items[1]))
    (data / "sft_eval.jsonl").write_text(chat(items[2]))  # an eval file: not training data, not counted
    model = tmp_path / "sft" / "model"
    shutil.copytree(tiny_base_model, model)
    (model / "manifest.json").write_text(json.dumps({"stage": "sft", "inputs": {
        "model": {"path": str(run / "model")},
        "data": {str(data / "sft_train.jsonl"): "-", str(data / "sft_eval.jsonl"): "-"}}}))

    rc, text = run_eval([str(model), "--limit", "6"], capsys)
    assert rc == 0 and "heldout_bpb" in text
    res = json.loads((model.parent / "eval.json").read_text())
    assert not (model / "eval.json").exists()  # the model directory stays as recorded
    assert res["settings"]["heldout"] == str(run / "data" / "val") and res["settings"]["seq_len"] == 64
    assert res["model_sha256"] == sha256_file(model / "model.safetensors")
    rep = res["decontamination"]
    assert rep["train_shards"] == {"prompts": 1, "prompt_and_answer": 0}
    assert rep["train_jsonl"] == {"prompts": 1, "prompt_and_answer": 1}


def test_missing_heldout_is_a_user_error(tiny_base_model, capsys):
    with pytest.raises(LlmcycleError, match="--heldout"):
        run_eval([tiny_base_model], capsys)
    with pytest.raises(LlmcycleError, match="either"):
        run_eval([], capsys)
