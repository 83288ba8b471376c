"""Agreement between annotators: Cohen's kappa for a pair, Krippendorff's alpha for any number with gaps, and
each annotator's quality (accuracy on gold items, agreement with the others' majority).

Pure numpy. Labels are any hashable values (the labelling page's 'a', 'b', 'tie', 'both_bad'); `None` is a
missing label. Checked against scikit-learn's `cohen_kappa_score` and the `krippendorff` package
(tests/test_agreement.py). One convention differs from both, on purpose: when chance agreement is already
perfect (every label in the data is the same category), kappa and alpha are 0/0; scikit-learn answers NaN and
`krippendorff` raises or answers NaN, here the answer is 1.0 (the annotators did agree, on everything), so a
report never shows NaN for a batch where everyone picked 'a'.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

LEVELS = ("nominal", "ordinal")
MIN_ITEMS = 5  # a quality measure over fewer items never flags an annotator


def _undefined(observed_agreement: float) -> float:
    # The one convention of the module docstring: chance agreement is 1, so kappa is 0/0.
    return 1.0 if observed_agreement >= 1.0 else 0.0


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two annotators' nominal labels of the same items (`a[i]`, `b[i]` label item i).

    (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e the chance agreement from each annotator's own
    label frequencies: equal to `sklearn.metrics.cohen_kappa_score(a, b)`. Where p_e is 1 (both gave one
    and the same category throughout) it returns 1.0 if p_o is 1 (always so, then) else 0.0, where
    scikit-learn returns NaN. ValueError for different lengths or no items."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: {len(a)} labels against {len(b)}.")
    if not len(a):
        raise ValueError("cohen_kappa: no items.")
    cats = {c: i for i, c in enumerate(dict.fromkeys([*a, *b]))}
    confusion = np.zeros((len(cats), len(cats)))
    np.add.at(confusion, ([cats[x] for x in a], [cats[y] for y in b]), 1.0)
    confusion /= len(a)
    p_o = float(np.trace(confusion))
    p_e = float(confusion.sum(axis=1) @ confusion.sum(axis=0))
    if p_e >= 1.0:
        return _undefined(p_o)
    return (p_o - p_e) / (1.0 - p_e)


def krippendorff_alpha(units: Sequence[Sequence[Hashable | None]], level: str = "nominal") -> float:
    """Krippendorff's alpha of a reliability matrix: one row per annotator, one column per item, None where
    an annotator gave no label (the orientation of the `krippendorff` package's `reliability_data`).

    alpha = 1 - D_o / D_e over the coincidence matrix of the pairable values (items with at least 2 labels;
    the rest carry no agreement information and are left out). `level` is "nominal" (any labels) or
    "ordinal" (labels that sort: ordinal distances by rank frequencies). NaN when fewer than 2 values are
    pairable; 1.0 where all pairable values are one category (the module docstring's convention)."""
    if level not in LEVELS:
        raise ValueError(f"krippendorff_alpha: level {level!r}; one of {', '.join(LEVELS)}.")
    rows = [list(r) for r in units]
    width = len(rows[0]) if rows else 0
    if any(len(r) != width for r in rows):
        raise ValueError("krippendorff_alpha: every annotator's row needs one entry per item.")
    present = {v for r in rows for v in r if v is not None}
    values = sorted(present) if level == "ordinal" else list(present)
    index = {v: i for i, v in enumerate(values)}
    counts = np.zeros((width, len(values)))  # counts[u, c]: how many annotators gave item u the value c
    for r in rows:
        for u, v in enumerate(r):
            if v is not None:
                counts[u, index[v]] += 1
    m = counts.sum(axis=1)
    counts, m = counts[m >= 2], m[m >= 2]
    if not len(m):
        return float("nan")
    # Coincidences: each ordered pair of labels of one item, weighted 1 / (m_u - 1).
    weighted = counts / (m - 1)[:, None]
    o = counts.T @ weighted - np.diag(weighted.sum(axis=0))
    n_c = o.sum(axis=0)
    n = n_c.sum()
    if level == "nominal":
        delta = 1.0 - np.eye(len(values))
    else:  # squared distance in cumulative rank frequency between the two values
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        rank = np.arange(len(values))
        lo, hi = np.minimum.outer(rank, rank), np.maximum.outer(rank, rank)
        delta = (cum[hi + 1] - cum[lo] - (n_c[lo] + n_c[hi]) / 2) ** 2
    d_o = float((o * delta).sum())
    d_e = float((np.outer(n_c, n_c) * delta).sum()) / (n - 1)
    if d_e <= 0.0:
        return _undefined(1.0 if d_o == 0.0 else 0.0)
    return 1.0 - d_o / d_e


def pairwise_kappa(labels: Mapping[Any, Mapping[str, Hashable]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Cohen's kappa of every pair of annotators over the items both labelled.

    `labels`: item id -> {annotator: label}. Keys of the answer are (ann1, ann2) with ann1 < ann2; values
    `{"kappa": float, "items": int}`. Pairs sharing fewer than 2 items are left out (one shared item says
    nothing about agreement beyond chance)."""
    shared: dict[tuple[str, str], tuple[list, list]] = {}
    for by_annotator in labels.values():
        for x, y in combinations(sorted(by_annotator), 2):
            a, b = shared.setdefault((x, y), ([], []))
            a.append(by_annotator[x])
            b.append(by_annotator[y])
    return {pair: {"kappa": cohen_kappa(a, b), "items": len(a)}
            for pair, (a, b) in sorted(shared.items()) if len(a) >= 2}


def majority(votes: Sequence[Hashable]) -> Hashable | None:
    """The most frequent label, or None when there is none or the top is tied."""
    top = Counter(votes).most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def annotator_quality(labels: Mapping[Any, Mapping[str, Hashable]], gold: Mapping[Any, Hashable],
                      min_accuracy: float = 0.7, min_majority: float = 0.6,
                      min_items: int = MIN_ITEMS) -> dict[str, dict[str, Any]]:
    """Each annotator's accuracy on gold items and agreement with the majority of the others.

    `labels`: item id -> {annotator: label}; `gold`: item id -> the known answer. Per annotator:
    `gold_items` (gold items labelled), `gold_accuracy` (share of them right; None without any),
    `majority_items` (items where at least 2 OTHER annotators gave labels and their most frequent label is
    not tied), `majority_agreement` (share of those where this annotator gave that label; None without any),
    `flagged` (accuracy below `min_accuracy` or agreement below `min_majority`; a measure over fewer than
    `min_items` items never flags: one unlucky item says little, and a flagged annotator's votes are
    dropped) and `why` (the failed measures in words, None when not flagged)."""
    out: dict[str, dict[str, Any]] = {}
    annotators = sorted({a for by_annotator in labels.values() for a in by_annotator})
    for ann in annotators:
        right = wrong = agree = disagree = 0
        for item, by_annotator in labels.items():
            if ann not in by_annotator:
                continue
            mine = by_annotator[ann]
            if item in gold and gold[item] is not None:
                right, wrong = (right + 1, wrong) if mine == gold[item] else (right, wrong + 1)
            others = [v for a, v in by_annotator.items() if a != ann]
            top = majority(others) if len(others) >= 2 else None
            if top is not None:
                agree, disagree = (agree + 1, disagree) if mine == top else (agree, disagree + 1)
        accuracy = right / (right + wrong) if right + wrong else None
        agreement = agree / (agree + disagree) if agree + disagree else None
        why = []
        if accuracy is not None and accuracy < min_accuracy and right + wrong >= min_items:
            why.append(f"gold accuracy {accuracy:.2f} < {min_accuracy:g} on {right + wrong} item(s)")
        if agreement is not None and agreement < min_majority and agree + disagree >= min_items:
            why.append(f"majority agreement {agreement:.2f} < {min_majority:g} on {agree + disagree} item(s)")
        out[ann] = {"gold_items": right + wrong, "gold_accuracy": accuracy, "majority_items": agree + disagree,
                    "majority_agreement": agreement, "flagged": bool(why), "why": "; ".join(why) or None}
    return out
