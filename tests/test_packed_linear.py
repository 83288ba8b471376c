"""oneDNN-packed linear layers for CPU inference: same outputs as nn.Linear, only where they apply."""

import pytest
import torch
from torch import nn

from llmcycle.model.config import ModelConfig
from llmcycle.model.transformer import Transformer
from llmcycle.serve.model_runner import ModelRunner
from llmcycle.serve.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_linear_for_every_row_count(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(lin)
    assert torch.equal(packed.weight, lin.weight)
    for shape in [(1, 96), (15, 96), (1, 7, 96), (3, 5, 96), (0, 96)]:
        x = torch.randn(shape)
        torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)


def test_pack_linears_swaps_plain_linears_of_a_cpu_fp32_model_only(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    expected = model(ids)
    assert pack_linears(model) == 2 * 7 + 1  # q k v o gate up down per layer, and the (tied) LM head
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.model.embed_tokens.weight, nn.Parameter)
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
    assert pack_linears(model) == 0  # nothing plain is left
    # bf16 is packed only where the CPU computes it natively (elsewhere oneDNN would emulate it).
    assert can_pack(Transformer(cfg).to(torch.bfloat16)) == torch.ops.mkldnn._is_mkldnn_bf16_supported()

    # The engine's door packs what it loads from disk.
    Transformer(cfg).save_pretrained(tmp_path)
    loaded = ModelRunner.load_weights(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, PackedLinear)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_model_packs_and_fuses_where_the_cpu_has_bf16(tmp_path):
    from llmcycle.serve.packed_linear import fuse_projections

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = Transformer(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9))
    expected = model(ids).float()
    assert fuse_projections(model) == 4 and pack_linears(model) == 2 * 4 + 1  # qkv o gate_up down, LM head
    assert model.lm_head.packed.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: a different summation order moves logits by a few units of the last place.
    torch.testing.assert_close(model(ids).float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("qkv_bias", [False, True])  # Llama, and Qwen2's biased q/k/v
def test_fused_projections_give_the_same_logits(qkv_bias):
    from llmcycle.serve.packed_linear import fuse_projections

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, qkv_bias=qkv_bias)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    expected = model(ids)
    assert fuse_projections(model) == 2 * 2  # qkv and gate/up in each layer
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_proj.out_features == 32 + 2 * 16 and not hasattr(attn, "q_proj")
    assert mlp.gate_up_proj.out_features == 2 * 64 and not hasattr(mlp, "up_proj")
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
    pack_linears(model)
    assert isinstance(attn.qkv_proj, PackedLinear)
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
    assert "model.layers.0.self_attn.q_proj.weight" in Transformer(cfg).state_dict()  # training models keep HF names
