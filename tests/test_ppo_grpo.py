"""`llmcycle ppo` and `llmcycle grpo` end to end on a tiny model and a task it can learn in seconds.

The task: six prompts ("Color of apple?"), each with one right answer among the single-token letters
A, B and C. A tiny random model is fine-tuned (with the project's own `sft`) on a mix that holds each
prompt's right answer 3 times and the two others once: it learns the answer format and leans toward the
right letter (about 60%) without being sure. Exact-match reward can then sharpen it, which GRPO must do
within a short run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmcycle.config import load_config
from llmcycle.errors import LlmcycleError
from llmcycle.model.config import ModelConfig
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.model.transformer import Transformer
from llmcycle.train.core import session as posttrain
from llmcycle.train.posttrain.sft import SFTConfig, sft
from llmcycle.train.rl.grpo import GRPOConfig, grpo
from llmcycle.train.rl.ppo import PPOConfig, ppo

LETTERS = ["A", "B", "C"]
ANSWER = {"apple": "A", "sky": "B", "grass": "C", "cherry": "A", "ocean": "B", "leaf": "C"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def user(thing: str) -> list[dict]:
    return [{"role": "user", "content": f"Color of {thing}?"}]


def write_jsonl(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def copy_tokenizer(src, dst) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def task(tiny_data, tmp_path_factory):
    torch.set_num_threads(1)
    from llmcycle.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("rl_task")
    tok_dir = Path(tiny_data["tokenizer"])
    tok = Tokenizer.from_pretrained(tok_dir)
    assert all(len(tok.encode(x)) == 1 for x in LETTERS)
    write_jsonl(root / "sft.jsonl", [{"messages": user(t) + [{"role": "assistant", "content": a}]}
                                     for t in ANSWER for a in LETTERS + [ANSWER[t]] * 2])
    prompts = [{"prompt": user(t), "answer": a} for t, a in ANSWER.items()]
    write_jsonl(root / "prompts.jsonl", prompts)
    # Two broken records: counted, not fatal.
    write_jsonl(root / "prompts_dirty.jsonl", prompts[:3] + ["{not json", {"answer": "A"}] + prompts[3:])

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    Transformer(cfg).save_pretrained(root / "base")
    copy_tokenizer(tok_dir, root / "base")
    sft(load_config(SFTConfig, None, [
        f"out_dir={root / 'sft'}", f"model={root / 'base'}", f"data.train={root / 'sft.jsonl'}", "data.eval=null",
        "data.packing=false", "train.batch_size=18", "train.max_steps=150", "train.lr=3e-3", "train.warmup_steps=5",
        "train.dtype=fp32", "train.threads=1", "eval.every=0", "eval.generate=0", "checkpoint.every=0"]))
    policy = root / "sft" / "model"

    # A tiny reward model: the policy's body with a random head (scores of order 1-10).
    torch.manual_seed(1)
    rm = ScalarHeadModel.from_causal_lm(Transformer.from_pretrained(policy))
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 1.0)
    rm.save_pretrained(root / "rm")
    copy_tokenizer(tok_dir, root / "rm")
    return {"root": root, "policy": policy, "rm": root / "rm", "prompts": root / "prompts.jsonl",
            "dirty": root / "prompts_dirty.jsonl"}


def records(out_dir) -> list[dict]:
    """Training records of metrics.jsonl, without wall-clock timings."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in map(json.loads, lines)
            if not r.get("eval")]


def all_finite(recs: list[dict]) -> bool:
    return all(math.isfinite(v) for r in recs for v in r.values() if isinstance(v, (int, float)))


def grpo_overrides(task, out_dir, steps: int, **extra) -> list[str]:
    base = {"out_dir": out_dir, "model": task["policy"], "data.train": task["prompts"], "data.eval": task["prompts"],
            "num_generations": 8, "train.batch_size": 24, "train.grad_accum": 1, "train.max_steps": steps,
            "train.lr": 1e-3, "train.dtype": "fp32", "train.threads": 1, "generation.max_new_tokens": 4,
            "eval.every": 0, "checkpoint.every": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def ppo_overrides(task, out_dir, steps: int, **extra) -> list[str]:
    base = {"out_dir": out_dir, "model": task["policy"], "reward_model": task["rm"], "reward_funcs": "[exact_match]",
            "data.train": task["prompts"], "data.eval": task["prompts"], "train.batch_size": 4,
            "train.grad_accum": 2, "num_minibatches": 2, "ppo_epochs": 2, "train.max_steps": steps,
            "train.lr": 1e-3, "train.dtype": "fp32", "train.threads": 1, "generation.max_new_tokens": 4,
            "eval.every": 0, "checkpoint.every": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---- GRPO ----------------------------------------------------------------------------------------


def test_grpo_raises_the_verifiable_reward(task, tmp_path):
    out = tmp_path / "grpo"
    # 6 prompts x 8 completions per iteration (the whole task every time: less noise in the comparison).
    cfg = load_config(GRPOConfig, None, grpo_overrides(task, out, 40, **{"data.train": task["dirty"],
                                                                         "train.batch_size": 48}))
    result = grpo(cfg)
    recs = records(out)
    assert len(recs) == 40 and all_finite(recs)
    reward = [r["reward"] for r in recs]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    # Seeds 0-4 all give first ~0.66-0.70 and last ~0.90 (a sharpened answer); the bars leave a margin.
    assert first < 0.75 and last > 0.85 and last > first + 0.15, (first, last)
    assert recs[0]["kl"] == 0.0 and max(r["kl"] for r in recs) > 0  # starts at the reference, then moves
    assert all(r["completions/mean_length"] <= 4 for r in recs)
    assert result["train_prompts"] == 6 and result["rejected"]["rejected"] == 2
    assert result["eval_exact_match_n"] == 6 and "eval_exact_match" in result["eval_before"]
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["inputs"]["reward_funcs"] == ["exact_match"]
    # The published directory is a Hugging Face model with its tokenizer.
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()


# ---- PPO -----------------------------------------------------------------------------------------


def test_ppo_end_to_end_with_adaptive_kl(task, tmp_path):
    out = tmp_path / "ppo"
    target, horizon, kl0 = 0.01, 40, 0.05
    cfg = load_config(PPOConfig, None, ppo_overrides(task, out, 6, adaptive_kl="true", kl_target=target,
                                                      kl_horizon=horizon, kl_coef=kl0))
    result = ppo(cfg)
    recs = records(out)
    assert len(recs) == 6 and all_finite(recs)
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/clipfrac", "val/clipfrac",
                "loss/policy", "loss/value", "objective/reward_model", "rewards/exact_match/mean"):
        assert key in recs[0], key
    assert recs[0]["objective/kl"] == 0.0  # the first rollout's policy is the reference, token for token
    assert any(r["objective/kl"] > target for r in recs)
    assert recs[-1]["step"] == 6 * 2 * 2  # ppo_epochs x num_minibatches optimizer steps per iteration
    # Ziegler et al.: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * rollouts / horizon, after each batch.
    coef = kl0
    for r in recs:
        assert r["objective/kl_coef"] == pytest.approx(coef, rel=1e-12)
        new = coef * (1 + min(max(r["objective/kl"] / target - 1, -0.2), 0.2) * 16 / horizon)  # 4 x 2 x 2 rollouts
        assert (new < coef) if r["objective/kl"] < target else (new > coef)
        coef = new
    assert result["kl_coef"] == pytest.approx(coef, rel=1e-12)
    assert (out / "model" / "config.json").exists() and not (out / "model" / "value").exists()


def test_ppo_learns_from_exact_match_without_reward_model(task, tmp_path):
    out = tmp_path / "ppo_em"
    # No reward model: the value model is the policy's body with a fresh head.
    cfg = load_config(PPOConfig, None, ppo_overrides(task, out, 30, reward_model="null", kl_coef=0.02,
                                                      **{"train.lr": 5e-4, "generation.temperature": 1.0}))
    ppo(cfg)
    scores = [r["objective/scores"] for r in records(out)]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    # Seeds 0-4: first 0.60-0.76, last 0.88-0.94.
    assert last > 0.85 and last > first + 0.1, scores


# ---- kill and resume -----------------------------------------------------------------------------


class Killed(Exception):
    pass


@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_resume_after_kill_matches_uninterrupted_run(task, tmp_path, monkeypatch, command):
    run, cls = (ppo, PPOConfig) if command == "ppo" else (grpo, GRPOConfig)
    make = ppo_overrides if command == "ppo" else grpo_overrides
    extra = {"checkpoint.every": 2}
    if command == "ppo":
        extra.update(adaptive_kl="true", kl_target=0.05, kl_horizon=20)  # the controller's state must resume too
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(load_config(cls, None, make(task, straight, 4, **extra)))

    real_save = posttrain.Session.save

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise Killed  # the process dies right after its first checkpoint (iteration 2)

    monkeypatch.setattr(posttrain.Session, "save", save_then_die)
    with pytest.raises(Killed):
        run(load_config(cls, None, make(task, killed, 4, **extra)))
    monkeypatch.setattr(posttrain.Session, "save", real_save)
    assert len(records(killed)) == 2
    with pytest.raises(LlmcycleError, match="--resume"):  # a fresh start over checkpoints is refused
        run(load_config(cls, None, make(task, killed, 4, **extra)))
    other_shape = {"num_minibatches": 1} if command == "ppo" else {"num_generations": 4}
    with pytest.raises(LlmcycleError, match="cannot resume"):
        run(load_config(cls, None, make(task, killed, 4, **extra, **other_shape)), resume=True)
    result = run(load_config(cls, None, make(task, killed, 4, **extra)), resume=True)

    a, b = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], load_file(task["policy"] / "model.safetensors")["model.norm.weight"])
    assert records(straight) == records(killed)
    if command == "ppo":
        ckpt = "checkpoints/step_00000016/value/model.safetensors"
        va, vb = load_file(straight / ckpt), load_file(killed / ckpt)
        assert all(torch.equal(va[k], vb[k]) for k in va)
        assert result["kl_coef"] != 0.05


# ---- refusals ------------------------------------------------------------------------------------


def test_clear_errors(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the default model directories do not exist
    with pytest.raises(LlmcycleError, match="runs/default/sft/model: model directory not found"):
        ppo(load_config(PPOConfig, None, [f"out_dir={tmp_path / 'a'}"]))
    with pytest.raises(LlmcycleError, match="runs/default/sft/model: model directory not found"):
        grpo(load_config(GRPOConfig, None, [f"out_dir={tmp_path / 'b'}"]))
    with pytest.raises(LlmcycleError, match="runs/reward/model: reward model directory not found"):
        ppo(load_config(PPOConfig, None, [f"out_dir={tmp_path / 'c'}", f"model={task['policy']}",
                                          f"data.train={task['prompts']}", "data.eval=null"]))
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, ["{oops", {"answer": "A"}])
    with pytest.raises(LlmcycleError, match="no usable prompt example; all 2 records were rejected"):
        grpo(load_config(GRPOConfig, None, grpo_overrides(task, tmp_path / "d", 1, **{"data.train": bad})))
    with pytest.raises(LlmcycleError, match="multiple of num_generations"):
        grpo(load_config(GRPOConfig, None, grpo_overrides(task, tmp_path / "e", 1, num_generations=5)))
    with pytest.raises(LlmcycleError, match="no module named"):
        grpo(load_config(GRPOConfig, None, grpo_overrides(task, tmp_path / "f", 1, reward_funcs="[nope_xyz:f]")))
