"""`llmcycle quantize MODEL_DIR --method int8|int4 --out DIR`: weight-only round-to-nearest quantization into
compressed-tensors' pack-quantized directory (`optimize/compressed.py`), which `llmcycle serve`, `generate`
and `eval` load, and so do vLLM and transformers (with the `compressed-tensors` package).

- `int8`: one scale per output channel; `int4`: one scale per `--group-size` inputs (128 by default).
- `--gptq`: GPTQ instead of round-to-nearest (`optimize/gptq.py`), calibrated on `--calibration` token
  shards: by default the training shards of the model's pre-training (found through its manifests), not
  the held-out ones, so held-out bits per byte stays an honest measure of what quantization cost.
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
from llmcycle.errors import LlmcycleError
from llmcycle.paths import check_model_dir

log = logging.getLogger(__name__)

METHODS = {"int8": (8, None), "int4": (4, 128)}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "README.md")


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def default_calibration(model_dir: Path) -> Path:
    """The training shards of the model's pre-training, from its manifest chain."""
    from llmcycle.eval.suite import lineage

    shards = lineage(model_dir).train_shards
    if shards is None:
        raise LlmcycleError(f"{model_dir}: its manifests lead to no pre-training shards; pass --calibration DIR "
                            "(a token shard set made with this model's tokenizer).")
    return shards


def quantize_dir(model_dir: str | Path, out: str | Path, method: str = "int8", group_size: int | None = None,
                 ignore: tuple[str, ...] = ("lm_head",), gptq: bool = False, calibration: str | Path | None = None,
                 num_samples: int = 128, seq_len: int = 256) -> dict:
    """Quantize `model_dir` into `out` (published atomically); returns the manifest's metrics."""
    from llmcycle.model.transformer import Transformer
    from llmcycle.optimize.compressed import save_quantized
    from llmcycle.optimize.gptq import calibration_batches, gptq_quantize_model
    from llmcycle.optimize.quantize import quantize_model
    from llmcycle.train.core.inputs import model_input

    model_dir, out = check_model_dir(model_dir), Path(out)
    bits, default_group = METHODS[method]
    group_size = group_size if bits == 4 and group_size else default_group
    model = Transformer.from_pretrained(model_dir).eval()
    inputs = {"model": model_input(model_dir)}
    if gptq:
        calibration = Path(calibration) if calibration else default_calibration(model_dir)
        seq_len = min(seq_len, model.config.max_position_embeddings)
        gptq_quantize_model(model, calibration_batches(str(calibration), seq_len, num_samples), bits, group_size)
        inputs["calibration"] = {"path": str(calibration)}
    quantize_model(model, bits, group_size, ignore)  # what GPTQ left (the head only if not ignored)
    tmp = staging_dir(out)
    save_quantized(model, tmp, bits, group_size, list(ignore))
    for name in SIDE_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    metrics = {"weight_bytes": weight_bytes(tmp), "source_weight_bytes": weight_bytes(model_dir)}
    config = {"method": method, "bits": bits, "group_size": group_size, "ignore": list(ignore),
              "algorithm": "gptq" if gptq else "rtn", "format": "compressed-tensors pack-quantized",
              **({"calibration_samples": num_samples, "calibration_seq_len": seq_len} if gptq else {})}
    write_manifest(tmp, stage="quantize", config=config, inputs=inputs, metrics=metrics)
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
    p.add_argument("--gptq", action="store_true", help="GPTQ with calibration data instead of round-to-nearest")
    p.add_argument("--calibration", metavar="SHARDS", default=None,
                   help="token shards to calibrate GPTQ on (default: the model's pre-training shards)")
    p.add_argument("--calibration-samples", type=int, default=128, help="GPTQ: calibration sequences (default: 128)")
    p.add_argument("--seq-len", type=int, default=256, help="GPTQ: tokens per calibration sequence (default: 256)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=quantize_main)


def quantize_main(args: argparse.Namespace) -> int:
    quantize_dir(args.model_dir, args.out, args.method, args.group_size, tuple(args.ignore), args.gptq,
                 args.calibration, args.calibration_samples, args.seq_len)
    return 0
