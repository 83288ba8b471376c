"""Post-training steps: llmcycle's SFT and DPO trainers against TRL's SFTTrainer and DPOTrainer.

One tiny random Llama (saved with `transformers.LlamaForCausalLM.save_pretrained`, with a BPE tokenizer
trained here on a slice of the embedded corpus) and the embedded post-training tasks
(`write_embedded_datasets`: `sft_train` as messages, `pref_train` as prompt/chosen/rejected messages) feed
both sides, in one command:

- llmcycle: `llmcycle.train.posttrain.sft.sft(cfg)` and `llmcycle.train.posttrain.dpo.dpo(cfg)` called as functions, with
  nothing added to them; the benchmark wraps `Session.set_lr` (called at the start of every step),
  `MetricsLog.write` (at its end) and `Batch.forward`/`forward_trained` (to count tokens) from the outside.
- TRL: `trl.SFTTrainer` / `trl.DPOTrainer` with a `TrainerCallback` (`on_train_begin`, `on_step_end`) and
  `compute_loss` wrapped to count tokens; the data read with `datasets.load_dataset("json", ...)`.

Same settings on both sides: fp32, batch size, max length, lr and schedule, fused AdamW, gradient clipping
1.0, no gradient checkpointing (TRL's default turns it on), loss on assistant tokens only (TRL:
`assistant_only_loss=True`, through our template's `{% generation %}` markers), DPO with the sigmoid loss
and reference log-probs precomputed before training (TRL: `precompute_ref_log_probs=True`). Tasks:

- `sft`: one example per row, right-padded to the longest in the batch (both sides).
- `sft_packed`: packing. llmcycle packs next-fit into `batch_size` rows of `max_length` tokens with a
  block-diagonal mask ([B, 1, T, T]); TRL packs best-fit-decreasing into sequences of `max_length` and,
  padding-free, concatenates a batch's sequences into one row with restarting position ids. Without a
  varlen attention kernel (flash-attention 2; none on CPU) transformers runs SDPA over that whole row with
  a block-diagonal mask, so TRL's attention costs (batch_size * max_length)^2, not batch_size * max_length^2.
- `dpo`: chosen and rejected in one padded batch of 2 x batch_size rows (both sides).

TRL computes log-probs with its fused LM head (`add_fused_lm_head`: the logits in tiles, recomputed in the
backward); on CUDA it scores only the trained positions, on CPU every position. llmcycle builds the full
[B, T, vocab] logits of every position.

Each (side, task) runs in its own child process (this script with `--side`), so peak RSS
(VmHWM of /proc/self/status, and `torch.cuda.max_memory_allocated` on CUDA) is that run's alone, with its
imports (Linux only). Steps/s is timed over steps `warmup+1..steps` from per-step wall clock (end of one step
to the end of the next: data collation, forward, backward, optimizer, logging); setup (model and data
loading, tokenization, reference log-probs) is reported apart, from the end of the imports to the start
of the first step. Tokens/s counts real (non-pad) tokens of the training forwards; "positions" counts
what the model computes (pads included). Peak RSS under glibc's default malloc varies by ~100 MB from run
to run (its dynamic mmap threshold lets freed blocks of varying size fragment the heap, notably over the
reference pass: hundreds of differently shaped batches); `--fixed-mmap-threshold` turns that off for both sides.

`--size 150m` swaps the tiny model for a ~144M one; the tasks `sft_lora` and `sft_qlora` (SFT with LoRA
adapters, and over a 4-bit NF4 base: PEFT's `peft_config` and bitsandbytes through transformers on TRL's
side) and the held-out loss of `--eval` serve benchmarks/lora.py, which documents them.

    PYTHONPATH=. python benchmarks/posttrain.py                  # 3 tasks x 2 sides, 20 steps: ~4 min on 2 cores
    PYTHONPATH=. python benchmarks/posttrain.py --tasks sft,dpo --steps 40 --repeats 2 --json posttrain.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()  # the child's clock starts before its heavy imports

TASKS = ("sft", "sft_packed", "dpo")  # the default set
LORA_TASKS = ("sft_lora", "sft_qlora")  # SFT with adapters (benchmarks/lora.py); not run by default
ALL_TASKS = TASKS + LORA_TASKS
SIDES = ("llmcycle", "trl")
SIZES = {
    # ~5M parameters with a 4096 vocabulary: small enough for a few CPU minutes, big enough that the model,
    # not Python overhead, is most of a step.
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
    # ~144M with a 4096 vocabulary (135M of it in the linear layers of the blocks): LoRA's and QLoRA's memory
    # savings show at this size, where the embeddings no longer dominate the weights.
    "150m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
}
SEED = 42
BETA = 0.1
# The adapters of sft_lora / sft_qlora on both sides: every linear layer of the blocks, PEFT's names.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    """Peak resident set size (MB) of this process's own address space: /proc's VmHWM.

    Not getrusage's ru_maxrss: Linux carries the peak RSS of the address space a process had before
    exec() into it, so a child of this script (which holds torch, transformers and a model: ~440 MB)
    would report at least that much whatever it used itself.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def _quant_state_tensors(state) -> list:
    """The tensors of a bitsandbytes `QuantState` (block maxima, codebook; nested under double quant)."""
    if state is None:
        return []
    own = [getattr(state, k, None) for k in ("absmax", "code", "offset")]
    return [t for t in own if t is not None and hasattr(t, "nbytes")] + _quant_state_tensors(getattr(state, "state2", None))


def weight_stats(model) -> dict:
    """What a loaded (quantized, adapted) model holds: bytes of its parameters and buffers, each tensor
    once, with the 4-bit statistics bitsandbytes keeps beside its packed weights (`Params4bit.quant_state`,
    not a parameter or buffer) and llmcycle keeps as buffers; and its trainable and total parameter counts
    (a packed 4-bit tensor counts as the stored uint8 elements)."""
    tensors, seen = [], set()
    for t in [*model.parameters(), *model.buffers()]:
        for x in [t, *_quant_state_tensors(getattr(t, "quant_state", None))]:
            if id(x) not in seen:
                seen.add(id(x))
                tensors.append(x)
    params = {id(p): p for p in model.parameters()}.values()
    return {"weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "stored_params": sum(p.numel() for p in params)}


# ---------------------------------------------------------------------------------------------------
# inputs (parent)


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Tokenizer + random Llama in one Hugging Face directory, and the embedded post-training files."""
    import torch
    import transformers

    from llmcycle.tokenizer import Tokenizer
    from llmcycle.train.posttrain.synthetic import write_embedded_datasets

    t = time.perf_counter()
    if args.tokenizer:
        tok = Tokenizer.from_pretrained(args.tokenizer)
    else:
        from llmcycle.data.pycorpus import collect_python_corpus
        from llmcycle.tokenizer.train import train_tokenizer

        docs = collect_python_corpus(max_bytes=args.corpus_bytes)
        tok = train_tokenizer((d.text for d in docs), vocab_size=args.vocab)
    tok_s = time.perf_counter() - t
    model_dir = work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                   pad_token_id=tok.pad_id, **SIZES[args.size])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    tok.save_pretrained(model_dir)
    files = write_embedded_datasets(work / "data", per_task=args.per_task)

    # TRL reads our directory through transformers: the chat template must render the same text there.
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    first = json.loads(files["sft_train"].read_text().splitlines()[0])["messages"]
    same = hf_tok.apply_chat_template(first, tokenize=False) == tok.apply_chat_template(first)
    if not same:
        raise SystemExit("transformers renders our chat template differently; the comparison would be unfair")
    return {"model": str(model_dir), "sft_train": str(files["sft_train"]), "sft_eval": str(files["sft_eval"]),
            "pref_train": str(files["pref_train"]),
            "vocab": tok.vocab_size, "params": n_params, "tokenizer_s": round(tok_s, 2),
            "sft_examples": len(files["sft_train"].read_text().splitlines()),
            "pref_pairs": len(files["pref_train"].read_text().splitlines())}


# ---------------------------------------------------------------------------------------------------
# one (side, task) run (child)


class Clock:
    """Per-step wall clock and token counts, filled by the hooks of either side."""

    def __init__(self, device: str):
        self.device = device
        self.train_begin: float | None = None
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.eval_losses: list[float] = []  # held-out loss after training (with --eval)
        self.weights: dict = {}  # weight_stats of the model as it trains, and the RSS then
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self._tok = self._pos = 0
        self.setup_peak_rss = self.begin_rss = 0.0
        self.setup_cuda_peak = 0
        self.threads = 0
        self.notes: dict = {}  # what each side actually ran with, for the JSON

    def begin(self) -> None:
        if self.train_begin is not None:
            return
        import torch

        self.setup_peak_rss, self.begin_rss = max_rss_mb(), rss_mb()
        self.threads = torch.get_num_threads()  # what the training loop runs with (a trainer may change it)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.setup_cuda_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.train_begin = time.perf_counter()

    def count(self, real: int, positions: int) -> None:
        self._tok += real
        self._pos += positions

    def end(self, loss: float | None = None) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if loss is not None:
            self.losses.append(loss)
        self.tokens.append(self._tok)
        self.positions.append(self._pos)
        self._tok = self._pos = 0


def task_lr(task: str, a: argparse.Namespace) -> float:
    """The peak lr of a task on both sides: --lora-lr for the adapter tasks where given, else --lr."""
    return a.lora_lr if task in LORA_TASKS and a.lora_lr is not None else a.lr


def lora_overrides(task: str, a: argparse.Namespace) -> list[str]:
    """llmcycle's `lora:` keys for a task: none for full fine-tuning; QLoRA adds the 4-bit base (which turns
    on gradient checkpointing)."""
    if task not in LORA_TASKS:
        return []
    keys = [f"lora.r={a.lora_r}", f"lora.alpha={a.lora_alpha}", "lora.dropout=0.0",
            f"lora.target_modules=[{','.join(LORA_TARGETS)}]"]
    return keys + (["lora.quantize=nf4"] if task == "sft_qlora" else [])


def run_llmcycle(task: str, a: argparse.Namespace, inputs: dict, out: Path, clock: Clock) -> None:
    import torch

    import llmcycle.train.core.metrics as metrics
    import llmcycle.train.core.session as session
    import llmcycle.train.posttrain.batching as batching
    from llmcycle.config import load_config

    # Hooks from the outside: llmcycle's code is run unchanged.
    set_lr, write = session.Session.set_lr, metrics.MetricsLog.write
    trained_modules = session.Session.trained_modules
    forward, forward_trained = batching.Batch.forward, batching.Batch.forward_trained

    def timed_set_lr(self, max_steps, position=None):  # called first thing in every post-training step
        clock.begin()
        return set_lr(self, max_steps, position)

    def timed_write(self, record):  # a step's record, written right after its optimizer step
        if not record.get("eval"):
            clock.end(record.get("loss"))
        elif record.get("step"):  # not the evaluation before training
            clock.eval_losses.append(record["eval_loss"])
        return write(self, record)

    def measured_trained_modules(self, build, bases=None):  # the model as it trains: quantized, adapted
        modules = trained_modules(self, build, bases)
        clock.weights = dict(weight_stats(modules["policy"]), rss_after_model_mb=rss_mb())
        return modules

    def count(batch) -> None:  # training forwards only (the reference pass runs without grad)
        if torch.is_grad_enabled():
            clock.count(int((batch.segments >= 0).sum()), batch.input_ids.numel())

    def counted_forward(self, model):
        count(self)
        return forward(self, model)

    def counted_forward_trained(self, model):
        count(self)
        return forward_trained(self, model)

    session.Session.set_lr, metrics.MetricsLog.write = timed_set_lr, timed_write
    session.Session.trained_modules = measured_trained_modules
    batching.Batch.forward, batching.Batch.forward_trained = counted_forward, counted_forward_trained

    evaluate = ([f"data.eval={inputs['sft_eval']}", f"eval.every={a.steps}"] if a.eval
                else ["data.eval=null", "eval.every=0"])
    common = [f"out_dir={out}", f"model={inputs['model']}", f"data.max_length={a.max_length}",
              f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}", "train.grad_accum=1",
              f"train.lr={task_lr(task, a)}", f"train.warmup_steps={a.warmup_steps}", "train.dtype=fp32",
              f"train.device={a.device}", f"train.threads={a.threads}", f"train.seed={SEED}",
              "eval.generate=0", "checkpoint.every=0", "checkpoint.keep=1"]
    if task == "dpo":
        from llmcycle.train.posttrain.dpo import DPOConfig, dpo

        cfg = load_config(DPOConfig, None, common + ["data.eval=null", "eval.every=0",
                                                     f"data.train={inputs['pref_train']}", "loss_type=sigmoid",
                                                     f"beta={BETA}"])
        dpo(cfg)  # quiet: llmcycle logs its progress only when asked (llmcycle/logs.py)
    else:
        from llmcycle.train.posttrain.sft import SFTConfig, sft

        cfg = load_config(SFTConfig, None, common + evaluate + lora_overrides(task, a) + [
            f"data.train={inputs['sft_train']}", "data.loss_on=assistant",
            f"data.packing={str(task == 'sft_packed').lower()}"])
        sft(cfg)


def trl_quantization(task: str, a: argparse.Namespace) -> dict:
    """from_pretrained's extra arguments: QLoRA's 4-bit NF4 base through bitsandbytes (its CPU backend
    here), blocks of 64, no double quantization, fp32 compute, as llmcycle's `lora.quantize=nf4`."""
    if task != "sft_qlora":
        return {}
    import torch
    import transformers

    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False,
                                        bnb_4bit_quant_storage=torch.uint8)
    return {"quantization_config": q, "device_map": a.device}


def peft_config(task: str, a: argparse.Namespace):
    """PEFT's LoraConfig of sft_lora / sft_qlora (llmcycle's `lora_overrides`, key for key), else None."""
    if task not in LORA_TASKS:
        return None
    import peft

    return peft.LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                           bias="none", task_type="CAUSAL_LM")


def run_trl(task: str, a: argparse.Namespace, inputs: dict, out: Path, clock: Clock) -> None:
    import datasets
    import torch
    import transformers
    import trl

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))
            if logs and "eval_loss" in logs:
                clock.eval_losses.append(float(logs["eval_loss"]))

    tok = transformers.AutoTokenizer.from_pretrained(inputs["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32,
                                                              **trl_quantization(task, a))
    data = inputs["pref_train" if task == "dpo" else "sft_train"]
    ds = datasets.load_dataset("json", data_files=data, split="train")
    # QLoRA recomputes activations on both sides (llmcycle turns it on with the 4-bit base); non-reentrant,
    # per decoder layer, as llmcycle's.
    checkpointing = task == "sft_qlora"
    common = dict(output_dir=str(out), report_to="none", use_cpu=a.device == "cpu", bf16=False, fp16=False,
                  gradient_checkpointing=checkpointing,
                  gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
                  per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=a.batch_size,
                  gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=task_lr(task, a),
                  warmup_steps=a.warmup_steps,
                  lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                  weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                  optim="adamw_torch_fused", save_strategy="no", logging_steps=1,
                  disable_tqdm=True, dataloader_num_workers=0, seed=SEED, max_length=a.max_length)
    if task == "dpo":
        cfg = trl.DPOConfig(**common, eval_strategy="no", loss_type=["sigmoid"], beta=BETA, precompute_ref_log_probs=True,
                            precompute_ref_batch_size=a.batch_size)
        trainer = trl.DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tok,
                                 callbacks=[Timer()])
    else:
        held = datasets.load_dataset("json", data_files=inputs["sft_eval"], split="train") if a.eval else None
        cfg = trl.SFTConfig(**common, eval_strategy="steps" if a.eval else "no", eval_steps=a.steps,
                            packing=task == "sft_packed", assistant_only_loss=True)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, eval_dataset=held, processing_class=tok,
                                 callbacks=[Timer()], peft_config=peft_config(task, a))
        if task == "sft_qlora":
            # SFTTrainer casts a quantized model's adapters to bf16 (QLoRA paper's recipe); the comparison
            # is fp32 on both sides, as PEFT makes them (`autocast_adapter_dtype`) for a 16-bit-free base.
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            # On an AVX512-BF16 CPU bitsandbytes repacks a 4-bit weight for its inference kernel at the first
            # forward in eval mode without grad, and asserts out_features % 32 == 0 there (the tiny model's
            # 688-wide MLP fails it): held-out evaluation keeps the layout training uses.
            for m in trainer.model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = False
    clock.weights = dict(weight_stats(trainer.model), rss_after_model_mb=rss_mb())

    clock.notes.update(activation_checkpointing=trainer.args.activation_checkpointing,
                       optim=getattr(trainer.args.optim, "value", trainer.args.optim),
                       padding_free=getattr(trainer, "padding_free", None),
                       precompute_ref_logps=getattr(trainer, "precompute_ref_logps", None))
    compute_loss = trainer.compute_loss

    def counted_compute_loss(model, inputs, *args, **kw):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")  # padding-free batches have none: every token is real
        clock.count(int(mask.sum()) if mask is not None else ids.numel(), ids.numel())
        return compute_loss(model, inputs, *args, **kw)

    trainer.compute_loss = counted_compute_loss
    trainer.train()


def child(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # llmcycle's Session does this; give TRL the same
    if a.side == "trl":
        import datasets  # noqa: F401 - imports are timed apart from setup
        import transformers  # noqa: F401
        import trl  # noqa: F401

        if a.task in LORA_TASKS:
            import peft  # noqa: F401
        if a.task == "sft_qlora":
            import bitsandbytes  # noqa: F401 - what transformers' 4-bit loading imports
    else:
        import llmcycle.train.posttrain.dpo  # noqa: F401
        import llmcycle.train.posttrain.sft  # noqa: F401
    t_imports = time.perf_counter()
    import_rss = rss_mb()
    work = Path(a.work)
    inputs = json.loads((work / "inputs.json").read_text())
    out = work / "runs" / a.run
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock(a.device)
    (run_trl if a.side == "trl" else run_llmcycle)(a.task, a, inputs, out, clock)
    t_done = time.perf_counter()

    timed = clock.ends[a.warmup - 1:] if a.warmup > 0 else [clock.train_begin, *clock.ends]
    span = timed[-1] - timed[0]
    n = len(timed) - 1
    intervals = [y - x for x, y in zip(timed, timed[1:])]
    r = dict(side=a.side, task=a.task, run=a.run, threads=clock.threads, steps=len(clock.ends), timed_steps=n,
             steps_per_s=n / span, median_step_ms=statistics.median(intervals) * 1e3,
             tokens_per_s=sum(clock.tokens[-n:]) / span, positions_per_s=sum(clock.positions[-n:]) / span,
             tokens_per_step=statistics.mean(clock.tokens[-n:]),
             positions_per_step=statistics.mean(clock.positions[-n:]),
             import_s=t_imports - T_START, setup_s=clock.train_begin - t_imports,
             first_step_s=clock.ends[0] - clock.train_begin, finish_s=t_done - clock.ends[-1],
             rss_after_imports_mb=import_rss, rss_at_train_begin_mb=clock.begin_rss,
             peak_rss_setup_mb=clock.setup_peak_rss, peak_rss_mb=max_rss_mb(),
             loss_first=clock.losses[0] if clock.losses else None,
             loss_last=clock.losses[-1] if clock.losses else None,
             losses=clock.losses, step_ends=[t - clock.train_begin for t in clock.ends],
             tokens=clock.tokens, positions=clock.positions, notes=clock.notes,
             eval_loss=clock.eval_losses[-1] if clock.eval_losses else None, **clock.weights)
    if a.device.startswith("cuda"):
        r.update(cuda_peak_setup_mb=clock.setup_cuda_peak / 2**20,
                 cuda_peak_train_mb=torch.cuda.max_memory_allocated() / 2**20)
    Path(a.result).write_text(json.dumps(r))


# ---------------------------------------------------------------------------------------------------
# the comparison (parent)


def spawn(a: argparse.Namespace, work: Path, side: str, task: str, run: str) -> dict:
    result = work / "results" / f"{run}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{run}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--side", side, "--task", task, "--run", run, "--work", str(work),
           "--result", str(result), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--threads", str(a.threads),
           "--device", a.device, "--lr", str(a.lr), "--warmup-steps", str(a.warmup_steps),
           *(["--lora-lr", str(a.lora_lr)] if a.lora_lr is not None else []),
           "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha), *(["--eval"] if a.eval else [])]
    threads = str(a.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           # A fresh datasets cache per run: TRL would otherwise reuse the Arrow files, tokenized data and
           # *reference log-probs* of an earlier run (same data, same weights) and skip that setup work.
           "HF_DATASETS_CACHE": str(work / "hf_cache" / run), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TQDM_DISABLE": "1",
           **({"MALLOC_MMAP_THRESHOLD_": "131072"} if a.fixed_mmap_threshold else {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        print(f"{side} {task}: failed (exit {proc.returncode}); end of {log}:\n{tail}", flush=True)
        return dict(side=side, task=task, run=run, error=f"exit {proc.returncode}", log=str(log))
    r = json.loads(result.read_text())
    r["wall_s"] = time.perf_counter() - t
    extra = "" if r.get("eval_loss") is None else f", eval loss {r['eval_loss']:.3f}"
    if "weight_bytes" in r:
        extra += f", weights {r['weight_bytes'] / 2**20:.0f} MB ({r['trainable_params'] / 1e6:.2f}M trained)"
    print(f"  {side:8s} {task:10s}: {r['steps_per_s']:6.2f} steps/s, {r['tokens_per_s']:7.0f} tok/s, "
          f"peak RSS {r['peak_rss_mb']:5.0f} MB, setup {r['setup_s']:5.1f} s, "
          f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}{extra} ({r['wall_s']:.0f} s)", flush=True)
    return r


def make_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """The command line of this script (and of benchmarks/lora.py, with its own `defaults`): what the parent
    takes, plus the internal flags of one child run."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8, help="examples (packed rows; DPO: pairs) per step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (packed row)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=10, help="linear lr warm-up (schedule, both sides)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(ALL_TASKS)}")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="the random Llama: tiny (~5M parameters) or 150m (~144M)")
    p.add_argument("--lora-r", type=int, default=16, help="sft_lora / sft_qlora: adapter rank")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="sft_lora / sft_qlora: adapter alpha")
    p.add_argument("--lora-lr", type=float, help="sft_lora / sft_qlora: peak lr (default: --lr); adapters "
                   "usually train at a higher lr than the full model")
    p.add_argument("--eval", action="store_true",
                   help="SFT tasks: held-out loss on the embedded sft_eval split after the last step (not timed; "
                        "llmcycle also evaluates before training, inside its setup time)")
    p.add_argument("--repeats", type=int, default=1, help="runs per (side, task), side order alternating; best kept")
    p.add_argument("--per-task", type=int, default=200,
                   help="embedded examples per task (train + eval); DPO setup scales with it (reference pass)")
    p.add_argument("--fixed-mmap-threshold", action="store_true",
                   help="MALLOC_MMAP_THRESHOLD_=131072 in the runs: peak RSS without glibc's heap fragmentation")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer size (when trained here)")
    p.add_argument("--corpus-bytes", type=int, default=2_000_000,
                   help="embedded-corpus slice the tokenizer learns from")
    p.add_argument("--tokenizer", help="use this tokenizer directory instead of training one")
    p.add_argument("--work", help="keep inputs, runs and logs here (default: a temporary folder, removed)")
    p.add_argument("--json", help="write machine, inputs and every run here")
    # internal: one run in a child process
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--task", choices=ALL_TASKS, help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.set_defaults(**defaults)
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse and check the command line."""
    a = p.parse_args()
    if a.warmup >= a.steps:
        p.error("--warmup must be below --steps")
    unknown = set(a.tasks.split(",")) - set(ALL_TASKS)
    if unknown:
        p.error(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_TASKS)}")
    return a


def run_all(a: argparse.Namespace) -> tuple[dict, list[dict], dict]:
    """The parent: inputs once, then every (side, task) `a.repeats` times, each in a child process of this
    script. Returns (meta, every run, the fastest run of each (side, task))."""
    from importlib.metadata import version

    from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

    tasks, sides = a.tasks.split(","), a.sides.split(",")
    keep = a.work is not None
    work = Path(a.work) if keep else Path(tempfile.mkdtemp(prefix="posttrain_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inputs = prepare(work, a)
        (work / "inputs.json").write_text(json.dumps(inputs))
        peers = ("torch", "transformers", "trl", "datasets", "accelerate")
        if set(tasks) & set(LORA_TASKS):
            peers += ("peft", "bitsandbytes")
        meta = dict(machine=cpu_name(), cores=len(os.sched_getaffinity(0)), python=platform.python_version(),
                    loadavg_start=list(os.getloadavg()), versions={k: version(k) for k in peers},
                    args={k: v for k, v in vars(a).items() if k not in ("side", "task", "run", "result")},
                    model=SIZES[a.size], inputs=inputs)
        print(f"machine: {meta['machine']}, {meta['cores']} cores, load {meta['loadavg_start'][0]:.1f}; "
              f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
              f"trl {meta['versions']['trl']}")
        print(f"model: Llama {inputs['params'] / 1e6:.1f}M parameters (vocab {inputs['vocab']}), "
              f"{inputs['sft_examples']} SFT examples, {inputs['pref_pairs']} preference pairs; "
              f"batch {a.batch_size}, max length {a.max_length}, {a.steps} steps ({a.warmup} untimed), "
              f"{a.threads} thread(s), {a.device}", flush=True)
        runs = []
        for rep in range(a.repeats):
            for task in tasks:
                order = sides if rep % 2 == 0 else sides[::-1]
                for side in order:
                    runs.append(spawn(a, work, side, task, f"{side}_{task}_{rep}"))
        meta["loadavg_end"] = list(os.getloadavg())
        best = {}
        for r in runs:
            if "error" not in r and r["steps_per_s"] > best.get((r["side"], r["task"]), {}).get("steps_per_s", 0):
                best[(r["side"], r["task"])] = r
        if a.json:
            Path(a.json).write_text(json.dumps(dict(meta=meta, runs=runs), indent=1))
        return meta, runs, best
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    a = parse(make_parser(__doc__.split("\n")[0]))
    if a.side:
        child(a)
        return
    _, _, best = run_all(a)
    report(best, a.tasks.split(","), a.sides.split(","), a.device)


def report(best: dict, tasks: list[str], sides: list[str], device: str) -> None:
    cuda = device.startswith("cuda")
    print("\n| side | task | steps/s | median step ms | tokens/s | positions/step | peak RSS MB | RSS after imports MB "
          f"| setup s |{' CUDA peak MB |' if cuda else ''} loss first -> last |")
    print(f"|---|---|---:|---:|---:|---:|---:|---:|---:|{'---:|' if cuda else ''}---|")
    for task in tasks:
        for side in sides:
            r = best.get((side, task))
            if r is None:
                print(f"| {side} | {task} | failed |")
                continue
            gpu = f" {r['cuda_peak_train_mb']:.0f} |" if cuda else ""
            print(f"| {side} | {task} | {r['steps_per_s']:.2f} | {r['median_step_ms']:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{r['positions_per_step']:.0f} | {r['peak_rss_mb']:.0f} | {r['rss_after_imports_mb']:.0f} | "
                  f"{r['setup_s']:.1f} |{gpu} {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    if not {"llmcycle", "trl"} <= set(sides):
        return
    print("\nllmcycle / TRL (above 1: llmcycle is faster or uses more memory / setup time):\n")
    print("| task | steps/s | tokens/s | peak RSS | peak RSS - RSS after imports | setup |"
          f"{' CUDA peak |' if cuda else ''}")
    print(f"|---|---:|---:|---:|---:|---:|{'---:|' if cuda else ''}")
    for task in tasks:
        o, t = best.get(("llmcycle", task)), best.get(("trl", task))
        if not o or not t:
            continue
        gpu = f" {o['cuda_peak_train_mb'] / t['cuda_peak_train_mb']:.2f}x |" if cuda else ""
        grow = (o["peak_rss_mb"] - o["rss_after_imports_mb"]) / (t["peak_rss_mb"] - t["rss_after_imports_mb"])
        print(f"| {task} | {o['steps_per_s'] / t['steps_per_s']:.2f}x | {o['tokens_per_s'] / t['tokens_per_s']:.2f}x | "
              f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x | {grow:.2f}x | {o['setup_s'] / t['setup_s']:.2f}x |{gpu}")


if __name__ == "__main__":
    main()
