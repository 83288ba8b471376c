"""The post-training recipes (sft, reward, dpo, ppo, grpo): every option with its default and a line of help.

Plain dataclasses that import neither torch nor the trainers, so `llmcycle <stage> --help`, recipe checks and
`llmcycle run`'s configuration answer at once. The shared sections (optimizer, data, checkpoints, generation)
come first; each command's defaults subclass them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmcycle.config import field_help as F


@dataclass
class OptimSection:
    batch_size: int = F(8, "examples (or packed rows) per micro-batch per process")
    grad_accum: int = F(1, "micro-batches per optimizer step")
    epochs: float = F(1.0, "passes over the training set (ignored when max_steps > 0)")
    max_steps: int = F(0, "optimizer steps; 0 derives them from epochs")
    lr: float = F(1e-4, "peak learning rate")
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = F(10, "linear warm-up steps")
    weight_decay: float = F(0.0, "AdamW weight decay (matrices only)")
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.999, "AdamW beta2")
    grad_clip: float = F(1.0, "max global gradient norm; 0 disables clipping")
    dtype: Literal["auto", "fp32", "bf16"] = F("auto", "autocast dtype; auto = bf16 where the device is fast at it")
    device: str = F("auto", "auto, cpu, cuda, cuda:N")
    seed: int = F(42, "seed for data order, dropout-free sampling and initialisation of new heads")
    threads: int | None = F(None, "torch CPU threads (default: torch's choice)")


@dataclass
class DataSection:
    train: str = F("embedded", "training data: a .jsonl/.jsonl.gz/.parquet file or a folder of them; 'embedded' "
                   "writes the tasks derived from the embedded corpus (llmcycle.train.posttrain.synthetic)")
    eval: str | None = F("embedded", "held-out data in the same format; 'embedded' for the embedded tasks; null for none")
    max_length: int = F(256, "tokens per example (prompt + completion); longer ones are truncated and counted")
    embedded_per_task: int = F(400, "examples per embedded task (train + eval)")
    embedded_seed: int = F(0, "seed of the embedded tasks")


@dataclass
class CheckpointSection:
    every: int = F(100, "save a checkpoint every N steps (and at the end)")
    keep: int = F(2, "keep the last K checkpoints")


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


@dataclass
class SFTOptim(OptimSection):
    lr: float = F(1e-3, "peak learning rate")
    epochs: float = F(3.0, "passes over the training set (ignored when max_steps > 0)")


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
    train: SFTOptim = field(default_factory=SFTOptim)
    eval: SFTEval = field(default_factory=SFTEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class RewardOptim(OptimSection):
    lr: float = F(3e-4, "peak learning rate")
    epochs: float = F(2.0, "passes over the training pairs (ignored when max_steps > 0)")


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
    train: RewardOptim = field(default_factory=RewardOptim)
    eval: RewardEval = field(default_factory=RewardEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class DPOOptim(OptimSection):
    lr: float = F(2e-4, "peak learning rate")
    epochs: float = F(1.0, "passes over the training data (ignored when max_steps > 0)")


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
    train: DPOOptim = field(default_factory=DPOOptim)
    eval: DPOEval = field(default_factory=DPOEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class PPOOptim(OptimSection):
    lr: float = F(3e-5, "peak learning rate (policy and value model)")
    batch_size: int = F(8, "rollouts per micro-batch per process")
    max_steps: int = F(100, "PPO iterations (rollout batches); 0 derives them from epochs over the prompts")
    warmup_steps: int = F(0, "linear warm-up, in iterations")


@dataclass
class PPOGeneration(GenerationSection):
    temperature: float = F(0.7, "sampling temperature (> 0); log-probs are taken at the same temperature")


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
    generation: PPOGeneration = field(default_factory=PPOGeneration)
    data: PromptData = field(default_factory=PromptData)
    train: PPOOptim = field(default_factory=PPOOptim)
    eval: OnlineEval = field(default_factory=OnlineEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class GRPOOptim(OptimSection):
    lr: float = F(5e-5, "peak learning rate")
    batch_size: int = F(16, "completions per micro-batch per process")
    grad_accum: int = F(4, "micro-batches per optimizer step")
    max_steps: int = F(100, "GRPO iterations (generation batches); 0 derives them from epochs over the prompts")
    warmup_steps: int = F(0, "linear warm-up, in iterations")


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
    train: GRPOOptim = field(default_factory=GRPOOptim)
    eval: OnlineEval = field(default_factory=OnlineEval)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
