"""Preference labelling over a real SQLite file: items, serving order, gold items, quality control, the
preference pairs, and `llmcycle label import|report|export` read back by the DPO data reader."""

import argparse
import json
import random
from collections import Counter

import pytest

from llmcycle.errors import LlmcycleError
from llmcycle.improve.label_cli import add_label_arguments
from llmcycle.improve.labels import Labels


def items(n: int, start: int = 0, gold: str | None = None) -> list[dict]:
    return [{"prompt": f"question {i}?", "a": f"answer {i} A", "b": f"answer {i} B", "gold": gold,
             "source": {"request_ids": [f"chatcmpl-{i}a", f"chatcmpl-{i}b"]}} for i in range(start, start + n)]


def label_all(labels: Labels, annotator: str, choose, limit: int = 10_000) -> list[dict]:
    """Label until nothing is left; `choose(item) -> choice`. Returns what was served, in order."""
    served = []
    while (item := labels.next_item(annotator)) is not None and len(served) < limit:
        served.append(item)
        labels.submit(annotator, item["item_id"], choose(item))
    return served


def truth_of(labels: Labels) -> dict[int, str]:
    """The answer a careful annotator gives: gold where known, else one fixed by the item's number."""
    rows = labels.store.rows("SELECT id, prompt, gold FROM label_items")
    return {r["id"]: r["gold"] or ("a" if int(r["prompt"].split()[1].rstrip("?")) % 3 else "b") for r in rows}


def test_add_items_dedups_and_checks(tmp_path):
    labels = Labels(tmp_path / "db.sqlite")
    assert labels.add_items(items(3)) == 3
    assert labels.add_items(items(4)) == 1  # three already there
    swapped = [{"prompt": "question 0?", "a": "answer 0 B", "b": "answer 0 A"}]
    assert labels.add_items(swapped) == 0  # the same comparison the other way round
    assert labels.add_items(items(1, start=9) * 2) == 1  # twice in one call
    for bad, said in [({"prompt": "p", "a": "x", "b": "x"}, "same text"),
                      ({"prompt": " ", "a": "x", "b": "y"}, "'prompt'"),
                      ({"prompt": "p", "a": "x"}, "'b'"),
                      ({"prompt": "p", "a": "x", "b": "y", "gold": "left"}, "gold"),
                      ({"prompt": "p", "a": "x", "b": "y", "extra": 1}, "unknown field")]:
        with pytest.raises(LlmcycleError, match="item 1") as e:
            labels.add_items([items(1, start=20)[0], bad])
        assert said in str(e.value)
    assert labels.report()["items"] == 5  # a bad batch adds nothing, not even its good items


def test_next_item_never_repeats_nor_reveals_gold(tmp_path):
    labels = Labels(tmp_path / "db.sqlite", per_item=3, gold_rate=0.3, seed=0)
    labels.add_items(items(30))
    labels.add_items(items(10, start=100, gold="a"))
    served = label_all(labels, "ann", lambda item: "a")
    ids = [s["item_id"] for s in served]
    assert len(ids) == len(set(ids))
    gold_ids = {r["id"] for r in labels.store.rows("SELECT id FROM label_items WHERE gold IS NOT NULL")}
    assert len(set(ids) - gold_ids) == 30  # every ordinary item, then None
    for s in served:
        assert set(s) == {"item_id", "prompt", "completions"}
        assert [set(c) for c in s["completions"]] == [{"id", "text"}] * 2
        assert sorted(c["id"] for c in s["completions"]) == ["a", "b"]
        assert "gold" not in json.dumps(s) and "chatcmpl" not in json.dumps(s)
    assert labels.next_item("ann") is None
    assert labels.next_item("someone else") is not None


def test_completions_come_in_random_order(tmp_path):
    labels = Labels(tmp_path / "db.sqlite", gold_rate=0.0, seed=1)
    labels.add_items(items(1))
    orders = Counter(tuple(c["id"] for c in labels.next_item("ann")["completions"]) for _ in range(40))
    assert set(orders) == {("a", "b"), ("b", "a")}
    item = labels.next_item("ann")
    texts = {c["id"]: c["text"] for c in item["completions"]}
    assert texts == {"a": "answer 0 A", "b": "answer 0 B"}  # the ids follow their texts


def test_per_item_spreads_labels(tmp_path):
    labels = Labels(tmp_path / "db.sqlite", per_item=2, gold_rate=0.0, seed=2)
    labels.add_items(items(6))
    # Taking turns, as annotators working at once do: the item with the fewest labels goes first.
    served = Counter()
    while True:
        progress = False
        for ann in ("w", "x", "y", "z"):
            item = labels.next_item(ann)
            if item is not None:
                labels.submit(ann, item["item_id"], "a")
                served[ann] += 1
                progress = True
        if not progress:
            break
    counts = Counter(r["item_id"] for r in labels.store.rows("SELECT item_id FROM labels"))
    assert sorted(counts.values()) == [2] * 6
    assert sum(served.values()) == 12 and all(n == 3 for n in served.values())


def test_gold_items_mixed_in_at_the_rate(tmp_path):
    labels = Labels(tmp_path / "db.sqlite", per_item=1, gold_rate=0.25, seed=3)
    labels.add_items(items(300))
    labels.add_items(items(300, start=1000, gold="b"))
    gold_ids = {r["id"] for r in labels.store.rows("SELECT id FROM label_items WHERE gold IS NOT NULL")}
    served = label_all(labels, "ann", lambda item: "b", limit=240)
    share = sum(s["item_id"] in gold_ids for s in served) / len(served)
    assert abs(share - 0.25) < 0.09  # 3 standard deviations of a binomial share over 240
    none = Labels(tmp_path / "db.sqlite", per_item=1, gold_rate=0.0, seed=3)
    assert not any(none.next_item("other")["item_id"] in gold_ids for _ in range(50))


def test_submit_errors(tmp_path):
    labels = Labels(tmp_path / "db.sqlite")
    labels.add_items(items(1))
    (item_id,) = [r["id"] for r in labels.store.rows("SELECT id FROM label_items")]
    with pytest.raises(LlmcycleError, match="no labelling item 999"):
        labels.submit("ann", 999, "a")
    with pytest.raises(LlmcycleError, match="choice 'left'"):
        labels.submit("ann", item_id, "left")
    with pytest.raises(LlmcycleError, match="reasons"):
        labels.submit("ann", item_id, "a", reasons=["x" * 201])
    with pytest.raises(LlmcycleError, match="annotator"):
        labels.submit("", item_id, "a")
    labels.submit("ann", item_id, "tie", reasons=["verbose"], comment="both fine")
    with pytest.raises(LlmcycleError, match="already labelled"):
        labels.submit("ann", item_id, "a")
    labels.submit("other", item_id, "both_bad")
    rows = labels.store.rows("SELECT annotator, choice, reasons, comment FROM labels ORDER BY id")
    assert rows == [{"annotator": "ann", "choice": "tie", "reasons": '["verbose"]', "comment": "both fine"},
                    {"annotator": "other", "choice": "both_bad", "reasons": "[]", "comment": None}]


def simulated(db, seed: int = 0) -> Labels:
    """60 items (15 gold), each labelled by two careful annotators (95% right) and one who picks at random."""
    labels = Labels(db, per_item=3, gold_rate=0.25, seed=seed)
    labels.add_items(items(45))
    labels.add_items([{**it, "gold": "a" if i % 2 else "b"} for i, it in enumerate(items(15, start=500))])
    truth = truth_of(labels)
    rng = random.Random(seed)
    for ann in ("good1", "good2", "random"):
        careful = ann != "random"
        label_all(labels, ann, lambda item, careful=careful: truth[item["item_id"]]
                  if careful and rng.random() < 0.95 else rng.choice(["a", "b", "tie", "both_bad"]))
    return labels


def test_report_flags_the_random_annotator(tmp_path):
    labels = simulated(tmp_path / "db.sqlite")
    r = labels.report()
    assert r["items"] == 60 and r["gold_items"] == 15
    assert r["flagged"] == ["random"]
    assert r["annotators"]["random"]["flagged"] and "gold accuracy" in r["annotators"]["random"]["why"]
    for a in ("good1", "good2"):
        q = r["annotators"][a]
        assert q["labels"] >= 45 and q["gold_items"] > 0 and q["gold_accuracy"] >= 0.7 and not q["flagged"]
    kappa = {tuple(p["annotators"]): p["kappa"] for p in r["pairwise"]}
    assert set(kappa) == {("good1", "good2"), ("good1", "random"), ("good2", "random")}
    assert kappa[("good1", "good2")] > 0.7 > max(kappa[("good1", "random")], kappa[("good2", "random")])
    assert r["alpha"] < 0.5 < r["alpha_without_flagged"] and r["alpha_items"] >= 45
    assert r["alpha_without_flagged"] == pytest.approx(kappa[("good1", "good2")], abs=0.05)  # 2 annotators
    json.dumps(r)  # the --json output
    # Stricter thresholds flag a careful annotator too; looser ones nobody.
    assert labels.report(min_accuracy=0.0, min_majority=0.0)["flagged"] == []


def test_preference_pairs_follow_the_unflagged_majority(tmp_path):
    labels = Labels(tmp_path / "db.sqlite", seed=0)
    labels.add_items(items(5))
    labels.add_items(items(5, start=100, gold="a"))
    ids = {r["prompt"]: r["id"] for r in labels.store.rows("SELECT id, prompt FROM label_items")}
    votes = {"question 0?": ("a", "a", "b"),      # a
             "question 1?": ("b", "b", "tie"),    # b
             "question 2?": ("tie", "tie", "a"),  # a tie is no pair
             "question 3?": ("a", "b", "tie"),    # no majority
             "question 4?": ("a", "b", "a")}      # a only with the flagged annotator's vote: no pair
    for prompt, choices in votes.items():
        for ann, choice in zip(("x", "y", "bad"), choices):
            labels.submit(ann, ids[prompt], choice)
    for i in range(100, 105):  # gold: x and y right, bad wrong (5 items: enough to flag)
        for ann in ("x", "y", "bad"):
            labels.submit(ann, ids[f"question {i}?"], "b" if ann == "bad" else "a")
    assert labels.report()["flagged"] == ["bad"]
    pairs = labels.preference_pairs()
    assert [p["prompt"] for p in pairs] == ["question 0?", "question 1?"]
    assert pairs[0]["chosen"] == "answer 0 A" and pairs[0]["rejected"] == "answer 0 B"
    assert pairs[1]["chosen"] == "answer 1 B" and pairs[1]["rejected"] == "answer 1 A"
    assert pairs[0]["votes"] == {"a": 2} and pairs[1]["votes"] == {"b": 2}
    assert pairs[0]["source"] == {"request_ids": ["chatcmpl-0a", "chatcmpl-0b"]}
    assert pairs[0]["item_id"] == ids["question 0?"]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmcycle label")
    add_label_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_import_report_export_round_trip(tmp_path, capsys):
    from llmcycle.tokenizer import train_tokenizer
    from llmcycle.train.posttrain.chat_data import Rejects, load_preferences

    db = str(tmp_path / "requests.sqlite")
    plain = [{k: v for k, v in it.items() if k != "gold"} for it in items(45)]
    assert run(["import", write_jsonl(tmp_path / "items.jsonl", plain), "--db", db]) == 0
    assert "added 45 new item(s) of 45 (0 gold)" in capsys.readouterr().out
    gold = [{**it, "gold": "a" if i % 2 else "b"} for i, it in enumerate(items(15, start=500))]
    assert run(["import", write_jsonl(tmp_path / "gold.jsonl", gold), "--gold", "--db", db]) == 0
    assert "(15 gold)" in capsys.readouterr().out
    with pytest.raises(LlmcycleError, match=r"items.jsonl:1: --gold needs"):
        run(["import", str(tmp_path / "items.jsonl"), "--gold", "--db", db])
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "a": "x", "b": "y"}\nnot json\n')
    with pytest.raises(LlmcycleError, match=r"broken.jsonl:2"):
        run(["import", str(tmp_path / "broken.jsonl"), "--db", db])

    simulated(db)  # the same items in the same database: label it as three annotators would on the page
    assert run(["report", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "Krippendorff's alpha (nominal)" in out and "good1 / good2" in out
    assert [line.split()[0] for line in out.splitlines() if "FLAGGED" in line] == ["random"]
    assert run(["report", "--json", "--db", db, "--min-accuracy", "0", "--min-majority", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["flagged"] == []

    out_file = tmp_path / "out" / "pairs.jsonl"
    assert run(["export", str(out_file), "--db", db]) == 0
    n = len(Labels(db).preference_pairs())
    assert f"wrote {n} preference pair(s)" in capsys.readouterr().out and n >= 30
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    texts = [json.dumps(r) for r in rows]
    tok = train_tokenizer(texts * 3, vocab_size=300)
    rejects = Rejects()
    examples = load_preferences(str(out_file), tok, 256, rejects)
    assert len(examples) == n and rejects.total() == 0
    first = examples[0]
    assert tok.decode(first.chosen_ids).startswith(rows[0]["chosen"][0]["content"])


def test_cli_needs_a_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with pytest.raises(LlmcycleError, match="give --db"):
        run(["report"])
