"""Every training recipe (pretrain, sft, reward, dpo, ppo, grpo): each option with its default and a line of help.

Plain dataclasses that import neither torch nor the trainers, so `llmcycle <stage> --help`, recipe checks and
`llmcycle run`'s configuration answer at once. The sections every trainer shares come first: `OptimSection`
(optimizer, schedule, batch shape, precision, device, seed) and `CheckpointSection`. A stage's own defaults
are the section instance its config starts from (`field(default_factory=lambda: OptimSection(lr=...))`):
a recipe that sets some keys of a section keeps the stage's defaults for the others (llmcycle.config.build),
and `--help` lists them, so `llmcycle sft`, `llmcycle run`'s sft section and `sft(SFTConfig())` agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmcycle.config import field_help as F
from llmcycle.errors import ConfigError
from llmcycle.optimize.config import LoRAConfig

# ---- shared by every trainer ---------------------------------------------------------------------


@dataclass
class OptimSection:
    batch_size: int = F(8, "examples, packed rows, sequences or rollouts per micro-batch per process")
    grad_accum: int = F(1, "micro-batches per optimizer step")
    max_steps: int = F(0, "optimizer steps (ppo, grpo: iterations); 0 derives them from epochs (post-training)")
    lr: float = F(1e-4, "peak learning rate")
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = F(10, "linear warm-up steps (ppo, grpo: iterations)")
    weight_decay: float = F(0.0, "AdamW weight decay (matrices only; not norms, biases, embeddings)")
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.999, "AdamW beta2")
    grad_clip: float = F(1.0, "max global gradient norm; 0 disables clipping")
    dtype: Literal["auto", "fp32", "bf16"] = F("auto", "autocast dtype; auto = bf16 where the device is fast at it")
    device: str = F("auto", "auto, cpu, cuda, cuda:N")
    seed: int = F(42, "seed for initialisation, data order, masking and sampling")
    threads: int | None = F(None, "torch CPU threads, kept fixed (default: the CPUs this process may use, cgroup "
                            "quota included, following those other processes leave free)")

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:  # torch would fail on it after the data is loaded
            raise ConfigError(f"train.threads must be positive (or null for automatic), not {self.threads}.")


@dataclass
class CheckpointSection:
    every: int = F(100, "save a checkpoint every N steps and at the end (pretrain: 0 saves none; post-training: "
                   "0 saves only the final one)")
    keep: int = F(2, "keep the last K checkpoints")


# ---- pre-training --------------------------------------------------------------------------------


@dataclass
class TokenizerSection:
    path: str | None = F(None, "existing tokenizer directory; null trains one on the training text")
    kind: Literal["bpe", "wordpiece", "unigram"] = F("bpe", "tokenizer model trained when path is null")
    vocab_size: int = F(4096, "vocabulary size of a trained tokenizer")
    min_frequency: int = F(2, "minimum pair frequency for a merge / token")


@dataclass
class CorpusSection:
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
class TrainSection(OptimSection):
    """Pre-training's optimizer section: the shared keys and the objective, sequence shape and parallelism."""

    objective: Literal["causal", "masked"] = F("causal", "causal LM (GPT/Llama) or masked LM (BERT-style)")
    mask_prob: float = F(0.15, "masked LM: fraction of tokens to predict (80/10/10 mask/random/keep)")
    seq_len: int = F(256, "tokens per training sequence")
    compile: bool = F(False, "torch.compile the model (about 25 s to compile on CPU)")
    activation_checkpointing: bool = F(False, "recompute activations in backward to save memory")
    parallel: Literal["ddp", "fsdp"] = F("ddp", "under torchrun: replicate (ddp) or shard (fsdp, FSDP2) the model")


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
class PretrainConfig:
    out_dir: str = F("runs/pretrain", "output directory (checkpoints, final model, logs)")
    init_from: str | None = F(None, "model directory to continue pre-training from")
    tensorboard: bool = F(False, "also write TensorBoard event files (needs the tensorboard package)")
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: CorpusSection = field(default_factory=CorpusSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(
        batch_size=16, max_steps=600, lr=3e-3, warmup_steps=50, weight_decay=0.1, beta2=0.95, seed=1337))
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=200))


# ---- post-training (sft, reward, dpo, ppo, grpo) -------------------------------------------------


@dataclass
class PostTrainSection(OptimSection):
    """Post-training's optimizer section: the shared keys and a length in epochs."""

    epochs: float = F(1.0, "passes over the training set (ignored when max_steps > 0)")


@dataclass
class DataSection:
    train: str = F("embedded", "training data: a .jsonl/.jsonl.gz/.parquet file or a folder of them; 'embedded' "
                   "writes the tasks derived from the embedded corpus (llmcycle.train.posttrain.synthetic)")
    eval: str | None = F("embedded", "held-out data in the same format; 'embedded' for the embedded tasks; null for none")
    max_length: int = F(256, "tokens per example (prompt + completion); longer ones are truncated and counted")
    embedded_per_task: int = F(400, "examples per embedded task (train + eval)")
    embedded_seed: int = F(0, "seed of the embedded tasks")
    embedded_tasks: list[str] | None = F(None, "which embedded tasks (null: the default set; also 'reverse', "
                                               "'count', and 'tool', calls of a listed tool)")


@dataclass
class PromptData(DataSection):
    max_length: int = F(256, "prompt + completion tokens: prompts longer than max_length - "
                         "generation.max_new_tokens are rejected (and counted)")


@dataclass
class GenerationSection:
    max_new_tokens: int = F(24, "tokens generated per completion at most")
    temperature: float = F(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature")
    top_k: int | None = F(None, "sample among the k most likely tokens; null: all")
    top_p: float | None = F(None, "nucleus sampling mass; null: off")
    batch_size: int = F(0, "rows generated together; 0: the whole rollout batch at once")
    sampler: Literal["simple", "engine"] = F(
        "simple", "simple: one padded KV-cache batch; engine: the serving engine (paged KV, continuous batching)")


@dataclass
class OnlineEval:
    every: int = F(50, "held-out exact match every N steps (and before the first and after the last)")
    generate: int = F(64, "held-out prompts with a reference answered greedily (0: none)")


@dataclass
class SFTData(DataSection):
    loss_on: Literal["assistant", "all"] = F("assistant", "train on assistant tokens only, or on every token")
    packing: bool = F(True, "pack several examples per row (no attention across them); false pads one per row")
    pretrain_mix: float = F(0.0, "share of trained tokens that are pre-training text, trained on every token, so "
                            "SFT keeps the language model it starts from (0: none)")
    pretrain_shards: str | None = F(None, "token shards replayed by pretrain_mix (default: the model's own "
                                    "pre-training shards, from its manifest)")


@dataclass
class SFTEval:
    every: int = F(50, "held-out evaluation every N steps (and before the first and after the last)")
    max_examples: int = F(256, "held-out examples for the loss")
    generate: int = F(64, "held-out examples answered greedily for exact match (0: none)")
    max_new_tokens: int = F(24, "tokens generated per answer")


@dataclass
class SFTConfig:
    out_dir: str = F("runs/sft", "output directory (checkpoints, final model, metrics)")
    model: str = F("runs/default/pretrain/model", "model directory to fine-tune (Hugging Face layout, with its tokenizer)")
    data: SFTData = field(default_factory=SFTData)
    train: PostTrainSection = field(default_factory=lambda: PostTrainSection(lr=1e-3, epochs=3.0))
    eval: SFTEval = field(default_factory=SFTEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class RewardEval:
    every: int = F(50, "held-out accuracy every N steps (and before the first and after the last)")
    max_pairs: int = F(512, "held-out pairs per evaluation")


@dataclass
class RewardConfig:
    out_dir: str = F("runs/reward", "output directory (checkpoints, final reward model, metrics)")
    model: str = F("runs/default/sft/model", "model to start from: a language model (a fresh head is added) or a reward model")
    center_coefficient: float | None = F(None, "weight of the (r_chosen + r_rejected)^2 centering term; null: none")
    data: DataSection = field(default_factory=DataSection)
    train: PostTrainSection = field(default_factory=lambda: PostTrainSection(lr=3e-4, epochs=2.0))
    eval: RewardEval = field(default_factory=RewardEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DPOEval:
    every: int = F(50, "held-out evaluation every N steps (and before the first and after the last)")
    max_pairs: int = F(256, "held-out preference pairs per evaluation")
    generate: int = F(64, "held-out prompts answered greedily, compared with the chosen answer (0: none)")
    max_new_tokens: int = F(24, "tokens generated per answer")


@dataclass
class DPOConfig:
    out_dir: str = F("runs/dpo", "output directory (checkpoints, final model, reference cache, metrics)")
    model: str = F("runs/default/sft/model", "the model to tune (usually the SFT model)")
    ref_model: str | None = F(None, "reference model; null: the starting model itself")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = F(
        "sigmoid", "sigmoid (DPO), ipo, hinge, robust (label smoothing), simpo, orpo (reference-free), kto (unpaired)")
    beta: float = F(0.1, "DPO beta / IPO tau / SimPO beta (paper: 2.0-2.5) / ORPO lambda / KTO beta")
    label_smoothing: float = F(0.0, "robust DPO and SimPO: assumed fraction of flipped labels")
    rpo_alpha: float | None = F(None, "RPO (TRL's rpo_alpha): add alpha x the chosen answers' mean token NLL, "
                                 "so preference tuning does not unlearn the right answers; null: off")
    simpo_gamma_beta_ratio: float = F(0.5, "SimPO: target margin gamma as a multiple of beta")
    desirable_weight: float = F(1.0, "KTO: weight of desirable examples' loss")
    undesirable_weight: float = F(1.0, "KTO: weight of undesirable examples' loss")
    data: DataSection = field(default_factory=DataSection)
    train: PostTrainSection = field(default_factory=lambda: PostTrainSection(lr=2e-4, epochs=1.0))
    eval: DPOEval = field(default_factory=DPOEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class PPOConfig:
    out_dir: str = F("runs/ppo", "output directory (checkpoints, final model, metrics)")
    model: str = F("runs/default/sft/model", "the policy to train (usually the SFT model); also the frozen reference")
    reward_model: str | None = F("runs/reward/model", "reward model directory (`llmcycle reward`); null: "
                                  "reward functions only")
    value_model: str | None = F(None, "where the value model starts; null: the reward model (or the policy's "
                                 "body with a fresh head when there is no reward model)")
    reward_funcs: list[str] = F([], "reward functions added to the reward model's score: exact_match, "
                                 "module:function or path/file.py:function")
    reward_weights: list[float] | None = F(None, "weight of each reward function; null: 1.0 each")
    missing_eos_penalty: float | None = F(None, "subtracted from the score of a completion that did not end "
                                           "with its end-of-turn token; null: none")
    num_minibatches: int = F(1, "minibatches (optimizer steps) per pass over a rollout batch")
    ppo_epochs: int = F(4, "passes over each rollout batch")
    cliprange: float = F(0.2, "policy ratio clip")
    cliprange_value: float = F(0.2, "value clip around the rollout's values")
    vf_coef: float = F(0.1, "weight of the value loss")
    gamma: float = F(1.0, "discount")
    lam: float = F(0.95, "GAE lambda")
    whiten_rewards: bool = F(False, "whiten per-token rewards (spread only, level kept) before GAE")
    kl_coef: float = F(0.05, "KL penalty coefficient (the initial one with adaptive_kl)")
    kl_estimator: Literal["k1", "k3"] = F("k1", "per-token KL estimate: k1 = log pi - log ref, k3 = (r-1) - log r")
    adaptive_kl: bool = F(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = F(6.0, "adaptive KL: target KL per completion (summed over its tokens)")
    kl_horizon: int = F(10000, "adaptive KL: horizon in rollouts")
    generation: GenerationSection = field(default_factory=lambda: GenerationSection(temperature=0.7))
    data: PromptData = field(default_factory=PromptData)
    train: PostTrainSection = field(
        default_factory=lambda: PostTrainSection(lr=3e-5, batch_size=8, max_steps=100, warmup_steps=0))
    eval: OnlineEval = field(default_factory=OnlineEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class GRPOConfig:
    out_dir: str = F("runs/grpo", "output directory (checkpoints, final model, metrics)")
    model: str = F("runs/default/sft/model", "the policy to train (usually the SFT model); also the frozen reference")
    reward_funcs: list[str] = F(["exact_match"], "reward functions, summed with reward_weights: exact_match, "
                                 "module:function or path/file.py:function")
    reward_weights: list[float] | None = F(None, "weight of each reward function; null: 1.0 each")
    num_generations: int = F(8, "completions sampled per prompt (the group)")
    beta: float = F(0.04, "weight of the k3 KL to the reference; 0: no reference model is loaded")
    epsilon: float = F(0.2, "ratio clip (lower side, and upper side unless epsilon_high)")
    epsilon_high: float | None = F(None, "upper ratio clip (DAPO's clip-higher); null: epsilon")
    kl_bias_correction: bool = F(True, "weigh each token's KL by the policy ratio (TRL's use_bias_correction_kl)")
    num_iterations: int = F(1, "optimizer steps on each generation batch (mu in the paper)")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = F(
        "dapo", "loss normalisation, as TRL: dapo = per token over the step, grpo = per sequence then per batch, "
        "dr_grpo = per batch x max_new_tokens")
    scale_rewards: bool = F(True, "divide advantages by the group's reward std (false: Dr. GRPO)")
    generation: GenerationSection = field(default_factory=GenerationSection)
    data: PromptData = field(default_factory=PromptData)
    train: PostTrainSection = field(
        default_factory=lambda: PostTrainSection(lr=5e-5, batch_size=16, grad_accum=4, max_steps=100, warmup_steps=0))
    eval: OnlineEval = field(default_factory=OnlineEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
