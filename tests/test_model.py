"""The Transformer on its own: shapes, sizes, caching, masking, checkpointing and checkpoint files."""

from __future__ import annotations

import json

import pytest
import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model import SIZES, KVCache, ModelConfig, Transformer, config_for_size, generate

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**(SMALL | kwargs))).eval()


def ids(batch: int = 2, seq: int = 12, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- shapes and sizes ------------------------------------------------------------------------


def test_shapes():
    model = make()
    x = ids()
    assert model(x).shape == (2, 12, 97)
    assert model(x, return_hidden=True).shape == (2, 12, 32)
    # Explicit per-row positions give the same result as the default 0..T-1.
    pos = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(model(x, positions=pos), model(x))


# Rough scale each name promises (the docs table lists the exact counts).
EXPECTED_SIZE = {"tiny": 1e6, "mini": 6e6, "small": 27e6, "base": 80e6, "medium": 240e6, "1b": 1e9}


@pytest.mark.parametrize("size", list(SIZES))
def test_named_sizes(size):
    n = config_for_size(size).num_parameters()  # default vocab 4096, tied
    assert 0.75 * EXPECTED_SIZE[size] <= n <= 1.35 * EXPECTED_SIZE[size], n


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(tie_word_embeddings=False), dict(attention_bias=True, mlp_bias=True),
     dict(model_type="qwen2", qkv_bias=True), dict(head_dim=12, num_key_value_heads=1)],
    ids=["tied", "untied", "llama-biases", "qwen2-bias", "head-dim-mqa"],
)
def test_config_parameter_count_matches_module(kwargs):
    model = make(**kwargs)
    assert model.config.num_parameters() == model.num_parameters()
    assert model.num_parameters() == sum(p.numel() for p in model.state_dict().values()) - (
        model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0)


def test_tiny_size_module_count():
    # The named "tiny" model really is ~1M parameters once built (vocab 4096 included).
    model = Transformer(config_for_size("tiny"))
    assert model.num_parameters() == config_for_size("tiny").num_parameters()
    assert 0.8e6 < model.num_parameters() < 2e6


def test_bad_configs_refused():
    with pytest.raises(LlmcycleError, match="multiple"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(LlmcycleError, match="unknown model size"):
        config_for_size("huge")
    with pytest.raises(LlmcycleError, match="model_type"):
        ModelConfig(model_type="gpt2")


# ---- caching and masking ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, dict(sliding_window=4)], ids=["full", "sliding-window"])
def test_kv_cache_matches_full_forward(kwargs):
    model = make(**kwargs)
    x = ids(2, 14)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 2, 14)
        steps = [model(x[:, :6], kv_cache=cache)]  # prefill
        steps.append(model(x[:, 6:9], kv_cache=cache))  # a chunk
        steps += [model(x[:, i:i + 1], kv_cache=cache) for i in range(9, 14)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 14
    with pytest.raises(ValueError, match="KV cache full"):
        model(x[:, :1], kv_cache=cache)


def test_causal_vs_bidirectional():
    # Changing the last token must not move position 0 in a decoder, and must in an encoder.
    x = ids(1, 10)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 97
    with torch.no_grad():
        dec = make()
        assert torch.equal(dec(x)[:, :-1], dec(y)[:, :-1])
        enc = make(is_causal=False)
        assert (enc(x)[:, 0] - enc(y)[:, 0]).abs().max() > 1e-4
    assert json.loads(json.dumps(enc.config.to_hf_dict()))["is_causal"] is False


def test_padding_mask_isolates_rows():
    # A right-padded row gives the same logits at its real positions as the unpadded sequence alone.
    model = make()
    x = ids(1, 8)
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, :8], model(x), atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_same_gradients():
    x = ids(2, 12)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make().train()
        model.activation_checkpointing = checkpointing
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        return {k: p.grad for k, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=0, rtol=0, msg=k)


def test_generate_greedy_and_stop():
    model = make()
    prompt = [1, 2, 3]
    out = generate(model, prompt, max_new_tokens=6)
    assert len(out) == 6 and out == generate(model, prompt, max_new_tokens=6)
    # The greedy choice at each step is the argmax of a full (uncached) forward.
    with torch.no_grad():
        assert out[0] == int(model(torch.tensor([prompt]))[0, -1].argmax())
        assert out[3] == int(model(torch.tensor([prompt + out[:3]]))[0, -1].argmax())
    stop = out[1]
    assert generate(model, prompt, max_new_tokens=6, stop_ids=[stop]) == out[: out.index(stop) + 1]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=10, generator=g1)
    assert s1 == generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=10, generator=g2)


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_roundtrip(tied, tmp_path):
    model = make(tie_word_embeddings=tied, eos_token_id=3)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    loaded = Transformer.from_pretrained(tmp_path).eval()
    assert loaded.config.to_hf_dict() == model.config.to_hf_dict()
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 3}


def test_sharded_save_replaces_single_file(tmp_path):
    model = make(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, max_shard_size=10_000)
    assert not (tmp_path / "model.safetensors").exists()  # no stale single file next to the shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(x), model(x), atol=0, rtol=0)


def test_bf16_load_runs(tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    bf = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert bf.lm_head.weight is bf.model.embed_tokens.weight  # the tie survives the cast
    assert bf.model.rotary_emb.inv_freq.dtype == torch.float32  # frequencies are not rounded
    x = ids()
    with torch.no_grad():
        got = bf(x)
        want = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    assert generate(bf, [1, 2, 3], max_new_tokens=4)  # the cache follows the model's dtype


def _assert_clean_error(excinfo, needle: str) -> None:
    # One sentence naming the file, raised `from None`: the CLI shows it without a torch traceback.
    assert needle in str(excinfo.value), str(excinfo.value)
    err = excinfo.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_truncated_safetensors(tmp_path):
    make().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LlmcycleError) as e:
        Transformer.from_pretrained(tmp_path)
    _assert_clean_error(e, str(f))


def test_corrupt_safetensors_header(tmp_path):
    make().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(LlmcycleError) as e:
        Transformer.from_pretrained(tmp_path)
    _assert_clean_error(e, str(f))


def test_weights_read_into_memory_of_their_own(tmp_path):
    # Not views of an mmap of the file (which would keep the whole file resident while any tensor lives):
    # the same tensors as safetensors' load_file, every dtype, scalars and empty tensors included.
    from safetensors.torch import load_file, save_file

    from llmcycle.model.hf_io import _read_safetensors

    state = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).bfloat16(), "f16": torch.randn(7).half(),
             "i64": torch.arange(6).view(2, 3), "u8": torch.arange(9, dtype=torch.uint8), "b": torch.tensor([True, False]),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(state, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours, theirs = _read_safetensors(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
    model = make()
    model.save_pretrained(tmp_path / "m")
    loaded = Transformer.from_pretrained(tmp_path / "m")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in loaded.parameters())


def test_missing_shard(tmp_path):
    make().save_pretrained(tmp_path, max_shard_size=10_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(LlmcycleError) as e:
        Transformer.from_pretrained(tmp_path)
    _assert_clean_error(e, shard.name)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    make().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f)
    with pytest.raises(LlmcycleError) as e:
        Transformer.from_pretrained(tmp_path)
    _assert_clean_error(e, "model.layers.1.mlp.up_proj.weight")
    assert str(tmp_path) in str(e.value)


def test_shape_mismatch(tmp_path):
    make().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmcycleError) as e:
        Transformer.from_pretrained(tmp_path)
    _assert_clean_error(e, "gate_proj.weight")
    assert str(tmp_path) in str(e.value) and "(64, 32)" in str(e.value)


def test_missing_config(tmp_path):
    make().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(LlmcycleError) as e:
        Transformer.from_pretrained(tmp_path)
    # the one wording for a folder that is not a model directory (llmcycle.paths.check_model_dir)
    _assert_clean_error(e, f"{tmp_path}: not a model directory (no config.json).")


def test_bad_config_json(tmp_path):
    make().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LlmcycleError) as e:
        Transformer.from_pretrained(tmp_path)
    _assert_clean_error(e, "config.json")
    cfg = make().config.to_hf_dict()
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmcycleError, match="hidden_size"):
        Transformer.from_pretrained(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(LlmcycleError, match="not found"):
        Transformer.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(make().config.to_hf_dict()))
    with pytest.raises(LlmcycleError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LlmcycleError, match="safetensors only"):
        Transformer.from_pretrained(tmp_path)


def test_flops_per_token():
    # 6 FLOPs per matmul weight per token (fwd + bwd), lm_head included, the input lookup excluded:
    # so tying the embeddings changes the parameter count but not the compute.
    tied, untied = ModelConfig(**SMALL), ModelConfig(**(SMALL | dict(tie_word_embeddings=False)))
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32
    assert tied.flops_per_token(16) == untied.flops_per_token(16)
    # (the RMSNorm gains are counted too, as nanoGPT does: 5 * 32 of 22k parameters)
    assert tied.flops_per_token(16) == 6 * tied.num_parameters() + 12 * 2 * 4 * 8 * 16
