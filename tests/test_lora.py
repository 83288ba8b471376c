"""LoRA against the real libraries: adapters written here load with peft onto the transformers model (same
logits), adapters peft makes load here (same logits, training continues), and gradients equal peft's."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import randomize_  # noqa: E402
from llmcycle.model import Transformer  # noqa: E402
from llmcycle.optimize.config import ALL_LINEAR, LoRAConfig  # noqa: E402
from llmcycle.optimize.lora import (  # noqa: E402
    AdaptersOff,
    LoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

VOCAB, SEQ = 300, 16
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def hf_base(tmp_path, cls_name="LlamaConfig", **kwargs):
    """A random transformers model saved under tmp_path/base; returns (model, path)."""
    cfg = getattr(transformers, cls_name)(**(BASE | kwargs))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize_(model)
    model.save_pretrained(tmp_path / "base")
    return model, tmp_path / "base"


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def nonzero_b_(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:  # DoRA: magnitudes away from the row norms
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def test_init_and_trainable_share():
    torch.manual_seed(0)
    model = apply_lora(Transformer(transformers_free_config()), LoRAConfig(r=4, alpha=8))
    layers = dict(lora_layers(model))
    assert len(layers) == 7 * 2
    for m in layers.values():
        assert m.lora_A.weight.abs().sum() > 0 and m.lora_B.weight.abs().sum() == 0
        assert m.scaling == 2.0 and not m.weight.requires_grad
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    x = ids()
    with torch.no_grad():
        before = model(x)
    nonzero_b_(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), before)
        with disable_adapters(model):
            torch.testing.assert_close(model(x), before)  # the base alone: the reference model
        torch.testing.assert_close(AdaptersOff(model)(x), before)
    assert not list(AdaptersOff(model).parameters())  # shares the weights, registers none


def transformers_free_config():
    from llmcycle.model import ModelConfig
    return ModelConfig(**BASE)


@pytest.mark.parametrize("targets,dora", [(ALL_LINEAR, False), (["q_proj", "v_proj", "lm_head"], False),
                                          (ALL_LINEAR, True)], ids=["all-linear", "qv-head", "dora"])
def test_our_adapter_loads_in_peft(targets, dora, tmp_path):
    hf, base = hf_base(tmp_path, attention_bias=dora)  # a biased layer exercises DoRA's bias handling
    ours = Transformer.from_pretrained(base).eval()
    cfg = LoRAConfig(r=4, alpha=12.0, target_modules=targets, use_dora=dora)
    apply_lora(ours, cfg)
    nonzero_b_(ours)
    save_adapter(ours, tmp_path / "adapter", base, cfg)
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 12.0

    x = ids()
    with torch.no_grad():
        expected = ours(x)
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(x).logits, expected, atol=1e-4, rtol=0)
        merged = merge_lora(ours)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(x), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(peft_model.merge_and_unload()(x).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls_name,dora", [("LlamaConfig", False), ("Qwen2Config", False), ("Qwen2Config", True)])
def test_peft_adapter_loads_here(cls_name, dora, tmp_path):
    hf, base = hf_base(tmp_path, cls_name)
    lcfg = peft.LoraConfig(r=6, lora_alpha=20, use_rslora=True, task_type="CAUSAL_LM", use_dora=dora,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(hf, lcfg)
    nonzero_b_(pm)
    pm.save_pretrained(tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        expected = pm(x).logits

    ours = load_adapter(Transformer.from_pretrained(base), tmp_path / "peft").eval()
    assert next(iter(dict(lora_layers(ours)).values())).scaling == pytest.approx(20 / 6 ** 0.5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)

    # Training continues from it: the adapters (only) train and move.
    trained = [p for p in ours.parameters() if p.requires_grad]
    assert trained and sum(p.numel() for p in trained) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in lora_state_dict(ours).items()}
    opt = torch.optim.SGD(trained, lr=0.1)
    ours.train()
    torch.nn.functional.cross_entropy(ours(x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
    opt.step()
    after = lora_state_dict(ours)
    assert all(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("rslora,dora", [(False, False), (True, False), (False, True)], ids=["lora", "rslora", "dora"])
def test_gradients_equal_peft(rslora, dora, tmp_path):
    hf, base = hf_base(tmp_path, num_key_value_heads=4)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, task_type="CAUSAL_LM", target_modules=ALL_LINEAR,
                           use_dora=dora)
    pm = peft.get_peft_model(hf, lcfg)
    nonzero_b_(pm)  # with B = 0 the gradient of A is zero: a weak test
    pm.save_pretrained(tmp_path / "peft")
    ours = load_adapter(Transformer.from_pretrained(base), tmp_path / "peft")

    x = ids()
    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss(pm(x).logits).backward()
    loss(ours(x)).backward()
    theirs = {n.replace(".default.weight", "").replace(".default", "") if "magnitude" in n else n.replace(".default", ""):
              p.grad for n, p in pm.named_parameters() if p.requires_grad}
    mine = {f"base_model.model.{n}": p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(theirs) == set(mine)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=0)


# ---- training with adapters through the Session ------------------------------------------------------

def _train_opts(tmp_path, base, out, command="sft", steps=6, **extra):
    from test_posttrain import _opts, _pref_records, _sft_records, _write_jsonl

    data = (_write_jsonl(tmp_path / "sft.jsonl", _sft_records(64, 1)) if command == "sft"
            else _write_jsonl(tmp_path / "pref.jsonl", _pref_records(64, 3)))
    return _opts(out, base, steps, **{"data.train": data, "data.eval": None, "train.lr": 1e-2,
                                      "lora.r": 4, "lora.alpha": 8, **extra})


def _adapter(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(f"{path}/adapter_model.safetensors")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_sft_with_lora_publishes_a_peft_adapter(dora, tiny_base_model, tmp_path):
    from llmcycle.config import load_config
    from llmcycle.train.posttrain.sft import SFTConfig, sft

    out = tmp_path / "run"
    sft(load_config(SFTConfig, None, _train_opts(tmp_path, tiny_base_model, out, **{"lora.use_dora": dora})))
    final = out / "model"
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "tokenizer.json"):
        assert (final / name).exists(), name
    assert not (final / "model.safetensors").exists()  # adapters alone
    card = (final / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card and "llmcycle merge" in card
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["path"] == tiny_base_model and "model.safetensors" in manifest["inputs"]["model"]
    state = _adapter(final)
    assert state and all(k.startswith("base_model.model.model.layers.") for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it trained
    # `llmcycle lineage` walks from the adapter to its base model, re-hashing both.
    from llmcycle.artifacts.lineage import trace
    links = trace(final)
    assert all(link.status != "MODIFIED" for link in links), [(link.path, link.problems) for link in links]
    assert any(link.path == tiny_base_model for link in links)

    # peft loads it onto the transformers model and agrees with llmcycle's model + adapter.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_base_model, attn_implementation="eager")
    x = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_adapter(Transformer.from_pretrained(tiny_base_model), final).eval()(x)
        theirs = peft.PeftModel.from_pretrained(hf, final).eval()(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_dpo_with_lora_uses_the_base_as_reference(tiny_base_model, tmp_path):
    from llmcycle.config import load_config
    from llmcycle.train.posttrain.dpo import REF_CACHE, DPOConfig, dpo

    out = tmp_path / "run"
    dpo(load_config(DPOConfig, None, _train_opts(tmp_path, tiny_base_model, out, "dpo", steps=3)))
    assert (out / "model" / "adapter_config.json").exists()
    # The cached reference log-probs are the base model's: the adapters were off when they were computed.
    cached = torch.load(out / REF_CACHE, weights_only=True)["logps"]["train"]
    ref_out = tmp_path / "full"
    dpo(load_config(DPOConfig, None, _train_opts(tmp_path, tiny_base_model, ref_out, "dpo", steps=1, **{"lora.r": 0})))
    torch.testing.assert_close(cached, torch.load(ref_out / REF_CACHE, weights_only=True)["logps"]["train"])


@pytest.mark.parametrize("sampler", ["simple", "engine"])
def test_grpo_with_lora_trains_adapters_against_the_base(sampler, tiny_base_model, tmp_path):
    from test_posttrain import _opts, _sft_records, _write_jsonl

    from llmcycle.config import load_config
    from llmcycle.train.rl.grpo import GRPOConfig, grpo

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in _sft_records(16, 5)])
    out = tmp_path / "run"
    opts = _opts(out, tiny_base_model, 2, **{"data.train": prompts, "data.eval": None, "num_generations": 4,
                                            "generation.max_new_tokens": 6, "train.grad_accum": 1, "beta": 0.1,
                                            "lora.r": 4, "generation.sampler": sampler})
    grpo(load_config(GRPOConfig, None, [o for o in opts if not o.startswith("data.max_length")]))
    assert (out / "model" / "adapter_model.safetensors").exists() and not (out / "model" / "model.safetensors").exists()


def test_reward_with_lora_trains_the_score_head_fully_and_loads_in_peft(tiny_base_model, tmp_path):
    from llmcycle.config import load_config
    from llmcycle.model.heads import ScalarHeadModel
    from llmcycle.train.posttrain.reward import RewardConfig, train_reward

    out = tmp_path / "run"
    train_reward(load_config(RewardConfig, None, _train_opts(tmp_path, tiny_base_model, out, "reward", steps=3)))
    final = out / "model"
    raw = json.loads((final / "adapter_config.json").read_text())
    assert raw["task_type"] == "SEQ_CLS" and raw["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in _adapter(final)

    ours = load_adapter(ScalarHeadModel.from_causal_lm(Transformer.from_pretrained(tiny_base_model)), final).eval()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_base_model, num_labels=1,
                                                                         attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, final).eval()
    x = torch.randint(4, hf.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits[:, 0], ours(x)[:, -1], atol=1e-4, rtol=0)


def _ppo_opts(tmp_path, base, out, steps=2, **extra) -> list[str]:
    from test_posttrain import _sft_records, _write_jsonl

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in _sft_records(16, 5)])
    opts = {"out_dir": out, "model": base, "reward_model": "null", "reward_funcs": "[exact_match]",
            "data.train": prompts, "data.eval": "null", "train.batch_size": 4, "train.grad_accum": 1,
            "num_minibatches": 1, "ppo_epochs": 1, "train.max_steps": steps, "train.dtype": "fp32",
            "train.threads": 1, "generation.max_new_tokens": 4, "eval.every": 0, "checkpoint.every": 0,
            "train.lr": 1e-2, "lora.r": 4, **extra}
    return [f"{k}={v}" for k, v in opts.items()]


def test_ppo_with_lora_adapts_policy_and_value_bodies(tiny_base_model, tmp_path):
    from llmcycle.config import load_config
    from llmcycle.train.rl.ppo import PPOConfig, ppo

    out = tmp_path / "run"
    ppo(load_config(PPOConfig, None, _ppo_opts(tmp_path, tiny_base_model, out)))
    assert (out / "model" / "adapter_model.safetensors").exists()
    ckpt = next((out / "checkpoints").glob("step_*"))
    assert json.loads((ckpt / "modules.json").read_text()) == {"policy": "lora", "value": "lora_scalar_head"}
    value = _adapter(ckpt / "value")  # the value body adapted, its head trained whole
    assert "base_model.model.score.weight" in value and any("lora_A" in k for k in value)


@pytest.mark.parametrize("command", ["sft", "ppo"])
def test_lora_kill_and_resume_gives_identical_adapters(command, tiny_base_model, tmp_path):
    opts = _train_opts if command == "sft" else _ppo_opts
    subs = ("model", *(["checkpoints/step_00000010/value"] if command == "ppo" else []))
    check_kill_and_resume(command, opts, tiny_base_model, tmp_path, {"lora.dropout": 0.1}, subs)


def check_kill_and_resume(command: str, opts, base, tmp_path, extra: dict, subs=("model",), steps: int = 10) -> None:
    """A run SIGKILLed after step 5 and resumed logs the same losses and publishes bit-identical adapters
    (each of `subs`) as an uninterrupted one."""
    from test_posttrain import _kill_after, _losses

    from conftest import run_cli

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    extra = {"checkpoint.every": 4, **extra}
    assert run_cli([command, *opts(tmp_path, base, ref, steps=steps, **extra)], timeout=300).returncode == 0
    args = [command, *opts(tmp_path, base, killed, steps=steps, **extra)]
    _kill_after(args, killed, min_step=5)
    assert (killed / "checkpoints" / "latest").exists() and not (killed / "model").exists()
    resumed = run_cli([*args, "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(ref), _losses(killed)
    assert sorted(b) == list(range(1, steps + 1)) and all(b[s] == a[s] for s in a)
    for sub in subs:
        sa, sb = _adapter(ref / sub), _adapter(killed / sub)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), sub


# ---- llmcycle merge ----------------------------------------------------------------------------------

def test_merge_writes_a_transformers_model_equal_to_peft_merge(tmp_path):
    from conftest import run_cli

    hf, base = hf_base(tmp_path, "Qwen2Config")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=10, use_rslora=True, target_modules=ALL_LINEAR,
                                                 task_type="CAUSAL_LM"))
    nonzero_b_(pm)
    pm.save_pretrained(tmp_path / "adapter")
    # PEFT records the base by its name_or_path; point it at the directory as llmcycle's adapters do.
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": str(base)}))
    x = ids()
    with torch.no_grad():
        expected = pm.merge_and_unload()(x).logits

    r = run_cli(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")], timeout=120)
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, atol=1e-4, rtol=0)
    inputs = json.loads((tmp_path / "merged" / "manifest.json").read_text())["inputs"]
    assert inputs["model"]["path"] == str(base) and "adapter_model.safetensors" in inputs["adapter"]
    from llmcycle.artifacts.lineage import trace
    shown = {link.path: link.status for link in trace(tmp_path / "merged")}
    assert str(tmp_path / "adapter") in shown and str(base) in shown and "MODIFIED" not in shown.values()


def test_merge_without_a_base_is_a_clear_error(tmp_path):
    from conftest import run_cli

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                                       "base_model_name_or_path": str(tmp_path / "nowhere")}))
    r = run_cli(["merge", str(d), "--out", str(tmp_path / "m")], timeout=60)
    assert r.returncode != 0 and "--base DIR" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key,value,words", [("lora.r", -1, "positive rank"), ("lora.dropout", 1.5, "[0, 1)"),
                                             ("lora.target_modules", "[nothing_here]", "match no linear layer")])
def test_bad_lora_settings_are_refused(key, value, words, tiny_base_model, tmp_path):
    from llmcycle.config import load_config
    from llmcycle.errors import LlmcycleError
    from llmcycle.train.posttrain.sft import SFTConfig, sft

    cfg = load_config(SFTConfig, None, _train_opts(tmp_path, tiny_base_model, tmp_path / "run", **{key: value}))
    with pytest.raises(LlmcycleError, match=re.escape(words)):
        sft(cfg)


def test_two_process_lora_sft_matches_one_process(tiny_base_model, tmp_path):
    """DDP over adapters only (the frozen base is no part of the reducer): the same adapters as one process."""
    import os
    import subprocess
    import sys

    from test_posttrain import _losses

    from llmcycle.config import load_config
    from llmcycle.train.posttrain.sft import SFTConfig, sft

    one, two = tmp_path / "one", tmp_path / "two"
    sft(load_config(SFTConfig, None, _train_opts(tmp_path, tiny_base_model, one, steps=3, **{
        "data.packing": False, "train.batch_size": 8})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "llmcycle", "sft", *_train_opts(tmp_path, tiny_base_model, two, steps=3, **{
                               "data.packing": False, "train.batch_size": 4})],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = _losses(one), _losses(two)
    assert all(l2[s] == pytest.approx(l1[s], rel=1e-4) for s in l1)
    a, b = _adapter(one / "model"), _adapter(two / "model")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
