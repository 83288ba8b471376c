"""Agreement metrics against their reference implementations (scikit-learn's Cohen's kappa, the
`krippendorff` package) on label sets generated here, and annotator quality on planted annotators."""

import math
import random

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from llmcycle.improve.agreement import (
    annotator_quality,
    cohen_kappa,
    krippendorff_alpha,
    majority,
    pairwise_kappa,
)

CATEGORIES = ["a", "b", "tie", "both_bad"]
# The references warn where kappa or alpha is 0/0 (the convention the tests pin down); nothing to see.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def random_matrix(rng: random.Random) -> list[list[str | None]]:
    """2-6 annotators x 2-30 items over 2-4 categories, some labels missing, some annotators biased."""
    n_ann, n_items, k = rng.randint(2, 6), rng.randint(2, 30), rng.randint(2, 4)
    truth = [rng.randrange(k) for _ in range(n_items)]
    missing = rng.choice([0.0, 0.2, 0.5])
    rows = []
    for _ in range(n_ann):
        skill = rng.random()  # chance of the true label, else a random one: agreement varies widely
        rows.append([None if rng.random() < missing else
                     CATEGORIES[truth[i] if rng.random() < skill else rng.randrange(k)] for i in range(n_items)])
    return rows


def reference_alpha(rows, level="nominal") -> float:
    codes = {c: i for i, c in enumerate(CATEGORIES)}  # ranks (ints) pass as they are
    data = np.array([[np.nan if v is None else codes.get(v, v) for v in r] for r in rows], dtype=float)
    return krippendorff.alpha(reliability_data=data, level_of_measurement=level)


def as_ranks(rows):
    """Ordinal labels must sort in their order: CATEGORIES' index, as the reference gets it."""
    return [[None if v is None else CATEGORIES.index(v) for v in r] for r in rows]


def test_cohen_kappa_matches_sklearn():
    rng = random.Random(0)
    checked = 0
    for _ in range(500):
        n, k = rng.randint(1, 40), rng.randint(2, 4)
        skill = rng.random()
        a = [rng.choice(CATEGORIES[:k]) for _ in range(n)]
        b = [x if rng.random() < skill else rng.choice(CATEGORIES[:k]) for x in a]
        # Where chance agreement is 1 scikit-learn answers NaN; replace_undefined_by=1.0 is our convention.
        expected = cohen_kappa_score(a, b, replace_undefined_by=1.0)
        assert cohen_kappa(a, b) == pytest.approx(expected, abs=1e-9), (a, b)
        checked += not (len(set(a)) == 1 and set(a) == set(b))
    assert checked > 400  # the degenerate case is not what most of the loop tested


def test_cohen_kappa_known_values_and_errors():
    assert cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == 1.0
    assert cohen_kappa(["a", "b"], ["b", "a"]) == -1.0
    assert cohen_kappa(["a", "a", "a"], ["a", "a", "a"]) == 1.0  # scikit-learn: NaN (documented)
    assert math.isnan(cohen_kappa_score(["a", "a"], ["a", "a"]))
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        cohen_kappa([], [])


@pytest.mark.parametrize("level", ["nominal", "ordinal"])
def test_krippendorff_alpha_matches_the_package(level):
    rng = random.Random(1 if level == "nominal" else 2)
    checked = 0
    for _ in range(400):
        rows = random_matrix(rng)
        if level == "ordinal":
            rows = as_ranks(rows)
        try:
            expected = reference_alpha(rows, level)
        except ValueError:  # the package refuses a single value in the whole matrix; we answer 1.0
            assert krippendorff_alpha(rows, level) == 1.0 or math.isnan(krippendorff_alpha(rows, level))
            continue
        got = krippendorff_alpha(rows, level)
        if math.isnan(expected):  # nothing pairable (NaN here too), or one pairable value (1.0 here)
            assert math.isnan(got) or got == 1.0
            continue
        assert got == pytest.approx(expected, abs=1e-9), rows
        checked += 1
    assert checked > 300


def test_krippendorff_alpha_edges():
    assert krippendorff_alpha([["a", "b", "a"], ["a", "b", "a"]]) == 1.0
    assert math.isnan(krippendorff_alpha([["a", None], [None, "b"]]))  # no item has 2 labels
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) == 1.0
    # A worked example: 3 annotators, 4 items, one disagreement.
    rows = [["a", "b", "a", "b"], ["a", "b", "a", "a"], ["a", "b", None, "b"]]
    assert krippendorff_alpha(rows) == pytest.approx(reference_alpha(rows), abs=1e-12)
    with pytest.raises(ValueError):
        krippendorff_alpha([["a", "b"], ["a"]])
    with pytest.raises(ValueError):
        krippendorff_alpha([["a", "b"], ["a", "b"]], level="interval")


def test_pairwise_kappa_over_shared_items():
    labels = {1: {"x": "a", "y": "a", "z": "b"}, 2: {"x": "b", "y": "b"}, 3: {"x": "a", "y": "b", "z": "a"},
              4: {"z": "tie"}}
    pairs = pairwise_kappa(labels)
    assert set(pairs) == {("x", "y"), ("x", "z"), ("y", "z")}
    assert pairs[("x", "y")]["items"] == 3
    assert pairs[("x", "y")]["kappa"] == pytest.approx(cohen_kappa_score(["a", "b", "a"], ["a", "b", "b"]))
    assert pairs[("x", "z")] == {"kappa": cohen_kappa(["a", "a"], ["b", "a"]), "items": 2}
    # One shared item is no pair.
    assert pairwise_kappa({1: {"x": "a", "y": "a"}, 2: {"x": "b"}}) == {}


def test_majority():
    assert majority(["a", "a", "b"]) == "a"
    assert majority(["a", "b"]) is None
    assert majority([]) is None
    assert majority(["tie"]) == "tie"


def simulate(seed: int, n_items: int = 80, good: int = 4, gold_every: int = 4):
    """`good` annotators right 95% of the time and one ("random") who picks at random; every 4th item gold."""
    rng = random.Random(seed)
    truth = {i: rng.choice(["a", "b", "a", "b", "tie"]) for i in range(n_items)}
    gold = {i: t for i, t in truth.items() if i % gold_every == 0}
    labels = {}
    for i, t in truth.items():
        labels[i] = {f"good{j}": t if rng.random() < 0.95 else rng.choice(CATEGORIES) for j in range(good)}
        labels[i]["random"] = rng.choice(CATEGORIES)
    return labels, gold


@pytest.mark.parametrize("seed", range(5))
def test_annotator_quality_flags_the_random_annotator(seed):
    labels, gold = simulate(seed)
    q = annotator_quality(labels, gold)
    assert [a for a, v in q.items() if v["flagged"]] == ["random"]
    r = q["random"]
    assert r["gold_items"] == 20 and r["majority_items"] > 60 and "accuracy" in r["why"]
    assert r["gold_accuracy"] < 0.7 and r["majority_agreement"] < 0.6
    for a in ("good0", "good1", "good2", "good3"):
        assert q[a]["gold_accuracy"] > 0.7 and q[a]["majority_agreement"] > 0.6 and q[a]["why"] is None


def test_annotator_quality_counts():
    labels = {1: {"x": "a", "y": "a", "z": "a"},    # gold a: x right; majority of others a
              2: {"x": "b", "y": "a", "z": "a"},    # x disagrees with the others' majority
              3: {"x": "a", "y": "a", "z": "b"},    # others tie (a vs b): skipped for x
              4: {"x": "a", "y": "b"}}              # only one other: skipped for x
    q = annotator_quality(labels, {1: "a", 4: "b"}, min_accuracy=0.7, min_majority=0.6, min_items=1)
    assert q["x"]["gold_items"] == 2 and q["x"]["gold_accuracy"] == 0.5
    assert q["x"]["majority_items"] == 2 and q["x"]["majority_agreement"] == 0.5
    assert q["x"]["flagged"] and "gold accuracy 0.50" in q["x"]["why"] and "majority agreement 0.50" in q["x"]["why"]
    assert q["y"]["gold_accuracy"] == 1.0 and q["y"]["gold_items"] == 2
    # z: right on its one gold item, with the others' majority on item 1, against it on item 3.
    assert q["z"]["gold_items"] == 1 and q["z"]["gold_accuracy"] == 1.0
    assert q["z"]["majority_items"] == 2 and q["z"]["majority_agreement"] == 0.5
    assert q["z"]["why"] == "majority agreement 0.50 < 0.6 on 2 item(s)"
    # Over fewer than min_items items (5 by default) a measure never flags.
    assert not any(v["flagged"] for v in annotator_quality(labels, {1: "a", 4: "b"}).values())
    lone = annotator_quality({1: {"w": "a"}}, {}, min_items=0)
    assert lone["w"] == {"gold_items": 0, "gold_accuracy": None, "majority_items": 0, "majority_agreement": None,
                         "flagged": False, "why": None}
