"""`llmcycle export gguf MODEL_DIR --type f32|f16|q8_0|q4_0|q4_k --out FILE`: one GGUF file that llama.cpp runs
(phones, Raspberry Pi class boards, laptops without a GPU), with the weights, the hyperparameters and the
tokenizer under the names llama.cpp reads.

- Llama and Mistral become GGUF architecture "llama", Qwen2 "qwen2". llama.cpp's "llama" rotates
  interleaved pairs, Hugging Face checkpoints rotate halves, so q_proj and k_proj rows (and biases) are
  permuted per head; "qwen2" rotates halves as we do and takes them as they are.
- `--type`: the 2-D weights in that format; norms, biases and RoPE factors stay float32. With the 4-bit
  types the embedding and output head are q8_0 (llama.cpp's own recipes also keep them wider); a
  matrix whose rows do not split into the format's blocks falls back to f16.
- The tokenizer is written as llama.cpp's byte-level BPE (`gguf_vocab.py` picks the pre-tokenizer that
  splits as ours does); the chat template goes along.
- The file is written beside its final name and renamed into place; `FILE.manifest.json` then names the
  source model and tokenizer by hash and the file's own hash (`llmcycle lineage` format).

Needs the `gguf` package (llama.cpp's writer): `pip install 'llmcycle[edge]'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcycle.errors import LlmcycleError

if TYPE_CHECKING:
    from llmcycle.model.config import ModelConfig

log = logging.getLogger(__name__)

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # our model_type -> GGUF architecture
MANIFEST_SUFFIX = ".manifest.json"

# Hugging Face tensor names -> GGUF names; "{i}" is the layer.
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def import_gguf() -> Any:
    """The `gguf` package, or LlmcycleError naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise LlmcycleError("GGUF export needs the gguf package: pip install 'llmcycle[edge]'.") from None
    return gguf


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor name, None for one llama.cpp has no place for."""
    if hf_name in TENSOR_NAMES:
        return TENSOR_NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        module = LAYER_NAMES.get(".".join(parts[3:-1]))
        if module is not None:
            return f"blk.{parts[2]}.{module}.{parts[-1]}"
    return None


def rope_permute(w: Any, n_head: int) -> Any:
    """Rows of a q/k projection (or bias) from rotate-half to llama.cpp's interleaved-pair order, per head:
    row j of each half of a head goes to position 2j (first half) or 2j+1 (second half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(gguf: Any, name: str, shape: tuple[int, ...], kind: str) -> Any:
    """The GGMLQuantizationType a tensor is stored in for `--type kind` (see the module docstring)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    want = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K}[kind]
    if want in (Q.Q4_0, Q.Q4_K) and name in ("token_embd.weight", "output.weight"):
        want = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[want][0]
    if shape[-1] % block:
        log.info(f"{name}: rows of {shape[-1]} do not split into blocks of {block}; stored as f16")
        return Q.F16
    return want


def encode(gguf: Any, data: Any, qtype: Any) -> Any:
    """`data` (float32 numpy) in GGML type `qtype`: the array gguf.GGUFWriter.add_tensor takes."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    if qtype == Q.Q4_K:
        from llmcycle.optimize.q4_k import quantize_q4_k

        return quantize_q4_k(data)
    return gguf.quants.quantize(data, qtype)


def gguf_tensors(model_dir: Path, cfg: ModelConfig) -> dict[str, Any]:
    """GGUF name -> float32 numpy array of every weight llama.cpp needs, q/k permuted for "llama"."""
    import torch

    from llmcycle.model.hf_io import read_state_dict
    from llmcycle.model.transformer import rope_inv_freq

    arch = ARCHS[cfg.model_type]
    out: dict[str, Any] = {}
    for hf_name, t in read_state_dict(model_dir).items():
        name = gguf_name(hf_name)
        if name is None:
            raise LlmcycleError(f"{model_dir}: tensor {hf_name} has no GGUF counterpart.")
        if name == "output.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp uses token_embd for the head when output is absent
        w = t.float()
        if arch == "llama" and ".attn_q." in name:
            w = rope_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            w = rope_permute(w, cfg.num_key_value_heads)
        out[name] = w.numpy()
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind == "llama3":
        # llama.cpp divides each rotary frequency by rope_freqs; ours are the unscaled ones over the scaled.
        base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        out["rope_freqs.weight"] = (base / rope_inv_freq(cfg)).to(torch.float32).numpy()
    return out


def check_config(cfg: ModelConfig) -> None:
    """LlmcycleError for what llama.cpp would run differently from us."""
    if cfg.model_type not in ARCHS:
        raise LlmcycleError(f"GGUF export supports {', '.join(ARCHS)}; this model is {cfg.model_type}.")
    if "quantization_config" in cfg.extra:
        raise LlmcycleError("this directory holds quantized weights; export the model it was quantized from "
                            "and pick --type here.")
    if not cfg.is_causal:
        raise LlmcycleError("GGUF export is for causal LMs; this model is a bidirectional (masked LM) encoder.")
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind not in (None, "default", "linear", "llama3") or (kind == "llama3" and ARCHS[cfg.model_type] != "llama"):
        raise LlmcycleError(f"GGUF export does not carry rope_scaling {kind!r} for {cfg.model_type}.")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        log.warning(f"sliding_window={cfg.sliding_window}: llama.cpp's llama architecture attends to the whole "
                    f"context, so outputs agree only while a sequence is within {cfg.sliding_window} tokens")


def write_metadata(gguf: Any, writer: Any, cfg: ModelConfig, name: str, kind: str) -> None:
    """The `general.*` and `<arch>.*` keys llama.cpp reads the hyperparameters from."""
    writer.add_name(name)
    F = gguf.LlamaFileType
    writer.add_file_type({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0,
                          "q4_k": F.MOSTLY_Q4_K_S}[kind])
    if kind not in ("f32", "f16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])


def _publish_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it over `final`, fsync the directory: a reader sees the old file or the new one."""
    from llmcycle.artifacts import fsync_dir

    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "f16") -> dict[str, Any]:
    """Write `model_dir` (Llama, Mistral or Qwen2, with a byte-level BPE tokenizer.json) as the GGUF file
    `out` in `kind` (one of TYPES), then `out` + MANIFEST_SUFFIX; return the manifest."""
    from llmcycle.artifacts import atomic_write_json, sha256_file
    from llmcycle.artifacts.io import temp_name
    from llmcycle.artifacts.manifest import versions
    from llmcycle.model.config import ModelConfig
    from llmcycle.optimize.gguf_vocab import read_vocab, write_vocab
    from llmcycle.paths import check_model_dir
    from llmcycle.train.core.inputs import model_input

    gguf = import_gguf()
    if kind not in TYPES:
        raise LlmcycleError(f"unknown GGUF type {kind!r}; choose from {', '.join(TYPES)}.")
    t0 = time.time()
    model_dir, out = check_model_dir(model_dir), Path(out)
    if not (model_dir / "tokenizer.json").is_file():
        raise LlmcycleError(f"{model_dir}: no tokenizer.json; a GGUF file carries the tokenizer.")
    cfg = ModelConfig.from_json_file(model_dir / "config.json")
    check_config(cfg)
    vocab = read_vocab(model_dir, cfg.vocab_size)
    arch = ARCHS[cfg.model_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    types: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        write_metadata(gguf, writer, cfg, model_dir.name, kind)
        write_vocab(writer, vocab)
        for name, data in gguf_tensors(model_dir, cfg).items():
            qtype = tensor_type(gguf, name, data.shape, kind)
            types[qtype.name] = types.get(qtype.name, 0) + 1
            writer.add_tensor(name, encode(gguf, data, qtype), raw_dtype=None if qtype in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _publish_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    source = model_input(model_dir)
    source["tokenizer.json"] = sha256_file(model_dir / "tokenizer.json")
    manifest = {
        "stage": "export",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"format": "gguf", "type": kind, "architecture": arch, "pre_tokenizer": vocab.pre},
        "inputs": {"model": source},
        "outputs": {out.name: sha256_file(out)},
        "metrics": {"bytes": out.stat().st_size, "tensor_types": types, "seconds": round(time.time() - t0, 2)},
        "versions": {**versions(), "gguf": _version("gguf")},
    }
    atomic_write_json(out.with_name(out.name + MANIFEST_SUFFIX), manifest)
    log.info(f"exported {model_dir} as GGUF ({arch}, {kind}, pre-tokenizer {vocab.pre}): {out}, "
             f"{manifest['metrics']['bytes'] / 2**20:.1f} MiB")
    return manifest


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """`llmcycle export FORMAT ...`: one subcommand per format (only gguf today)."""
    p.description = "Write a model for another runtime. gguf: one file for llama.cpp (edge devices)."
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = sub.add_parser("gguf", help="a GGUF file for llama.cpp (f32, f16, q8_0, q4_0, q4_k)",
                       description="Write MODEL_DIR (Llama, Mistral or Qwen2 with a byte-level BPE tokenizer) "
                                   "as one GGUF file that llama.cpp loads, and FILE.manifest.json beside it. "
                                   "Needs: pip install 'llmcycle[edge]'. See docs/optimize.md.")
    g.add_argument("model_dir", help="model directory (Hugging Face layout, with tokenizer.json)")
    g.add_argument("--type", dest="gguf_type", choices=TYPES, default="f16",
                   help="weight format: f32 (unquantized, the largest), f16, q8_0 (8-bit blocks of 32), q4_0 (4-bit blocks of 32), "
                        "q4_k (4-bit super-blocks of 256); default f16")
    g.add_argument("--out", required=True, help="output .gguf file")
    g.set_defaults(func=export_main)


def export_main(args: argparse.Namespace) -> int:
    export_gguf(args.model_dir, args.out, args.gguf_type)
    return 0
