"""`llmcycle feedback export`: what users and annotators said, as training data the post-training commands read.

From the monitor's database (requests logged with `store_text`, their feedback, and the labelling store):
- preference pairs (`preferences.jsonl`, TRL's conversational {prompt, chosen, rejected}): every pairwise
  label decided by a majority of annotators (improve/labels.py), and, for a prompt answered more than once,
  an answer rated positive against a different answer to the same prompt rated negative;
- SFT examples (`sft.jsonl`, {messages}): answers rated highly (thumbs up, or a score >= `min_score`).

Every example passes PII redaction again (labelling items may come from outside the log), duplicates go,
and examples whose prompt is an evaluation item (the suite's held-out embedded items and `eval_files`,
compared as normalised words, or sharing a run of 8 words) are dropped and counted: training on the test
set would make the regression gate meaningless. The output directory is published whole, with a manifest
whose inputs name the database and every request id and label item used (lineage back to the requests).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llmcycle.artifacts.io import atomic_write_text, publish_dir, staging_dir
from llmcycle.artifacts.manifest import write_manifest
from llmcycle.errors import LlmcycleError
from llmcycle.monitor.store import LogStore, as_store

log = logging.getLogger(__name__)
NGRAM = 8
PAIRS_PER_PROMPT = 4  # rated answers of one prompt give at most this many pairs (one prompt must not dominate)


class EvalGuard:
    """Tells whether a prompt is (or overlaps) an evaluation item."""

    def __init__(self, eval_texts: Iterable[str]) -> None:
        from llmcycle.data.dedup.minhash import ngram_hashes, simple_words, word_hashes

        self._words, self._hashes, self._ngrams = simple_words, word_hashes, ngram_hashes
        self.exact: set[tuple[str, ...]] = set()
        self.grams: set[int] = set()
        for text in eval_texts:
            words = simple_words(text, numbers=False)  # digits kept: "7 + 4" is not "123 + 999"
            self.exact.add(tuple(words))
            if len(words) >= NGRAM:
                self.grams.update(int(g) for g in ngram_hashes(word_hashes(words), NGRAM))

    def __call__(self, prompt: str) -> bool:
        words = self._words(prompt, numbers=False)
        if tuple(words) in self.exact:
            return True
        return len(words) >= NGRAM and any(int(g) in self.grams
                                           for g in self._ngrams(self._hashes(words), NGRAM))


def eval_texts(eval_files: Sequence[str | Path] = ()) -> list[str]:
    """The prompts of the evaluation sets: the suite's held-out embedded items (all of them) and the
    `prompt`/`question` of every JSONL record in `eval_files`."""
    from llmcycle.eval.suite import heldout_items

    texts = [it.prompt for it in heldout_items(limit=1 << 30)]  # every one of the split the suite holds out
    for path in eval_files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts += [row[k] for k in ("prompt", "question") if isinstance(row.get(k), str)]
    return texts


def _prompt_messages(row: dict) -> list[dict] | None:
    """The request's prompt as chat messages: the logged messages, or a completion prompt as one user turn."""
    if row.get("messages"):
        msgs = json.loads(row["messages"])
        return msgs if isinstance(msgs, list) and msgs else None
    return [{"role": "user", "content": row["prompt"]}] if row.get("prompt") else None


def rated_answers(store: LogStore, since: float = 0.0) -> list[dict[str, Any]]:
    """Logged single answers with text and a verdict: {request_id, messages, completion, positive, score},
    one per request (its latest rating)."""
    rows = store.rows(
        'SELECT r.request_id, r.prompt, r.messages, r.completion, r.num_prompts, r.finish_reasons, f.positive, '
        'f.score, f.id FROM requests r JOIN feedback f ON f.request_id = r.request_id '
        'WHERE r.status < 400 AND f.positive IS NOT NULL AND r."time" >= ? ORDER BY f.id', [since])
    latest: dict[str, dict] = {}
    for r in rows:
        finishes = json.loads(r["finish_reasons"] or "[]")
        if (r["num_prompts"] or 1) != 1 or len(finishes) != 1 or not r["completion"]:
            continue  # several answers in one request: the rating cannot say which
        msgs = _prompt_messages(r)
        if msgs is not None:
            latest[r["request_id"]] = {"request_id": r["request_id"], "messages": msgs,
                                       "completion": r["completion"], "positive": r["positive"], "score": r["score"]}
    return list(latest.values())


def export_feedback(target: LogStore | str | Path, out_dir: str | Path, min_score: int = 4,
                    eval_files: Sequence[str | Path] = (), since: float = 0.0, labels: bool = True) -> dict:
    """Write preferences.jsonl, sft.jsonl and manifest.json into `out_dir` (published whole); returns counts."""
    from llmcycle.data.filters.pii import Pii

    store = as_store(target)
    if not store.exists():
        raise LlmcycleError(f"no monitor database at {store} (serve writes one; give --db).")
    from llmcycle.improve.feedback import FeedbackStore
    from llmcycle.monitor.request_log import ensure_schema

    con = store.connect()
    ensure_schema(store, con)
    con.close()
    FeedbackStore(store)  # the table exists, even with no feedback yet
    pii = Pii()
    guard = EvalGuard(eval_texts(eval_files))

    def clean(text: str) -> str:
        return pii.redact(text)[0]

    counts: dict[str, int] = defaultdict(int)
    answers = rated_answers(store, since)
    counts["rated_answers"] = len(answers)
    prefs: dict[tuple, dict] = {}
    sft: dict[tuple, dict] = {}
    request_ids: set[str] = set()

    def contaminated(msgs: list[dict]) -> bool:
        hit = guard("\n".join(m["content"] for m in msgs if m.get("role") == "user"))
        counts["dropped_eval_overlap"] += hit
        return hit

    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for a in answers:
        a["messages"] = [{**m, "content": clean(m["content"])} for m in a["messages"]]
        a["completion"] = clean(a["completion"])
        by_prompt[json.dumps(a["messages"], sort_keys=True)].append(a)
    for group in by_prompt.values():
        if contaminated(group[0]["messages"]):
            continue
        good = [a for a in group if a["positive"] == 1]
        bad = [a for a in group if a["positive"] == 0]
        for a in good:
            if a["score"] is None or a["score"] >= min_score:
                key = (json.dumps(a["messages"]), a["completion"])
                if key not in sft:
                    sft[key] = {"messages": [*a["messages"], {"role": "assistant", "content": a["completion"]}]}
                    request_ids.add(a["request_id"])
        made = 0
        for g in good:
            for b in bad:
                if made >= PAIRS_PER_PROMPT or g["completion"].strip() == b["completion"].strip():
                    continue
                key = (json.dumps(g["messages"]), g["completion"], b["completion"])
                if key not in prefs:
                    prefs[key] = trl_preference(g["messages"], g["completion"], b["completion"])
                    request_ids.update((g["request_id"], b["request_id"]))
                    made += 1
    counts["pairs_from_ratings"] = len(prefs)
    label_items: list[int] = []
    if labels:
        from llmcycle.improve.labels import Labels

        for p in Labels(store).preference_pairs():
            msgs = [{"role": "user", "content": clean(p["prompt"])}]
            if contaminated(msgs):
                continue
            key = (json.dumps(msgs), clean(p["chosen"]), clean(p["rejected"]))
            if key not in prefs:
                prefs[key] = trl_preference(msgs, key[1], key[2])
                label_items.append(p["item_id"])
        counts["pairs_from_labels"] = len(label_items)
    counts["preference_pairs"], counts["sft_examples"] = len(prefs), len(sft)
    out = Path(out_dir)
    tmp = staging_dir(out)
    atomic_write_text(tmp / "preferences.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n"
                                                         for p in prefs.values()))
    atomic_write_text(tmp / "sft.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sft.values()))
    write_manifest(tmp, "feedback_export", {"min_score": min_score, "since": since, "labels": labels,
                                            "eval_files": [str(p) for p in eval_files]},
                   {"database": str(store), "request_ids": sorted(request_ids), "label_items": sorted(label_items)},
                   dict(counts))
    publish_dir(tmp, out)
    log.debug("feedback export -> %s: %d preference pairs, %d SFT examples (%d dropped as evaluation items)",
             out, counts["preference_pairs"], counts["sft_examples"], counts["dropped_eval_overlap"])
    return dict(counts)


def trl_preference(messages: list[dict], chosen: str, rejected: str) -> dict:
    """TRL's conversational preference record: the prompt's messages, and one assistant turn each side."""
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}
