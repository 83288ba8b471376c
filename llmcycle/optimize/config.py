"""The `lora` section every post-training command takes (`llmcycle sft ... lora.r=16`). Torch-free.

Names follow PEFT's `LoraConfig` (r, lora_alpha as `alpha`, lora_dropout as `dropout`, target_modules,
use_rslora, use_dora), so a recipe reads like the adapter_config.json it produces. `quantize`,
`double_quant` and `blocksize` are QLoRA's (the frozen base in 4-bit NF4, `optimize/nf4.py`); they shape
training only and appear in no adapter file: the adapter goes on the full-precision base.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcycle.config import field_help as F

# Every linear layer of a Llama/Qwen2/Mistral block, by the module names transformers (and llmcycle) use.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    r: int = F(0, "LoRA rank; 0 trains every parameter (no adapters)")
    alpha: float = F(16.0, "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = F(0.0, "dropout on the adapter's input during training")
    target_modules: list[str] = F(list(ALL_LINEAR), "module names to adapt (PEFT-style: a name matches a "
                                  "module whose path ends with it); add lm_head to adapt the output head")
    use_rslora: bool = F(False, "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = F(False, "DoRA (weight-decomposed LoRA): also train a magnitude per output row")
    quantize: str | None = F(None, "QLoRA: 'nf4' stores the frozen base's linear layers (not lm_head) in 4-bit "
                             "NF4, dequantized on the fly; null keeps the base in full precision")
    double_quant: bool = F(False, "QLoRA: also quantize the NF4 block scales to 8 bits (double quantization)")
    blocksize: int = F(64, "QLoRA: values per NF4 block (one scale each)")

    def check(self) -> None:
        """Refuse values that cannot train, before any model is loaded."""
        from llmcycle.errors import LlmcycleError

        if self.r < 0:
            raise LlmcycleError(f"lora.r must be 0 (off) or a positive rank, not {self.r}.")
        if self.r and not 0 <= self.dropout < 1:
            raise LlmcycleError(f"lora.dropout must be in [0, 1), not {self.dropout}.")
        if self.r and not self.target_modules:
            raise LlmcycleError("lora.target_modules is empty: name the linear layers to adapt.")
        if self.quantize not in (None, "nf4"):
            raise LlmcycleError(f"lora.quantize must be null or 'nf4', not {self.quantize!r}.")
        if self.quantize and self.r <= 0:
            raise LlmcycleError("lora.quantize needs adapters to train: set lora.r to a positive rank "
                                "(a 4-bit base is frozen).")
        if self.quantize and (self.blocksize <= 0 or self.blocksize % 2):
            raise LlmcycleError(f"lora.blocksize must be a positive even number, not {self.blocksize}.")
