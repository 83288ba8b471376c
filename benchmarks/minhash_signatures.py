"""MinHash signatures/s: llmcycle's vectorized MinHasher against datasketch's MinHash, num_perm=112.

Both sides see the same documents and the same shingles in one process: the words are llmcycle's
`simple_words` (lowercase, accents and punctuation removed, numbers -> "0"), 5 consecutive words make
a shingle, a document with fewer words is one shingle. Two timings per side:

- from text: normalization included. llmcycle: `MinHasher.signature(text)`. datasketch: the same
  `simple_words(text)`, the shingles joined as strings and encoded, `MinHash.update_batch`.
- from words: the word lists are computed once beforehand, so only hashing and the permutations are
  timed (llmcycle: xxh3 per word, shingle combination and (a*x+b) mod (2^61-1) in numpy; datasketch:
  sha1 per shingle and its permutations in numpy).

Rounds interleave all variants, so load from other processes hits them alike; the median round is
reported. Then the Jaccard estimates of both are compared with the true Jaccard similarity of the
shingle sets over pairs (document, copy with a fraction of its words replaced).

    python benchmarks/minhash_signatures.py                       # embedded corpus, ~3 MB, 5 rounds
    python benchmarks/minhash_signatures.py --synthetic 2000 --words 1000 --json minhash.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time
from collections.abc import Callable

import numpy as np
from datasketch import MinHash
from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

from llmcycle.data.dedup.minhash import MinHasher, estimate_jaccard, shingle_hashes, simple_words, word_hashes

NUM_PERM = 112
NGRAM = 5


def shingle_strings(words: list[str]) -> list[bytes]:
    n = NGRAM if len(words) >= NGRAM else len(words)
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)] if words else []


def shingle_set(words: list[str]) -> set[tuple[str, ...]]:
    n = NGRAM if len(words) >= NGRAM else len(words)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)} if words else set()


def load_texts(args) -> list[str]:
    if args.synthetic:
        rng = random.Random(0)
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(30000)]
        weights = [1 / (r + 1) for r in range(len(vocab))]  # Zipf-like, as in natural text
        return [" ".join(rng.choices(vocab, weights, k=args.words)) for _ in range(args.synthetic)]
    from llmcycle.data.pycorpus import collect_python_corpus

    return [d.text for d in collect_python_corpus(max_bytes=args.max_bytes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-bytes", type=int, default=3_000_000, help="embedded corpus size (default 3 MB)")
    ap.add_argument("--synthetic", type=int, default=0, help="use N random Zipf-word documents instead")
    ap.add_argument("--words", type=int, default=1000, help="words per synthetic document")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scheme", default="affine32,affine64",
                    help="datasketch permutation schemes to time (affine32 is datasketch 2.0's default)")
    ap.add_argument("--pairs", type=int, default=200, help="document pairs for the Jaccard comparison")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    texts = [t for t in load_texts(args) if simple_words(t)]  # documents with at least one word
    words = [simple_words(t) for t in texts]
    n_words = sum(map(len, words))
    print(f"machine: {cpu_name()}, numpy {np.__version__}; {len(texts)} documents, {n_words} words "
          f"({n_words / len(texts):.0f} per document), num_perm={NUM_PERM}, {NGRAM}-word shingles")

    ours = MinHasher(NUM_PERM, NGRAM, seed=1)
    schemes = [s for s in args.scheme.split(",") if s]

    def ours_text():
        return [ours.signature(t) for t in texts]

    def ours_words():
        return [ours.signature_of_shingles(shingle_hashes(word_hashes(w), NGRAM)) for w in words]

    def ds_text(scheme):
        def run():
            out = []
            for t in texts:
                m = MinHash(num_perm=NUM_PERM, seed=1, scheme=scheme)
                m.update_batch(shingle_strings(simple_words(t)))
                out.append(m)
            return out
        return run

    def ds_words(scheme):
        def run():
            out = []
            for w in words:
                m = MinHash(num_perm=NUM_PERM, seed=1, scheme=scheme)
                m.update_batch(shingle_strings(w))
                out.append(m)
            return out
        return run

    variants: dict[str, Callable] = {"llmcycle/text": ours_text, "llmcycle/words": ours_words}
    for s in schemes:
        variants[f"datasketch-{s}/text"] = ds_text(s)
        variants[f"datasketch-{s}/words"] = ds_words(s)
    for f in variants.values():  # warm-up: caches, lazy tables
        f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, f in variants.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}

    print(f"\n{'variant':<28} {'signatures/s':>13} {'words/s':>12}  llmcycle speed-up")
    results = {}
    for mode in ("text", "words"):
        base = rate[f"llmcycle/{mode}"]
        for name in [k for k in variants if k.endswith("/" + mode)]:
            ratio = base / rate[name]
            print(f"{name:<28} {rate[name]:>13,.0f} {rate[name] * n_words / len(texts):>12,.0f}  "
                  f"{'' if name.startswith('llmcycle') else f'{ratio:.2f}x'}")
            results[name] = {"signatures_per_s": rate[name], "seconds": times[name], "llmcycle_speedup": ratio}

    # Jaccard estimates against the truth, on (document, variant) pairs at several similarities.
    rng = random.Random(1)
    candidates = [w for w in words if len(w) >= 50]
    vocab = sorted({x for w in words for x in w})
    rows = []
    ds_scheme = schemes[0] if schemes else "affine32"
    for i in range(min(args.pairs, 4 * len(candidates))):
        base = candidates[i % len(candidates)]
        variant = list(base)
        for pos in rng.sample(range(len(base)), int(len(base) * rng.choice((0.01, 0.03, 0.06, 0.1, 0.2)))):
            variant[pos] = rng.choice(vocab)
        a, b = shingle_set(base), shingle_set(variant)
        true = len(a & b) / len(a | b)
        est_ours = estimate_jaccard(*(ours.signature_of_shingles(shingle_hashes(word_hashes(w), NGRAM))
                                      for w in (base, variant)))
        m1, m2 = (MinHash(num_perm=NUM_PERM, seed=1, scheme=ds_scheme) for _ in range(2))
        m1.update_batch(shingle_strings(base))
        m2.update_batch(shingle_strings(variant))
        rows.append((true, est_ours, m1.jaccard(m2)))
    jac = None
    if rows:
        arr = np.array(rows)
        err_ours, err_ds = arr[:, 1] - arr[:, 0], arr[:, 2] - arr[:, 0]
        ideal = float(np.sqrt(np.mean(arr[:, 0] * (1 - arr[:, 0]) / NUM_PERM)))
        print(f"\nJaccard estimates on {len(rows)} pairs (true similarity {arr[:, 0].min():.2f}.."
              f"{arr[:, 0].max():.2f}; an ideal MinHash of {NUM_PERM} values has rms error {ideal:.3f}):")
        for name, err in (("llmcycle", err_ours), (f"datasketch-{ds_scheme}", err_ds)):
            print(f"  {name:<22} mean error {err.mean():+.4f}, rms error {np.sqrt(np.mean(err ** 2)):.4f}, "
                  f"max |error| {np.abs(err).max():.3f}")
        print(f"  llmcycle vs datasketch: mean |difference| {np.abs(arr[:, 1] - arr[:, 2]).mean():.4f}, "
              f"correlation {np.corrcoef(arr[:, 1], arr[:, 2])[0, 1]:.4f}")
        jac = dict(pairs=len(rows), rms_error_ideal=ideal,
                   mean_error_llmcycle=float(err_ours.mean()), mean_error_datasketch=float(err_ds.mean()),
                   rms_error_llmcycle=float(np.sqrt(np.mean(err_ours ** 2))),
                   rms_error_datasketch=float(np.sqrt(np.mean(err_ds ** 2))))

    if args.json:
        meta = dict(machine=cpu_name(), numpy=np.__version__, documents=len(texts), words=n_words,
                    num_perm=NUM_PERM, ngram=NGRAM, rounds=args.rounds, synthetic=args.synthetic)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "jaccard": jac}, f, indent=1)

if __name__ == "__main__":
    main()
