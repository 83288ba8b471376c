"""Every artifact carries a manifest: what made it, from which inputs, with which results.

`manifest.json` in an artifact directory records the stage, its full configuration, the content
hashes of its inputs and of its own files, its metrics, and the versions of llmcycle, torch and
Python. Lineage from a served model back to the raw data follows these files.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from llmcycle.artifacts.hashing import sha256_file
from llmcycle.artifacts.io import atomic_write_json, is_temporary

MANIFEST = "manifest.json"
CARD = "README.md"  # a model card: rewritten as evaluation results arrive, so never among the hashed outputs
RECORD = "stage.json"  # `llmcycle run`'s record of a stage: the graph's bookkeeping beside an artifact, not in it
UNHASHED = (CARD, RECORD)


def file_hashes(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `directory` but the manifest, the top-level entries in `skip` and a crashed
    writer's temporary files (`is_temporary`: never part of an artifact)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                   and p.relative_to(directory).parts[0] not in skip and not is_temporary(p.name))
    return {str(f.relative_to(directory)): sha256_file(f) for f in files}


def versions() -> dict[str, str]:
    """llmcycle, torch and Python versions. torch's is read from its installed metadata (the same string as
    `torch.__version__`), so stages that never use torch (data, tokenizer) do not import it to say so."""
    from importlib.metadata import PackageNotFoundError, version

    from llmcycle import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return {"llmcycle": __version__, "torch": torch_version, "python": platform.python_version()}


def write_manifest(
    directory: Path, stage: str, config: dict[str, Any], inputs: dict[str, Any], metrics: dict[str, Any],
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write `directory/manifest.json` (atomically: a manifest is whole or absent) hashing every file of
    `directory` but the top-level entries in `skip` and UNHASHED; return what was written."""
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "inputs": inputs,
        "outputs": file_hashes(directory, (*skip, *UNHASHED)),
        "metrics": metrics,
        "versions": versions(),
    }
    atomic_write_json(directory / MANIFEST, manifest, default=str)
    return manifest

