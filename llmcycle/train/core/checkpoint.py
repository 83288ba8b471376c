"""Checkpoints that survive a crash.

Layout under `<out_dir>/checkpoints/`:

    step_00000200/            a loadable Hugging Face model directory (config.json, model.safetensors,
                              tokenizer files) plus trainer_state.pt (optimizer, RNG, data-loader state)
                              and checkpoint.json (the sha256 and size of every file in it)
    latest                    a one-line file naming the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, every file fsync'd, then renamed into
place; only after that does `latest` change (itself replaced atomically). A crash at any moment leaves
either the previous checkpoint as latest or the new one complete, never a half-written one. A step
written again (a resumed run reaching it a second time) replaces the old one by `publish_dir`'s swap, so
the checkpoint `latest` names is never missing either (llmcycle/artifacts/io.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from llmcycle.artifacts import atomic_write_text, publish_dir, recover, sha256_file
from llmcycle.errors import LlmcycleError

MANIFEST = "checkpoint.json"
LATEST = "latest"
STEP = re.compile(r"step_\d+")  # a checkpoint; not step_*.old-<pid>, a swap's leftover


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int, extra: dict | None = None) -> Path:
    """Create checkpoint `step` by calling write(tmp_dir), then publish it atomically."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[str(f.relative_to(tmp))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {"step": step, "files": files, **(extra or {})}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    final = root / name
    publish_dir(tmp, final)  # fsyncs it all; over an older copy of this step: swapped, never deleted first
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    for aside in root.glob("step_*.old-*"):  # left by a crash amid a swap: back in place, or removed
        recover(root / aside.name.split(".old-")[0])
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and STEP.fullmatch(p.name))
    for old in steps[: max(0, len(steps) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):  # left by a crashed writer
        if tmp.is_dir() and not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, verified against its manifest; None when there is none."""
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    recover(path)  # a crash amid replacing it may have left it renamed aside
    verify_checkpoint(path)
    return path


def verify_checkpoint(path: Path) -> dict:
    """Check every file against checkpoint.json; raise LlmcycleError naming the first bad file."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise LlmcycleError(f"{path}: checkpoint is incomplete ({MANIFEST} missing); it cannot be resumed.")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise LlmcycleError(f"{manifest_path}: corrupt checkpoint manifest ({e}).") from None
    for rel, info in files.items():
        f = path / rel
        if not f.exists():
            raise LlmcycleError(f"{f}: file of checkpoint {path.name} is missing.")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise LlmcycleError(
                f"{f}: checkpoint file is truncated or altered ({size} bytes, expected {info['bytes']})."
            )
        if sha256_file(f) != info["sha256"]:
            raise LlmcycleError(f"{f}: checkpoint file is corrupt (sha256 does not match {MANIFEST}).")
    return manifest
