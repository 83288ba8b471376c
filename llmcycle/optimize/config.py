"""The `lora` section every post-training command takes (`llmcycle sft ... lora.r=16`). Torch-free.

Names follow PEFT's `LoraConfig` (r, lora_alpha as `alpha`, lora_dropout as `dropout`, target_modules,
use_rslora, use_dora), so a recipe reads like the adapter_config.json it produces.
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

    def check(self) -> None:
        """Refuse values that cannot train, before any model is loaded."""
        from llmcycle.errors import LlmcycleError

        if self.r < 0:
            raise LlmcycleError(f"lora.r must be 0 (off) or a positive rank, not {self.r}.")
        if self.r and not 0 <= self.dropout < 1:
            raise LlmcycleError(f"lora.dropout must be in [0, 1), not {self.dropout}.")
        if self.r and not self.target_modules:
            raise LlmcycleError("lora.target_modules is empty: name the linear layers to adapt.")
