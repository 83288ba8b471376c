"""Weight-only int8 / int4 quantization: codes and packing bit for bit as compressed-tensors writes them, the
integer kernels against the dequantized product, and `llmcycle quantize` directories that transformers
(with compressed-tensors) loads to the same weights, that the engine serves and that training refuses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from llmcycle.errors import LlmcycleError
from llmcycle.optimize.compressed import pack_int32, unpack_int32
from llmcycle.optimize.quantize import QuantizedLinear, dequantize_weight, quantize_weight


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (24, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    q[0, :2] = torch.tensor([lo, hi - 1])  # both extremes: the sign bit of the top field
    assert torch.equal(pack_int32(q, bits), helpers.pack_to_int32(q, bits))
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, tuple(q.shape)), q)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, None)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row: a finite scale, codes 0
    q, scale = quantize_weight(w, bits, group)
    assert q.dtype == torch.int8 and scale.shape == (48, 1 if group is None else 128 // group)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    step = scale.repeat_interleave(128 // scale.shape[1], dim=1)
    assert ((dequantize_weight(q, scale) - w).abs() <= step / 2 + 1e-7).all()
    assert (q[3] == 0).all() and torch.isfinite(scale).all()


def test_w8a8_int_kernel_equals_the_same_integers_in_float():
    layer = torch.nn.Linear(256, 96, bias=True)
    x = torch.randn(4, 7, 256)
    x[..., 3] *= 30  # an outlier channel
    expected = layer(x)
    err = {}
    for act, in_scale in (("dynamic", None), ("static", x.abs().max() / 127)):
        ql = QuantizedLinear.from_linear(layer, 8, None, act, in_scale)
        y = ql(x)
        assert ql._kernel == "int_mm"
        ql._kernel = "dequantize"  # the fallback: the same int8 x int8 products summed in float
        torch.testing.assert_close(ql(x), y, rtol=1e-5, atol=1e-5)
        err[act] = ((y - expected).norm() / expected.norm()).item()
    # an outlier channel costs the others precision, less with a scale per token than one per tensor
    assert err["dynamic"] < 0.05 and err["static"] < 0.1 and err["dynamic"] < err["static"], err
    with pytest.raises(LlmcycleError, match="static activations need an input scale"):
        QuantizedLinear.from_linear(layer, 8, None, "static")
    with pytest.raises(LlmcycleError, match="int8 per-channel weights"):
        QuantizedLinear.from_linear(layer, 4, 64, "dynamic")


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), (8, 32)])
def test_kernels_compute_the_dequantized_product(bits, group, caplog):
    layer = torch.nn.Linear(256, 96, bias=True)
    x = torch.randn(3, 5, 256)
    ql = QuantizedLinear.from_linear(layer, bits, group)
    codes = ql.q.clone()
    with caplog.at_level(logging.WARNING):
        y = ql(x)
    assert torch.equal(ql.codes(), codes)  # int4 keeps only the kernel's layout: q comes back from it exactly
    assert (ql.q is None) == (ql._kernel == "int4pack")
    expected = torch.nn.functional.linear(x, ql.dequantize(), ql.bias)
    if ql._kernel == "dequantize":  # int8 in groups: no kernel, the fallback says so and is exact
        assert (bits, group) == (8, 32) and "dequantizing instead" in caplog.text
        torch.testing.assert_close(y, expected)
    else:  # bf16 activations inside the kernel: bf16's rounding, no more
        assert ql._kernel == ("int8pack" if bits == 8 else "int4pack")
        assert (y - expected).abs().max() <= 1e-2 * expected.abs().max()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from conftest import randomize_

    out = {}
    for name in ("LlamaConfig", "Qwen2Config"):
        cfg = getattr(transformers, name)(vocab_size=300, hidden_size=128, intermediate_size=256,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        randomize_(model)
        path = tmp_path_factory.mktemp(name) / "model"
        model.save_pretrained(path)
        out[name] = path
    return out


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8-dynamic"])
@pytest.mark.parametrize("arch", ["LlamaConfig", "Qwen2Config"])
def test_quantized_directory_loads_in_transformers_and_the_engine(arch, method, hf_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    from llmcycle.cli import main
    from llmcycle.model import Transformer
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.model_runner import ModelRunner
    from llmcycle.serve.sampling import SamplingParams

    src, out = hf_models[arch], tmp_path / "q"
    assert main(["quantize", str(src), "--method", method, "--group-size", "64", "--out", str(out)]) == 0
    ours = ModelRunner.load_weights(out)
    # run_compressed=False: transformers decompresses the weights (dense nn.Linear), as on a CPU
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    # compressed-tensors decompresses to exactly our dequantized weights, biases (Qwen2) included
    for name, layer in ours.named_modules():
        if isinstance(layer, QuantizedLinear):
            torch.testing.assert_close(theirs.get_submodule(name).weight, layer.dequantize(), rtol=0, atol=0)
            if layer.bias is not None:
                torch.testing.assert_close(theirs.get_submodule(name).bias, layer.bias, rtol=0, atol=0)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, reference = ours(x), theirs(x).logits
        full = Transformer.from_pretrained(src).eval()(x)
    if method.startswith("w8a8"):  # transformers decompresses the weights only: ours adds int8 activations
        assert (logits - reference).norm() <= 0.05 * reference.norm()
    else:  # the same weights; bf16 activations inside our kernels
        assert (logits - reference).abs().max() <= 2e-2 * reference.abs().max()
    rel = ((logits - full).norm() / full.norm()).item()
    # rounding noise of random weights (int4 RTN: ~10% per layer, compounded; int8 activations: a few %)
    assert rel <= {"int8": 0.03, "w8a8-dynamic": 0.08, "int4": 0.6}[method], rel

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["path"] == str(src)
    m = manifest["metrics"]
    assert m["weight_bytes"] < (0.35 if method == "int4" else 0.45) * m["source_weight_bytes"]

    # the engine serves it: greedy tokens from the quantized model, which the plain loader refuses
    with pytest.raises(LlmcycleError, match="a quantized model"):
        Transformer.from_pretrained(out)
    engine = LLMEngine(None, model=ours, num_blocks=16, block_size=8)
    rid = engine.add_request(x[0].tolist(), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    done = [o for _ in range(20) for o in engine.step() if o.finished and o.request_id == rid]
    assert len(done[0].outputs[0].token_ids) == 4


def test_quantize_refuses_what_it_cannot_do(hf_models, tmp_path):
    from llmcycle.cli import main

    assert main(["quantize", str(hf_models["LlamaConfig"]), "--method", "int4", "--group-size", "48",
                 "--out", str(tmp_path / "q")]) != 0  # 48 does not divide 128 inputs
    assert not (tmp_path / "q").exists()


def test_a_group_as_wide_as_a_layer_keeps_the_models_scheme(hf_models, tmp_path):
    """Group size 128 over 128 inputs (q, k, v, gate, up) and 256 (down): one scale per row is still the group
    scheme, not per-channel int8's (the default run's model broke on this: 'holds one scheme; this has 2')."""
    from llmcycle.cli import main
    from llmcycle.optimize.formats import load_model_dir

    out = tmp_path / "q"
    assert main(["quantize", str(hf_models["LlamaConfig"]), "--method", "int4", "--group-size", "128",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 128
    model = load_model_dir(out)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and {m.group_size for m in layers} == {128}
    with pytest.raises(LlmcycleError, match="group size"):
        QuantizedLinear(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), 4)


def test_gptq_equals_round_to_nearest_without_correlations_and_beats_it_with_them():
    from llmcycle.optimize.gptq import gptq_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    for group in (None, 64):
        q_rtn, s_rtn = quantize_weight(w, 4, group)
        q, s = gptq_weight(w, torch.eye(256), 4, group, damp=0.0)  # H = I: nothing to correct with
        assert torch.equal(q, q_rtn) and torch.allclose(s, s_rtn)
    # Correlated inputs with uneven scales (what real activations look like): a smaller output error.
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 256, generator=g) + 0.1 * torch.randn(2048, 256, generator=g)
    x[:, :8] *= 10  # outlier channels
    h = 2 * x.T @ x / x.shape[0]
    for group in (None, 64):
        q, s = gptq_weight(w, h, 4, group)
        err_gptq = (x @ (w - dequantize_weight(q, s)).T).norm()
        err_rtn = (x @ (w - dequantize_weight(*quantize_weight(w, 4, group))).T).norm()
        assert err_gptq < 0.7 * err_rtn, (group, err_gptq / err_rtn)


def test_gptq_command_keeps_a_model_closer_than_round_to_nearest(tiny_data, tmp_path):
    from conftest import make_serving_model, tiny_train_overrides
    from llmcycle.cli import main
    from llmcycle.config import load_config
    from llmcycle.data.loader import PackedLoader
    from llmcycle.data.shards import ShardSet
    from llmcycle.model import Transformer
    from llmcycle.serve.model_runner import ModelRunner
    from llmcycle.train.config import PretrainConfig
    from llmcycle.train.pretrain.loop import pretrain

    # a briefly trained model: its activations have the structure GPTQ exploits (random ones have little)
    cfg = load_config(PretrainConfig, None, tiny_train_overrides(tmp_path / "pre", steps=60) + tiny_data["overrides"]
                      + ["model.hidden_size=128", "model.intermediate_size=256", "eval.every=60"])
    pretrain(cfg)
    src = str(tmp_path / "pre" / "model")
    common = ["--method", "int4", "--group-size", "32"]
    assert main(["quantize", src, *common, "--out", str(tmp_path / "rtn")]) == 0
    assert main(["quantize", src, *common, "--gptq", "--calibration", tiny_data["train"], "--calibration-samples", "32",
                 "--seq-len", "64", "--out", str(tmp_path / "gptq")]) == 0
    manifest = json.loads((tmp_path / "gptq" / "manifest.json").read_text())
    assert manifest["config"]["algorithm"] == "gptq" and manifest["inputs"]["calibration"]["path"] == tiny_data["train"]

    x = PackedLoader(ShardSet(tiny_data["val"]), 64, 16).next_batch()[:, :64]  # held out: not calibrated on
    with torch.no_grad():
        full = Transformer.from_pretrained(src).eval()(x)
        err = {name: ((ModelRunner.load_weights(tmp_path / name)(x) - full).norm() / full.norm()).item()
               for name in ("rtn", "gptq")}
    assert err["gptq"] < 0.5 * err["rtn"], err  # measured: 8x smaller
    # by default it calibrates on the training shards its pre-training manifest names
    assert main(["quantize", src, *common, "--gptq", "--calibration-samples", "8", "--seq-len", "32",
                 "--out", str(tmp_path / "default")]) == 0
    used = json.loads((tmp_path / "default" / "manifest.json").read_text())["inputs"]["calibration"]["path"]
    assert Path(used).resolve() == Path(tiny_data["train"]).resolve()
    # a model without that lineage: the error says what to pass
    bare = make_serving_model(tiny_data["tokenizer"], tmp_path / "bare")
    assert main(["quantize", bare, "--gptq", "--out", str(tmp_path / "none")]) != 0


def _outlier_model(tiny_data, tmp_path) -> str:
    """A briefly trained tiny model, then the same function with activation outliers: a few channels of every
    norm scaled up 30x and the weight columns they feed scaled down 30x (what trained LLMs look like)."""
    from conftest import tiny_train_overrides
    from llmcycle.config import load_config
    from llmcycle.model import Transformer
    from llmcycle.optimize.smoothquant import NORM_GROUPS
    from llmcycle.train.config import PretrainConfig
    from llmcycle.train.pretrain.loop import pretrain

    cfg = load_config(PretrainConfig, None, tiny_train_overrides(tmp_path / "pre", steps=60) + tiny_data["overrides"]
                      + ["model.hidden_size=128", "model.intermediate_size=256", "eval.every=60"])
    pretrain(cfg)
    model = Transformer.from_pretrained(tmp_path / "pre" / "model")
    with torch.no_grad():
        for block in model.model.layers:
            for norm, linears in NORM_GROUPS:
                block.get_submodule(norm).weight[:4] *= 30
                for name in linears:
                    block.get_submodule(name).weight[:, :4] /= 30
    model.save_pretrained(tmp_path / "outliers")
    import shutil
    for f in (tmp_path / "pre" / "model").iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "manifest.json"):
            shutil.copy2(f, tmp_path / "outliers" / f.name)
    return str(tmp_path / "outliers")


def test_static_w8a8_with_smoothquant_holds_outliers(tiny_data, tmp_path):
    from llmcycle.cli import main
    from llmcycle.data.loader import PackedLoader
    from llmcycle.data.shards import ShardSet
    from llmcycle.model import Transformer
    from llmcycle.optimize.calibration import input_absmax
    from llmcycle.optimize.quantize import linear_layers
    from llmcycle.optimize.smoothquant import smooth_
    from llmcycle.serve.model_runner import ModelRunner

    src = _outlier_model(tiny_data, tmp_path)
    x = PackedLoader(ShardSet(tiny_data["val"]), 64, 16).next_batch()[:, :64]
    model = Transformer.from_pretrained(src).eval()
    with torch.no_grad():
        full = model(x)
        smooth_(model, input_absmax(model, [x], linear_layers(model)), 0.5)
        torch.testing.assert_close(model(x), full, rtol=0, atol=1e-4)  # the same function, smoother inputs

    calib = ["--calibration", tiny_data["train"], "--calibration-samples", "32", "--seq-len", "64"]
    runs = {"static": [], "smooth": ["--smoothquant", "0.5"], "dynamic": []}
    err = {}
    for name, extra in runs.items():
        method = "w8a8-dynamic" if name == "dynamic" else "w8a8-static"
        assert main(["quantize", src, "--method", method, *calib, *extra, "--out", str(tmp_path / name)]) == 0
        with torch.no_grad():
            err[name] = ((ModelRunner.load_weights(tmp_path / name)(x) - full).norm() / full.norm()).item()
    assert err["smooth"] < 0.5 * err["static"], err
    assert err["dynamic"] < err["static"], err
    raw = json.loads((tmp_path / "smooth" / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "int-quantized" and raw["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    assert main(["quantize", src, "--method", "int4", "--smoothquant", "0.5", "--out", str(tmp_path / "x")]) != 0
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "smooth", quantization_config=transformers.CompressedTensorsConfig(run_compressed=False))
    ours = ModelRunner.load_weights(tmp_path / "smooth")
    layer = ours.model.layers[1].mlp.up_proj
    torch.testing.assert_close(theirs.model.layers[1].mlp.up_proj.weight, layer.dequantize(), rtol=0, atol=0)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "smooth" / "model.safetensors")  # vLLM's name for the static scale
    assert saved["model.layers.1.mlp.up_proj.input_scale"].float().reshape(1) == layer.input_scale


@pytest.mark.parametrize("method", ["nf4", "nf4-dq"])
def test_nf4_directory_loads_in_transformers_with_bitsandbytes(method, hf_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    from llmcycle.cli import main
    from llmcycle.optimize.nf4 import Linear4bit
    from llmcycle.serve.model_runner import ModelRunner

    src, out = hf_models["Qwen2Config"], tmp_path / "q"
    assert main(["quantize", str(src), "--method", method, "--out", str(out)]) == 0
    ours = ModelRunner.load_weights(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.double_quant == (method == "nf4-dq") for _, m in layers)
    for name, layer in layers:
        p = theirs.get_submodule(name).weight
        torch.testing.assert_close(bnb.functional.dequantize_4bit(p.data, p.quant_state).float(), layer.dequantize(),
                                   rtol=0, atol=0)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # bitsandbytes' CPU 4-bit matmul itself is off x @ W.T by ~1% (bf16 inside)
        logits, reference = ours(x), theirs(x).logits.float()
    assert (logits - reference).norm() <= 0.02 * reference.norm()
    assert main(["quantize", str(src), "--method", "nf4", "--gptq", "--out", str(tmp_path / "x")]) != 0
