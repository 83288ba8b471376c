"""`llmcycle quantize MODEL_DIR --method ... --out DIR`: a quantized model directory in compressed-tensors'
format (`optimize/compressed.py`), which `llmcycle serve`, `generate` and `eval` load, and so do vLLM and
transformers (with the `compressed-tensors` package).

Methods (vLLM / llm-compressor's scheme names in brackets):
- `int8` [W8A16]: int8 weights, one scale per output channel; activations stay in floating point.
- `int4` [W4A16]: int4 weights, one scale per `--group-size` inputs (128 by default).
- `w8a8-dynamic` [W8A8, dynamic per token]: int8 weights, and each token's activations quantized to int8 at
  run time with its own scale.
- `w8a8-static` [W8A8, static per tensor]: activations quantized with one scale per layer calibrated
  beforehand (the largest input magnitude seen on the calibration text).
- `nf4`, `nf4-dq` [bitsandbytes 4-bit]: QLoRA's NormalFloat codes in blocks of 64 (`nf4-dq`: with the block
  maxima double-quantized), in bitsandbytes' serialization (`optimize/bnb_format.py`), which transformers
  with bitsandbytes loads.

Options: `--gptq` quantizes the weights with GPTQ instead of round-to-nearest (`optimize/gptq.py`);
`--smoothquant ALPHA` migrates activation outliers into the weights first (`optimize/smoothquant.py`,
W8A8 methods). Both calibrate on `--calibration` token shards, by default the model's pre-training
training shards (`optimize/calibration.py`). The output head stays in full precision (`--ignore`). The
tokenizer and generation config are copied; the manifest names the source model (and the calibration
shards) and records the weight bytes before and after.
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

# method -> (weight bits, default group size, activations)
METHODS = {"int8": (8, None, None), "int4": (4, 128, None), "w8a8-dynamic": (8, None, "dynamic"),
           "w8a8-static": (8, None, "static"), "nf4": (4, 64, None), "nf4-dq": (4, 64, None)}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "README.md")


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def quantize_dir(model_dir: str | Path, out: str | Path, method: str = "int8", group_size: int | None = None,
                 ignore: tuple[str, ...] = ("lm_head",), gptq: bool = False, smoothquant: float | None = None,
                 calibration: str | Path | None = None, num_samples: int = 128, seq_len: int = 256) -> dict:
    """Quantize `model_dir` into `out` (published atomically); returns the manifest's metrics."""
    from llmcycle.model.transformer import Transformer
    from llmcycle.optimize import calibration as calib
    from llmcycle.optimize.compressed import save_quantized
    from llmcycle.optimize.gptq import gptq_quantize_model
    from llmcycle.optimize.quantize import linear_layers, quantize_model
    from llmcycle.optimize.smoothquant import smooth_
    from llmcycle.train.core.inputs import model_input

    model_dir, out = check_model_dir(model_dir), Path(out)
    bits, default_group, act = METHODS[method]
    group_size = group_size if bits == 4 and group_size else default_group
    if smoothquant is not None and not act:
        raise LlmcycleError("--smoothquant helps int8 activations: use it with w8a8-dynamic or w8a8-static.")
    if smoothquant is not None and not 0 < smoothquant < 1:
        raise LlmcycleError(f"--smoothquant alpha must be in (0, 1), not {smoothquant}.")
    model = Transformer.from_pretrained(model_dir).eval()
    inputs = {"model": model_input(model_dir)}
    if method.startswith("nf4"):
        if gptq or smoothquant is not None:
            raise LlmcycleError("nf4 is round-to-nearest on its codebook: --gptq and --smoothquant do not apply.")
        return _publish(model_dir, out, inputs, {"method": method, "bits": 4, "blocksize": 64, "ignore": list(ignore)},
                        lambda tmp: _save_nf4(model, tmp, method == "nf4-dq", ignore))
    config = {"method": method, "bits": bits, "group_size": group_size, "activations": act,
              "ignore": list(ignore), "algorithm": "gptq" if gptq else "rtn", "smoothquant": smoothquant}
    batches, input_scales = None, None
    if gptq or smoothquant is not None or act == "static":
        shards = Path(calibration) if calibration else calib.default_calibration(model_dir)
        seq_len = min(seq_len, model.config.max_position_embeddings)
        batches = calib.calibration_batches(str(shards), seq_len, num_samples)
        inputs["calibration"] = {"path": str(shards)}
        config |= {"calibration_samples": num_samples, "calibration_seq_len": seq_len}
    names = linear_layers(model, ignore)
    if smoothquant is not None or act == "static":
        absmax = calib.input_absmax(model, batches, names)
        if smoothquant is not None:
            absmax = smooth_(model, absmax, smoothquant)
        input_scales = {n: a.max() / 127 for n, a in absmax.items()}
    if gptq:
        gptq_quantize_model(model, batches, bits, group_size, act=act, input_scales=input_scales)
    quantize_model(model, bits, group_size, ignore, act, input_scales)  # what GPTQ left, or every layer
    return _publish(model_dir, out, inputs, config, lambda tmp: save_quantized(model, tmp, ignore=list(ignore)))


def _save_nf4(model, tmp: Path, double_quant: bool, ignore: tuple[str, ...]) -> None:
    from llmcycle.optimize.bnb_format import save_nf4
    from llmcycle.optimize.nf4 import quantize_model as quantize_nf4

    quantize_nf4(model, exclude=ignore, double_quant=double_quant)
    save_nf4(model, tmp, list(ignore))


def _publish(model_dir: Path, out: Path, inputs: dict, config: dict, write) -> dict:
    """Build the directory with `write(tmp)` plus side files and manifest; publish it atomically."""
    tmp = staging_dir(out)
    write(tmp)
    for name in SIDE_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    metrics = {"weight_bytes": weight_bytes(tmp), "source_weight_bytes": weight_bytes(model_dir)}
    write_manifest(tmp, stage="quantize", config=config, inputs=inputs, metrics=metrics)
    publish_dir(tmp, out)
    log.info(f"quantized {model_dir} ({config['method']}): {out}, "
             f"weights {metrics['source_weight_bytes'] / 2**20:.1f} -> {metrics['weight_bytes'] / 2**20:.1f} MiB")
    return metrics


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Quantize a model's linear layers: int8 or int4 weights, optionally int8 activations "
                     "(dynamic per token or static); round-to-nearest or GPTQ; write a compressed-tensors model "
                     "directory that llmcycle, vLLM and transformers load.")
    p.add_argument("model_dir", help="model directory (Hugging Face layout)")
    p.add_argument("--method", choices=list(METHODS), default="int8", help="what is quantized (default: int8)")
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (default: 128)")
    p.add_argument("--ignore", nargs="+", default=["lm_head"], help="layers left unquantized (default: lm_head)")
    p.add_argument("--gptq", action="store_true", help="GPTQ with calibration data instead of round-to-nearest")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="w8a8 methods: migrate activation outliers into the weights first (0.5 is usual)")
    p.add_argument("--calibration", metavar="SHARDS", default=None,
                   help="token shards to calibrate on (default: the model's pre-training shards)")
    p.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences (default: 128)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default: 256)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=quantize_main)


def quantize_main(args: argparse.Namespace) -> int:
    quantize_dir(args.model_dir, args.out, args.method, args.group_size, tuple(args.ignore), args.gptq,
                 args.smoothquant, args.calibration, args.calibration_samples, args.seq_len)
    return 0
