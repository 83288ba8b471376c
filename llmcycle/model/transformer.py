"""The one transformer: a Llama-family decoder (also a bidirectional encoder for masked LM).

RMSNorm, rotary embeddings (Llama-3 style scaling), SwiGLU MLP, grouped-query attention through
`scaled_dot_product_attention`, optional tied embeddings and q/k/v bias. Module and parameter names
are the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`, ...), so a state dict moves
between llmcycle and `transformers` unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmcycle.model.config import ModelConfig

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5; older releases expand k/v.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, then cast back: bf16 statistics lose too much precision.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) / .to_empty() would round or wipe the frequencies; recompute them in fp32
        # on whatever device the module moved to.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] or [B, T]; cos/sin computed in fp32 for accuracy at long positions.
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [T, D] or [B, T, D] (HF's rotate-half convention, not interleaved).
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # Under bf16 autocast q/k come out of the projections in bf16 while cos/sin follow the fp32
    # residual stream: match q/k instead of promoting them (and the whole rotation) to fp32.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _owns_attention(kv_cache) -> bool:
    """The kv_cache protocol has two forms. A contiguous cache (`KVCache`) offers `update(layer, k, v)` and
    the model attends with its own mask. A paged one (`serve.kv_pool.PagedBatch`) offers
    `attend(layer, q, k, v)`: its queries are several sequences packed into one row, so only it knows which
    keys each query may see."""
    return kv_cache is not None and hasattr(kv_cache, "attend")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.config = config  # read is_causal from it: one switch turns the whole model into an encoder
        self.sliding_window = config.sliding_window
        h = config.hidden_size
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_bias)
        # Inference may replace q/k/v by one product (serve/packed_linear.fuse_projections): fewer, larger
        # matmuls for a decode step's few rows. None: the three HF projections above.
        self.qkv_proj: nn.Module | None = None

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            kv_width = self.n_kv * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if _owns_attention(kv_cache):  # a paged cache knows which keys each packed query sees
            return self.o_proj(kv_cache.attend(self.layer_idx, q, k, v).transpose(1, 2).reshape(B, T, -1))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        gqa = {}
        if self.n_kv != self.n_heads:
            if _SDPA_GQA:
                # The CPU flash kernel (and CUDA's) index shared k/v heads directly: no copies of k/v
                # forward, no reduction over the copies backward (~10% of attention time on CPU).
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_heads // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # SDPA's is_causal aligns the mask top-left, exact only when queries and keys coincide.
        causal = self.config.is_causal and attn_mask is None and q.shape[2] == k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one product, for inference (as qkv_proj)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The HF `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # Residual projections scaled by depth (GPT-2): keeps the residual stream's variance
                # independent of the number of layers at initialisation.
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache=None,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or the final hidden states).

        positions: [T] or [B, T]; default 0..T-1 (offset by the KV cache's length).
        attention_mask: optional boolean [B, 1, Tq, Tk] (True = attend) or [B, Tk] padding mask.
        logits_mask: optional boolean [B, T]; logits only where True, as [N, vocab]. Post-training trains a
        small fraction of positions (the answers), and the vocabulary projection of the rest is wasted work.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        mask = None if _owns_attention(kv_cache) else self._attention_mask(attention_mask, B, T, past,
                                                                           input_ids.device)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, kv_cache, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x if logits_mask is None else x[logits_mask])

    def _attention_mask(self, attention_mask, B, T, past, device):
        """Return None when SDPA's own is_causal is exact (the fast path), else a boolean mask."""
        cfg = self.config
        window = cfg.sliding_window
        needs_window = cfg.is_causal and window is not None and past + T > window
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        if attention_mask is None and not needs_window and (past == 0 or T == 1 or not cfg.is_causal):
            return None
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        k_pos = torch.arange(past + T, device=device)[None, :]
        mask = torch.ones(T, past + T, dtype=torch.bool, device=device)
        if cfg.is_causal:
            mask = k_pos <= q_pos
            if window is not None:
                mask = mask & (q_pos - k_pos < window)
        mask = mask[None, None].expand(B, 1, T, past + T)
        if attention_mask is not None:  # [B, Tk] padding mask, 1 = real token
            mask = mask & attention_mask[:, None, None, :].bool()
        return mask

    # ---- checkpoints --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Transformer:
        from llmcycle.model.hf_io import load_model

        return load_model(path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, max_shard_size: int = 2 * 1024**3) -> None:
        from llmcycle.model.hf_io import save_model

        save_model(self, path, max_shard_size=max_shard_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
