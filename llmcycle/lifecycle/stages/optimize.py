"""optimize: the efficiency stage. Its first part, LoRA: the run's SFT again with adapters, from the model
the `sft` stage started from, on the same data, both evaluated with the eval stage's suite and compared
(quality, trainable parameters, peak memory, seconds per step). Into runs/<name>/optimize/:

    lora/model/        the adapter (PEFT format, manifest; its base is sft's starting model: lineage reaches it)
    lora/              the LoRA run's working files (metrics.jsonl, checkpoints, tokenizer, held-out split)
    lora-merged/       the adapter folded into its base (`llmcycle merge`): what the suite evaluates
    eval/sft.json, eval/lora.json   suite v1 on sft's model and on the merged LoRA model, the same limit

It publishes no model of the run (`produces_model` False): dpo, eval and serve keep taking sft's and dpo's
models. It sits after dpo, before eval: it reads sft's model and starting point (so after sft), and its
coming parts (quantization, GGUF; issue 16) work on the run's final model, which is dpo's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcycle import svg
from llmcycle.config import field_help as F
from llmcycle.errors import LlmcycleError
from llmcycle.lifecycle.stage import Stage
from llmcycle.optimize.config import ALL_LINEAR, LoRAConfig
from llmcycle.train.config import SFTConfig

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section

log = logging.getLogger(__name__)

SUITE = ("mc_accuracy", "exact_match", "heldout_bpb")  # the eval suite's numbers compared, higher better but bpb
TASKS = ("mc_accuracy", "exact_match")  # quality on the embedded tasks, what the 10% target is about (bpb, on
#                                          pre-training's held-out text, says how much each forgot instead)
TRAINER = ("eval_loss", "eval_exact_match")  # the SFT trainer's own held-out numbers (the same split for both)
QUALITY_TARGET = 0.10  # issue 15: LoRA's quality within 10% of the full fine-tune's


def default_lora() -> LoRAConfig:
    """r 16, alpha 32 on every block linear and the output head. The head's adapter is what lets the run's
    chat turns end: pre-training never saw the chat tokens, so the base's output row for end-of-turn is its
    random start, which full fine-tuning trains and LoRA on the blocks alone cannot reach (on the default
    run leaving it out cost 40% of the exact match; docs/optimize.md has the numbers)."""
    return LoRAConfig(r=16, alpha=32.0, target_modules=[*ALL_LINEAR, "lm_head"])


@dataclass
class OptimizeConfig:
    lora: LoRAConfig = field(default_factory=default_lora,
                             metadata={"help": "the LoRA run: the sft section's recipe with these adapters; r 0 "
                                               "leaves the LoRA part out"})
    lora_lr_scale: float = F(5.0, "the LoRA run's learning rate: sft.train.lr times this (adapters start from "
                                  "zero and are few: they take a larger step than full fine-tuning)")


@dataclass
class OptimizePlan:
    """The section resolved by the graph (what the stage's key and record hold): the LoRA run's whole SFT
    recipe (None: LoRA left out), the full fine-tune it is compared with, and the suite's item limit."""

    lora_sft: SFTConfig | None
    reference: str
    eval_limit: int


def configure(lc: Lifecycle, cfg: OptimizeConfig) -> OptimizePlan:
    """sft's recipe as the graph resolves it (its starting model, data, schedule) with the adapters, the
    scaled learning rate and an out_dir of this stage's: the one difference from sft is the LoRA."""
    if "sft" not in lc.stages:
        raise LlmcycleError("stage optimize compares LoRA with the run's full fine-tune: add sft to stages.")
    sft = lc.stage_config("sft")
    lora = None
    if cfg.lora.r > 0:
        lora = dataclasses.replace(sft, out_dir=str(lc.dir("optimize") / "lora"), lora=cfg.lora,
                                   train=dataclasses.replace(sft.train, lr=sft.train.lr * cfg.lora_lr_scale))
    return OptimizePlan(lora_sft=lora, reference=str(lc.dir("sft") / "model"),
                        eval_limit=lc.cfg.eval.limit)


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.artifacts import atomic_write_json
    from llmcycle.eval.suite import evaluate_model
    from llmcycle.optimize.merge import merge_adapter
    from llmcycle.train.posttrain.sft import sft

    plan: OptimizePlan = lc.stage_config("optimize")
    if plan.lora_sft is None:
        log.info("[optimize] lora.r is 0: no LoRA run")
        return {}
    out = lc.dir("optimize")
    sft(plan.lora_sft, resume=resume)  # publishes the adapter in lora/model
    adapter = out / "lora" / "model"
    merged = merge_adapter(adapter, out / "lora-merged")
    suite = {}
    (out / "eval").mkdir(exist_ok=True)
    for name, model in (("sft", plan.reference), ("lora", merged)):  # the eval stage's suite and limit
        result, _ = evaluate_model(model, limit=plan.eval_limit)
        atomic_write_json(out / "eval" / f"{name}.json", result, default=str)
        suite[name] = result["metrics"]
    # Both trainers' numbers as their manifests hold them (the returned metrics plus steps and seconds)
    full, tuned = _trained(lc.dir("sft") / "model"), _trained(adapter)
    metrics = {"adapter": str(adapter), "merged": str(merged),
               "full": {**full, "suite": suite["sft"]}, "lora": {**tuned, "suite": suite["lora"]}}
    metrics["quality_ratio"] = quality_ratio(metrics)
    log.info("[optimize] LoRA vs full SFT: " + ", ".join(comparison(metrics)))
    return metrics


def _trained(model_dir: Path) -> dict:
    """A trainer's numbers the comparison keeps, from its manifest: held-out metrics, what it used
    (core/usage.py), its steps and training seconds."""
    m = json.loads((model_dir / "manifest.json").read_text()).get("metrics") or {}
    keys = (*TRAINER, "eval_exact_match_n", "trainable_parameters", "parameters", "trainable_share",
            "mean_step_seconds", "train_peak_rss_mb", "train_start_rss_mb", "train_peak_cuda_mb", "steps",
            "train_seconds")
    return {k: m[k] for k in keys if k in m}


def quality_ratio(m: dict) -> dict[str, float]:
    """LoRA's suite numbers over the full fine-tune's (bits per byte: full over LoRA, so that above 1 is
    better for every one). 0.9 or more on the TASKS meets the 10% target."""
    full, lora = m["full"]["suite"], m["lora"]["suite"]
    out = {}
    for k in SUITE:
        a, b = full.get(k), lora.get(k)
        if a is None or b is None:
            continue
        num, den = (a, b) if k == "heldout_bpb" else (b, a)
        if den:
            out[k] = num / den
    return out


def comparison(m: dict) -> list[str]:
    """Short phrases, LoRA's number first, the full fine-tune's second: quality by suite metric, trainable
    parameters, peak memory of training, seconds per step."""
    full, lora = m.get("full") or {}, m.get("lora") or {}
    if not lora:
        return []
    parts = [f"{k} {lora['suite'][k]:.3f} vs {full['suite'][k]:.3f}" for k in SUITE
             if k in lora.get("suite", {}) and k in full.get("suite", {})]
    if "trainable_parameters" in lora:
        parts.append(f"trainable {lora['trainable_parameters']:,} ({100 * lora['trainable_share']:.2f}%) vs "
                     f"{full.get('trainable_parameters', 0):,}")
    growth = [_growth(x) for x in (lora, full)]
    if None not in growth:  # what training added; the peak itself carries what earlier stages left live
        parts.append(f"training RSS +{growth[0]:.0f} vs +{growth[1]:.0f} MB (peak {lora['train_peak_rss_mb']:.0f} "
                     f"vs {full['train_peak_rss_mb']:.0f})")
    if "mean_step_seconds" in lora and "mean_step_seconds" in full:
        parts.append(f"step {lora['mean_step_seconds']:.3f} vs {full['mean_step_seconds']:.3f} s")
    return parts


def headline(record: dict) -> dict[str, Any]:
    m = record.get("metrics") or {}
    lora = m.get("lora") or {}
    if not lora:
        return {"lora": "off"}
    out: dict[str, Any] = {f"lora {k}": lora["suite"][k] for k in ("mc_accuracy", "exact_match") if k in lora["suite"]}
    if "trainable_share" in lora:
        out["trainable"] = f"{100 * lora['trainable_share']:.2f}%"
    return out


def summary(record: dict) -> list[tuple[str, str]]:
    m = record.get("metrics") or {}
    return [("LoRA vs full SFT", ", ".join(comparison(m)))] if m.get("lora") else []


def report(run: Records) -> list[Section]:
    """LoRA against the full fine-tune: quality (suite and trainer), parameters, memory, time."""
    m = run.metrics("optimize")
    full, lora = m.get("full") or {}, m.get("lora") or {}
    if not lora:
        return []
    cfg = ((run.records.get("optimize") or {}).get("config") or {}).get("lora_sft") or {}
    lc, lr = cfg.get("lora") or {}, (cfg.get("train") or {}).get("lr")
    rows: list[list[Any]] = []

    def row(label: str, a: Any, b: Any, ratio: bool = True) -> None:
        share = b / a if ratio and isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None
        rows.append([label, a, b, share])

    for k in SUITE:
        row(f"suite: {k}", full.get("suite", {}).get(k), lora.get("suite", {}).get(k))
    for k in TRAINER:
        row(f"trainer held-out: {k}", full.get(k), lora.get(k))
    row("trainable parameters", full.get("trainable_parameters"), lora.get("trainable_parameters"))
    row("trainable share", *(_percent(x.get("trainable_share")) for x in (full, lora)), ratio=False)
    row("RSS growth over training (MB)", *(_mb(_growth(x)) for x in (full, lora)))
    for key, label in (("train_peak_rss_mb", "peak RSS of training (MB)"),
                       ("train_start_rss_mb", "RSS when training started (MB)"),
                       ("train_peak_cuda_mb", "peak CUDA memory of training (MB)")):
        if key in full or key in lora:
            row(label, *(_mb(x.get(key)) for x in (full, lora)))
    row("seconds per optimizer step", full.get("mean_step_seconds"), lora.get("mean_step_seconds"))
    row("optimizer steps", full.get("steps"), lora.get("steps"), ratio=False)
    row("training seconds", full.get("train_seconds"), lora.get("train_seconds"))
    ratio = {k: v for k, v in (m.get("quality_ratio") or {}).items() if k in TASKS}
    worst = min(ratio.values()) if ratio else None
    verdict = ("" if worst is None else
               f" On the tasks LoRA reaches {worst:.3f} of the full fine-tune's quality at worst "
               f"({', '.join(f'{k} {v:.3f}' for k, v in ratio.items())}): "
               f"{'within' if worst >= 1 - QUALITY_TARGET else 'NOT within'} the 10% target.")
    blocks: list[Block] = [
        ("p", f"The run's SFT again with LoRA adapters (r {lc.get('r')}, alpha {lc.get('alpha')} on "
              f"{', '.join(lc.get('target_modules') or [])}; learning rate {lr}), from the model sft started from, "
              f"on the same data and schedule; both evaluated by suite v1 with the eval stage's limit (the LoRA "
              f"model merged into its base). Adapter: `{m.get('adapter')}`; per-model results: "
              f"`{run.dir('optimize')}/eval/`. Memory: the process's resident set (one process runs every stage). "
              f"Its high-water mark is reset at each stage's start after freed heap is handed back, but what "
              f"earlier stages left live stays, and it differs between sft's turn and this one's: compare the "
              f"growth over training, peak minus the RSS training started from. The ratio column is LoRA "
              f"over full." + verdict),
        ("table", ["", "full SFT", "LoRA", "LoRA / full"], rows),
    ]
    shown = [k for k in ("mc_accuracy", "exact_match") if k in full.get("suite", {}) and k in lora.get("suite", {})]
    if shown:
        blocks.append(("chart", svg.grouped_bar_chart(shown, {"full SFT": [full["suite"][k] for k in shown],
                                                              "LoRA": [lora["suite"][k] for k in shown]},
                                                      title="Full fine-tuning vs LoRA")))
    return [("Efficiency: LoRA vs full fine-tuning", blocks)]


def _growth(m: dict) -> float | None:
    """Peak RSS of training over the RSS it started from: the memory training itself took."""
    if "train_peak_rss_mb" not in m or "train_start_rss_mb" not in m:
        return None
    return m["train_peak_rss_mb"] - m["train_start_rss_mb"]


def _percent(share: float | None) -> str | None:
    return None if share is None else f"{100 * share:.2f}%"


def _mb(value: float | None) -> int | None:
    return None if value is None else round(value)


STAGE = Stage("optimize", run, config=OptimizeConfig, configure=configure, inputs=("pretrain", "sft"),
              headline=headline, summary=summary, report=report)
