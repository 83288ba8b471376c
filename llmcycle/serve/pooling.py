"""Pooling models: embeddings from any served model, and reward models served as scorers.

A pooling request needs one forward over whole inputs and no KV cache, so it does not go through the
generation engine: `Pooler` runs the model's body on padded batches (longest first, up to a token budget)
and pools the final hidden states, in a worker thread, one batch at a time.

- Embeddings (`/v1/embeddings`): mean pooling over the input's tokens for a bidirectional (masked-LM)
  model, last-token pooling for a causal one (its last position is the only one that has seen the whole
  input; vLLM's default for decoder embedding models too), L2-normalised.
- Reward models (directories written by `llmcycle reward`, `...ForSequenceClassification` with a one-label
  `score.weight`): the score at the last token, as they were trained (`train/posttrain/reward.py`).
  `/v1/score` scores (prompt, answer) pairs rendered as a chat, the way the model saw its training pairs;
  `/classify` and `/pooling` give vLLM's shapes. An embedding model's `/v1/score` is the cosine
  similarity of the two texts' embeddings, as in vLLM.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.tokenizer import Tokenizer

POOLINGS = ("mean", "last")


def is_reward_model(model_dir: str | Path) -> bool:
    """A sequence-classification directory (`llmcycle reward` writes `LlamaForSequenceClassification`)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


class Pooler:
    """A model's body with a pooling: `embed(ids)` and, for a reward model, `score(ids)`.

    `model`: a `Transformer` (an engine's own, shared: inference never writes to it) or a
    `ScalarHeadModel`. `max_batch_tokens` bounds one forward's padded batch."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None, pooling: str | None = None,
                 max_batch_tokens: int = 8192) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.is_reward = isinstance(model, ScalarHeadModel)
        causal = getattr(model.config, "is_causal", True)
        self.pooling = pooling or ("last" if causal else "mean")
        if self.pooling not in POOLINGS:
            raise LlmcycleError(f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}.")
        self.max_len = model.config.max_position_embeddings
        self.max_batch_tokens = max_batch_tokens
        self.hidden_size = model.config.hidden_size
        self._lock = threading.Lock()  # one batch at a time: the CPU's threads are all a forward needs

    @classmethod
    def load_reward(cls, model_dir: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Pooler:
        from llmcycle.serve.packed_linear import pack_linears

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = ScalarHeadModel.from_pretrained(model_dir, device=device, dtype=dtype).eval()
        pack_linears(model)
        return cls(model, Tokenizer.from_pretrained(model_dir))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, item: str | list[int]) -> list[int]:
        """Token ids of a text (with the tokenizer's special tokens) or ids as given; LlmcycleError for an
        input that is empty or longer than the context."""
        if isinstance(item, str):
            if self.tokenizer is None:
                raise LlmcycleError("this model has no tokenizer: give token ids.")
            ids = self.tokenizer.encode(item, add_special_tokens=True)
        else:
            ids = list(item)
        if not ids:
            raise LlmcycleError("an input is empty.")
        if len(ids) > self.max_len:
            raise LlmcycleError(f"an input has {len(ids)} tokens, more than the model's context of {self.max_len}.")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise LlmcycleError(f"token ids must be in [0, {vocab}).")
        return ids

    @torch.no_grad()
    def _forward(self, ids_list: list[list[int]]) -> list[torch.Tensor]:
        """Per input: its pooled hidden state [hidden] (embedding models) or its score [] (reward models)."""
        order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
        out: list[torch.Tensor | None] = [None] * len(ids_list)
        with self._lock:
            start = 0
            while start < len(order):
                width = len(ids_list[order[start]])
                rows = max(1, self.max_batch_tokens // width)
                batch = order[start:start + rows]
                start += len(batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.bool)
                for r, i in enumerate(batch):
                    ids[r, : len(ids_list[i])] = torch.tensor(ids_list[i])
                    mask[r, : len(ids_list[i])] = True
                ids, mask = ids.to(self.device), mask.to(self.device)
                lengths = mask.sum(1)
                last = (lengths - 1).unsqueeze(1)
                if self.is_reward:
                    scores = self.model(ids, attention_mask=mask).gather(1, last).squeeze(1)
                    for r, i in enumerate(batch):
                        out[i] = scores[r].float().cpu()
                    continue
                hidden = self.model(ids, attention_mask=mask, return_hidden=True).float()
                if self.pooling == "last":
                    pooled = hidden[torch.arange(len(batch), device=hidden.device), last.squeeze(1)]
                else:
                    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1)
                pooled = F.normalize(pooled, dim=-1).cpu()
                for r, i in enumerate(batch):
                    out[i] = pooled[r]
        return out  # type: ignore[return-value]

    def embed(self, ids_list: list[list[int]]) -> list[torch.Tensor]:
        """L2-normalised embeddings, one per input (blocking: run it off the event loop)."""
        if self.is_reward:
            raise LlmcycleError("a reward model scores; it does not serve embeddings.")
        return self._forward(ids_list)

    def score(self, ids_list: list[list[int]]) -> list[float]:
        """A reward model's score of each input (blocking)."""
        if not self.is_reward:
            raise LlmcycleError("only a reward model scores inputs on its own; an embedding model scores pairs.")
        return [float(s) for s in self._forward(ids_list)]

    def pair_ids(self, prompt: str, answer: str) -> list[int]:
        """A (prompt, answer) pair as a reward model saw its training pairs (a user turn, the answer as the
        assistant's, up to its end of turn: `chat_data.pair_ids`)."""
        from llmcycle.train.posttrain.chat_data import pair_ids

        if self.tokenizer is None:
            raise LlmcycleError("scoring text needs the model's tokenizer.")
        ids = pair_ids(self.tokenizer, prompt, answer)
        if len(ids) > self.max_len:
            raise LlmcycleError(f"a pair has {len(ids)} tokens, more than the model's context of {self.max_len}.")
        return ids

    def describe(self) -> dict[str, Any]:
        return {"task": "reward" if self.is_reward else "embed", "pooling": "last" if self.is_reward else self.pooling,
                "hidden_size": self.hidden_size}
