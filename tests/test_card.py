"""Model cards: written by a trainer at publish time, from the records; never hashed, so lineage and the
lifecycle's up-to-date checks ignore rewrites of them."""

import json
from pathlib import Path

import pytest

from conftest import tiny_train_overrides
from llmcycle.card import model_card, parameter_count, write_model_card
from llmcycle.cli import main
from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "pre"
    assert main(["pretrain", *tiny_data["overrides"], *tiny_train_overrides(out, 2, **{"eval.every": 2})]) == 0
    return out / "model"


def test_trainer_writes_a_card_that_lineage_does_not_hash(pretrained, capsys):
    card = (pretrained / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    params = sum(p.numel() for p in Transformer.from_pretrained(pretrained).parameters())
    assert f"A {params / 1e6:.1f}M-parameter Llama-architecture causal language model (2 layers" in card
    assert "## Training data" in card and "prepared by pre-training itself" in card
    assert "- **pretrain**" in card and "train.max_steps 2" in card
    assert "Not run yet" in card and "| val_bpb |" in card  # no suite yet: the trainer's own numbers
    assert "README.md" not in json.loads((pretrained / "manifest.json").read_text())["outputs"]
    (pretrained / "README.md").write_text(card + "\nEdited by a person.\n")
    assert main(["lineage", str(pretrained)]) == 0  # a rewritten card is not a modified artifact
    capsys.readouterr()


def test_card_with_evaluation_and_counts(pretrained):
    evaluation = {"pretrain": {"mc_accuracy": 0.25, "heldout_bpb": 3.5}, "sft": {"mc_accuracy": 0.5}}
    card = model_card(pretrained, evaluation, name="demo|model")
    assert "# demo|model" in card
    assert "| metric | pretrain | sft |" in card and "| mc_accuracy | 0.25 | 0.5 |" in card
    assert "| heldout_bpb | 3.5 | - |" in card
    assert parameter_count(pretrained) == sum(p.numel() for p in Transformer.from_pretrained(pretrained).parameters())
    path = write_model_card(pretrained, evaluation)
    assert path == pretrained / "README.md" and "| mc_accuracy |" in path.read_text()


def test_card_needs_a_manifest(tmp_path):
    with pytest.raises(LlmcycleError, match="no manifest.json"):
        model_card(tmp_path)
