"""Numerical parity with Hugging Face `transformers` in both directions.

Every test builds a tiny random model on the spot (no downloads): a transformers model saved with
its own `save_pretrained` must load into llmcycle with equal logits, and ours saved with ours must load
into `AutoModelForCausalLM` with equal logits. Weights are re-drawn with a larger spread than either
library's init so that a wrong bias, rope frequency or mask shows up far above the tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import randomize_  # noqa: E402
from llmcycle.errors import LlmcycleError  # noqa: E402
from llmcycle.model import KVCache, ModelConfig, Transformer, generate  # noqa: E402
from llmcycle.model.transformer import rope_inv_freq  # noqa: E402

ATOL = 1e-5
VOCAB = 300
SEQ = 24
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# (id, transformers config class, kwargs) for the HF -> llmcycle direction.
HF_CASES = [
    ("llama-gqa", "LlamaConfig", {}),
    ("llama-mha", "LlamaConfig", dict(num_key_value_heads=4)),
    ("llama-mqa-tied", "LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    ("llama-attn-bias", "LlamaConfig", dict(attention_bias=True)),
    ("llama-mlp-bias", "LlamaConfig", dict(mlp_bias=True, attention_bias=True)),
    ("llama-head-dim", "LlamaConfig", dict(head_dim=24)),
    ("llama3-rope", "LlamaConfig", dict(rope_parameters={"rope_theta": 10000.0, **LLAMA3})),
    ("linear-rope", "LlamaConfig", dict(rope_parameters={"rope_theta": 500.0, "rope_type": "linear",
                                                         "factor": 4.0})),
    ("qwen2", "Qwen2Config", dict(rope_parameters={"rope_theta": 1e6, "rope_type": "default"})),
    ("qwen2-tied", "Qwen2Config", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    ("mistral-window", "MistralConfig", dict(sliding_window=8, head_dim=16)),
    ("qwen2-window", "Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=0)),
]


def hf_model(cls_name: str, **kwargs):
    cfg = getattr(transformers, cls_name)(**(BASE | kwargs))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize_(model)
    return model


def ours_model(**kwargs) -> Transformer:
    model = Transformer(ModelConfig(**(BASE | kwargs))).eval()
    randomize_(model)
    return model


def ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_transformers_to_llmcycle(case, tmp_path):
    _, cls_name, kwargs = case
    ref = hf_model(cls_name, **kwargs)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)
    assert want.abs().max() > 0.5  # the comparison is not vacuous
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # The config made the round trip: what we write back is what transformers wrote.
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    hf_head_dim = getattr(ref.config, "head_dim", None) or ref.config.hidden_size // ref.config.num_attention_heads
    assert ours.config.head_dim == hf_head_dim


def test_rope_scaling_matters():
    # The llama3 / linear cases above would pass vacuously if scaling changed nothing at these sizes.
    plain = rope_inv_freq(ModelConfig(**BASE))
    assert not torch.allclose(plain, rope_inv_freq(ModelConfig(**BASE, rope_scaling=LLAMA3)))
    assert torch.allclose(plain / 4, rope_inv_freq(ModelConfig(**BASE, rope_scaling={"rope_type": "linear",
                                                                                      "factor": 4.0})))
    # ... and end to end: the same weights give different logits at these positions.
    plain_model, scaled_model = ours_model(), ours_model(rope_scaling=LLAMA3)
    with torch.no_grad():
        assert (plain_model(ids()) - scaled_model(ids())).abs().max() > 1e-2


def test_legacy_rope_keys_load(tmp_path):
    # Checkpoints written by transformers 4.x carry rope_theta / rope_scaling and no rope_parameters.
    ref = hf_model("LlamaConfig", rope_parameters={"rope_theta": 5000.0, **LLAMA3})
    ref.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope | {"type": rope.pop("rope_type")}  # oldest spelling: "type"
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == 5000.0 and ours.config.rope_scaling["rope_type"] == "llama3"
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), ref(ids()).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs,shard",
    [
        (dict(tie_word_embeddings=True), None),
        (dict(tie_word_embeddings=False), None),
        (dict(tie_word_embeddings=False, num_key_value_heads=1, rope_scaling=LLAMA3), 40_000),
        (dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6), None),
        (dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False), 40_000),
        (dict(attention_bias=True, mlp_bias=True, head_dim=24), None),
        (dict(model_type="qwen2", qkv_bias=True, sliding_window=6), None),
    ],
    ids=["tied", "untied", "mqa-llama3-sharded", "qwen2", "mistral-sharded", "biases-head-dim", "qwen2-window"],
)
def test_llmcycle_to_transformers(kwargs, shard, tmp_path):
    ours = ours_model(**kwargs)
    if shard:
        ours.save_pretrained(tmp_path, max_shard_size=shard)
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    else:
        ours.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(ref).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                  "mistral": "MistralForCausalLM"}[ours.config.model_type]
    # transformers must not have re-initialised anything: every tensor arrives as we saved it.
    ref_state = ref.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(ref_state[k], v, atol=0, rtol=0, msg=k)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=ATOL, rtol=0)
    # ... and back again through our loader.
    again = Transformer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


@pytest.mark.parametrize("cls_name,kwargs", [("LlamaConfig", {}), ("Qwen2Config", {}),
                                             ("MistralConfig", dict(sliding_window=6, head_dim=16))],
                         ids=["llama", "qwen2", "mistral-window"])
def test_greedy_generate_matches(cls_name, kwargs, tmp_path):
    ref = hf_model(cls_name, **kwargs)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    for seed, n in [(1, 3), (2, 9), (3, 1)]:
        prompt = ids(1, n, seed)
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
        got = generate(ours, prompt[0].tolist(), max_new_tokens=12)
        assert got == want[0, n:].tolist()


def test_padding_mask_matches(tmp_path):
    ref = hf_model("LlamaConfig")
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    x = ids(3, 12)
    mask = torch.ones_like(x)
    mask[0, 9:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        want = ref(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    assert torch.isfinite(got).all()


def test_sliding_window_mask_matches_with_cache(tmp_path):
    # Prefill longer than the window, then decode step by step: the cached path masks the same way.
    ref = hf_model("MistralConfig", sliding_window=5, head_dim=16)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    x = ids(1, 16)
    with torch.no_grad():
        want = ref(x).logits
        cache = KVCache(ours.config, 1, 16)
        parts = [ours(x[:, :10], kv_cache=cache)] + [ours(x[:, i:i + 1], kv_cache=cache) for i in range(10, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), want, atol=ATOL, rtol=0)


def test_transformers_defaults_for_absent_keys(tmp_path):
    # A config.json without tie_word_embeddings / head_dim must mean what it means to transformers
    # (untied, hidden / heads): a tied guess would silently drop the trained lm_head.
    ref = hf_model("Qwen2Config")
    ref.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    for key in ("tie_word_embeddings", "head_dim"):
        d.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), ref(ids()).logits, atol=ATOL, rtol=0)


def test_transformers_sharded_checkpoint_loads(tmp_path):
    ref = hf_model("LlamaConfig", num_key_value_heads=1)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), ref(ids()).logits, atol=ATOL, rtol=0)


def test_unsupported_rope_scaling_refused(tmp_path):
    ref = hf_model("LlamaConfig", rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 64})
    ref.save_pretrained(tmp_path)
    with pytest.raises(LlmcycleError, match="'yarn'"):
        Transformer.from_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(LlmcycleError, match="low_freq_factor"):
        Transformer.from_pretrained(tmp_path)


def test_unsupported_architecture_refused(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(LlmcycleError, match="GPT2LMHeadModel") as e:
        Transformer.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


def test_qwen2_partial_sliding_window_refused(tmp_path):
    # Qwen2 windows only layers >= max_window_layers; one pattern for all layers cannot express that.
    hf_model("Qwen2Config", use_sliding_window=True, sliding_window=6, max_window_layers=1).save_pretrained(tmp_path)
    with pytest.raises(LlmcycleError, match="sliding window on only some layers"):
        Transformer.from_pretrained(tmp_path)
