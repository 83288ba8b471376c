"""Our losses against TRL 1.16's own trainers, on one tiny random Llama.

TRL keeps its losses inside the trainers, so each test builds the real trainer (DPO with each loss type,
CPO with loss_type="simpo", ORPO, KTO, Reward, SFT) around a tiny `LlamaForCausalLM`, collates a hand-built
batch with the trainer's own data collator and calls its `compute_loss`. Our side runs the same weights
through our `Transformer` and the production code on the same hand-built ids: completion log-probs through
`llmcycle.train.posttrain.dpo.completion_logps` (what the DPO-family trainers run) fed to `llmcycle.train.posttrain.losses`,
and SFT through `llmcycle.train.posttrain.sft.sft_loss` on padded and packed batches.
The policy is a perturbed copy of the reference so DPO/KTO log-ratios are not all zero.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# TRL's configs set transformers' deprecated `gradient_checkpointing` field themselves.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

from llmcycle.model import Transformer  # noqa: E402
from llmcycle.train.core.masking import IGNORE  # noqa: E402
from llmcycle.train.posttrain.batching import packed_batch, pad_batch  # noqa: E402
from llmcycle.train.posttrain.dpo import completion_logps  # noqa: E402
from llmcycle.train.posttrain.losses import (  # noqa: E402
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from llmcycle.train.posttrain.sft import sft_loss  # noqa: E402

ATOL = 1e-5
VOCAB = 64
PAD, BOS, EOS = 0, 1, 2
# Four pairs of different prompt/completion lengths; no pad id inside any sequence (the reward model
# finds the last token as the last non-pad one).
PROMPTS = [[BOS, 10, 11, 12], [BOS, 13, 14], [BOS, 15, 16, 17, 18, 19], [BOS, 20]]
CHOSEN = [[30, 31, EOS], [32, EOS], [33, 34, 35, 36, EOS], [37, 38, EOS]]
REJECTED = [[40, EOS], [41, 42, 43, EOS], [44, 45, EOS], [46, 47, 48, 49, 50, EOS]]


# ---- shared fixtures: one tokenizer, one reference model and a perturbed policy on disk -----------


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trl_parity")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # A wider spread than the init: log-probs far from uniform, so a misaligned token shows.
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    model.save_pretrained(root / "ref")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "policy")
    return {"ref": root / "ref", "policy": root / "policy", "out": root / "out"}


def hf_lm(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def ours(path) -> Transformer:
    return Transformer.from_pretrained(path).eval()


def common_args(dirs) -> dict:
    return dict(output_dir=str(dirs["out"]), report_to="none", use_cpu=True, bf16=False, fp16=False,
                per_device_train_batch_size=len(PROMPTS), save_strategy="no",
                logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)


def text_pairs() -> datasets.Dataset:
    # Only for constructing the trainers (they tokenize it at init); every test feeds its own batch.
    return datasets.Dataset.from_dict({"prompt": ["w10 w11"] * 4, "chosen": [" w12"] * 4, "rejected": [" w13"] * 4})


def trl_loss(trainer, batch) -> float:
    trainer.model.train()  # so TRL files its metrics under "train" (dropout is 0 in these models)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.compute_loss(trainer.model, batch).item()


# ---- our side -----------------------------------------------------------------------------------


@torch.no_grad()
def seq_logps(model: Transformer, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each completion given its prompt, and the completion lengths: the production
    function the DPO-family trainers run, so these tests cover their code path."""
    return completion_logps(model, list(zip(prompts, completions)), PAD, torch.device("cpu"))


def assert_close(ours_value: float, trl_value: float) -> None:
    assert abs(ours_value - trl_value) < ATOL, (ours_value, trl_value)


# ---- DPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type, beta, label_smoothing", [
    ("sigmoid", 0.5, 0.0), ("ipo", 0.5, 0.0), ("hinge", 2.0, 0.0), ("robust", 0.1, 0.2),
])
def test_dpo_matches_trl(dirs, loss_type, beta, label_smoothing):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(dirs), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing)
    trainer = DPOTrainer(model=hf_lm(dirs["policy"]), ref_model=hf_lm(dirs["ref"]), args=args,
                         train_dataset=text_pairs(), processing_class=_tokenizer())
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                   for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)])
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    expected = trl_loss(trainer, batch)

    policy, ref = ours(dirs["policy"]), ours(dirs["ref"])
    chosen, chosen_len = seq_logps(policy, PROMPTS, CHOSEN)
    rejected, rejected_len = seq_logps(policy, PROMPTS, REJECTED)
    ref_chosen, _ = seq_logps(ref, PROMPTS, CHOSEN)
    ref_rejected, _ = seq_logps(ref, PROMPTS, REJECTED)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, chosen_len=chosen_len, rejected_len=rejected_len)
    assert_close(losses.mean().item(), expected)

    # The logged rewards too (TRL appends batch means to its metrics).
    metrics = trainer._metrics["train"]
    assert_close(chosen_rewards.mean().item(), metrics["rewards/chosen"][-1])
    assert_close(rejected_rewards.mean().item(), metrics["rewards/rejected"][-1])
    assert_close(chosen.mean().item(), metrics["logps/chosen"][-1])
    if loss_type == "sigmoid":
        # Guard against a trivial pass: the perturbed policy moves the loss well away from log 2.
        assert abs(expected - 0.6931472) > 1e-2
    if loss_type == "hinge":
        assert (losses == 0).any() and (losses > 0).any()  # both sides of the hinge are in the batch


def test_rpo_nll_term_matches_trl(dirs):
    """RPO = DPO + alpha x NLL of the chosen answers: TRL spells it loss_type=["sigmoid", "sft"]."""
    from trl import DPOConfig, DPOTrainer

    alpha = 0.7
    args = DPOConfig(**common_args(dirs), beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha])
    trainer = DPOTrainer(model=hf_lm(dirs["policy"]), ref_model=hf_lm(dirs["ref"]), args=args,
                         train_dataset=text_pairs(), processing_class=_tokenizer())
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                   for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)])
    expected = trl_loss(trainer, batch)

    policy, ref = ours(dirs["policy"]), ours(dirs["ref"])
    chosen, chosen_len = seq_logps(policy, PROMPTS, CHOSEN)
    rejected, rejected_len = seq_logps(policy, PROMPTS, REJECTED)
    losses, _, _ = dpo_loss(chosen, rejected, seq_logps(ref, PROMPTS, CHOSEN)[0], seq_logps(ref, PROMPTS, REJECTED)[0],
                            beta=0.5, loss_type="sigmoid")
    assert len(set(chosen_len.tolist())) > 1  # answers of different lengths: token-weighted != per-pair mean
    assert_close((losses + alpha * chosen_nll(chosen, chosen_len)).mean().item(), expected)
    assert abs((losses + alpha * -chosen / chosen_len).mean().item() - expected) > 10 * ATOL


# ---- SimPO (TRL: CPOTrainer with loss_type="simpo", cpo_alpha=0) ----------------------------------


def cpo_features(prompts, chosen, rejected) -> list[dict]:
    """The rows CPO/ORPO's tokenize_row produces: prompt+answer ids, masks, labels -100 on the prompt."""
    rows = []
    for p, c, r in zip(prompts, chosen, rejected):
        row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for key, answer in (("chosen", c), ("rejected", r)):
            row[f"{key}_input_ids"] = p + answer
            row[f"{key}_attention_mask"] = [1] * (len(p) + len(answer))
            row[f"{key}_labels"] = [-100] * len(p) + answer
        rows.append(row)
    return rows


def test_simpo_matches_trl_cpo(dirs):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, ratio, eps = 2.0, 0.3, 0.1
    args = CPOConfig(**common_args(dirs), loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=ratio * beta,
                     label_smoothing=eps, max_length=64)
    trainer = CPOTrainer(model=hf_lm(dirs["policy"]), args=args, train_dataset=text_pairs(),
                         processing_class=_tokenizer())
    batch = trainer.data_collator(cpo_features(PROMPTS, CHOSEN, REJECTED))
    expected = trl_loss(trainer, batch)

    policy = ours(dirs["policy"])
    chosen, chosen_len = seq_logps(policy, PROMPTS, CHOSEN)
    rejected, rejected_len = seq_logps(policy, PROMPTS, REJECTED)
    losses, chosen_rewards, _ = simpo_loss(chosen, rejected, chosen_len, rejected_len, beta=beta,
                                           gamma_beta_ratio=ratio, label_smoothing=eps)
    assert_close(losses.mean().item(), expected)
    assert_close(chosen_rewards.mean().item(), trainer._stored_metrics["train"]["rewards/chosen"][-1])


# ---- ORPO ---------------------------------------------------------------------------------------


def test_orpo_matches_trl(dirs):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    beta = 0.25
    args = ORPOConfig(**common_args(dirs), beta=beta, max_length=64)
    trainer = ORPOTrainer(model=hf_lm(dirs["policy"]), args=args, train_dataset=text_pairs(),
                          processing_class=_tokenizer())
    batch = trainer.data_collator(cpo_features(PROMPTS, CHOSEN, REJECTED))
    expected = trl_loss(trainer, batch)

    policy = ours(dirs["policy"])
    chosen, chosen_len = seq_logps(policy, PROMPTS, CHOSEN)
    rejected, rejected_len = seq_logps(policy, PROMPTS, REJECTED)
    # TRL's SFT term: token-mean NLL of the chosen rows over prompt AND completion (every token after the first).
    full, _ = seq_logps(policy, [p[:1] for p in PROMPTS], [p[1:] + c for p, c in zip(PROMPTS, CHOSEN)])
    n_tokens = sum(len(p) - 1 + len(c) for p, c in zip(PROMPTS, CHOSEN))
    chosen_nll = -full.sum() / n_tokens
    losses, _, _, extras = orpo_loss(chosen, rejected, chosen_len, rejected_len, chosen_nll, beta=beta)
    assert_close(losses.mean().item(), expected)
    stored = trainer._stored_metrics["train"]
    assert_close(extras["log_odds_ratio"].mean().item(), stored["log_odds_ratio"][-1])
    assert_close(extras["log_odds_chosen"].mean().item(), stored["log_odds_chosen"][-1])
    assert_close(chosen_nll.item(), stored["nll_loss"][-1])


# ---- KTO ----------------------------------------------------------------------------------------


def test_kto_matches_trl(dirs):
    from trl import KTOConfig, KTOTrainer

    beta, w_d, w_u = 0.5, 1.0, 1.3
    args = KTOConfig(**common_args(dirs), beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    unpaired = datasets.Dataset.from_dict({"prompt": ["w10 w11"] * 4, "completion": [" w12"] * 4,
                                           "label": [True, False, True, False]})
    # Roles swapped on purpose: with the unperturbed weights as the policy the batch KL estimate is
    # positive here (about 1.1), so the clamp at 0 does not hide it.
    policy_dir, ref_dir = dirs["ref"], dirs["policy"]
    trainer = KTOTrainer(model=hf_lm(policy_dir), ref_model=hf_lm(ref_dir), args=args,
                         train_dataset=unpaired, processing_class=_tokenizer())
    # Unpaired examples: a mix of chosen and rejected completions, labels not sorted.
    completions = [CHOSEN[0], REJECTED[1], CHOSEN[2], REJECTED[3]]
    labels = [True, False, False, True]
    # The KL completions are the batch's completions shifted by one, as TRL's dataset map builds them.
    mismatched = completions[-1:] + completions[:-1]
    batch = trainer.data_collator([
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": y}
        for p, c, k, y in zip(PROMPTS, completions, mismatched, labels)])
    expected = trl_loss(trainer, batch)

    policy, ref = ours(policy_dir), ours(ref_dir)
    logps, _ = seq_logps(policy, PROMPTS, completions)
    ref_logps, _ = seq_logps(ref, PROMPTS, completions)
    kl = kl_estimate(seq_logps(policy, PROMPTS, mismatched)[0], seq_logps(ref, PROMPTS, mismatched)[0])
    losses, rewards = kto_loss(logps, ref_logps, torch.tensor(labels), kl, beta=beta, desirable_weight=w_d,
                               undesirable_weight=w_u)
    assert_close(losses.mean().item(), expected)
    metrics = trainer._metrics["train"]
    assert kl.item() > 0.1
    assert_close(kl.item(), metrics["kl"][-1])
    assert_close(rewards[torch.tensor(labels)].mean().item(), metrics["rewards/chosen"][-1])


# ---- Bradley-Terry (RewardTrainer) --------------------------------------------------------------


@pytest.mark.parametrize("with_margin, center", [(False, None), (True, 0.05)])
def test_bradley_terry_matches_trl_reward_trainer(dirs, with_margin, center):
    from trl import RewardConfig, RewardTrainer

    model = transformers.AutoModelForSequenceClassification.from_pretrained(dirs["ref"], num_labels=1,
                                                                            dtype=torch.float32)
    with torch.no_grad():  # scores of order 1 instead of the init's ~0.02
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(1)))
    args = RewardConfig(**common_args(dirs), center_rewards_coefficient=center)
    trainer = RewardTrainer(model=model, args=args, train_dataset=text_pairs(), processing_class=_tokenizer())
    margins = [0.5, 0.0, -0.3, 1.0]
    rows = [{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    if with_margin:
        rows = [row | {"margin": m} for row, m in zip(rows, margins)]
    batch = trainer.data_collator(rows)
    expected = trl_loss(trainer, batch)

    # Ours: LlamaForSequenceClassification's score is `score` applied to the final hidden state at the
    # last real token.
    body = ours(dirs["ref"])
    score_weight = model.score.weight.detach()

    @torch.no_grad()
    def scores(seqs):
        out = []
        for s in seqs:
            hidden = body(torch.tensor([s]), return_hidden=True)[0, -1]
            out.append(hidden @ score_weight[0])
        return torch.stack(out)

    chosen = scores([p + c for p, c in zip(PROMPTS, CHOSEN)])
    rejected = scores([p + r for p, r in zip(PROMPTS, REJECTED)])
    losses = bradley_terry_loss(chosen, rejected, torch.tensor(margins) if with_margin else None, center)
    assert_close(losses.mean().item(), expected)


# ---- SFT (SFTTrainer, completion-only loss) -----------------------------------------------------


@torch.no_grad()
def sft_sequences(model: Transformer) -> list[tuple[list[int], list[bool]]]:
    """Four sequences of different lengths with their trained masks (one multi-turn, trained on two separate
    answers). Every other answer token is the model's own greedy choice, so token accuracy is neither 0 nor 1."""
    turns = [  # (prompt, answer length) per turn
        [([BOS, 10, 11, 12], 3)],
        [([BOS, 13], 1)],
        [([BOS, 15, 16], 2), ([17, 18], 2)],
        [([BOS, 20, 21, 22, 23], 6)],
    ]
    seqs = []
    for conversation in turns:
        ids: list[int] = []
        trained: list[bool] = []
        for prompt, n in conversation:
            ids += prompt
            trained += [False] * len(prompt)
            for k in range(n):
                greedy = int(model(torch.tensor([ids]))[0, -1].argmax())
                ids.append(greedy if k % 2 == 0 else 30 + len(ids))
            ids.append(EOS)
            trained += [True] * (n + 1)
        seqs.append((ids, trained))
    return seqs


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_matches_trl(dirs, padding_free):
    from trl import SFTConfig, SFTTrainer

    policy = ours(dirs["policy"])
    seqs = sft_sequences(policy)
    assert len({len(ids) for ids, _ in seqs}) == len(seqs)
    # Pre-tokenized rows with a completion mask: TRL's dataset preparation turns them into labels (-100 off the
    # mask), its collator pads them (or, padding-free, flattens them into one row with restarting positions).
    data = datasets.Dataset.from_dict({"input_ids": [ids for ids, _ in seqs],
                                       "completion_mask": [[int(t) for t in m] for _, m in seqs]})
    args = SFTConfig(**common_args(dirs), completion_only_loss=True, padding_free=padding_free, max_length=None)
    trainer = SFTTrainer(model=hf_lm(dirs["policy"]), args=args, train_dataset=data, processing_class=_tokenizer())
    rows = [trainer.train_dataset[i] for i in range(len(seqs))]
    # TRL's labels follow our convention: labels[i] = ids[i] where token i is trained (shifted in the loss).
    assert [r["labels"] for r in rows] == [[t if m else IGNORE for t, m in zip(ids, mask)] for ids, mask in seqs]
    batch = trainer.data_collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    if padding_free:
        assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                              "max_length_q", "max_length_k", "seq_idx"}
        assert batch["input_ids"].shape == (1, sum(len(ids) for ids, _ in seqs))
    else:
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
    expected = trl_loss(trainer, batch)
    trl_accuracy = trainer._metrics["train"]["mean_token_accuracy"][-1]
    assert 0.1 < trl_accuracy < 0.9

    # Ours: one example per row, and packed two per row (block-diagonal attention, restarting positions).
    n_trained = sum(sum(mask[1:]) for _, mask in seqs)
    for batch in (pad_batch(seqs, PAD), packed_batch([[seqs[0], seqs[2]], [seqs[1], seqs[3]]], PAD)):
        assert int((batch.targets != IGNORE).sum()) == n_trained
        with torch.no_grad():
            loss, metrics = sft_loss(policy, batch)
        assert_close(loss.item() / n_trained, expected)
        assert_close(metrics["mean_token_accuracy"] / n_trained, trl_accuracy)
