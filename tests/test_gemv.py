"""The int8 GEMV of batch-1 decode (llmcycle/optimize/gemv.c): every instruction-set build computes the same
integers, W8A8 equals the `torch._int_mm` path exactly, weight-only int8 is closer to the float product than
torch's bf16-activation kernel, and without a compiler the layers keep torch's kernels."""

import logging
import platform
import shutil

import pytest
import torch

from llmcycle.optimize import gemv
from llmcycle.optimize.quantize import QuantizedLinear, quantize_rows, quantize_weight

CC = shutil.which("cc") or shutil.which("gcc")
X86 = platform.machine() in ("x86_64", "AMD64")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


def _case(n: int, k: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_weight(w, 8, None)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 40  # an outlier channel, as LLM activations have
    return x, q, scale[:, 0].contiguous()


def _w8a8_reference(x, q, scale, x_scale):
    """What QuantizedLinear computes with torch._int_mm: the same codes, int32 sums, then the scales."""
    acc = (quantize_rows(x, x_scale).long() @ q.long().T).float()
    return acc * x_scale * scale


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """gemv.c compiled for this machine, and on x86 for AVX2 and for plain x86-64: the two machine kinds
    llmcycle runs on (AVX-512 with VNNI, AVX2 only) and the fallback."""
    out = {}
    archs = {"native": ("-march=native",)}
    if X86:
        archs |= {"avx2": ("-march=x86-64-v3",), "plain": ("-march=x86-64",)}
    for name, arch in archs.items():
        path = tmp_path_factory.mktemp("gemv") / f"{name}.so"
        gemv.build(CC, path, arch)
        out[name] = gemv.load(path)
    return out


@pytest.mark.parametrize("n,k,m", [(96, 256, 1), (37, 200, 3), (64, 1000, 2)])
def test_every_build_computes_the_same_integers(builds, n, k, m):
    x, q, scale = _case(n, k, m)
    wsum = q.sum(1, dtype=torch.int32)
    exact = x.double() @ (q.double() * scale.double()[:, None]).T
    bf16 = x.bfloat16().double() @ (q.double() * scale.double()[:, None]).T  # activations rounded to bf16
    static = x.abs().max().reshape(1) / 127
    results = []
    for name, lib in builds.items():
        if X86:
            assert lib.llmc_isa() == {"avx2": 1, "plain": 0}.get(name, lib.llmc_isa()), name
        y16 = gemv.w8a16(x, q, scale, lib=lib)
        # 15 bits per block of 128 activations: far closer to the float product than bf16 activations
        err = (y16.double() - exact).abs().max() / exact.abs().max()
        assert err < 5e-4 and err < (bf16 - exact).abs().max() / exact.abs().max() / 5, (name, err)
        dyn = gemv.w8a8(x, q, scale, wsum, None, lib=lib)
        assert torch.equal(dyn, _w8a8_reference(x, q, scale, x.abs().amax(1, keepdim=True) / 127)), name
        stat = gemv.w8a8(x, q, scale, wsum, static, lib=lib)
        assert torch.equal(stat, _w8a8_reference(x, q, scale, static)), name
        results.append((y16, dyn, stat))
    for other in results[1:]:  # integer sums are exact and the float steps happen in one order
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_threads_split_the_rows_without_changing_a_number(builds):
    x, q, scale = _case(300, 768, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.w8a16(x, q, scale, lib=builds["native"])
        torch.set_num_threads(2)
        two = gemv.w8a16(x, q, scale, lib=builds["native"])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_non_finite_activations_give_nan_rows_not_garbage(builds):
    x, q, scale = _case(32, 256, 3)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    lib = builds["native"]
    for y in (gemv.w8a16(x, q, scale, lib=lib), gemv.w8a8(x, q, scale, q.sum(1, dtype=torch.int32), None, lib=lib)):
        assert torch.isfinite(y[0]).all() and y[1].isnan().all()
    assert gemv.w8a16(x, q, scale, lib=lib)[2].isnan().all()  # an inf in a block: its products are undefined


def test_quantized_layers_take_the_gemv_for_few_rows_only(monkeypatch):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 96, bias=True)
    for act, max_rows in ((None, gemv.W8A16_MAX_ROWS), ("dynamic", gemv.W8A8_MAX_ROWS)):
        ql = QuantizedLinear.from_linear(layer, 8, None, act)
        few, many = torch.randn(1, max_rows, 256), torch.randn(1, max_rows + 1, 256)
        calls = []
        name = "w8a16" if act is None else "w8a8"
        real = getattr(gemv, name)
        monkeypatch.setattr(gemv, name, lambda *a, _r=real, _c=calls, **kw: _c.append(1) or _r(*a, **kw))
        y_few, y_many = ql(few), ql(many)
        assert len(calls) == 1 and y_few.shape == (1, max_rows, 96) and y_many.shape == (1, max_rows + 1, 96)
        expected = torch.nn.functional.linear(few, ql.dequantize(), ql.bias)
        # weight-only: 15-bit activations; W8A8: int8 activations, a step of 1/127 of the row's largest
        tolerance = 1e-3 if act is None else 3e-2
        assert (y_few - expected).abs().max() <= tolerance * expected.abs().max()
        if act:  # the same integers as the _int_mm path, exactly
            ql._kernel = "dequantize"
            torch.testing.assert_close(ql(few), y_few, rtol=1e-6, atol=1e-6)


def test_without_a_compiler_layers_keep_torchs_kernels(monkeypatch, caplog):
    layer = torch.nn.Linear(256, 96)
    x = torch.randn(1, 256)
    ql = QuantizedLinear.from_linear(layer, 8, None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    gemv.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert gemv.library() is None
            y = ql(x)
        assert "could not build the int8 GEMV kernel" in caplog.text
        expected = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), ql.q, ql.scale[:, 0].bfloat16()).float()
        torch.testing.assert_close(y, expected + layer.bias.detach())
        monkeypatch.setenv("LLMCYCLE_NATIVE_GEMV", "0")
        monkeypatch.delenv("CC")
        gemv.library.cache_clear()
        assert gemv.library() is None
    finally:
        gemv.library.cache_clear()


@pytest.mark.parametrize("in_features", [200, 100])
def test_int8_layers_whose_inputs_torchs_kernel_mishandles_stay_exact(in_features):
    """torch's `_weight_int8pack_mm` returns wrong numbers for 200 inputs and crashes for 100 (torch 2.13,
    AVX-512): such layers use the GEMV for few rows and dequantize for more, never that kernel."""
    layer = torch.nn.Linear(in_features, 48)
    ql = QuantizedLinear.from_linear(layer, 8, None)
    for rows in (1, 2, 9):
        x = torch.randn(rows, in_features)
        expected = torch.nn.functional.linear(x, ql.dequantize(), ql.bias)
        assert (ql(x) - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert ql._kernel == "dequantize"


@pytest.mark.parametrize("group", [8, 16])
def test_int4_groups_the_kernel_refuses_fall_back_instead_of_failing(group):
    layer = torch.nn.Linear(96, 48)
    ql = QuantizedLinear.from_linear(layer, 4, group)
    x = torch.randn(3, 96)
    torch.testing.assert_close(ql(x), torch.nn.functional.linear(x, ql.dequantize(), ql.bias))
    assert ql._kernel == "dequantize"
