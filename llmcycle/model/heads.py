"""The transformer with a scalar head: reward models and PPO value models.

On disk it is Hugging Face's `LlamaForSequenceClassification` with one label (`model.*` plus
`score.weight`), so `AutoModelForSequenceClassification` loads a reward model we train, and we load theirs.
The score of a sequence is the head's output at its last real token, as transformers computes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmcycle.artifacts import atomic_write_json
from llmcycle.errors import LlmcycleError
from llmcycle.model.config import ModelConfig
from llmcycle.model.transformer import Transformer
from llmcycle.paths import check_model_dir

SEQ_CLS_SUFFIX = "ForSequenceClassification"


class ScalarHeadModel(Transformer):
    """Transformer body, no LM head, a bias-free linear `score` from hidden size to 1."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        del self.lm_head  # the body's logits are never needed; keep the parameter count honest
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=config.initializer_range)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, kv_cache=None,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> a scalar per position [B, T] (fp32)."""
        hidden = super().forward(input_ids, positions, kv_cache, attention_mask, return_hidden=True)
        return self.score(hidden).squeeze(-1).float()

    @classmethod
    def from_causal_lm(cls, lm: Transformer) -> ScalarHeadModel:
        """Body from a language model, fresh head: how a reward or value model starts."""
        model = cls(lm.config)
        body = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or set(missing) - {"score.weight"}:
            raise LlmcycleError(f"cannot build a scalar-head model from this LM ({missing}, {unexpected}).")
        return model.to(next(lm.parameters()).device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: torch.dtype | None = None) -> ScalarHeadModel:
        from llmcycle.model.hf_io import read_state_dict

        path = check_model_dir(path)
        raw = json.loads((path / "config.json").read_text())
        config = ModelConfig.from_json_file(path / "config.json")
        state = read_state_dict(path)
        archs = raw.get("architectures") or []
        if "score.weight" not in state:
            raise LlmcycleError(
                f"{path}: not a reward/value model (architectures {archs}, no score.weight); train one with "
                "`llmcycle reward`."
            )
        if state["score.weight"].shape[0] != 1:
            raise LlmcycleError(f"{path}: score head has {state['score.weight'].shape[0]} labels; expected 1.")
        for k in ("id2label", "label2id", "num_labels"):
            config.extra.pop(k, None)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=torch.device(device or "cpu"))
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"}
        model.load_state_dict(state, strict=True)
        return model.to(dtype=dtype or torch.float32)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:  # type: ignore[override]
        from llmcycle.model.hf_io import save_model

        state = dict(state_dict or self.state_dict())
        save_model(self, path, state_dict=state)
        config_path = Path(path) / "config.json"
        hf = json.loads(config_path.read_text())
        hf["architectures"] = [hf["architectures"][0].replace("ForCausalLM", SEQ_CLS_SUFFIX)]
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        atomic_write_json(config_path, hf, sort_keys=True)


def last_token_scores(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [B, T], lengths [B] (real tokens, right-padded) -> the value at each row's last real token."""
    idx = (lengths - 1).clamp(min=0).to(values.device)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)
