"""SFT, reward model and the DPO family end to end on a tiny model: each moves its metric the right way,
writes Hugging Face-compatible models, survives a kill, and reports bad input without stopping."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from llmcycle.config import load_config
from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.model.transformer import Transformer
from llmcycle.train.posttrain.dpo import DPOConfig, dpo
from llmcycle.train.posttrain.reward import RewardConfig, train_reward
from llmcycle.train.posttrain.sft import SFTConfig, sft

GOOD = ["apple", "river", "garden", "music", "bread", "summer", "friend", "light"]
BAD = ["rust", "storm", "mud", "noise", "ash", "dust", "error", "broken"]


def _write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _sft_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(GOOD + BAD)
        out.append({"messages": [{"role": "user", "content": f"Repeat the word {w}."},
                                 {"role": "assistant", "content": w}]})
    return out


def _pref_records(n: int, seed: int) -> list[dict]:
    """Chosen answers come from one word list, rejected from another: learnable by a tiny model."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": f"Say something about {rng.choice(GOOD + BAD)}."}],
             "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
             "rejected": [{"role": "assistant", "content": rng.choice(BAD)}]} for _ in range(n)]


def _opts(out: Path, model: str, steps: int, **extra) -> list[str]:
    base = {"out_dir": str(out), "model": model, "train.max_steps": steps, "train.batch_size": 8,
            "train.warmup_steps": 2, "train.dtype": "fp32", "train.threads": 1, "data.max_length": 64,
            "eval.every": 0, "checkpoint.every": 0}
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def word_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("words")
    return {"sft_train": _write_jsonl(d / "sft_train.jsonl", _sft_records(160, 1)),
            "sft_eval": _write_jsonl(d / "sft_eval.jsonl", _sft_records(32, 2)),
            "pref_train": _write_jsonl(d / "pref_train.jsonl", _pref_records(160, 3)),
            "pref_eval": _write_jsonl(d / "pref_eval.jsonl", _pref_records(48, 4)),
            "prompts": _write_jsonl(d / "prompts.jsonl", [
                {"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in _sft_records(40, 5)])}


@pytest.fixture(scope="module")
def sft_model(tiny_base_model, word_data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("sft_model")
    cfg = load_config(SFTConfig, None, _opts(out, tiny_base_model, 40, **{
        "data.train": word_data["sft_train"], "data.eval": word_data["sft_eval"], "train.lr": 3e-3,
        "eval.generate": 8}))
    result = sft(cfg)
    return str(out / "model"), result


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and not r.get("eval")}


def _same_weights(a: str | Path, b: str | Path, cls=Transformer, atol: float = 1e-6) -> bool:
    sa, sb = cls.from_pretrained(a).state_dict(), cls.from_pretrained(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=atol) for k in sa)


# ---- SFT ------------------------------------------------------------------------------------------

def test_sft_lowers_heldout_loss_and_writes_a_transformers_model(sft_model):
    from transformers import AutoModelForCausalLM

    path, result = sft_model
    before, after = result["eval_before"]["eval_loss"], result["eval_loss"]
    assert after < 0.6 * before, (before, after)
    assert result["eval_mean_token_accuracy"] > result["eval_before"]["eval_mean_token_accuracy"]
    assert 0.0 <= result["eval_exact_match"] <= 1.0 and result["eval_exact_match_n"] == 8
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = Transformer.from_pretrained(path).eval()
    x = torch.randint(8, 500, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["stage"] == "sft"
    assert any(k.endswith("sft_train.jsonl") for k in manifest["inputs"]["data"])
    assert "model.safetensors" in manifest["inputs"]["model"]


def test_sft_replays_pretraining_text_and_keeps_the_language_model(tiny_base_model, tiny_data, word_data, tmp_path):
    """data.pretrain_mix: rows of pre-training shards join the SFT data, trained on every token, as the given
    share of trained tokens; held-out bits/byte end lower than after the same SFT without them."""
    from llmcycle.data.shards import ShardSet
    from llmcycle.eval.suite import bpb_metrics
    from llmcycle.tokenizer import Tokenizer
    from llmcycle.train.posttrain.replay import ReplayRows, rows_per_epoch

    assert rows_per_epoch(0.25, 3000, 64) == 16  # 1000 trained tokens beside 3000: 16 rows of 63 targets
    replay = ReplayRows(Path(tiny_data["train"]), 64, seed=0, vocab_size=512)
    ids, trained = replay.example(3)
    assert len(ids) == 64 and trained == [False] + [True] * 63
    assert ReplayRows(Path(tiny_data["train"]), 64, 0, 512).row(3) == ids != replay.row(4)
    assert len(replay.row(10_000)) == 64  # past the first epoch of the shard set: the next epoch's packing
    with pytest.raises(LlmcycleError, match="another tokenizer"):
        ReplayRows(Path(tiny_data["train"]), 64, 0, 512, tokenizer_hash="0" * 64)

    common = {"data.train": word_data["sft_train"], "data.eval": None, "train.lr": 3e-3}
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    sft(load_config(SFTConfig, None, _opts(plain, tiny_base_model, 30, **common)))
    result = sft(load_config(SFTConfig, None, _opts(mixed, tiny_base_model, 30, **common, **{
        "data.pretrain_mix": 0.5, "data.pretrain_shards": tiny_data["train"]})))
    assert result["pretrain_rows_per_epoch"] > 0 and result["train_examples"] == 160
    manifest = json.loads((mixed / "model" / "manifest.json").read_text())
    assert any(k.endswith(".bin") and "train" in k for k in manifest["inputs"]["data"])
    tok, val = Tokenizer.from_pretrained(tiny_base_model), ShardSet(tiny_data["val"])
    bpb = {name: bpb_metrics(Transformer.from_pretrained(d / "model").eval(), tok, val, 64, 16)["heldout_bpb"]
           for name, d in (("plain", plain), ("mixed", mixed))}
    assert bpb["mixed"] < bpb["plain"] - 0.05, bpb

    # A model whose manifests lead to no pre-training shards, and an impossible share: one-line errors.
    with pytest.raises(LlmcycleError, match="data.pretrain_shards"):
        sft(load_config(SFTConfig, None, _opts(tmp_path / "x", tiny_base_model, 2, **common, **{
            "data.pretrain_mix": 0.5})))
    with pytest.raises(LlmcycleError, match=r"pretrain_mix must be in \[0, 1\)"):
        sft(load_config(SFTConfig, None, _opts(tmp_path / "y", tiny_base_model, 2, **common, **{
            "data.pretrain_mix": 1.0, "data.pretrain_shards": tiny_data["train"]})))


@pytest.mark.parametrize("packing", [True, False])
def test_sft_loss_is_normalised_over_gradient_accumulation(tiny_base_model, word_data, tmp_path, packing):
    common = {"data.train": word_data["sft_train"], "data.eval": None, "data.packing": packing}
    a, b = tmp_path / "a", tmp_path / "b"
    sft(load_config(SFTConfig, None, _opts(a, tiny_base_model, 4, **common, **{"train.batch_size": 4})))
    sft(load_config(SFTConfig, None, _opts(b, tiny_base_model, 4, **common, **{
        "train.batch_size": 2, "train.grad_accum": 2})))
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() == {1, 2, 3, 4}
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5)
    assert _same_weights(a / "model", b / "model", atol=1e-5)


def test_sft_counts_bad_records_with_their_lines_and_trains_on_the_rest(tiny_base_model, tmp_path):
    good = _sft_records(12, 5)
    records = [good[0], "{not json", {"messages": [{"role": "user", "content": "hi"}]}, good[1],
               {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"},
                             {"role": "assistant", "content": "y"}]},
               {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
               {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]},
               *good[2:]]
    data = _write_jsonl(tmp_path / "mixed.jsonl", records)
    out = tmp_path / "run"
    proc = run_cli(["sft", *_opts(out, tiny_base_model, 2, **{"data.train": data, "data.eval": None})], timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "mixed.jsonl:2" in text and "mixed.jsonl:3" in text and "mixed.jsonl:5" in text and "mixed.jsonl:7" in text
    rejected = json.loads((out / "model" / "manifest.json").read_text())["metrics"]["rejected"]
    assert rejected["rejected"] == 4
    assert json.loads((out / "model" / "manifest.json").read_text())["metrics"]["train_examples"] == 13


def test_a_dataset_with_no_usable_example_is_refused_before_training(tiny_base_model, tmp_path):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}, "[1, 2"])
    proc = run_cli(["sft", *_opts(tmp_path / "run", tiny_base_model, 2, **{"data.train": data})], timeout=120)
    assert proc.returncode == 2
    assert "no usable" in proc.stderr and "bad.jsonl:1" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_base_model_is_a_clear_error(tmp_path):
    proc = run_cli(["sft", f"out_dir={tmp_path / 'x'}", f"model={tmp_path / 'nowhere'}"], timeout=120)
    assert proc.returncode == 2
    assert "model directory not found" in proc.stderr and "llmcycle run" in proc.stderr


# ---- reward model ------------------------------------------------------------------------------

def test_reward_model_beats_chance_and_loads_in_transformers(sft_model, word_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    cfg = load_config(RewardConfig, None, _opts(out, sft_model[0], 30, **{
        "data.train": word_data["pref_train"], "data.eval": word_data["pref_eval"], "train.lr": 1e-3}))
    result = train_reward(cfg)
    assert result["eval_accuracy"] >= 0.85, result
    assert result["eval_margin"] > result["eval_before"]["eval_margin"] + 0.5
    hf = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    ours = ScalarHeadModel.from_pretrained(out / "model").eval()
    x = torch.randint(8, 500, (2, 10))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits.squeeze(-1), ours(x)[:, -1], atol=1e-4)


# ---- DPO family ---------------------------------------------------------------------------------

def test_dpo_raises_reward_accuracy_and_margins(sft_model, word_data, tmp_path):
    out = tmp_path / "dpo"
    cfg = load_config(DPOConfig, None, _opts(out, sft_model[0], 30, **{
        "data.train": word_data["pref_train"], "data.eval": word_data["pref_eval"], "train.lr": 1e-3,
        "eval.generate": 0}))
    result = dpo(cfg)
    before = result["eval_before"]
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert result["eval_rewards/accuracies"] >= 0.85, result
    assert result["eval_rewards/margins"] > 0.5
    assert result["eval_rewards/chosen"] > result["eval_rewards/rejected"]
    assert (out / "ref_logps.pt").exists()


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust", "simpo", "orpo", "kto"])
def test_every_loss_type_trains(sft_model, word_data, tmp_path, loss_type):
    train = word_data["pref_train"]
    if loss_type == "kto":
        pairs = [json.loads(x) for x in Path(train).read_text().splitlines()]
        train = _write_jsonl(tmp_path / "kto.jsonl", [
            {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, p in enumerate(pairs)])
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    cfg = load_config(DPOConfig, None, _opts(tmp_path / loss_type, sft_model[0], 12, **{
        "loss_type": loss_type, "data.train": train, "data.eval": word_data["pref_eval"], "train.lr": 1e-3,
        "eval.generate": 0, "beta": 2.0 if loss_type == "simpo" else 0.1, **extra}))
    result = dpo(cfg)
    losses = _losses(tmp_path / loss_type)
    assert len(losses) == 12 and all(map(lambda v: v == v, losses.values()))
    # Every method prefers the chosen answers on held-out pairs after a short run.
    assert result["eval_rewards/accuracies"] > 0.7, result


def test_label_smoothing_with_a_loss_that_ignores_it_is_refused(sft_model, word_data, tmp_path):
    cfg = load_config(DPOConfig, None, _opts(tmp_path / "x", sft_model[0], 2, **{
        "data.train": word_data["pref_train"], "label_smoothing": 0.1}))
    with pytest.raises(LlmcycleError, match="label_smoothing"):
        dpo(cfg)


def test_bad_preference_records_are_counted(sft_model, tmp_path):
    good = _pref_records(10, 7)
    same = {"prompt": "q", "chosen": "a", "rejected": "a"}
    records = [good[0], {"prompt": "q", "chosen": "", "rejected": "b"}, same, good[1],
               {"prompt": "x " * 300, "chosen": "a", "rejected": "b"}, *good[2:]]
    data = _write_jsonl(tmp_path / "pairs.jsonl", records)
    proc = run_cli(["dpo", *_opts(tmp_path / "run", sft_model[0], 2, **{"data.train": data, "data.eval": None})],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for line in (2, 3, 5):
        assert f"pairs.jsonl:{line}" in text
    metrics = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())["metrics"]
    assert metrics["rejected"]["rejected"] == 3 and metrics["train_examples"] == 10


# ---- kill and resume -------------------------------------------------------------------------------

def _kill_after(args: list[str], out: Path, min_step: int, timeout: float = 180) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "latest").exists() and (out / "metrics.jsonl").exists() \
                and max(_losses(out), default=0) >= min_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"


KILL_DATA = {"sft": {"data.train": "sft_train"}, "reward": {"data.train": "pref_train"},
             "dpo": {"data.train": "pref_train"},
             "grpo": {"data.train": "prompts", "num_generations": 4, "generation.max_new_tokens": 6, "train.grad_accum": 1}}


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "grpo"])
def test_kill_and_resume_matches_an_uninterrupted_run(command, sft_model, word_data, tmp_path):
    steps = 10
    data = {k: word_data.get(v, v) for k, v in KILL_DATA[command].items()}
    extra = {**data, "data.eval": None, "checkpoint.every": 4, "train.lr": 1e-3}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_cli([command, *_opts(ref, sft_model[0], steps, **extra)], timeout=300).returncode == 0
    args = [command, *_opts(killed, sft_model[0], steps, **extra)]
    _kill_after(args, killed, min_step=5)
    assert not (killed / "model").exists()
    resumed = run_cli([*args, "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: continuing" in resumed.stdout + resumed.stderr
    a, b = _losses(ref), _losses(killed)
    assert sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-6), s
    assert _same_weights(ref / "model", killed / "model", ScalarHeadModel if command == "reward" else Transformer)


def test_resume_with_other_data_is_refused(sft_model, word_data, tmp_path):
    out = tmp_path / "run"
    opts = _opts(out, sft_model[0], 2, **{"data.train": word_data["sft_train"], "data.eval": None,
                                          "checkpoint.every": 1})
    sft(load_config(SFTConfig, None, opts))
    other = [o if not o.startswith("data.train=") else f"data.train={word_data['sft_eval']}" for o in opts]
    with pytest.raises(LlmcycleError, match="data.train"):
        sft(load_config(SFTConfig, None, other), resume=True)


# ---- torchrun -------------------------------------------------------------------------------------

def test_two_process_sft_matches_one_process(tiny_base_model, word_data, tmp_path):
    common = {"data.train": word_data["sft_train"], "data.eval": None, "data.packing": False}
    one = tmp_path / "one"
    sft(load_config(SFTConfig, None, _opts(one, tiny_base_model, 3, **common, **{"train.batch_size": 8})))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "llmcycle", "sft", *_opts(two, tiny_base_model, 3, **common,
                                                           **{"train.batch_size": 4})],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = _losses(one), _losses(two)
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), s
    assert _same_weights(one / "model", two / "model", atol=1e-4)
