"""A/B tests: the sticky traffic split, the statistics, and the per-variant report read from the request log.

`assign(split, sticky_key)` picks a variant by hashing the key: the same user (or key) always gets the same
variant, and nudging a weight moves only the keys near the boundary it shifts. The server records the
variant that answered on every request-log row (`variant`), feedback joins its request by id, and
`ab_report(store, name)` compares the variants of one registry name from those two tables alone.

The statistics are the textbook ones, with the normal approximation throughout:
- `two_proportion_test`: z test with the pooled proportion, two-sided p, Wald (unpooled) interval on the
  difference b - a;
- `bootstrap_diff`: percentile interval on the difference of means b - a (latency has no normal shape);
- `sample_size_two_proportions`: per arm, Fleiss' formula without continuity correction.

The verdict of a variant against the control (`VERDICT_RULE`) reads the positive-feedback test and the
error-rate test at `alpha`; latency and cost are reported beside it, never part of it.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmcycle.errors import LlmcycleError
from llmcycle.monitor.store import LogStore, as_store

# Fewer rated requests (feedback with a verdict) than this in either arm and no test is trusted: the normal
# approximation wants several successes and failures per arm, and early peeks are the noisiest.
MIN_RATED = 30

VERDICT_RULE = (
    "worse: the error rate significantly higher than the control's (two-proportion z test, p < alpha, "
    f"at least {MIN_RATED} requests per arm), or positive feedback significantly lower; better: positive "
    "feedback significantly higher and the error rate not significantly higher; not enough data: fewer than "
    f"{MIN_RATED} rated requests in either arm; otherwise no significant difference, with the requests per "
    "arm still needed to detect min_effect on the positive rate at the control's rate"
)


def assign(split: dict[str, float], sticky_key: str, salt: str = "") -> str:
    """The variant of `split` ({variant: weight}) that `sticky_key` (a user, or an API key's id) gets.

    sha256(salt + sticky_key) becomes a uniform number u in [0, 1), and u falls in one variant's share of
    the cumulative, normalized weights, taken in sorted-name order. The same key always gets the same
    variant; changing a weight slightly reassigns only the keys near the boundaries it moves; another `salt`
    (one per experiment) draws an independent split. ValueError for an empty split, a negative or
    non-finite weight, or weights that are all zero."""
    if not split:
        raise ValueError("an A/B split needs at least one variant.")
    for v, w in split.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"variant {v!r}: a weight must be a finite number >= 0, not {w!r}.")
    total = float(sum(split.values()))
    if total <= 0:
        raise ValueError("an A/B split needs at least one variant with a positive weight.")
    digest = hashlib.sha256((salt + sticky_key).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    cum, last = 0.0, None
    for v in sorted(split):
        if split[v] <= 0:
            continue  # a zero weight owns no interval, even where rounding would give it one
        cum += split[v] / total
        last = v
        if u < cum:
            return v
    return last  # u just under 1 and the cumulative sum rounded below it


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def two_proportion_test(success_a: int, n_a: int, success_b: int, n_b: int,
                        confidence: float = 0.95) -> dict[str, float]:
    """Two-sided z test of p_b == p_a from counts (b is the challenger, a the control).

    The test uses the pooled proportion (its null: one common rate); the interval on `difference`
    (p_b - p_a) is Wald's, unpooled, at `confidence`. With no variance at all (every outcome identical in
    both arms) z is 0 and p is 1. ValueError for an empty arm or counts out of range."""
    for s, n in ((success_a, n_a), (success_b, n_b)):
        if n <= 0 or not 0 <= s <= n:
            raise ValueError(f"successes must be in 0..n and n > 0; got {s} of {n}.")
    p_a, p_b = success_a / n_a, success_b / n_b
    diff = p_b - p_a
    pooled = (success_a + success_b) / (n_a + n_b)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = diff / se0 if se0 > 0 else 0.0
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    half = _z(confidence) * se
    return {"p_a": p_a, "p_b": p_b, "n_a": n_a, "n_b": n_b, "difference": diff, "z": z,
            "p_value": math.erfc(abs(z) / math.sqrt(2)), "ci_low": diff - half, "ci_high": diff + half,
            "confidence": confidence}


def bootstrap_diff(a: Sequence[float], b: Sequence[float], iterations: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> dict[str, float]:
    """Bootstrap of mean(b) - mean(a): each iteration resamples both arms with replacement.

    Returns the observed `difference`, the percentile interval (`ci_low`, `ci_high`) at `confidence`, and
    `p_value`: twice the smaller share of resampled differences on either side of 0 (capped at 1), a
    rough two-sided p. Deterministic for a seed. ValueError for an empty arm."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("bootstrap_diff needs at least one value in each arm.")
    rng = np.random.default_rng(seed)
    diffs = np.empty(iterations)
    # resample in chunks of about 4M draws, so a long log never allocates iterations x n at once
    chunk = max(1, 4_000_000 // max(xa.size, xb.size))
    for start in range(0, iterations, chunk):
        k = min(chunk, iterations - start)
        ma = xa[rng.integers(0, xa.size, (k, xa.size))].mean(axis=1)
        mb = xb[rng.integers(0, xb.size, (k, xb.size))].mean(axis=1)
        diffs[start:start + k] = mb - ma
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return {"difference": float(xb.mean() - xa.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "p_value": p, "confidence": confidence, "iterations": iterations}


def sample_size_two_proportions(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Observations per arm for a two-sided test at `alpha` to detect p_a vs p_b with `power`.

    n = (z_{1-alpha/2} sqrt(2 pbar (1 - pbar)) + z_{power} sqrt(p_a (1 - p_a) + p_b (1 - p_b)))^2
        / (p_a - p_b)^2,  pbar = (p_a + p_b) / 2,
    rounded up (Fleiss, without continuity correction: 0.5 vs 0.6 at 0.05 and 0.8 needs 388).
    ValueError for rates outside [0, 1] or equal rates (no finite n detects no difference)."""
    if not (0 <= p_a <= 1 and 0 <= p_b <= 1) or p_a == p_b:
        raise ValueError(f"two different rates in [0, 1] are needed; got {p_a} and {p_b}.")
    nd = statistics.NormalDist()
    za, zb = nd.inv_cdf(1 - alpha / 2), nd.inv_cdf(power)
    pbar = (p_a + p_b) / 2
    root = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))
    return math.ceil(root**2 / (p_a - p_b) ** 2)


def ab_report(store: LogStore | str | Path, name: str, since: float | None = None, alpha: float = 0.05,
              control: str | None = None, min_effect: float = 0.05) -> dict[str, Any]:
    """Every variant of the model name `name` compared with the control, from the monitor's database.

    Rows: requests with `model == name` and a variant (since `since`, unix time), and their feedback.
    Per variant (`variants`, the control first): requests; errors (status >= 400) and error rate; latency
    p50 / p95 of `total_s` and mean `ttft_s` over the successful requests (an error's time measures how
    fast it failed, not the model; p95 is the nearest-rank value, as in `llmcycle monitor usage`); total
    cost and cost per request (over the requests that have a cost; None when none has); feedback rows;
    feedback rate (requests with any feedback / requests); rated requests (with a positive-or-negative
    verdict: each request's latest feedback row that has one) and their positive rate.

    `control` is the variant given, or the one with the most requests. Each other variant has a
    `comparisons` entry: the two-proportion test on positive feedback (`positive`, None without rated
    requests in both arms), on errors (`errors`), the bootstrap on mean latency (`latency`, seconds, variant
    minus control), the rated requests per arm needed to detect `min_effect` on the positive rate at the
    control's rate, `decision` ("better", "worse", "inconclusive", "insufficient") and the `verdict` text
    (`VERDICT_RULE`). Everything is JSON-serializable. LlmcycleError for a missing SQLite file or an unknown
    control; ValueError for alpha or min_effect outside (0, 1)."""
    from llmcycle.improve.feedback import ensure_feedback_schema
    from llmcycle.monitor.request_log import ensure_schema

    if not (0 < alpha < 1 and 0 < min_effect < 1):
        raise ValueError(f"alpha and min_effect must lie in (0, 1); got {alpha} and {min_effect}.")
    store = as_store(store)
    if not store.exists():
        raise LlmcycleError(f"no request log at {store}.")
    con = store.connect()
    try:  # a log written before A/B tests gains the variant column and an empty feedback table
        ensure_schema(store, con)
        ensure_feedback_schema(store, con)
    finally:
        con.close()
    where, params = 'model = ? AND variant IS NOT NULL', [name]
    if since is not None:
        where, params = where + ' AND "time" >= ?', params + [since]
    requests = store.rows('SELECT request_id, variant, status, total_s, ttft_s, cost, output_perplexity FROM requests '
                          f'WHERE {where}', params)
    feedback = store.rows("SELECT request_id, positive, score FROM feedback WHERE request_id IN "
                          f"(SELECT request_id FROM requests WHERE {where}) ORDER BY id", params)

    fb_rows: dict[str, int] = {}       # request id -> feedback rows
    verdict_of: dict[str, int] = {}    # request id -> its latest non-null `positive` (rows come oldest first)
    score_of: dict[str, int] = {}      # request id -> its latest 1-5 score
    for f in feedback:
        rid = f["request_id"]
        fb_rows[rid] = fb_rows.get(rid, 0) + 1
        if f["positive"] is not None:
            verdict_of[rid] = int(f["positive"])
        if f["score"] is not None:
            score_of[rid] = int(f["score"])

    groups: dict[str, list[dict]] = {}
    for r in requests:
        groups.setdefault(str(r["variant"]), []).append(r)
    stats = {v: _variant_stats(v, rs, fb_rows, verdict_of, score_of) for v, rs in groups.items()}
    samples = {v: [r["total_s"] for r in rs if _ok(r) and r["total_s"] is not None] for v, rs in groups.items()}

    report: dict[str, Any] = {"name": name, "since": since, "alpha": alpha, "min_effect": min_effect,
                              "control": None, "variants": [], "comparisons": [], "rule": VERDICT_RULE}
    if not stats:
        if control is not None:
            raise LlmcycleError(f"control {control!r}: {name!r} has no A/B traffic in the request log.")
        return report
    if control is None:
        control = min(stats, key=lambda v: (-stats[v]["requests"], _order(v)))
    elif str(control) not in stats:
        raise LlmcycleError(f"control {control!r} is not a variant of {name!r}; variants: "
                            f"{', '.join(sorted(stats, key=_order))}.")
    control = str(control)
    others = sorted((v for v in stats if v != control), key=_order)
    report["control"] = control
    report["variants"] = [stats[v] for v in [control, *others]]
    report["comparisons"] = [_compare(stats[control], stats[v], samples[control], samples[v], alpha, min_effect)
                             for v in others]
    return report


def _ok(r: dict) -> bool:
    return (r["status"] or 0) < 400


def _order(v: str) -> tuple:
    """Versions sort as numbers ("2" before "10"), other names after them, alphabetically."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def _variant_stats(variant: str, rows: list[dict], fb_rows: dict[str, int], verdict_of: dict[str, int],
                   score_of: dict[str, int]) -> dict:
    n = len(rows)
    errors = sum(1 for r in rows if not _ok(r))
    totals = sorted(r["total_s"] for r in rows if _ok(r) and r["total_s"] is not None)
    ttfts = [r["ttft_s"] for r in rows if _ok(r) and r["ttft_s"] is not None]
    costs = [r["cost"] for r in rows if r["cost"] is not None]
    ids = {r["request_id"] for r in rows if r["request_id"] is not None}
    rated = [verdict_of[i] for i in ids if i in verdict_of]
    scores = [score_of[i] for i in ids if i in score_of]
    ppl = [r["output_perplexity"] for r in rows if _ok(r) and r["output_perplexity"] is not None]
    with_feedback = sum(1 for i in ids if i in fb_rows)
    return {
        "variant": variant, "requests": n, "errors": errors, "error_rate": errors / n,
        "latency_p50_s": statistics.median(totals) if totals else None,
        "latency_p95_s": totals[min(len(totals) - 1, int(0.95 * len(totals)))] if totals else None,
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "cost": sum(costs) if costs else None,
        "cost_per_request": sum(costs) / len(costs) if costs else None,
        "feedback": sum(fb_rows.get(i, 0) for i in ids),
        "feedback_rate": with_feedback / n,
        "rated": len(rated), "positive": sum(rated),
        "positive_rate": sum(rated) / len(rated) if rated else None,
        "score_mean": statistics.fmean(scores) if scores else None,  # the 1-5 scores given
        "output_perplexity_mean": statistics.fmean(ppl) if ppl else None,  # the model's own surprise at its answers
    }


def _compare(c: dict, v: dict, lat_c: list[float], lat_v: list[float], alpha: float, min_effect: float) -> dict:
    out: dict[str, Any] = {"variant": v["variant"], "control": c["variant"], "positive": None,
                           "errors": two_proportion_test(c["errors"], c["requests"], v["errors"], v["requests"]),
                           "latency": bootstrap_diff(lat_c, lat_v) if lat_c and lat_v else None,
                           "sample_size_per_arm": None, "more_requests_per_arm": None}
    if c["rated"] and v["rated"]:
        out["positive"] = two_proportion_test(c["positive"], c["rated"], v["positive"], v["rated"])
    if c["positive_rate"] is not None:
        p = c["positive_rate"]
        target = p + min_effect if p + min_effect <= 1 else p - min_effect
        if 0 <= target <= 1 and min_effect > 0:
            need = sample_size_two_proportions(p, target, alpha)
            out["sample_size_per_arm"] = need
            # rated requests still missing, turned into requests at each arm's own share of rated requests
            more = [math.ceil(max(0, need - s["rated"]) * s["requests"] / s["rated"]) if s["rated"] else None
                    for s in (c, v)]
            out["more_requests_per_arm"] = None if None in more else max(more)
    out["decision"], out["verdict"] = _verdict(out, c, v, alpha, min_effect)
    return out


def _verdict(cmp: dict, c: dict, v: dict, alpha: float, min_effect: float) -> tuple[str, str]:
    """(decision, verdict text) of one comparison: `VERDICT_RULE`."""
    err, pos = cmp["errors"], cmp["positive"]
    # errors need no feedback: a broken variant is worse before anyone rates it
    if min(c["requests"], v["requests"]) >= MIN_RATED and err["p_value"] < alpha and err["difference"] > 0:
        return "worse", "worse"
    if pos is None or min(c["rated"], v["rated"]) < MIN_RATED:
        return "insufficient", "not enough data"
    if pos["p_value"] < alpha:
        return ("better", "better") if pos["difference"] > 0 else ("worse", "worse")
    more = cmp["more_requests_per_arm"]
    if more:
        return "inconclusive", f"no significant difference yet (need ~{more} more per arm)"
    return "inconclusive", f"no significant difference (enough data to detect a change of {min_effect:g})"


def format_ab_report(report: dict[str, Any]) -> str:
    """`ab_report`'s dict as plain text: one table row per variant, then one verdict line per comparison."""
    name = report["name"]
    if not report["variants"]:
        return f"{name}: no A/B traffic in the request log (no request with a variant)."
    head = ("variant", "requests", "errors", "p50 s", "p95 s", "ttft s", "cost/req", "feedback", "rated",
            "positive", "score", "ppl")
    body = []
    for s in report["variants"]:
        label = s["variant"] + (" (control)" if s["variant"] == report["control"] else "")
        body.append((label, str(s["requests"]), _pct(s["error_rate"]), _num(s["latency_p50_s"]),
                     _num(s["latency_p95_s"]), _num(s["ttft_mean_s"]), _num(s["cost_per_request"], 6),
                     _pct(s["feedback_rate"]), str(s["rated"]), _pct(s["positive_rate"]), _num(s["score_mean"]),
                     _num(s["output_perplexity_mean"])))
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [f"A/B report for {name} (alpha {report['alpha']:g}, control {report['control']})", ""]
    for row in [head, *body]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("")
    for c in report["comparisons"]:
        parts = []
        if c["positive"] is not None:
            parts.append("positive " + _test_text(c["positive"]))
        parts.append("errors " + _test_text(c["errors"]))
        if c["latency"] is not None:
            lt = c["latency"]
            parts.append(f"mean latency {lt['difference']:+.3f} s [{lt['ci_low']:+.3f}, {lt['ci_high']:+.3f}]")
        lines.append(f"{c['variant']} vs {c['control']}: {c['verdict']}")
        lines.append("    " + "; ".join(parts))
        if c["sample_size_per_arm"] is not None:
            lines.append(f"    {c['sample_size_per_arm']} rated requests per arm detect a change of "
                         f"{report['min_effect']:g} from the control's positive rate")
    lines.append("")
    lines += textwrap.wrap("rule: " + report["rule"], 110, subsequent_indent="    ")
    return "\n".join(lines)


def _test_text(t: dict) -> str:
    """+4.1 pts [+0.2, +8.0] p=0.037: the difference in percentage points, its interval, its p."""
    return (f"{100 * t['difference']:+.1f} pts [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}] "
            f"p={t['p_value']:.3g}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
