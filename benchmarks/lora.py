"""LoRA and QLoRA fine-tuning: llmcycle's SFT with adapters against PEFT + TRL's SFTTrainer (issue 15).

Three variants of supervised fine-tuning on one random Llama, each on both sides, in one command:

- `sft`: full fine-tuning (every parameter trained);
- `sft_lora`: LoRA r=16, alpha=32, no dropout, on every linear layer of the blocks (q, k, v, o, gate, up,
  down projections). llmcycle: `lora.r=16 lora.alpha=32 ...`; PEFT: the same `peft.LoraConfig` passed as
  `peft_config` to `trl.SFTTrainer`;
- `sft_qlora`: the same adapters over a frozen base whose linear layers are held in 4-bit NF4 (blocks of 64,
  no double quantization, fp32 compute, the output head in fp32). llmcycle: `lora.quantize=nf4`
  (llmcycle/optimize/nf4.py, its torch dequantization); PEFT + TRL: the model loaded by transformers with
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)`,
  run by bitsandbytes' CPU backend (its C++ dequantization; the `kernels` hub kernel it tries first is not
  reachable offline). SFTTrainer casts a quantized model's adapters to bf16; they are cast back to fp32
  before training, so both sides train fp32 adapters.

The runs are benchmarks/posttrain.py's (imported, not copied): each (side, variant) in its own child process
of that script, llmcycle's `sft(cfg)` unchanged and hooked from the outside, the same tokenizer, data
(the embedded SFT tasks as messages, loss on assistant tokens), batch, max length, lr and schedule, fused
AdamW, clipping 1.0 and fp32 on both sides. Gradient checkpointing: off for `sft` and `sft_lora` on both
sides, on (per decoder layer, non-reentrant) for `sft_qlora` on both sides, as llmcycle's QLoRA always does.

Measured per run: step time (median and steps/s over the steps after `--warmup`), peak RSS (VmHWM of the
child: imports, model, data, training), the RSS after imports, and "weights": bytes of the parameters and
buffers of the model as it trains (after loading, quantizing and attaching adapters; bitsandbytes' 4-bit
block maxima counted with its packed weights), with the trainable parameter count. `--eval` adds the held-out
loss after the last step (the embedded `sft_eval` split; not timed).

Targets (issue 15), printed with the measurements: LoRA's peak RSS <= 0.5x full fine-tuning's; QLoRA's
weights <= 0.3x LoRA's; llmcycle >= 1.3x PEFT + TRL's steps/s at <= their peak RSS, per variant; with
`--eval`, LoRA's and QLoRA's held-out loss within 10% of full fine-tuning's. The 0.5x and 0.3x ratios need a
model whose weights are mostly in its blocks: `--size 150m` (~144M parameters, 135M in the blocks' linear
layers); on the tiny model the 4096 x 256 embeddings and head are 40% of the weights.

    PYTHONPATH=. python benchmarks/lora.py --size tiny --steps 20 --eval --lora-lr 1e-3  # quick: ~3 min
    PYTHONPATH=. python benchmarks/lora.py --fixed-mmap-threshold --json lora.json       # 150m: ~10 min

`--fixed-mmap-threshold` (posttrain.py's) keeps glibc's heap fragmentation, a few hundred MB that vary from
run to run, out of the peak RSS the memory targets compare.
"""

from __future__ import annotations

import posttrain  # benchmarks/posttrain.py (the script's own folder is on sys.path)

VARIANTS = ("sft", "sft_lora", "sft_qlora")
LABEL = {"sft": "full fine-tune", "sft_lora": "LoRA r=16", "sft_qlora": "QLoRA r=16 (NF4)"}
PEER = {"llmcycle": "llmcycle", "trl": "PEFT + TRL"}
# The ~144M model at 2 threads: a step of 8 examples (~250 positions) takes a few seconds; 10 steps, of which
# 3 untimed, keep the six runs near 10 minutes on 2 cores.
DEFAULTS = dict(tasks=",".join(VARIANTS), size="150m", steps=10, warmup=3, batch_size=8, threads=2)


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def measurements(best: dict, tasks: list[str], sides: list[str]) -> list[str]:
    """The per-run table of the variants run (markdown lines)."""
    lines = ["| variant | side | steps/s | median step | peak RSS MB | peak RSS - after imports MB | weights MB "
             "| trainable params | loss first -> last | eval loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for task in tasks:
        for side in sides:
            r = best.get((side, task))
            if r is None:
                lines.append(f"| {LABEL[task]} | {PEER[side]} | failed | | | | | | | |")
                continue
            ev = "" if r.get("eval_loss") is None else f"{r['eval_loss']:.3f}"
            lines.append(
                f"| {LABEL[task]} | {PEER[side]} | {r['steps_per_s']:.2f} | {r['median_step_ms']:,.0f} ms "
                f"| {r['peak_rss_mb']:,.0f} | {r['peak_rss_mb'] - r['rss_after_imports_mb']:,.0f} "
                f"| {_mb(r['weight_bytes'])} | {r['trainable_params']:,} "
                f"| {r['loss_first']:.3f} -> {r['loss_last']:.3f} | {ev} |")
    return lines


def _ratio(best: dict, a: tuple[str, str], b: tuple[str, str], key: str) -> float | None:
    x, y = best.get(a), best.get(b)
    if x is None or y is None or x.get(key) is None or not y.get(key):
        return None
    return x[key] / y[key]


def targets(best: dict, tasks: list[str], sides: list[str]) -> list[str]:
    """Issue 15's targets against the measurements (markdown lines); a target whose runs failed says so."""
    rows: list[tuple[str, float | None, float, bool]] = []  # (what, ratio, bound, ratio must be <= bound)
    for side in sides:
        if {"sft", "sft_lora"} <= set(tasks):
            rows.append((f"{PEER[side]}: LoRA peak RSS / full fine-tune peak RSS",
                         _ratio(best, (side, "sft_lora"), (side, "sft"), "peak_rss_mb"), 0.5, True))
        if {"sft_lora", "sft_qlora"} <= set(tasks):
            rows.append((f"{PEER[side]}: QLoRA weights / LoRA weights",
                         _ratio(best, (side, "sft_qlora"), (side, "sft_lora"), "weight_bytes"), 0.3, True))
    if {"llmcycle", "trl"} <= set(sides):
        for task in tasks:
            mine, peer = ("llmcycle", task), ("trl", task)
            rows.append((f"{LABEL[task]}: llmcycle / PEFT + TRL steps/s",
                         _ratio(best, mine, peer, "steps_per_s"), 1.3, False))
            rows.append((f"{LABEL[task]}: llmcycle / PEFT + TRL peak RSS",
                         _ratio(best, mine, peer, "peak_rss_mb"), 1.0, True))
    for side in sides:
        for task in [t for t in tasks if t != "sft"]:
            r = _ratio(best, (side, task), (side, "sft"), "eval_loss")
            if r is not None:
                rows.append((f"{PEER[side]}: {LABEL[task]} eval loss / full fine-tune eval loss", r, 1.1, True))
    lines = ["| target | measured | bound | met |", "|---|---:|---:|---|"]
    for what, ratio, bound, at_most in rows:
        if ratio is None:
            lines.append(f"| {what} | n/a (a run failed or was not measured) | {'<=' if at_most else '>='} "
                         f"{bound} | |")
            continue
        met = ratio <= bound if at_most else ratio >= bound
        lines.append(f"| {what} | {ratio:.2f}x | {'<=' if at_most else '>='} {bound}x | {'yes' if met else '**no**'} |")
    return lines


def main() -> None:
    p = posttrain.make_parser(__doc__.split("\n")[0], **DEFAULTS)
    a = posttrain.parse(p)
    if a.side:  # children run posttrain.py itself; this is only reached if one is started by hand
        posttrain.child(a)
        return
    if set(a.tasks.split(",")) - set(VARIANTS):
        p.error(f"--tasks: choose from {','.join(VARIANTS)}")
    _, _, best = posttrain.run_all(a)
    tasks, sides = a.tasks.split(","), a.sides.split(",")
    print("\n" + "\n".join(measurements(best, tasks, sides)))
    print("\n" + "\n".join(targets(best, tasks, sides)))


if __name__ == "__main__":
    main()
