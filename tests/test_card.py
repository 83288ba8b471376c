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


# ---- Hugging Face metadata, usage snippet, task list (issue 13, section 5) ----------------------------


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def tuned(pretrained, tmp_path_factory) -> Path:
    """SFT of the pre-trained model on the embedded tasks, 2 steps, 20 items per task."""
    out = tmp_path_factory.mktemp("card") / "sft"
    assert main(["sft", f"out_dir={out}", f"model={pretrained}", "train.max_steps=2", "train.batch_size=4",
                 "train.warmup_steps=1", "train.dtype=fp32", "train.threads=1", "data.max_length=64",
                 "eval.every=0", "checkpoint.every=0", "data.eval=null", "data.embedded_per_task=20"]) == 0
    return out / "model"


def test_front_matter_has_hugging_face_metadata_and_model_index(tuned, pretrained):
    evaluation = {"pretrain": {"mc_accuracy": 0.25}, "sft": {"mc_accuracy": 0.5, "exact_match": 0.125,
                                                            "heldout_bpb": 2.5, "items": 10}}
    meta = _front_matter(model_card(tuned, evaluation, name="r-sft"))
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en", "code"]
    assert meta["datasets"] == ["python-stdlib-docs-and-source", "llmcycle-embedded-tasks"]
    assert meta["base_model"] == str(pretrained) and meta["base_model_relation"] == "finetune"
    (entry,) = meta["model-index"]
    assert entry["name"] == "r-sft"
    text, tasks = entry["results"]
    assert text["task"]["type"] == "text-generation" and text["dataset"]["type"] == "llmcycle-heldout-text"
    assert text["metrics"] == [{"type": "heldout_bpb", "value": 2.5, "name": "held-out bits per byte"}]
    assert {m["type"]: m["value"] for m in tasks["metrics"]} == {"mc_accuracy": 0.5, "exact_match": 0.125}
    assert "model-index" not in _front_matter(model_card(tuned))  # no suite results, no model-index
    assert "base_model" not in _front_matter(model_card(pretrained))


def test_task_list_is_the_trained_tasks(tuned):
    from llmcycle.train.posttrain.synthetic import EXTRA_TASKS, TASKS

    info = json.loads((tuned.parent / "data" / "info.json").read_text())
    card = model_card(tuned)
    tasks_section = card.split("## Tasks")[1].split("\n## ")[0]
    for task in info["tasks"]:
        assert f"| {task} |" in tasks_section
    assert set(info["tasks"]) == set(TASKS)
    for task in EXTRA_TASKS:  # available in synthetic.py, but not trained: not claimed anywhere
        assert f"| {task} |" not in tasks_section and task not in card.split("## Intended use")[1]
    assert "string reversal" not in card
    assert "answers the tasks it was tuned on (add, sub, max" in card


def test_task_list_of_user_data_names_the_files(tuned, tmp_path):
    """A manifest whose training data hash does not match the embedded info.json claims no embedded task."""
    import shutil

    copy = tmp_path / "sft" / "model"
    shutil.copytree(tuned, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["data"]["train"] = "mine.jsonl"
    manifest["inputs"]["data"] = {"mine.jsonl": "0" * 64}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    card = model_card(copy)
    assert "- **sft** trained on `mine.jsonl`" in card and "| add |" not in card


def test_usage_snippet_loads_and_stops_at_end_of_turn(tuned, capsys):
    """The card's transformers snippet runs as written and passes the end-of-turn token as a stop id."""
    pytest.importorskip("transformers")
    from llmcycle.tokenizer import Tokenizer

    card = model_card(tuned)
    code = card.split("```python\n")[1].split("```")[0]
    tok = Tokenizer.from_pretrained(tuned)
    assert "apply_chat_template(messages, add_generation_prompt=True" in code
    assert f"tok.convert_tokens_to_ids({tok.end_of_turn_token!r})" in code
    namespace: dict = {}
    exec(compile(code, "card-snippet", "exec"), namespace)  # noqa: S102 - the card's own example
    assert tok.token_to_id(tok.end_of_turn_token) in namespace["stop"]
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    capsys.readouterr()
