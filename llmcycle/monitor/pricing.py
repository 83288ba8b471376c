"""Prices: what a request cost, from the recipe's price table.

A price table maps a model name (as the client asks for it: a served model or a LoRA adapter; `"*"` for
every other) to either token prices, per million tokens as cloud providers quote them, or a price per second
of compute for a self-hosted model:

```yaml
prices:
  default:  {input: 0.15, cached_input: 0.075, output: 0.60}   # per 1M tokens
  my-lora:  {per_second: 0.0004}                               # per second from arrival to last token
  "*":      {input: 0.10, output: 0.40}
```

`cached_input` defaults to `input` (cached prompt tokens are billed like the rest unless a price says
otherwise). A model with no entry and no `"*"` costs nothing recorded (null), not zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcycle.errors import ConfigError

PER_TOKEN_KEYS = ("input", "cached_input", "output")


@dataclass(frozen=True)
class Price:
    input: float = 0.0          # per 1M prompt tokens not served from the prefix cache
    cached_input: float = 0.0   # per 1M prompt tokens served from the prefix cache
    output: float = 0.0         # per 1M completion tokens
    per_second: float = 0.0     # per second of request time (self-hosted compute)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, seconds: float) -> float:
        fresh = prompt_tokens - cached_tokens
        return (fresh * self.input + cached_tokens * self.cached_input + completion_tokens * self.output) / 1e6 \
            + seconds * self.per_second


class PriceTable:
    """Prices by model name; `price(model)` is None for a model without one."""

    def __init__(self, table: dict | None) -> None:
        self.prices: dict[str, Price] = {}
        for model, spec in (table or {}).items():
            if not isinstance(spec, dict) or not spec:
                raise ConfigError(f"prices.{model}: give {{input, cached_input, output}} per 1M tokens or "
                                  f"{{per_second}}, not {spec!r}.")
            unknown = sorted(set(spec) - {*PER_TOKEN_KEYS, "per_second"})
            if unknown:
                raise ConfigError(f"prices.{model}: unknown key {unknown[0]!r}; use input, cached_input, output "
                                  "(per 1M tokens) or per_second.")
            for k, v in spec.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(f"prices.{model}.{k} must be a number >= 0, not {v!r}.")
            values = {k: float(v) for k, v in spec.items()}
            values.setdefault("cached_input", values.get("input", 0.0))
            self.prices[str(model)] = Price(**values)

    def price(self, model: str) -> Price | None:
        return self.prices.get(model, self.prices.get("*"))

    def cost(self, model: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
             seconds: float) -> float | None:
        p = self.price(model)
        return None if p is None else p.cost(prompt_tokens, cached_tokens, completion_tokens, seconds)
