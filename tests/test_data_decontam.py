"""Decontamination: documents sharing long n-grams with evaluation sets are dropped."""

from __future__ import annotations

import json
import pickle

import pytest

from llmcycle.config import build
from llmcycle.data.decontam import Decontaminate, read_eval_items
from llmcycle.data.document import Document
from llmcycle.data.steps import STEPS
from llmcycle.errors import ConfigError, LlmcycleError

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
ANSWER = "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May."
TXT_ITEM = "The mitochondria is the powerhouse of the cell and it produces most of the chemical energy"


@pytest.fixture
def eval_files(tmp_path):
    jsonl = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": QUESTION, "answer": ANSWER, "id": 1},
        {"question": "What is two plus two?", "answer": "4"},  # 6 words: below min_item_words, ignored
        {"prompt": "Translate the following short sentence into French please now", "other": "x"},  # 9 words
        {"choices": ["only", "choices"]},  # no text key: an empty item, ignored
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    txt = tmp_path / "bio.txt"
    txt.write_text(f"{TXT_ITEM}\n\n   \nshort line\n")
    return str(jsonl), str(txt)


def doc(i: int, text: str) -> Document:
    return Document(id=f"d{i}", text=text, source="test")


def test_decontaminate_exact_counts(eval_files):
    jsonl, txt = eval_files
    step = Decontaminate(build(Decontaminate.Params, {"eval_files": [jsonl, txt]}))
    step = pickle.loads(pickle.dumps(step))  # shipped to a worker
    step.setup()
    assert step.ignored_items == {jsonl: 2, txt: 1}
    texts = [
        "A blog post. " + QUESTION.upper() + " Answer below.",  # the question, case changed: gsm8k
        "Some text quoting " + " ".join(QUESTION.split()[5:18]) + " and more",  # exactly 13 words of it
        "Some text quoting " + " ".join(QUESTION.split()[5:17]) + " and more",  # 12 words: clean
        "Notes: the   mitochondria, is the powerhouse of the cell and it produces most of the chemical energy!",
        "Both: " + ANSWER + " " + TXT_ITEM,  # contaminated by both files
        "Please translate the following short sentence into French, please now.",  # whole 9-word item
        "Translate the following short sentence into French",  # part of the short item only: clean
        "What is two plus two? 4",  # the ignored short item: clean
        "",
        # ANSWER (19 words) with 72 -> 73 in word 13: every 13-word window holds the changed number, and
        # numbers are compared as they are (no "0" normalization): clean
        "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 73 clips altogether in April and May.",
        # the same with the change in word 14: the first window matches
        "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 bags altogether in April and May.",
    ]
    results = [step.process(doc(i, t)) for i, t in enumerate(texts)]
    dropped = [i for i, r in enumerate(results) if r == "eval_contamination"]
    assert dropped == [0, 1, 3, 4, 5, 10]
    assert all(isinstance(results[i], Document) and results[i].text == texts[i] for i in (2, 6, 7, 8, 9))
    assert step.counters == {f"contaminated_by:{jsonl}": 5, f"contaminated_by:{txt}": 2}


def test_min_matches_and_ngram(eval_files):
    jsonl, _ = eval_files
    text = "Quote: " + " ".join(QUESTION.split()[:14])  # 14 words: two 13-grams of the item
    step = Decontaminate(Decontaminate.Params(eval_files=[jsonl], min_matches=2))
    assert step.process(doc(0, text)) == "eval_contamination"
    step3 = Decontaminate(Decontaminate.Params(eval_files=[jsonl], min_matches=3))
    assert isinstance(step3.process(doc(0, text)), Document)
    assert step3.counters == {}
    # With 8-grams, 8 consecutive words of the question are enough; 7 are not.
    step8 = Decontaminate(Decontaminate.Params(eval_files=[jsonl], ngram=8))
    assert step8.process(doc(0, "x " + " ".join(QUESTION.split()[3:11]) + " y")) == "eval_contamination"
    assert isinstance(step8.process(doc(0, "x " + " ".join(QUESTION.split()[3:10]) + " y")), Document)


def test_text_keys(eval_files):
    jsonl, _ = eval_files
    only_answer = Decontaminate(Decontaminate.Params(eval_files=[jsonl], text_keys=["answer"]))
    assert isinstance(only_answer.process(doc(0, QUESTION)), Document)
    assert only_answer.process(doc(0, ANSWER)) == "eval_contamination"
    assert read_eval_items(jsonl, ["choices"])[3] == "only\nchoices"


def test_glob_patterns(tmp_path, eval_files):
    jsonl, txt = eval_files
    step = Decontaminate(Decontaminate.Params(eval_files=[str(tmp_path / "*.*"), txt]))
    assert step.files == [txt, jsonl]  # sorted matches, each file once
    assert step.process(doc(0, TXT_ITEM)) == "eval_contamination"
    assert step.counters == {f"contaminated_by:{txt}": 1}
    with pytest.raises(ConfigError, match=r"evals/\*.jsonl matches no file"):
        Decontaminate(Decontaminate.Params(eval_files=[str(tmp_path / "evals" / "*.jsonl")]))


def test_config_errors(tmp_path, eval_files):
    assert STEPS["decontaminate"] is Decontaminate
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"decontaminate.eval_files: .*nope.jsonl does not exist"):
        Decontaminate(Decontaminate.Params(eval_files=[eval_files[0], str(missing)]))
    with pytest.raises(ConfigError, match="eval_files is empty"):
        Decontaminate(Decontaminate.Params())
    other = tmp_path / "eval.csv"
    other.write_text("a,b\n")
    with pytest.raises(ConfigError, match="neither .jsonl nor .txt"):
        Decontaminate(Decontaminate.Params(eval_files=[str(other)]))
    with pytest.raises(ConfigError, match="decontaminate.ngram must be an integer >= 1"):
        Decontaminate(Decontaminate.Params(eval_files=[eval_files[0]], ngram=0))
    with pytest.raises(ConfigError, match="unknown key 'decontaminate.n_gram'"):
        build(Decontaminate.Params, {"n_gram": 13}, prefix="decontaminate.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    step = Decontaminate(Decontaminate.Params(eval_files=[str(bad)]))
    with pytest.raises(LlmcycleError, match=r"bad.jsonl:2: not valid JSON"):
        step.setup()
