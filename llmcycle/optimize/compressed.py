"""compressed-tensors' model directory: what vLLM, llm-compressor and transformers (with the
`compressed-tensors` package) load.

Two of its formats, by what is quantized:
- `pack-quantized` (int8 or int4 weights only): a linear layer `P` is `P.weight_packed` (int32 words holding
  the codes shifted to unsigned, `32 / bits` per word, lowest bits first), `P.weight_scale` ([out, groups],
  the model's dtype) and `P.weight_shape`;
- `int-quantized` (W8A8: int8 weights and activations): `P.weight` in int8, `P.weight_scale` [out, 1], and
  for static activations `P.input_scale` [1].

Everything else keeps its usual name and dtype. config.json carries `quantization_config` (quant_method
"compressed-tensors", the format, one config group of symmetric int weights with strategy "channel" or
"group", input activations "token"/dynamic or "tensor"/static, the layers left out in `ignore`). Packing is
written here (a dozen lines) rather than imported, so serving a quantized model needs no extra package;
tests check it bit for bit against compressed-tensors' own `pack_to_int32`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.optimize.quantize import QuantizedLinear

PACKED, INT = "pack-quantized", "int-quantized"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Scheme:
    """What a quantized directory holds: weight bits, group size (None: per channel), int8 activations."""

    bits: int
    group_size: int | None = None
    act: str | None = None  # None, "dynamic" (per token) or "static" (per tensor)

    @property
    def format(self) -> str:
        return INT if self.act else PACKED


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


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for symmetric int weights (and int8 activations)."""
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if scheme.group_size is None else "group", "group_size": scheme.group_size}
    acts = None if not scheme.act else {
        "num_bits": 8, "type": "int", "symmetric": True, "dynamic": scheme.act == "dynamic",
        "strategy": "token" if scheme.act == "dynamic" else "tensor"}
    return {"quant_method": "compressed-tensors", "format": scheme.format, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None, "format": scheme.format}},
            "ignore": ignore, "kv_cache_scheme": None}


def model_scheme(model: nn.Module) -> Scheme:
    """The one scheme every QuantizedLinear of `model` shares (LlmcycleError if none or mixed)."""
    schemes = {Scheme(m.bits, m.group_size, m.act) for m in model.modules() if isinstance(m, QuantizedLinear)}
    if len(schemes) != 1:
        raise LlmcycleError(f"a quantized model directory holds one scheme; this model has {len(schemes)}.")
    return schemes.pop()


def compressed_state_dict(model: nn.Module, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The model's tensors under compressed-tensors' names (tied weights once, as save_pretrained does)."""
    state = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, m in quantized.items():
        if scheme.format == PACKED:
            state[f"{name}.weight_packed"] = pack_int32(m.codes().cpu(), m.bits)
            state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
        else:
            state[f"{name}.weight"] = m.codes().cpu().contiguous()
        state[f"{name}.weight_scale"] = m.scale.cpu().to(m.dtype)
        if m.input_scale is not None:
            state[f"{name}.input_scale"] = m.input_scale.cpu().to(m.dtype)
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach().cpu()
    seen = {id(t) for t in state.values()}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] in quantized or id(value) in seen:
            continue
        seen.add(id(value))
        state[key] = value.detach().cpu().contiguous()
    return state


def save_quantized(model: nn.Module, directory: Path, ignore: list[str]) -> Scheme:
    """Write config.json (with quantization_config) and model.safetensors into `directory`."""
    scheme = model_scheme(model)
    directory.mkdir(parents=True, exist_ok=True)
    state = compressed_state_dict(model, scheme)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    config = model.config.to_hf_dict() | {"quantization_config": quantization_config(scheme, ignore)}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return scheme


def read_quantization(model_dir: str | Path) -> Scheme | None:
    """The scheme of a quantized directory; None for an unquantized one; LlmcycleError for a quantization
    this loader does not read (naming it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc:
        return None
    groups = list((qc.get("config_groups") or {}).values())
    w = (groups[0].get("weights") or {}) if len(groups) == 1 else {}
    a = (groups[0].get("input_activations") or {}) if len(groups) == 1 else {}
    act = None if not a else "dynamic" if a.get("dynamic") and a.get("strategy") == "token" else \
        "static" if not a.get("dynamic") and a.get("strategy") == "tensor" else "?"
    scheme = Scheme(int(w.get("num_bits", 0)), w.get("group_size") if w.get("strategy") == "group" else None, act)
    ok = (qc.get("quant_method") == "compressed-tensors" and qc.get("format") == scheme.format
          and w.get("type") == "int" and w.get("symmetric", True) and scheme.bits in (4, 8) and act != "?"
          and (not a or (a.get("type") == "int" and a.get("num_bits") == 8 and a.get("symmetric", True))))
    if not ok:
        raise LlmcycleError(f"{model_dir}: quantization_config {qc.get('quant_method')}/{qc.get('format')} is not one "
                            "llmcycle reads (compressed-tensors: pack-quantized int4/int8 weights, or int-quantized "
                            "W8A8 with dynamic per-token or static per-tensor activations; symmetric).")
    return scheme


def load_quantized(model_dir: str | Path, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """A quantized directory as llmcycle's Transformer with QuantizedLinear layers (eval mode). dtype: of
    the unquantized tensors, the scales' arithmetic and the outputs (None: float32)."""
    from llmcycle.model.config import ModelConfig
    from llmcycle.model.hf_io import model_from_state, read_state_dict

    scheme = read_quantization(model_dir)
    config = ModelConfig.from_json_file(Path(model_dir) / "config.json")
    state = read_state_dict(model_dir)
    dtype = dtype or torch.float32
    names = {k.rpartition(".")[0] for k in state if k.endswith(".weight_scale")}
    layers = {}
    for name in sorted(names):
        try:
            if scheme.format == PACKED:
                shape = tuple(state.pop(f"{name}.weight_shape").tolist())
                q = unpack_int32(state.pop(f"{name}.weight_packed"), scheme.bits, shape)
            else:
                q = state.pop(f"{name}.weight")
            scale = state.pop(f"{name}.weight_scale").float()
            in_scale = state.pop(f"{name}.input_scale", None)
            layers[name] = QuantizedLinear(q, scale, scheme.bits, state.pop(f"{name}.bias", None), dtype,
                                           scheme.act, in_scale, scheme.group_size)
        except (KeyError, RuntimeError, LlmcycleError) as e:
            raise LlmcycleError(f"{model_dir}: the quantized tensors of {name} are incomplete or misshapen ({e}).") from None
    return model_from_state(config, state, str(model_dir), device=device, dtype=dtype, modules=layers).eval()
