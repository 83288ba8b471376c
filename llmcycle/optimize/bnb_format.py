"""NF4 model directories in bitsandbytes' serialization: what `transformers` + `bitsandbytes` load
(`AutoModelForCausalLM.from_pretrained(dir)` with the `quantization_config` inside), and llmcycle too.

A 4-bit linear layer `P` is stored as bitsandbytes' `Params4bit` saves itself: `P.weight` (the packed
codes, uint8 [ceil(n / 2), 1]), `P.weight.absmax`, `P.weight.quant_map` (the NF4 codebook), under double
quantization `P.weight.nested_absmax` and `P.weight.nested_quant_map`, and
`P.weight.quant_state.bitsandbytes__nf4`: the rest of the quantization state (type, block size, dtype,
shape, nested block size and offset) as JSON bytes in a uint8 tensor. The codes and statistics are those of
`optimize/nf4.py`, which equal bitsandbytes' own bit for bit (tests/test_nf4.py), so writing and reading the
format needs no bitsandbytes here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.optimize.nf4 import NESTED_BLOCKSIZE, NF4_CODE, Linear4bit, NF4State, dynamic_map

WEIGHTS = "model.safetensors"
QUANT_STATE = "weight.quant_state.bitsandbytes__nf4"


def quantization_config(double_quant: bool, skip: list[str]) -> dict:
    """config.json's `quantization_config`, as transformers' BitsAndBytesConfig writes it."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def _layer_tensors(name: str, m: Linear4bit) -> dict[str, torch.Tensor]:
    state = m.state()
    meta = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": "float32", "shape": list(state.shape)}
    out = {f"{name}.weight": state.packed.cpu().reshape(-1, 1), f"{name}.weight.absmax": state.absmax.cpu(),
           f"{name}.weight.quant_map": NF4_CODE.clone()}
    if state.double_quant:
        meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                 "nested_offset": float(state.nested_offset)}
        out |= {f"{name}.weight.nested_absmax": state.nested_absmax.cpu(),
                f"{name}.weight.nested_quant_map": dynamic_map()}
    out[f"{name}.{QUANT_STATE}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().cpu()
    return out


def save_nf4(model: nn.Module, directory: Path, skip: list[str]) -> None:
    """Write config.json (with quantization_config) and model.safetensors of a model with Linear4bit layers."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    dq = {m.double_quant for m in layers.values()}
    if len(dq) != 1:
        raise LlmcycleError("an NF4 directory holds one scheme: every 4-bit layer with or without double quant.")
    state = {k: v for n, m in layers.items() for k, v in _layer_tensors(n, m).items()}
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in layers:
            state[key] = value.detach().cpu().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    config = model.config.to_hf_dict() | {"quantization_config": quantization_config(dq.pop(), skip)}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _load_layer(name: str, state: dict[str, torch.Tensor]) -> Linear4bit:
    meta = json.loads(bytes(state.pop(f"{name}.{QUANT_STATE}").tolist()).decode())
    code = state.pop(f"{name}.weight.quant_map")
    if meta.get("quant_type") != "nf4" or not torch.equal(code.float(), NF4_CODE):
        raise LlmcycleError(f"{name}: 4-bit type {meta.get('quant_type')!r}; only NF4 is read.")
    out_f, in_f = meta["shape"]
    dq = f"{name}.weight.nested_absmax" in state
    nested = state.pop(f"{name}.weight.nested_absmax", None)
    nested_map = state.pop(f"{name}.weight.nested_quant_map", None)
    if dq and (meta.get("nested_blocksize") != NESTED_BLOCKSIZE or not torch.equal(nested_map.float(), dynamic_map())):
        raise LlmcycleError(f"{name}: double quantization other than bitsandbytes' default (256, dynamic map).")
    bias = state.pop(f"{name}.bias", None)
    layer = Linear4bit(in_f, out_f, bias is not None, meta["blocksize"], dq)
    layer.load_state(NF4State(state.pop(f"{name}.weight").reshape(-1), state.pop(f"{name}.weight.absmax"),
                              torch.Size((out_f, in_f)), meta["blocksize"], nested,
                              torch.tensor(float(meta["nested_offset"])) if dq else None))
    if bias is not None:
        layer.bias = nn.Parameter(bias.float(), requires_grad=False)
    return layer


def load_nf4(model_dir: str | Path, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes NF4 directory as llmcycle's Transformer with Linear4bit layers (eval mode)."""
    from llmcycle.model.config import ModelConfig
    from llmcycle.model.hf_io import model_from_state, read_state_dict

    config = ModelConfig.from_json_file(Path(model_dir) / "config.json")
    state = read_state_dict(model_dir)
    names = sorted(k[: -len(QUANT_STATE) - 1] for k in state if k.endswith(QUANT_STATE))
    try:
        layers = {n: _load_layer(n, state) for n in names}
    except (KeyError, ValueError, RuntimeError) as e:
        raise LlmcycleError(f"{model_dir}: a 4-bit layer's tensors are incomplete or misshapen ({e}).") from None
    model = model_from_state(config, state, str(model_dir), device=device, dtype=dtype, modules=layers)
    return model.eval()
