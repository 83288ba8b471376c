"""Model configuration: named sizes, explicit fields, and the mapping to Hugging Face config.json.

One dataclass describes every decoder we run: Llama, Qwen2 (q/k/v bias) and Mistral (sliding
window) differ only in a few fields, so they share one implementation. Field names follow the
Hugging Face config keys, which makes `config.json` import and export a plain copy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError

# Architectures we load, and the class name written into config.json for each.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} / {"rope_type": "linear", "factor"}
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    initializer_range: float = 0.02
    model_type: str = "llama"
    # False turns the decoder into a bidirectional encoder for the masked-LM objective.
    is_causal: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # unknown HF keys, carried through unchanged

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlmcycleError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.model_type not in ARCHITECTURES:
            raise LlmcycleError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(ARCHITECTURES)}."
            )

    # ---- Hugging Face config.json ---------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
            # Both spellings of the RoPE settings: transformers >= 5 reads rope_parameters,
            # older releases read rope_theta / rope_scaling.
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"}
            | (self.rope_scaling or {}),
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            # Qwen2 windows only layers >= max_window_layers; 0 puts every layer in the window, as here.
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = 0 if self.sliding_window is not None else self.num_hidden_layers
        if not self.is_causal:
            d["is_causal"] = False
        d.update(self.extra)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = d.get("architectures") or [model_type]
            raise LlmcycleError(
                f"{source}: architecture {archs[0]!r} (model_type {model_type!r}) is not supported; "
                f"llmcycle loads {', '.join(ARCHITECTURES.values())}."
            )
        for key in ("hidden_act",):
            if d.get(key, "silu") != "silu":
                raise LlmcycleError(f"{source}: {key}={d[key]!r} is not supported (only 'silu').")
        rope = dict(d.get("rope_parameters") or {})
        rope_theta = float(d.get("rope_theta") or rope.pop("rope_theta", 10000.0))
        rope.pop("rope_theta", None)
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise LlmcycleError(f"{source}: rope scaling type {kind!r} is not supported (llama3, linear).")
            scaling["rope_type"] = kind
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            needed = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings"), "linear": ("factor",)}.get(kind, ())
            if missing := [k for k in needed if scaling.get(k) is None]:
                raise LlmcycleError(f"{source}: {kind} rope scaling needs {', '.join(missing)}.")
            if kind == "default":
                scaling = None
        sliding = d.get("sliding_window")
        if model_type == "qwen2":
            sliding = _qwen2_window(d, source)
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known and k not in _HF_DERIVED}
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            # transformers' own default when the key is absent: untied for all three classes.
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) if model_type == "llama" else False,
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=sliding,
            initializer_range=d.get("initializer_range", 0.02),
            model_type=model_type,
            is_causal=d.get("is_causal", True),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra=extra,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise LlmcycleError(f"{path}: not found; a model directory needs config.json.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlmcycleError(f"{path}: not valid JSON ({e}).") from None
        try:
            return cls.from_hf_dict(d, source=str(path))
        except KeyError as e:
            raise LlmcycleError(f"{path}: required field {e.args[0]!r} is missing.") from None

    def num_parameters(self) -> int:
        h, kv, hd = self.hidden_size, self.num_key_value_heads, self.head_dim
        q = self.num_attention_heads * hd
        attn = h * q + 2 * h * kv * hd + q * h
        if self.attention_bias:
            attn += q + 2 * kv * hd + h
        elif self.qkv_bias:
            attn += q + 2 * kv * hd
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return emb * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM / nanoGPT MFU estimate."""
        # The input embedding is a lookup, not a matmul: drop it unless it is tied to lm_head, whose
        # matmul does cost 2 * vocab * hidden per token forward.
        n = self.num_parameters() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * n + attn


def _qwen2_window(d: dict[str, Any], source: str) -> int | None:
    """Qwen2's window applies per layer (layer_types, or layers >= max_window_layers); we have one
    attention pattern for all layers, so load all-full or all-sliding and refuse a mix."""
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    n = d["num_hidden_layers"]
    types = d.get("layer_types") or [
        "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    if window is None or all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return window
    raise LlmcycleError(
        f"{source}: Qwen2 sliding window on only some layers (layer_types {types}) is not supported; "
        "llmcycle applies one attention pattern to every layer."
    )


# Keys transformers writes that we derive ourselves; not copied into `extra`.
_HF_DERIVED = {
    "architectures", "hidden_act", "rope_parameters", "torch_dtype", "dtype", "use_cache",
    "transformers_version", "use_sliding_window", "max_window_layers", "layer_types", "attention_dropout",
    "pretraining_tp", "qkv_bias",
}

# Named sizes, from a ~1M-parameter test model to a ~1B model (Llama-3.2-1B's shape).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "mini": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                   num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
}


def config_for_size(size: str, **overrides: Any) -> ModelConfig:
    if size not in SIZES:
        raise LlmcycleError(f"unknown model size {size!r}; choose one of: {', '.join(SIZES)}.")
    fields = dict(SIZES[size])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**fields)


def describe(cfg: ModelConfig) -> str:
    n = cfg.num_parameters()
    unit = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return (f"{cfg.model_type} {unit} params: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, vocab {cfg.vocab_size}")

