"""Drift: is today's traffic like the traffic (or the data) the model was checked on?

Features per request, from the request log: `prompt_tokens`, `completion_tokens`, `output_perplexity` (the
generated text's perplexity under the served model: a quality signal; numeric) and
`prompt_lang` (py3langid's guess, the data stage's language model), `finish_reason` (categorical). A
reference window (an earlier period of traffic, or a file of prompts such as the SFT data) is compared
with a current window, feature by feature, with Evidently's default tests:

- numeric, reference of at most 1000 rows: two-sample Kolmogorov-Smirnov, drift when p <= 0.05;
- numeric, larger: Wasserstein distance normed by the reference's standard deviation, drift when >= 0.1;
- categorical: Jensen-Shannon distance (natural log, as scipy's `jensenshannon`), drift when >= 0.1.

The statistics are written here with numpy (scipy is not a base dependency); tests/test_monitor.py checks
them against scipy's.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llmcycle.monitor.periodic import Periodic
from llmcycle.monitor.store import LogStore, as_store

NUMERIC = ("prompt_tokens", "completion_tokens", "output_perplexity")
CATEGORICAL = ("prompt_lang", "finish_reason")
KS_MAX_ROWS, KS_P, WASSERSTEIN_MIN, JS_MIN = 1000, 0.05, 0.1, 0.1


def ks_2samp(a: Iterable[float], b: Iterable[float]) -> tuple[float, float]:
    """(D, p): the two-sample Kolmogorov-Smirnov statistic and its asymptotic two-sided p-value (Kolmogorov's
    limit distribution at D * sqrt(nm / (n + m)); scipy's default exact p-value differs a little for small
    samples)."""
    x, y = np.sort(np.asarray(list(a), dtype=float)), np.sort(np.asarray(list(b), dtype=float))
    n, m = len(x), len(y)
    grid = np.concatenate([x, y])
    d = float(np.max(np.abs(np.searchsorted(x, grid, side="right") / n - np.searchsorted(y, grid, side="right") / m)))
    en = math.sqrt(n * m / (n + m))
    return d, _kolmogorov_sf(d * en)


def _kolmogorov_sf(t: float) -> float:
    """P(K > t) for the Kolmogorov distribution: 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 t^2)."""
    if t < 0.3:  # the series converges slowly here, and the answer is 1 to double precision
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * t * t) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def wasserstein_normed(ref: Iterable[float], cur: Iterable[float]) -> float:
    """1-D Wasserstein distance between the samples, divided by the reference's standard deviation."""
    r, c = np.sort(np.asarray(list(ref), dtype=float)), np.sort(np.asarray(list(cur), dtype=float))
    grid = np.sort(np.concatenate([r, c]))
    gaps = np.diff(grid)
    cdf_r = np.searchsorted(r, grid[:-1], side="right") / len(r)
    cdf_c = np.searchsorted(c, grid[:-1], side="right") / len(c)
    w = float(np.sum(np.abs(cdf_r - cdf_c) * gaps))
    std = float(np.std(r))
    return w / std if std > 0 else (0.0 if w == 0 else math.inf)


def jensen_shannon(ref: Iterable[Any], cur: Iterable[Any]) -> float:
    """Jensen-Shannon distance (natural log) between the category frequencies of two samples."""
    a, b = Counter(ref), Counter(cur)
    cats = sorted(set(a) | set(b), key=str)
    p = np.array([a[k] for k in cats], dtype=float)
    q = np.array([b[k] for k in cats], dtype=float)
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2

    def kl(u: np.ndarray, v: np.ndarray) -> float:
        keep = u > 0
        return float(np.sum(u[keep] * np.log(u[keep] / v[keep])))

    return math.sqrt(max(0.0, (kl(p, mid) + kl(q, mid)) / 2))


def reference_profile(reference: list[dict]) -> dict[str, Any]:
    """What one request is judged against: the reference's 99th percentile of each numeric feature and the
    languages making at least 1% of its prompts."""
    profile: dict[str, Any] = {}
    for feature in NUMERIC:
        values = [r[feature] for r in reference if r.get(feature) is not None]
        if len(values) >= 20:
            profile[feature] = float(np.quantile(values, 0.99))
    langs = Counter(r.get("prompt_lang") for r in reference if r.get("prompt_lang"))
    total = sum(langs.values())
    if total >= 20:
        profile["prompt_lang"] = sorted(k for k, n in langs.items() if n / total >= 0.01)
    return profile


def outliers(row: dict, profile: dict[str, Any]) -> list[str]:
    """The features on which one request falls outside the reference (`reference_profile`): its drift flags."""
    flags = [f for f in NUMERIC if f in profile and row.get(f) is not None and row[f] > profile[f]]
    if "prompt_lang" in profile and row.get("prompt_lang") and row["prompt_lang"] not in profile["prompt_lang"]:
        flags.append("prompt_lang")
    return flags


def compare(reference: list[dict], current: list[dict]) -> list[dict[str, Any]]:
    """One result per feature both windows have: feature, method, value, threshold, drift (bool), sizes."""
    out = []
    for feature in NUMERIC + CATEGORICAL:
        ref = [r[feature] for r in reference if r.get(feature) is not None]
        cur = [r[feature] for r in current if r.get(feature) is not None]
        if len(ref) < 2 or len(cur) < 2:
            continue
        if feature in CATEGORICAL:
            value, method, threshold, drift = jensen_shannon(ref, cur), "jensen_shannon", JS_MIN, None
            drift = value >= JS_MIN
        elif len(ref) <= KS_MAX_ROWS:
            _, value = ks_2samp(ref, cur)
            method, threshold, drift = "ks_p_value", KS_P, value <= KS_P
        else:
            value = wasserstein_normed(ref, cur)
            method, threshold, drift = "wasserstein_normed", WASSERSTEIN_MIN, value >= WASSERSTEIN_MIN
        out.append({"feature": feature, "method": method, "value": value, "threshold": threshold,
                    "drift": bool(drift), "reference_rows": len(ref), "current_rows": len(cur)})
    return out


def log_window(log: LogStore | str | Path, start_days_ago: float, end_days_ago: float = 0.0,
               now: float | None = None) -> list[dict]:
    """Successful requests of the request log between `start_days_ago` and `end_days_ago`."""
    now = time.time() if now is None else now
    return as_store(log).rows(
        "SELECT prompt_tokens, completion_tokens, output_perplexity, prompt_lang, finish_reason FROM requests "
        "WHERE status = 200 AND route != '/v1/models' AND \"time\" >= ? AND \"time\" < ?",
        (now - start_days_ago * 86400, now - end_days_ago * 86400))


def prompts_file_rows(path: str | Path, tokenizer: Any) -> list[dict]:
    """Reference rows from a file of prompts: JSON lines with `prompt` (text, or chat messages as in TRL),
    `messages` or `text`, or plain text with one prompt per line. Prompt features only."""
    from llmcycle.monitor.language import language_of

    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        text = line
        if line.lstrip().startswith("{"):
            obj = json.loads(line)
            value = obj.get("prompt", obj.get("messages", obj.get("text", "")))
            text = value if isinstance(value, str) else "\n".join(str(m.get("content", "")) for m in value)
        rows.append({"prompt_tokens": len(tokenizer.encode(text)), "prompt_lang": language_of(text), "text": text})
    return rows


def log_prompts(log: LogStore | str | Path, start_days_ago: float, end_days_ago: float = 0.0,
                now: float | None = None) -> list[str]:
    """The stored prompts (serve's `store_text`, PII-redacted) of successful requests in the window."""
    now = time.time() if now is None else now
    rows = as_store(log).rows('SELECT prompt FROM requests WHERE status = 200 AND prompt IS NOT NULL AND "time" >= ? '
                              'AND "time" < ?', (now - start_days_ago * 86400, now - end_days_ago * 86400))
    return [r["prompt"] for r in rows]


class DriftWatch(Periodic):
    """Checks drift in a thread every `every_s` seconds: the last `window_s` of the request log against the
    day before it. Each result replaces `monitor.drift`, which /metrics shows as `llmcycle:drift_detected` and
    `llmcycle:drift_value` (and a Prometheus alert can fire on)."""

    def __init__(self, monitor: Any, log: LogStore | str | Path, every_s: float = 300.0,
                 window_s: float = 3600.0) -> None:
        super().__init__(every_s, "drift")
        self.monitor, self.log, self.window_s = monitor, as_store(log), window_s

    def check(self, now: float | None = None) -> list[dict]:
        days = self.window_s / 86400
        reference = log_window(self.log, days + 1, days, now)
        results = compare(reference, log_window(self.log, days, 0, now))
        self.monitor.drift = results
        if self.monitor.log is not None:  # each new request is flagged against this reference
            self.monitor.log.drift_profile = reference_profile(reference)
        self._store(results, time.time() if now is None else now)
        return results

    def _store(self, results: list[dict], now: float) -> None:
        """Each check's verdicts into the log's `drift` table, beside the requests they judge."""
        real = self.log.column_type("REAL")
        self.log.execute(f'CREATE TABLE IF NOT EXISTS drift ("time" {real}, feature TEXT, method TEXT, value {real}, '
                         f"threshold {real}, drifted INTEGER, reference_rows INTEGER, current_rows INTEGER)")
        for r in results:
            self.log.execute("INSERT INTO drift VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (now, r["feature"], r["method"], r["value"], r["threshold"], int(r["drift"]),
                              r["reference_rows"], r["current_rows"]))

    def tick(self) -> None:
        self.check()


# ---- prompt embeddings: a domain classifier over the served model's own hidden states

AUC_MIN = 0.55


def embed_texts(model_dir: str | Path, texts: list[str], max_tokens: int = 256) -> np.ndarray:
    """[N, hidden]: each text's final hidden states under the model, averaged over its (first `max_tokens`)
    tokens."""
    import torch

    from llmcycle.serve.model_runner import ModelRunner
    from llmcycle.tokenizer import Tokenizer

    model, tok = ModelRunner.load_weights(str(model_dir)), Tokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(text)[:max_tokens] or [tok.bos_id or 0]
            h = model(torch.tensor([ids]), return_hidden=True)[0].float()
            out.append(h.mean(0).numpy())
    return np.stack(out)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive outscores a negative (ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def domain_classifier_auc(reference: np.ndarray, current: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold ROC AUC of an L2-regularised logistic regression telling current rows from reference ones
    (Evidently's embedding drift test): about 0.5 when the two are alike."""
    x = np.concatenate([reference, current]).astype(np.float64)
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(current))])
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(x)) % folds
    scores = np.zeros(len(x))
    for f in range(folds):
        train, test = fold != f, fold == f
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
        xt, xs = (x[train] - mu) / sd, (x[test] - mu) / sd
        w, b = np.zeros(x.shape[1]), 0.0
        for _ in range(300):  # gradient descent on the mean log loss + 0.01 |w|^2
            p = 1 / (1 + np.exp(-(xt @ w + b)))
            g = p - y[train]
            w -= 0.5 * (xt.T @ g / len(g) + 0.02 * w)
            b -= 0.5 * g.mean()
        scores[test] = xs @ w + b
    return roc_auc(scores, y)


def embedding_drift(model_dir: str | Path, reference_texts: list[str], current_texts: list[str]) -> dict[str, Any]:
    auc = domain_classifier_auc(embed_texts(model_dir, reference_texts), embed_texts(model_dir, current_texts))
    return {"feature": "prompt_embedding", "method": "domain_classifier_auc", "value": auc, "threshold": AUC_MIN,
            "drift": auc > AUC_MIN, "reference_rows": len(reference_texts), "current_rows": len(current_texts)}


def token_distribution(tokenizer: Any, reference_texts: list[str], current_texts: list[str]) -> dict[str, Any]:
    """Jensen-Shannon distance between the token-id frequencies of two sets of prompts (tokenized by the
    served model's tokenizer): what the prompts are made of, beyond their length and language."""
    ref = [t for text in reference_texts for t in tokenizer.encode(text)]
    cur = [t for text in current_texts for t in tokenizer.encode(text)]
    value = jensen_shannon(ref, cur)
    return {"feature": "prompt_token_distribution", "method": "jensen_shannon", "value": value, "threshold": JS_MIN,
            "drift": value >= JS_MIN, "reference_rows": len(reference_texts), "current_rows": len(current_texts)}
