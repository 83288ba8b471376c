"""QLoRA: the frozen base in 4-bit NF4 under LoRA adapters (`lora.quantize=nf4`). The adapter it trains is a
plain PEFT adapter for the full-precision base: peft loads it, `llmcycle merge` folds it into that base."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_lora import _adapter, _train_opts, check_kill_and_resume  # noqa: E402

from llmcycle.model import Transformer  # noqa: E402
from llmcycle.optimize.config import LoRAConfig  # noqa: E402
from llmcycle.optimize.lora import LoRALinear, apply_lora, load_adapter, merge_lora  # noqa: E402
from llmcycle.optimize.nf4 import Linear4bit, quantize_model, quantized_weight_nbytes  # noqa: E402

QLORA = {"lora.r": 8, "lora.alpha": 16, "lora.quantize": "nf4"}


def _qlora_model(base: str, blocksize: int = 64, double_quant: bool = False) -> Transformer:
    """Our QLoRA model as the Session builds it: the base quantized, then adapted."""
    model = Transformer.from_pretrained(base)
    quantize_model(model, exclude=("lm_head", "score"), blocksize=blocksize, double_quant=double_quant)
    return model


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_quantized_base_under_adapters_is_frozen_and_small(double_quant, tiny_base_model):
    model = _qlora_model(tiny_base_model, double_quant=double_quant)
    full = Transformer.from_pretrained(tiny_base_model)
    apply_lora(model, LoRAConfig(r=8))
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 7 * full.config.num_hidden_layers
    assert all(isinstance(m.base_layer, Linear4bit) and m.weight is None for m in adapted)
    model.activation_checkpointing = True
    model.train()
    x = torch.randint(0, full.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x).float().logsumexp(-1).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    for m in model.modules():
        if isinstance(m, Linear4bit):
            assert all(not p.requires_grad and p.grad is None for p in m.parameters())
    # 4 bits a weight plus the block scales: well under a third of the fp32 weights they replace.
    fp32 = sum(4 * m.weight.numel() for n, m in full.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert quantized_weight_nbytes(model) <= 0.3 * fp32


def test_qlora_sft_trains_and_publishes_a_peft_adapter_for_the_full_precision_base(tiny_base_model, tmp_path, caplog):
    from test_posttrain import _losses

    from conftest import run_cli
    from llmcycle.config import load_config
    from llmcycle.train.posttrain.sft import SFTConfig, sft

    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        sft(load_config(SFTConfig, None, _train_opts(tmp_path, tiny_base_model, out, steps=12, **QLORA)))
    assert "4-bit NF4" in caplog.text and "gradient checkpointing on" in caplog.text
    losses = _losses(out)
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])  # it learns
    final = out / "model"
    raw = json.loads((final / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == tiny_base_model and raw["r"] == 8
    assert not any("quant" in k for k in raw)  # nothing about 4 bits: the adapter goes on the full base
    assert "Trained as QLoRA" in (final / "README.md").read_text()
    state = _adapter(final)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)

    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qlora = load_adapter(_qlora_model(tiny_base_model), final).eval()(x)
        full = load_adapter(Transformer.from_pretrained(tiny_base_model), final).eval()
        ours = full(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_base_model, attn_implementation="eager")
        theirs = peft.PeftModel.from_pretrained(hf, final).eval()(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)  # peft: the same adapter on the same base
    # The 4-bit base differs from the full one by its quantization error only.
    err = (qlora - ours).abs().max().item()
    assert 0 < err < 0.1 * ours.abs().max().item(), err

    merged = tmp_path / "merged"
    r = run_cli(["merge", str(final), "--out", str(merged)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert (merged / "model.safetensors").exists() and (merged / "config.json").exists()
    assert not (merged / "adapter_config.json").exists()
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
        torch.testing.assert_close(plain(x).logits, merge_lora(full)(x), atol=1e-4, rtol=0)


def test_qlora_kill_and_resume_gives_identical_adapters(tiny_base_model, tmp_path):
    from conftest import run_cli

    extra = {"lora.dropout": 0.1, **QLORA, "lora.double_quant": True}
    check_kill_and_resume("sft", _train_opts, tiny_base_model, tmp_path, extra)
    args = ["sft", *_train_opts(tmp_path, tiny_base_model, tmp_path / "killed", steps=10,
                                **{"checkpoint.every": 4, **extra})]
    # A resume with other quantization settings is another run: refused.
    r = run_cli([*args, "lora.double_quant=false", "--resume"], timeout=120)
    assert r.returncode != 0 and "lora.double_quant" in r.stderr


@pytest.mark.parametrize("key,value,words", [("lora.r", 0, "positive rank"), ("lora.quantize", "int8", "'nf4'")])
def test_bad_qlora_settings_are_refused(key, value, words, tiny_base_model, tmp_path):
    from llmcycle.config import load_config
    from llmcycle.errors import LlmcycleError
    from llmcycle.train.posttrain.sft import SFTConfig, sft

    opts = _train_opts(tmp_path, tiny_base_model, tmp_path / "run", **{**QLORA, key: value})
    with pytest.raises(LlmcycleError, match=re.escape(words)):
        sft(load_config(SFTConfig, None, opts))


@pytest.mark.parametrize("command", ["dpo", "reward", "ppo", "grpo-engine"])
def test_qlora_on_other_post_training_commands(command, tiny_base_model, tmp_path):
    from test_posttrain import _opts, _sft_records, _write_jsonl

    from llmcycle.config import load_config

    out = tmp_path / "run"
    if command == "dpo":
        from llmcycle.train.posttrain.dpo import DPOConfig, dpo
        dpo(load_config(DPOConfig, None, _train_opts(tmp_path, tiny_base_model, out, "dpo", steps=2, **QLORA)))
    elif command == "reward":  # a scalar head: the score layer stays full precision and trains whole
        from llmcycle.train.posttrain.reward import RewardConfig, train_reward
        train_reward(load_config(RewardConfig, None, _train_opts(tmp_path, tiny_base_model, out, "reward", steps=2,
                                                                 **QLORA)))
        assert "base_model.model.score.weight" in _adapter(out / "model")
    elif command == "ppo":
        from test_lora import _ppo_opts

        from llmcycle.train.rl.ppo import PPOConfig, ppo
        ppo(load_config(PPOConfig, None, _ppo_opts(tmp_path, tiny_base_model, out, **QLORA)))
    else:
        from llmcycle.train.rl.grpo import GRPOConfig, grpo
        prompts = _write_jsonl(tmp_path / "prompts.jsonl", [
            {"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in _sft_records(16, 5)])
        opts = _opts(out, tiny_base_model, 2, **{"data.train": prompts, "data.eval": None, "num_generations": 4,
                                                "generation.max_new_tokens": 6, "train.grad_accum": 1,
                                                "beta": 0.1, "generation.sampler": "engine", **QLORA})
        grpo(load_config(GRPOConfig, None, [o for o in opts if not o.startswith("data.max_length")]))
    assert (out / "model" / "adapter_model.safetensors").exists() and not (out / "model" / "model.safetensors").exists()
