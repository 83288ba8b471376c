"""quantize: the efficiency stage's second part. The run's final model (the nearest model stage before it,
dpo's in the default run) quantized each way the recipe lists (`llmcycle quantize`), every variant and the
model itself evaluated by the eval stage's suite and probed for what serving it costs, in a trade-off table.
Into runs/<name>/quantize/:

    <variant>/          the quantized model directory (compressed-tensors or bitsandbytes; manifest)
    eval/<variant>.json suite v1 on it (eval/reference.json: on the unquantized model)

A variant is a `llmcycle quantize` method, `-gptq` for GPTQ weights, `-sq` for SmoothQuant before int8
activations: int8, int4, int4-gptq, w8a8-dynamic, w8a8-static-sq, nf4, ... The probe
(`python -m llmcycle.optimize.probe`, one process per model so its peak memory is its own) gives batch-1
decode and 16-request tokens/s and peak RSS. It publishes no model of the run: eval and serve keep the
final model as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcycle import svg
from llmcycle.config import field_help as F
from llmcycle.errors import ConfigError
from llmcycle.lifecycle.stage import PREVIOUS_MODEL, Stage

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section

log = logging.getLogger(__name__)

SUFFIXES = {"gptq": ("gptq", True), "sq": ("smoothquant", 0.5)}
COLUMNS = ("heldout_bpb", "mc_accuracy", "exact_match")


@dataclass
class QuantizeStage:
    model: str = F("runs/default/dpo/model", "model to quantize when no model stage runs before this one")
    variants: list[str] = F(["int8", "int4", "int4-gptq", "w8a8-dynamic"],
                            "what to make: a `llmcycle quantize` method (int8, int4, w8a8-dynamic, w8a8-static, nf4, "
                            "nf4-dq), with -gptq for GPTQ weights and -sq for SmoothQuant (w8a8)")
    group_size: int = F(128, "int4: inputs per scale")
    calibration_samples: int = F(64, "calibration sequences for GPTQ, SmoothQuant and static scales (from the "
                                     "model's pre-training shards)")
    probe_tokens: int = F(32, "tokens each probe request decodes")
    probe_concurrency: int = F(16, "requests at once in the throughput probe")
    eval_limit: int = F(0, "suite items (0: the eval stage's limit)")


def variant_options(name: str) -> dict[str, Any]:
    """`quantize_dir` keywords of a variant name ("int4-gptq" -> method int4, gptq True)."""
    from llmcycle.optimize.quantize_cli import METHODS

    method, options = name, {}
    while method not in METHODS and "-" in method:
        method, _, suffix = method.rpartition("-")
        if suffix not in SUFFIXES:
            break
        key, value = SUFFIXES[suffix]
        options[key] = value
    if method not in METHODS:
        raise ConfigError(f"quantize.variants: {name!r} is not a method ({', '.join(METHODS)}) with -gptq / -sq.")
    return {"method": method, **options}


def configure(lc: Lifecycle, cfg: QuantizeStage) -> QuantizeStage:
    for name in cfg.variants:
        variant_options(name)
    if len(set(cfg.variants)) != len(cfg.variants):
        raise ConfigError("quantize.variants: a variant is listed twice.")
    return dataclasses.replace(cfg, model=str(lc.previous_model("quantize")),
                               eval_limit=cfg.eval_limit or lc.cfg.eval.limit)


def probe(model_dir: Path, cfg: QuantizeStage) -> dict:
    """The probe's JSON for one model directory, measured in a child process."""
    cmd = [sys.executable, "-m", "llmcycle.optimize.probe", str(model_dir), "--tokens", str(cfg.probe_tokens),
           "--concurrency", str(cfg.probe_concurrency)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise RuntimeError(f"probe of {model_dir} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.artifacts import atomic_write_json
    from llmcycle.eval.suite import evaluate_model
    from llmcycle.optimize.quantize_cli import quantize_dir, weight_bytes

    cfg: QuantizeStage = lc.stage_config("quantize")
    out, source = lc.dir("quantize"), Path(cfg.model)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    models = {"reference": source}
    for name in cfg.variants:
        models[name] = out / name
        if not (models[name] / "manifest.json").exists():  # resumed: made already
            quantize_dir(source, models[name], group_size=cfg.group_size, num_samples=cfg.calibration_samples,
                         **variant_options(name))
    results = {}
    for name, model in models.items():
        suite, _ = evaluate_model(model, limit=cfg.eval_limit)
        atomic_write_json(out / "eval" / f"{name}.json", suite, default=str)
        results[name] = {"suite": suite["metrics"], "weight_bytes": weight_bytes(model), **probe(model, cfg)}
        log.info(f"[quantize] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in suite["metrics"].items()
                                                    if k in COLUMNS) +
                 f", {results[name]['batch1_tok_s']:.1f} tok/s at batch 1")
    return {"model": str(source), "variants": results}


def deltas(m: dict) -> dict[str, dict[str, float]]:
    """Each variant's suite numbers relative to the unquantized model: bits/byte as a fraction (+0.01: 1%
    worse), accuracies as differences."""
    variants = m.get("variants") or {}
    ref = (variants.get("reference") or {}).get("suite") or {}
    out = {}
    for name, v in variants.items():
        if name == "reference":
            continue
        d = {}
        for k in COLUMNS:
            a, b = ref.get(k), v["suite"].get(k)
            if a is not None and b is not None:
                d[k] = (b - a) / a if k == "heldout_bpb" and a else b - a
        out[name] = d
    return out


def headline(record: dict) -> dict[str, Any]:
    d = deltas(record.get("metrics") or {})
    return {f"{name} bpb": f"{100 * v['heldout_bpb']:+.1f}%" for name, v in d.items() if "heldout_bpb" in v}


def report(run: Records) -> list[Section]:
    """The trade-off table (quality against size and speed) and two charts."""
    m = run.metrics("quantize")
    variants = m.get("variants") or {}
    if not variants:
        return []
    d = deltas(m)
    rows = []
    for name, v in variants.items():
        s, dv = v["suite"], d.get(name, {})
        rows.append([name, s.get("heldout_bpb"), _pct(dv.get("heldout_bpb")), s.get("mc_accuracy"),
                     _diff(dv.get("mc_accuracy")), s.get("exact_match"), _diff(dv.get("exact_match")),
                     f"{v['weight_bytes'] / 2**20:.2f}", f"{v['peak_rss_mb']:.0f}", f"{v['batch1_tok_s']:.1f}",
                     f"{v['concurrent_tok_s']:.1f}"])
    names = list(variants)
    conc = next(iter(variants.values())).get("concurrency", 16)
    blocks: list[Block] = [
        ("p", f"The run's final model (`{m.get('model')}`) and its quantized variants (`llmcycle quantize`), each "
              f"evaluated by suite v1 and probed in a process of its own for serving cost: weight files, peak "
              f"resident memory of that process (load plus the probe's decoding), greedy decode tokens/s of one "
              f"request and of {conc} at once, on this machine's CPU threads. Deltas are against the "
              f"unquantized model (bits/byte: relative, lower is better; accuracies: absolute)."),
        ("table", ["variant", "bits/byte", "Δ bpb", "mc_accuracy", "Δ", "exact_match", "Δ", "weights MiB",
                   "peak RSS MB", "batch-1 tok/s", f"{conc} at once tok/s"], rows),
        ("chart", svg.bar_chart(names, [variants[n]["suite"].get("heldout_bpb") or 0 for n in names],
                                title="Held-out bits per byte (lower is better)")),
        ("chart", svg.grouped_bar_chart(["batch 1", f"{conc} at once"],
                                        {n: [variants[n]["batch1_tok_s"], variants[n]["concurrent_tok_s"]]
                                         for n in names}, title="Decode tokens/s")),
    ]
    return [("Efficiency: quantized variants of the final model", blocks)]


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:+.2f}%"


def _diff(x: float | None) -> str | None:
    return None if x is None else f"{x:+.3f}"


STAGE = Stage("quantize", run, config=QuantizeStage, configure=configure, inputs=PREVIOUS_MODEL,
              headline=headline, report=report)
