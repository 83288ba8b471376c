"""Importing this module registers every filter step (the pipeline imports it)."""

from llmcycle.data.filters import (  # noqa: F401
    blocklist,
    c4,
    fineweb,
    gopher,
    harmful,
    language,
    pii,
)
