"""`llmcycle merge ADAPTER_DIR --out DIR`: fold a LoRA adapter into its base and write a plain Hugging Face
model directory (transformers loads it; its logits are PeftModel.merge_and_unload's).

The base is the adapter's `base_model_name_or_path` unless `--base` names another. The tokenizer and
generation_config.json come from the adapter directory when it has them (a tuned model stops at end of
turn), else from the base. The manifest names both inputs by hash, so `llmcycle lineage` walks from the
merged model through the adapter's run to its data and through the base to pre-training.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from llmcycle.artifacts import publish_dir, sha256_file, staging_dir
from llmcycle.artifacts.manifest import write_manifest
from llmcycle.errors import LlmcycleError
from llmcycle.paths import check_model_dir

log = logging.getLogger(__name__)

# Files a model directory carries beside its weights, taken from the adapter directory when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json")


def adapter_input(adapter_dir: Path) -> dict:
    """How a manifest names an adapter: its path and the hash of its files (lineage follows `path`)."""
    info = {"path": str(adapter_dir)}
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
        if (adapter_dir / name).exists():
            info[name] = sha256_file(adapter_dir / name)
    return info


def adapter_base(adapter_dir: str | Path, base: str | Path | None = None) -> Path:
    """The base model directory of an adapter: `base` if given, else its adapter_config.json's
    base_model_name_or_path; LlmcycleError when that is no model directory here."""
    from llmcycle.optimize.lora import read_adapter_config

    _, raw = read_adapter_config(adapter_dir)
    base = Path(base or raw.get("base_model_name_or_path") or "")
    if not str(base) or str(base) == ".":
        raise LlmcycleError(f"{adapter_dir}: adapter_config.json names no base model; pass --base DIR.")
    return check_model_dir(base, hint="Pass --base DIR: the model the adapter was trained on.")


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    from llmcycle.model.transformer import Transformer
    from llmcycle.optimize.lora import load_adapter, merge_lora
    from llmcycle.train.core.inputs import model_input

    adapter_dir, out = Path(adapter_dir), Path(out)
    base = adapter_base(adapter_dir, base)
    model = merge_lora(load_adapter(Transformer.from_pretrained(base), adapter_dir))
    tmp = staging_dir(out)
    model.save_pretrained(tmp)
    for name in SIDE_FILES:
        src = adapter_dir / name if (adapter_dir / name).exists() else base / name
        if src.exists():
            shutil.copy2(src, tmp / name)
    write_manifest(tmp, stage="merge", config={"adapter": str(adapter_dir), "base": str(base)},
                   inputs={"model": model_input(base), "adapter": adapter_input(adapter_dir)}, metrics={})
    publish_dir(tmp, out)
    log.info(f"merged adapter {adapter_dir} with its base {base} (unchanged): wrote {out}")
    return out


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Fold a LoRA adapter (PEFT format) into its base model; write a plain Hugging Face model."
    p.add_argument("adapter_dir", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=merge_main)


def merge_main(args: argparse.Namespace) -> int:
    merge_adapter(args.adapter_dir, args.out, args.base)
    return 0
