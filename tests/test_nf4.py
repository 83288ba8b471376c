"""NF4 (QLoRA's 4-bit base): bit-level agreement with bitsandbytes, the Linear4bit layer, a quantized model."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcycle.model.config import ModelConfig
from llmcycle.model.transformer import Transformer
from llmcycle.optimize.nf4 import (
    NF4_CODE,
    Linear4bit,
    block_absmax,
    dequantize_nf4,
    dynamic_map,
    quantize_model,
    quantize_nf4,
    quantized_weight_nbytes,
)

KERNELS = ("torch", "bitsandbytes")  # dequantize_nf4's own torch path, and bitsandbytes' op on our bytes
# 1024x640: several tiles of the fast dequantization; 333x333: an odd count and a ragged last block
SHAPES = [((256, 512), torch.float32), ((96, 200), torch.bfloat16), ((1024, 640), torch.float32),
          ((333, 333), torch.float16)]


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :64] = 0.0  # an all-zero block
    return w.to(dtype)


def test_codebooks_are_bitsandbytes():
    bf = _bnb()
    assert torch.equal(NF4_CODE, bf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bf.create_dynamic_map())


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_quantize_and_round_trip_equal_bitsandbytes(shape, dtype):
    bf = _bnb()
    w = _weight(shape, dtype)
    packed, qs = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    state = quantize_nf4(w, blocksize=64)
    assert torch.equal(state.packed, packed.view(-1))  # same codes, same nibble order
    assert torch.equal(state.absmax, qs.absmax)
    for out in (torch.float32, torch.bfloat16):
        qs.dtype = out
        for kernel in KERNELS:
            assert torch.equal(dequantize_nf4(state, out, kernel), bf.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_double_quant_equals_bitsandbytes_where_its_search_is_exact(shape, dtype):
    """bitsandbytes' CPU kernel for the 8-bit codes of the block maxima finds the nearest code with an
    approximate binary search (BinSearch's Direct2): ~0.2% of the codes land one or two steps off. Ours
    are the nearest; everything else, and the dequantization of bitsandbytes' own codes, is bit-equal."""
    bf = _bnb()
    w = _weight(shape, dtype)
    packed, qs = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(state.packed, packed.view(-1))
    assert torch.equal(state.nested_absmax, qs.state2.absmax) and torch.equal(state.nested_offset, qs.offset)
    same = state.absmax == qs.absmax
    assert same.float().mean() > 0.99
    assert ((state.absmax.int() - qs.absmax.int()).abs() <= 2).all()
    exact = w.float().reshape(-1)
    exact = F.pad(exact, (0, -exact.numel() % 64)).view(-1, 64).abs().amax(1)
    ours = block_absmax(state)
    theirs = bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    assert ((ours - exact).abs() <= (theirs - exact).abs()).all()
    state.absmax = qs.absmax  # with bitsandbytes' codes, the round trip is theirs to the bit
    for out in (torch.float32, torch.bfloat16):
        qs.dtype = out
        for kernel in KERNELS:
            assert torch.equal(dequantize_nf4(state, out, kernel), bf.dequantize_4bit(packed, qs))


def test_round_trip_error_is_that_of_4_bits():
    w = _weight((512, 512), torch.float32)
    for dq in (False, True):
        err = (dequantize_nf4(quantize_nf4(w, double_quant=dq), kernel="torch") - w).abs()
        assert err.mean() < 0.1 * w.abs().mean()  # NF4 on a normal weight: ~8% mean relative error


def _linear(bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(192, 96, bias=bias).to(dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_is_linear_with_the_bitsandbytes_weight(double_quant, kernel):
    bf = _bnb()
    lin = _linear()
    packed, qs = bf.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4",
                                  compress_statistics=double_quant)
    layer = Linear4bit.from_linear(lin, double_quant=double_quant)
    layer.kernel = kernel
    if double_quant:
        layer.absmax = qs.absmax  # see the double quantization test: compare on bitsandbytes' codes
    x = torch.randn(3, 5, 192)
    assert torch.equal(layer(x), F.linear(x, bf.dequantize_4bit(packed, qs), lin.bias))
    assert (layer.in_features, layer.out_features) == (192, 96)


def test_linear4bit_trains_inputs_not_the_weight():
    lin = _linear()
    layer = Linear4bit.from_linear(lin)
    assert all(not p.requires_grad for p in layer.parameters())
    assert {n for n, _ in layer.named_buffers()} == {"weight_nf4", "absmax"}
    x = torch.randn(4, 192, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(4, 96)
    layer(x).backward(g)
    F.linear(x_ref, layer.dequantize(), lin.bias.detach()).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.bias.grad is None and all(b.grad is None for b in layer.buffers())


def test_linear4bit_bf16_and_dtype_cast_keep_fp32_statistics():
    layer = Linear4bit.from_linear(_linear(), double_quant=True)
    stats = {k: v.clone() for k, v in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert all(torch.equal(stats[k], v) for k, v in layer.named_buffers())
    x = torch.randn(2, 192, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    x32 = torch.randn(2, 192)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x32)
    assert torch.equal(y, F.linear(x32.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()))


def test_linear4bit_keeps_nothing_for_backward():
    """The dequantized weight is rebuilt in the backward, not saved: a 4-bit base stays 4-bit in training."""
    layer = Linear4bit.from_linear(_linear())
    saved = []
    x = torch.randn(8, 192, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert saved == []
    y.sum().backward()
    assert x.grad.shape == x.shape


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_model_keeps_logits_and_cuts_weight_memory(double_quant):
    model = _tiny(tie_word_embeddings=False)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    bf16_bytes = sum(m.weight.numel() * 2 for m in linears.values())
    swapped = quantize_model(model, double_quant=double_quant)
    assert sorted(swapped) == sorted(linears) and isinstance(model.lm_head, nn.Linear)
    assert quantized_weight_nbytes(model) <= 0.3 * bf16_bytes
    with torch.no_grad():
        out = model(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"NF4 (double_quant={double_quant}) logits relative error {rel:.4f}; weight bytes "
          f"{quantized_weight_nbytes(model) / bf16_bytes:.3f} of bf16")
    assert rel < 0.2  # random weights: the logits carry each layer's ~8% weight error

def test_quantize_model_include_exclude_and_tied_head():
    model = _tiny()  # tied embeddings
    swapped = quantize_model(model, include=["q_proj", "model.layers.1.mlp.*"], exclude=["down_proj"])
    assert swapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                       "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="tied"):
        quantize_model(model, include=["lm_head"], exclude=[])


def test_state_dict_round_trip_and_checkpointed_backward():
    model = _tiny()
    quantize_model(model, double_quant=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = _tiny()
    torch.manual_seed(123)
    fresh.reset_parameters()
    quantize_model(fresh, double_quant=True)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    # Gradient checkpointing on, base frozen: gradients reach what trains (here the embeddings) only.
    fresh.train().activation_checkpointing = True
    for n, p in fresh.named_parameters():
        p.requires_grad_(n == "model.embed_tokens.weight")
    fresh(ids).logsumexp(-1).mean().backward()
    assert fresh.model.embed_tokens.weight.grad.abs().sum() > 0


def test_zero_weight_quantizes_to_zero():
    for dq in (False, True):
        assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(4, 256), double_quant=dq)), torch.zeros(4, 256))


class _Adapter(nn.Module):
    """A stand-in for the LoRA layer that wraps Linear4bit: base(x) + x A^T B^T, A and B trained."""

    def __init__(self, base: Linear4bit, r: int = 4):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(r, base.in_features) * 0.01)
        self.b = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


def test_adapters_train_on_a_4bit_base_under_bf16_autocast_and_checkpointing():
    model = _tiny()
    quantize_model(model, double_quant=True)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, name, _Adapter(getattr(layer.self_attn, name)))
    model.train().activation_checkpointing = True
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b.grad is None for b in model.buffers())
