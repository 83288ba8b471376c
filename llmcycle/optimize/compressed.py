"""compressed-tensors' `pack-quantized` model directory: what vLLM, llm-compressor and transformers (with the
`compressed-tensors` package) load.

A quantized linear layer `P` is stored as `P.weight_packed` (int32: the codes shifted to unsigned,
`32 / bits` per word, lowest bits first), `P.weight_scale` ([out, groups], the model's dtype) and
`P.weight_shape` ([out, in]); everything else keeps its usual name and dtype. config.json carries
`quantization_config` (quant_method "compressed-tensors", format "pack-quantized", one config group of
symmetric int weights with strategy "channel" or "group", the layers left out in `ignore`). Packing is
written here (a dozen lines) rather than imported, so serving a quantized model needs no extra package;
tests check it bit for bit against compressed-tensors' own `pack_to_int32`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.optimize.quantize import QuantizedLinear

FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [out, in] -> int32 [out, in * bits / 32]: q + 2^(bits-1), `32 // bits` per word, element k
    of a word in bits k*bits.. (compressed-tensors' layout; `in` a multiple of 32 // bits)."""
    per = 32 // bits
    u = (q.to(torch.int64) + (1 << (bits - 1))).reshape(q.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)  # disjoint bit fields: the sum is their OR
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed 32 bits


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack_int32`: int8 codes of `shape`."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, : shape[1]] - (1 << (bits - 1))).to(torch.int8).reshape(shape)


def quantization_config(bits: int, group_size: int | None, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for symmetric round-to-nearest int weights."""
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if group_size is None else "group", "group_size": group_size}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ignore, "kv_cache_scheme": None}


def compressed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under compressed-tensors' names (tied weights once, as save_pretrained does)."""
    state = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, m in quantized.items():
        state[f"{name}.weight_packed"] = pack_int32(m.q.cpu(), m.bits)
        state[f"{name}.weight_scale"] = m.scale.cpu().to(m.dtype)
        state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach().cpu()
    seen = {id(t) for t in state.values()}
    for key, value in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in quantized or id(value) in seen:
            continue
        seen.add(id(value))
        state[key] = value.detach().cpu().contiguous()
    return state


def save_quantized(model: nn.Module, directory: Path, bits: int, group_size: int | None, ignore: list[str]) -> None:
    """Write config.json (with quantization_config) and model.safetensors into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    state = compressed_state_dict(model)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    config = model.config.to_hf_dict() | {"quantization_config": quantization_config(bits, group_size, ignore)}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_quantization(model_dir: str | Path) -> tuple[int, int | None] | None:
    """(bits, group_size) of a pack-quantized directory; None for an unquantized one; LlmcycleError for a
    quantization this loader does not read (naming it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc:
        return None
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    if (qc.get("quant_method") != "compressed-tensors" or qc.get("format") != FORMAT or len(weights) != 1
            or weights[0].get("type") != "int" or not weights[0].get("symmetric", True)
            or any(g.get("input_activations") for g in groups.values())):
        raise LlmcycleError(f"{model_dir}: quantization_config {qc.get('quant_method')}/{qc.get('format')} is not "
                            "one llmcycle reads (compressed-tensors pack-quantized, symmetric int weights only).")
    w = weights[0]
    return int(w["num_bits"]), w.get("group_size") if w.get("strategy") == "group" else None


def load_quantized(model_dir: str | Path, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """A pack-quantized directory as llmcycle's Transformer with QuantizedLinear layers (eval mode). dtype:
    of the unquantized tensors, the scales' arithmetic and the outputs (None: float32)."""
    from llmcycle.model.config import ModelConfig
    from llmcycle.model.hf_io import model_from_state, read_state_dict

    bits, _ = read_quantization(model_dir)
    config = ModelConfig.from_json_file(Path(model_dir) / "config.json")
    state = read_state_dict(model_dir)
    dtype = dtype or torch.float32
    layers = {}
    for name in sorted({k.rpartition(".")[0] for k in state if k.endswith(".weight_packed")}):
        try:
            shape = tuple(state.pop(f"{name}.weight_shape").tolist())
            q = unpack_int32(state.pop(f"{name}.weight_packed"), bits, shape)
            scale = state.pop(f"{name}.weight_scale").float()
        except (KeyError, RuntimeError) as e:
            raise LlmcycleError(f"{model_dir}: the quantized tensors of {name} are incomplete or misshapen ({e}).") from None
        layers[name] = QuantizedLinear(q, scale, bits, state.pop(f"{name}.bias", None), dtype)
    return model_from_state(config, state, str(model_dir), device=device, dtype=dtype, modules=layers).eval()
