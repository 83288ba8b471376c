"""`llmcycle quantize MODEL_DIR --method int8|int4 --out DIR`: weight-only round-to-nearest quantization into
compressed-tensors' pack-quantized directory (`optimize/compressed.py`), which `llmcycle serve`, `generate`
and `eval` load, and so do vLLM and transformers (with the `compressed-tensors` package).

- `int8`: one scale per output channel; `int4`: one scale per `--group-size` inputs (128 by default).
- The output head (`lm_head`) stays in full precision (`--ignore` names the layers to leave alone).
- The tokenizer and generation config are copied; the manifest names the source model by hash, and its
  metrics give the weight bytes before and after, so lineage and the report see what quantization bought.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from llmcycle.artifacts import publish_dir, staging_dir
from llmcycle.artifacts.manifest import write_manifest
from llmcycle.paths import check_model_dir

log = logging.getLogger(__name__)

METHODS = {"int8": (8, None), "int4": (4, 128)}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "README.md")


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def quantize_dir(model_dir: str | Path, out: str | Path, method: str = "int8", group_size: int | None = None,
                 ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """Quantize `model_dir` into `out` (published atomically); returns the manifest's metrics."""
    from llmcycle.model.transformer import Transformer
    from llmcycle.optimize.compressed import save_quantized
    from llmcycle.optimize.quantize import quantize_model
    from llmcycle.train.core.inputs import model_input

    model_dir, out = check_model_dir(model_dir), Path(out)
    bits, default_group = METHODS[method]
    group_size = group_size if bits == 4 and group_size else default_group
    model = Transformer.from_pretrained(model_dir).eval()
    quantize_model(model, bits, group_size, ignore)
    tmp = staging_dir(out)
    save_quantized(model, tmp, bits, group_size, list(ignore))
    for name in SIDE_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    metrics = {"weight_bytes": weight_bytes(tmp), "source_weight_bytes": weight_bytes(model_dir)}
    config = {"method": method, "bits": bits, "group_size": group_size, "ignore": list(ignore),
              "format": "compressed-tensors pack-quantized"}
    write_manifest(tmp, stage="quantize", config=config, inputs={"model": model_input(model_dir)}, metrics=metrics)
    publish_dir(tmp, out)
    log.info(f"quantized {model_dir} ({method}{'' if group_size is None else f', group {group_size}'}): {out}, "
             f"weights {metrics['source_weight_bytes'] / 2**20:.1f} -> {metrics['weight_bytes'] / 2**20:.1f} MiB")
    return metrics


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Quantize a model's linear layers to int8 (per channel) or int4 (group-wise), round to "
                     "nearest; write a compressed-tensors (pack-quantized) model directory.")
    p.add_argument("model_dir", help="model directory (Hugging Face layout)")
    p.add_argument("--method", choices=sorted(METHODS), default="int8", help="weight format (default: int8)")
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (default: 128)")
    p.add_argument("--ignore", nargs="+", default=["lm_head"], help="layers left unquantized (default: lm_head)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=quantize_main)


def quantize_main(args: argparse.Namespace) -> int:
    quantize_dir(args.model_dir, args.out, args.method, args.group_size, tuple(args.ignore))
    return 0
