"""The pre-training recipe: every option with its default and a line of help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmcycle.config import field_help as F


@dataclass
class TokenizerSection:
    path: str | None = F(None, "existing tokenizer directory; null trains one on the training text")
    kind: Literal["bpe", "wordpiece", "unigram"] = F("bpe", "tokenizer model trained when path is null")
    vocab_size: int = F(4096, "vocabulary size of a trained tokenizer")
    min_frequency: int = F(2, "minimum pair frequency for a merge / token")


@dataclass
class DataSection:
    corpus: str = F("python", "'python' (the embedded corpus), or a .jsonl/.txt file or folder of them")
    train_shards: str | None = F(None, "token shard directory to train on; null tokenizes `corpus`")
    val_shards: str | None = F(None, "held-out token shard directory; null splits `corpus` by hash")
    heldout_fraction: float = F(0.05, "fraction of documents held out (by hash of the document id)")
    max_bytes: int | None = F(None, "cap on corpus size in bytes (deterministic prefix)")


@dataclass
class ModelSection:
    size: Literal["tiny", "mini", "small", "base", "medium", "1b"] = F("tiny", "named size (llmcycle.model.SIZES)")
    hidden_size: int | None = F(None, "override the size's hidden width")
    intermediate_size: int | None = F(None, "override the MLP width")
    num_hidden_layers: int | None = F(None, "override the number of layers")
    num_attention_heads: int | None = F(None, "override the number of query heads")
    num_key_value_heads: int | None = F(None, "override the number of key/value heads (GQA)")
    max_position_embeddings: int | None = F(None, "context length the model is built for (default: seq_len)")
    rope_theta: float = F(10000.0, "rotary embedding base")
    tie_word_embeddings: bool = F(True, "share input embeddings and output head")


@dataclass
class TrainSection:
    objective: Literal["causal", "masked"] = F("causal", "causal LM (GPT/Llama) or masked LM (BERT-style)")
    mask_prob: float = F(0.15, "masked LM: fraction of tokens to predict (80/10/10 mask/random/keep)")
    seq_len: int = F(256, "tokens per training sequence")
    batch_size: int = F(16, "sequences per micro-batch per process")
    grad_accum: int = F(1, "micro-batches per optimizer step")
    max_steps: int = F(600, "optimizer steps")
    lr: float = F(3e-3, "peak learning rate")
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = F(50, "linear warm-up steps")
    weight_decay: float = F(0.1, "AdamW weight decay (matrices only; not norms, biases)")
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.95, "AdamW beta2")
    grad_clip: float = F(1.0, "max global gradient norm; 0 disables clipping")
    dtype: Literal["auto", "fp32", "bf16"] = F("auto", "autocast dtype; auto = bf16 where the device is fast at it")
    compile: bool = F(False, "torch.compile the model (about 25 s to compile on CPU)")
    activation_checkpointing: bool = F(False, "recompute activations in backward to save memory")
    parallel: Literal["ddp", "fsdp"] = F("ddp", "under torchrun: replicate (ddp) or shard (fsdp, FSDP2) the model")
    device: str = F("auto", "auto, cpu, cuda, cuda:N")
    seed: int = F(1337, "seed for initialisation, data order and masking")
    threads: int | None = F(None, "torch CPU threads (default: torch's choice)")


@dataclass
class EvalSection:
    every: int = F(100, "held-out evaluation every N steps (and at the end)")
    sequences: int = F(128, "held-out sequences (of train.seq_len) per evaluation, the same ones each time")
    sample_every: int = F(200, "print sampled continuations every N steps (0: only at the end)")
    sample_tokens: int = F(40, "tokens per sampled continuation")
    # No trailing spaces: byte-level BPE glues a word's leading space to the word, so a prompt ending in a
    # space asks the model to continue from a token boundary it has rarely seen.
    prompts: list[str] = F(["def", "The", "import", "class"], "fixed prompts for sampled continuations")


@dataclass
class CheckpointSection:
    every: int = F(200, "save a checkpoint every N steps (and at the end)")
    keep: int = F(2, "keep the last K checkpoints")


@dataclass
class PretrainConfig:
    out_dir: str = F("runs/pretrain", "output directory (checkpoints, final model, logs)")
    init_from: str | None = F(None, "model directory to continue pre-training from")
    tensorboard: bool = F(False, "also write TensorBoard event files (needs the tensorboard package)")
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
