"""How a manifest names a run's inputs: dataset files and models by content hash (the lineage)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmcycle.artifacts import sha256_file


def file_inputs(paths: Sequence[str | Path]) -> dict[str, str]:
    """sha256 of each dataset file (every file of a directory): the data lineage in manifests."""
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = sha256_file(f)
    return out


def model_input(path: str | Path) -> dict[str, Any]:
    """How a manifest names an input model: its path and the hash of its weights (and manifest when present)."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    for name in ("model.safetensors", "model.safetensors.index.json", "manifest.json"):
        if (path / name).exists():
            info[name] = sha256_file(path / name)
    return info
