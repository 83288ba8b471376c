"""A/B tests (issue 18): the sticky split lands on its weights and holds per key, the statistics agree with
scipy and the textbook, an A/A test is rejected about alpha of the time while a planted difference in
feedback is found, and `ab_report` reads a real SQLite request log to the hand-computed numbers."""

import json
import math
import re

import numpy as np
import pytest
from scipy import stats

from llmcycle.errors import LlmcycleError
from llmcycle.improve.abtest import (
    ab_report,
    assign,
    bootstrap_diff,
    format_ab_report,
    sample_size_two_proportions,
    two_proportion_test,
)
from llmcycle.improve.feedback import ensure_feedback_schema
from llmcycle.monitor.store import LogStore

KEYS = [f"user-{i}" for i in range(2000)]


# --- the split -------------------------------------------------------------------------------------------

def test_split_lands_within_binomial_tolerance():
    got = [assign({"2": 0.7, "3": 0.3}, k) for k in KEYS]
    share = got.count("2") / len(KEYS)
    assert abs(share - 0.7) < 4 * math.sqrt(0.7 * 0.3 / len(KEYS)), share
    # weights need not sum to 1, and a zero weight is never drawn
    scaled = [assign({"2": 7, "3": 3, "4": 0}, k) for k in KEYS]
    assert scaled == got


def test_split_is_sticky_and_stable_and_salted():
    split = {"2": 0.7, "3": 0.3}
    first = [assign(split, k) for k in KEYS]
    assert all(assign(split, k) == v for k, v in zip(KEYS, first))
    assert [assign({"3": 0.3, "2": 0.7}, k) for k in KEYS] == first  # the dict's order does not matter
    # a nudged weight moves only the keys near the boundary: about 1% of them for 0.70 -> 0.71
    nudged = [assign({"2": 0.71, "3": 0.29}, k) for k in KEYS]
    moved = sum(a != b for a, b in zip(first, nudged))
    assert 0 < moved <= 0.03 * len(KEYS)
    assert all(a == "3" and b == "2" for a, b in zip(first, nudged) if a != b)
    # another salt is an independent draw: P(differ) = 2 * 0.7 * 0.3 = 0.42
    salted = [assign(split, k, salt="exp-2") for k in KEYS]
    differ = sum(a != b for a, b in zip(first, salted)) / len(KEYS)
    assert abs(differ - 0.42) < 4 * math.sqrt(0.42 * 0.58 / len(KEYS)), differ
    assert assign({"only": 1.0}, "anyone") == "only"


@pytest.mark.parametrize("split", [{}, {"a": -0.1, "b": 1.0}, {"a": 0.0, "b": 0}, {"a": float("nan")}])
def test_bad_split(split):
    with pytest.raises(ValueError):
        assign(split, "k")


# --- the statistics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("counts", [(550, 1000, 700, 1000), (30, 120, 45, 150), (5, 40, 2, 60)])
def test_two_proportion_test_matches_scipy(counts):
    sa, na, sb, nb = counts
    t = two_proportion_test(sa, na, sb, nb)
    # scipy's chi-square test of the 2x2 table without Yates' correction is the pooled z test squared
    chi2, p, _, _ = stats.chi2_contingency([[sa, na - sa], [sb, nb - sb]], correction=False)
    assert t["z"] ** 2 == pytest.approx(chi2, rel=1e-9)
    assert t["p_value"] == pytest.approx(p, rel=1e-9)
    assert t["p_value"] == pytest.approx(2 * stats.norm.sf(abs(t["z"])), rel=1e-9)
    assert math.copysign(1, t["z"]) == math.copysign(1, sb / nb - sa / na)
    # the interval: Wald, unpooled
    pa, pb = sa / na, sb / nb
    half = stats.norm.ppf(0.975) * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    assert (t["ci_low"], t["ci_high"]) == pytest.approx((pb - pa - half, pb - pa + half), rel=1e-9)
    assert two_proportion_test(0, 10, 0, 20)["p_value"] == 1.0  # no variance at all: nothing to reject
    with pytest.raises(ValueError):
        two_proportion_test(3, 0, 1, 5)


def test_sample_size_textbook_and_simulated_power():
    # Fleiss (no continuity correction): n = (z_.975 sqrt(2 pbar qbar) + z_.8 sqrt(p1 q1 + p2 q2))^2 / d^2
    assert sample_size_two_proportions(0.5, 0.6) == 388
    assert sample_size_two_proportions(0.6, 0.5) == 388
    assert sample_size_two_proportions(0.5, 0.6, power=0.9) > 388
    with pytest.raises(ValueError):
        sample_size_two_proportions(0.5, 0.5)
    # and it delivers its power: at n = 388 per arm, about 80% of simulated 0.5 vs 0.6 tests reject
    rng = np.random.default_rng(0)
    a, b = rng.binomial(388, 0.5, 4000), rng.binomial(388, 0.6, 4000)
    power = np.mean([two_proportion_test(int(x), 388, int(y), 388)["p_value"] < 0.05 for x, y in zip(a, b)])
    assert 0.75 < power < 0.85, power


def test_aa_false_positive_rate_near_alpha_and_planted_difference_found():
    rng = np.random.default_rng(1)
    n, reps = 1000, 200
    same = [two_proportion_test(int(x), n, int(y), n)["p_value"] < 0.05
            for x, y in zip(rng.binomial(n, 0.6, reps), rng.binomial(n, 0.6, reps))]
    assert 0.01 <= np.mean(same) <= 0.10, np.mean(same)
    planted = [two_proportion_test(int(x), n, int(y), n) for x, y in
               zip(rng.binomial(n, 0.55, reps), rng.binomial(n, 0.70, reps))]
    assert np.mean([t["p_value"] < 0.05 and t["difference"] > 0 for t in planted]) > 0.95


def test_bootstrap_diff():
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 0.5, 400), rng.normal(1.2, 0.5, 300)
    r = bootstrap_diff(a, b, iterations=2000, seed=0)
    assert r["difference"] == pytest.approx(b.mean() - a.mean())
    # close to the normal-theory interval for a difference of means
    half = 1.96 * math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert r["ci_low"] == pytest.approx(r["difference"] - half, abs=0.015)
    assert r["ci_high"] == pytest.approx(r["difference"] + half, abs=0.015)
    assert r["p_value"] < 0.01
    assert bootstrap_diff(a, b, iterations=2000, seed=0) == r  # deterministic for a seed
    # A/A: the interval excludes 0 about 5% of the time
    hits = [bootstrap_diff(x, y, iterations=500, seed=i)["p_value"] < 0.05
            for i, (x, y) in enumerate(zip(rng.exponential(1.0, (100, 100)), rng.exponential(1.0, (100, 100))))]
    assert np.mean(hits) <= 0.12, np.mean(hits)
    with pytest.raises(ValueError):
        bootstrap_diff([], [1.0])


# --- the report on a real request log ---------------------------------------------------------------------

def make_db(tmp_path, requests, feedback):
    from llmcycle.monitor.request_log import ensure_schema

    store = LogStore(tmp_path / "requests.db")
    con = store.connect()
    ensure_schema(store, con)
    ensure_feedback_schema(store, con)
    con.executemany('INSERT INTO requests ("time", request_id, model, variant, status, total_s, ttft_s, cost, '
                    "output_perplexity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(*r, None)[:9] for r in requests])
    con.executemany('INSERT INTO feedback ("time", request_id, positive, score) VALUES (?, ?, ?, ?)',
                    [(*f, None)[:4] for f in feedback])
    con.commit()
    con.close()
    return store


def test_report_numbers_by_hand(tmp_path):
    t = 1000.0
    store = make_db(tmp_path, [
        (t, "r1", "chat", "1", 200, 1.0, 0.1, 0.01, 2.0),
        (t, "r2", "chat", "1", 200, 3.0, 0.3, 0.03, 4.0),
        (t, "r3", "chat", "1", 500, 0.05, None, None),
        (t, "r4", "chat", "1", 200, 2.0, 0.2, 0.02),
        (t, "s1", "chat", "2", 200, 4.0, 0.5, 0.05),
        (t, "s2", "chat", "2", 429, 0.01, None, None),
        (t, "s3", "chat", "2", 200, 6.0, 0.7, 0.04),
        (t, "x1", "other", "1", 200, 9.0, 0.9, 0.09),   # another name
        (t, "x2", "chat", None, 200, 9.0, 0.9, 0.09),   # not in the test
        (10.0, "x3", "chat", "1", 500, 9.0, 0.9, 0.09),  # before `since`
    ], [
        (t + 1, "r1", 1), (t + 2, "r1", 0),      # the latest verdict counts: negative
        (t + 1, "r2", 1, 5), (t + 2, "r2", None),   # a bare comment later does not erase the rating
        (t + 1, "s1", 1),
        (t + 1, "x1", 0), (t + 1, "x3", 0),
    ])
    rep = ab_report(store, "chat", since=500.0)
    json.dumps(rep)
    assert rep["control"] == "1"  # the most requests
    v1, v2 = rep["variants"]
    assert v1 == pytest.approx({
        "variant": "1", "requests": 4, "errors": 1, "error_rate": 0.25, "latency_p50_s": 2.0, "latency_p95_s": 3.0,
        "ttft_mean_s": 0.2, "cost": 0.06, "cost_per_request": 0.02, "feedback": 4, "feedback_rate": 0.5,
        "rated": 2, "positive": 1, "positive_rate": 0.5, "score_mean": 5.0, "output_perplexity_mean": 3.0})
    assert v2 == pytest.approx({
        "variant": "2", "requests": 3, "errors": 1, "error_rate": 1 / 3, "latency_p50_s": 5.0, "latency_p95_s": 6.0,
        "ttft_mean_s": 0.6, "cost": 0.09, "cost_per_request": 0.045, "feedback": 1, "feedback_rate": 1 / 3,
        "rated": 1, "positive": 1, "positive_rate": 1.0, "score_mean": None, "output_perplexity_mean": None})
    (cmp,) = rep["comparisons"]
    assert cmp["latency"]["difference"] == pytest.approx(5.0 - 2.0)
    assert cmp["errors"]["difference"] == pytest.approx(1 / 3 - 1 / 4)
    assert cmp["positive"]["difference"] == pytest.approx(0.5)
    assert cmp["sample_size_per_arm"] == sample_size_two_proportions(0.5, 0.55)
    assert (cmp["decision"], cmp["verdict"]) == ("insufficient", "not enough data")
    # a control already at 100% positive: the effect to detect is downwards
    (back,) = ab_report(store, "chat", since=500.0, control="2")["comparisons"]
    assert back["sample_size_per_arm"] == sample_size_two_proportions(1.0, 0.95)
    # without `since` the old error counts
    assert ab_report(store, "chat")["variants"][0]["errors"] == 2
    text = format_ab_report(rep)
    assert "1 (control)" in text and "2 vs 1: not enough data" in text and "25.0%" in text
    assert ab_report(store, "nobody")["variants"] == []
    with pytest.raises(LlmcycleError, match="variants: 1, 2"):
        ab_report(store, "chat", control="9")
    with pytest.raises(LlmcycleError):
        ab_report(tmp_path / "missing.db", "chat")


def simulate(rng, variant, n, positive_rate, start):
    """n requests of one variant with 2% errors, lognormal latency, and feedback on 60% of them."""
    reqs, fb = [], []
    for i in range(n):
        rid = f"{variant}-{start + i}"
        err = rng.random() < 0.02
        reqs.append((1000.0 + i, rid, "chat", variant, 500 if err else 200, float(rng.lognormal(0, 0.3)),
                     0.05, 0.001))
        if not err and rng.random() < 0.6:
            fb.append((2000.0 + i, rid, int(rng.random() < positive_rate)))
    return reqs, fb


def test_report_detects_planted_difference(tmp_path):
    rng = np.random.default_rng(3)
    r1, f1 = simulate(rng, "1", 1200, 0.55, 0)
    r2, f2 = simulate(rng, "2", 1000, 0.70, 0)
    store = make_db(tmp_path, r1 + r2, f1 + f2)
    rep = ab_report(store, "chat")
    assert rep["control"] == "1"
    (cmp,) = rep["comparisons"]
    assert (cmp["decision"], cmp["verdict"]) == ("better", "better"), format_ab_report(rep)
    assert 0.08 < cmp["positive"]["difference"] < 0.22
    assert cmp["positive"]["ci_low"] > 0
    # seen from the challenger's side, the control is the worse one
    (back,) = ab_report(store, "chat", control="2")["comparisons"]
    assert back["verdict"] == "worse"
    assert "2 vs 1: better" in format_ab_report(rep)


def test_report_aa_is_inconclusive(tmp_path):
    rng = np.random.default_rng(4)
    r1, f1 = simulate(rng, "1", 1000, 0.6, 0)
    r2, f2 = simulate(rng, "2", 1000, 0.6, 0)
    rep = ab_report(make_db(tmp_path, r1 + r2, f1 + f2), "chat")
    (cmp,) = rep["comparisons"]
    assert cmp["decision"] == "inconclusive", format_ab_report(rep)
    # ~1,500 rated per arm detect +0.05 at the control's rate (~0.56); ~590 are rated so far, 0.59 per request
    m = re.fullmatch(r"no significant difference yet \(need ~(\d+) more per arm\)", cmp["verdict"])
    assert m and 1200 < int(m.group(1)) < 1800, cmp["verdict"]


def test_report_orders_versions_as_numbers(tmp_path):
    rows = [(1.0, f"{v}-{i}", "chat", v, 200, 1.0, 0.1, None) for v, n in (("2", 3), ("10", 2), ("9", 2))
            for i in range(n)]
    rep = ab_report(make_db(tmp_path, rows, []), "chat")
    assert rep["control"] == "2" and [c["variant"] for c in rep["comparisons"]] == ["9", "10"]
    assert rep["variants"][0]["cost"] is None and rep["variants"][0]["positive_rate"] is None
    assert rep["comparisons"][0]["verdict"] == "not enough data"
    assert "2 (control)" in format_ab_report(rep)
