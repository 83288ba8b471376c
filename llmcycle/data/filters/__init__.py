"""Document filters of `llmcycle data`: language, quality rules, blocklists, harmful content, PII.

Every filter is a `MapStep` registered under a recipe name (importing `llmcycle.data.filters.steps`
registers them all). The quality rules mirror datatrove's filters (Gopher quality and repetition, C4,
FineWeb) rule for rule, with the same defaults and drop reasons; `words` holds the fast word splitter
they share. See docs/data-filters.md.
"""

from __future__ import annotations

from typing import Any

from llmcycle.errors import ConfigError


def check_range(step: str, key: str, value: Any, lo: float | None = None, hi: float | None = None,
                allow_none: bool = True) -> None:
    """Refuse a parameter outside [lo, hi] with its key named (None passes when allowed: rule off)."""
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{step}.{key} must be set.")
    if lo is not None and value < lo:
        raise ConfigError(f"{step}.{key} = {value!r} is too small; it must be >= {lo}.")
    if hi is not None and value > hi:
        raise ConfigError(f"{step}.{key} = {value!r} is too large; it must be <= {hi}.")
