"""Deduplication steps: exact, MinHash LSH (against the theoretical catch curve), boilerplate lines."""

from __future__ import annotations

import io
import math
import pickle
import random
import string
import unicodedata

import numpy as np
import pytest

from conftest import dropped_pairs
from llmcycle.config import build
from llmcycle.data.dedup import is_dropped
from llmcycle.data.dedup.boilerplate import line_hashes, remove_lines
from llmcycle.data.dedup.exact import normalize_exact
from llmcycle.data.dedup.minhash import (
    _NUMBER_RE,
    _WORD_RE,
    MERSENNE_61,
    MinHasher,
    _combining_marks,
    estimate_jaccard,
    permutation_params,
    shingle_hashes,
    simple_words,
    word_hashes,
)
from llmcycle.data.dedup.steps import BoilerplateLines, ExactDedup, MinhashDedup
from llmcycle.data.dedup.unionfind import UnionFind
from llmcycle.data.document import Document
from llmcycle.data.steps import STEPS
from llmcycle.errors import ConfigError

# ---------------------------------------------------------------- helpers


def docs_of(texts: list[str], task: int = 0) -> list[Document]:
    return [Document(id=f"t{task}-{i}", text=t, source="test") for i, t in enumerate(texts)]


def pack(parts: list[np.ndarray], dtype=np.uint64) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    values = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
    return values, offsets


def signatures_of(step, tasks: list[list[Document]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [pack([np.asarray(step.signature(d), dtype=step.signature_dtype).ravel() for d in docs],
                 step.signature_dtype) for docs in tasks]


def savez_roundtrip(decision: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the pipeline does with a decision: np.savez, then np.load without pickles."""
    buf = io.BytesIO()
    np.savez(buf, **decision)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def run_global(step, tasks: list[list[Document]]):
    """Signatures in a pickled copy (a worker), decide in the step, apply in another pickled copy."""
    worker = pickle.loads(pickle.dumps(step))
    worker.setup()
    decision = savez_roundtrip(step.decide(signatures_of(worker, tasks)))
    applier = pickle.loads(pickle.dumps(step))
    applier.setup()
    results = [[applier.apply(d, t, i, decision) for i, d in enumerate(docs)] for t, docs in enumerate(tasks)]
    return decision, results, applier


# ---------------------------------------------------------------- registry and params


def test_steps_registered_and_params_validated():
    assert STEPS["exact_dedup"] is ExactDedup
    assert STEPS["minhash_dedup"] is MinhashDedup
    assert STEPS["boilerplate_lines"] is BoilerplateLines
    p = build(MinhashDedup.Params, {"bands": 20, "rows": 5})
    assert (p.ngram, p.bands, p.rows, p.seed) == (5, 20, 5, 1)
    with pytest.raises(ConfigError, match="unknown key 'x.minhash_dedup.band'"):
        build(MinhashDedup.Params, {"band": 3}, prefix="x.minhash_dedup.")
    with pytest.raises(ConfigError, match="minhash_dedup.rows must be an integer >= 1"):
        MinhashDedup(MinhashDedup.Params(rows=0))
    with pytest.raises(ConfigError, match="minhash_dedup.seed"):
        MinhashDedup(MinhashDedup.Params(seed=-1))
    with pytest.raises(ConfigError, match="boilerplate_lines.min_docs must be an integer >= 2"):
        BoilerplateLines(BoilerplateLines.Params(min_docs=1))
    with pytest.raises(ConfigError, match="boilerplate_lines.min_line_chars"):
        BoilerplateLines(BoilerplateLines.Params(min_line_chars=0))
    # Cheap to ship: no hash tables in the pickle, even after use.
    step = MinhashDedup()
    step.signature(Document("a", "some words here", "s"))
    assert len(pickle.dumps(step)) < 1000


# ---------------------------------------------------------------- exact


def test_normalize_exact():
    assert normalize_exact("  Hello \t World\n\n") == "hello world"
    assert normalize_exact("Ｈｅｌｌｏ\u00a0ﬁne") == "hello fine"  # NFKC: full-width, no-break space, ligature
    assert normalize_exact("Hello, world") != normalize_exact("Hello world")


def test_exact_dedup_across_tasks_keeps_first():
    task0 = docs_of(["Hello world", "unique one", "The  Quick\nbrown fox", "hello world", "Hello, world"], 0)
    task1 = docs_of(["HELLO   WORLD", "the quick brown fox", "different text", "Ｈｅｌｌｏ world", ""], 1)
    task2 = docs_of([], 2)
    task3 = docs_of(["unique one ", "\n", "different text"], 3)
    step = ExactDedup()
    decision, results, _ = run_global(step, [task0, task1, task2, task3])
    expected = {(0, 3): (0, 0), (1, 0): (0, 0), (1, 1): (0, 2), (1, 3): (0, 0),
                (3, 0): (0, 1), (3, 1): (1, 4), (3, 2): (1, 2)}
    assert dropped_pairs(decision) == sorted(expected)
    kept_of = dict(zip(dropped_pairs(decision), zip(decision["kept_task"].tolist(), decision["kept_index"].tolist())))
    assert kept_of == expected
    assert step.counters == {"clusters": 5, "duplicates": 7}
    survivors = [d.id for docs in results for d in docs if not isinstance(d, str)]
    assert survivors == ["t0-0", "t0-1", "t0-2", "t0-4", "t1-2", "t1-4"]
    reasons = {r for docs in results for r in docs if isinstance(r, str)}
    assert reasons == {"exact_duplicate"}
    assert decision["task_offsets"].tolist() == [0, 5, 10, 10, 13]
    assert decision["drop_offsets"].tolist() == [0, 1, 4, 4, 7]


def test_exact_dedup_no_documents():
    step = ExactDedup()
    decision = savez_roundtrip(step.decide([]))
    assert decision["drop_index"].size == 0 and decision["task_offsets"].tolist() == [0]
    decision = savez_roundtrip(step.decide(signatures_of(step, [[], []])))
    assert not is_dropped(decision, 1, 0)


# ---------------------------------------------------------------- minhash: text and hashes


def test_simple_words():
    assert simple_words("Hello, World! It's 3.14 or 1,000 — foo_bar x2") == [
        "hello", "world", "it", "s", "0", "or", "0", "foo", "bar", "x0"]
    assert simple_words("Crème BRÛLÉE ﬁne １２３ naïve") == ["creme", "brulee", "fine", "0", "naive"]
    assert simple_words("Année 2024", numbers=False) == ["annee", "2024"]
    assert simple_words("") == [] and simple_words(" \n ... ") == []


def test_fast_path_matches_the_plain_definition():
    """`word_bytes` (bytes.translate, regexes only on non-ASCII pieces) == lower, NFKD, marks removed,
    numbers, `[^\\W_]+`, on random ASCII and Unicode text (no non-ASCII digits: the documented corner)."""
    def plain(text, numbers):
        text = _combining_marks().sub("", unicodedata.normalize("NFKD", text.lower()))
        if numbers:
            text = _NUMBER_RE.sub("0", text)
        return _WORD_RE.findall(text)

    rng = random.Random(3)
    ascii_chars = [chr(c) for c in range(128)] + list(string.ascii_letters + string.digits + " .,") * 3
    unicode_chars = list("éÉàçñøßÆœﬁﬂ\u00a0\u2003\u2019\u201c—…·€©™ΩωЖжअआ中文")
    unicode_chars += list("\u0301\u0308ℌ１２Ａｂ") + ["\U0001F600"]  # combining marks, compatibility forms
    for _ in range(4000):
        alphabet = ascii_chars + (unicode_chars * 2 if rng.random() < 0.5 else [])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for numbers in (True, False):
            assert simple_words(text, numbers) == plain(text, numbers), repr(text)
    assert simple_words("lone \ud800 surrogate") == ["lone", "surrogate"]  # not a letter: no error either
    assert MinHasher(16).signature("lone \ud800 surrogate").shape == (16,)


def test_word_and_shingle_hashes_are_stable():
    # Fixed values: a change here changes every signature ever computed (and breaks resumed runs).
    assert word_hashes(["hello"]).tolist() == [10760762337991515389]  # xxh3-64 of b"hello"
    sig = MinHasher(112, 5, seed=1).signature("The quick brown fox jumps over the lazy dog")
    assert sig[:3].tolist() == [117253361817616997, 399243696331886360, 2514170336116987]
    assert ExactDedup().signature(Document("a", "Hello  World", "s")).tolist() == [
        16108542339571992832, 12221510953804871367]
    h = word_hashes(simple_words("a b c d e f"))
    assert shingle_hashes(h, 5).size == 2
    assert shingle_hashes(h[:3], 5).size == 1  # fewer words than ngram: one shingle of all of them
    assert shingle_hashes(h[:0], 5).size == 0
    # order matters inside a shingle
    assert shingle_hashes(word_hashes(["a", "b"]), 5)[0] != shingle_hashes(word_hashes(["b", "a"]), 5)[0]


def test_permutations_and_signature_values():
    a, b = permutation_params(112, seed=1)
    assert (a % 2 == 1).all() and (a < MERSENNE_61).all() and (b < MERSENNE_61).all()
    assert len(set(a.tolist())) == 112
    a2, _ = permutation_params(112, seed=2)
    assert not np.array_equal(a, a2)
    mh = MinHasher(112, 5, seed=1)
    x = shingle_hashes(word_hashes([f"w{i}" for i in range(5000)]), 5)  # > one block of 2048
    sig = mh.signature_of_shingles(x)
    ref = ((a[:, None] * x[None, :] + b[:, None]) % MERSENNE_61).min(axis=1)  # uint64 wrap, as documented
    assert sig.dtype == np.uint64 and np.array_equal(sig, ref)
    assert mh.signature("").size == 0 and mh.signature("!!! ...").size == 0
    assert mh.signature("Hello, World").tolist() == mh.signature("hello world").tolist()


# ---------------------------------------------------------------- minhash: LSH catch rate


def lsh_probability(s: float, bands: int = 14, rows: int = 8) -> float:
    return 1 - (1 - s ** rows) ** bands


LEVELS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
PAIRS_PER_LEVEL = 200
BASE_WORDS = 300


def make_pairs(seed: int = 12345):
    """(base, variant, true Jaccard of their 5-shingle sets, level) for every level.

    Words are random 8-letter strings (26^8 of them), so unrelated documents share no shingle and a
    replaced word never recreates one: a variant's shingles are the base's windows that no replaced
    position touches, plus new ones. Words are replaced at random positions until the similarity
    reaches the level.
    """
    rng = random.Random(seed)

    def word():
        return "".join(rng.choices(string.ascii_lowercase, k=8))

    pairs = []
    m = BASE_WORDS - 4
    for level in LEVELS:
        for _ in range(PAIRS_PER_LEVEL):
            base = [word() for _ in range(BASE_WORDS)]
            touched = np.zeros(m, dtype=bool)
            variant = list(base)
            for pos in rng.sample(range(BASE_WORDS), BASE_WORDS):
                touched[max(0, pos - 4):pos + 1] = True
                variant[pos] = word()
                shared = m - int(touched.sum())
                if shared / (2 * m - shared) <= level + 0.01:
                    break
            a = {tuple(base[i:i + 5]) for i in range(m)}
            b = {tuple(variant[i:i + 5]) for i in range(m)}
            pairs.append((" ".join(base), " ".join(variant), len(a & b) / len(a | b), level))
    return pairs


def test_lsh_catch_rate_follows_the_curve():
    """The fraction of pairs caught at each similarity level matches 1-(1-s^8)^14 averaged over the
    pairs' true similarities, within 4 binomial standard deviations (+0.01 for the curve's slope
    inside a level); every cluster is exactly one (base, variant) pair and keeps the base."""
    pairs = make_pairs()
    step = MinhashDedup()
    # Two tasks: bases in task 0, variants in task 1, so the variant is always the later document.
    tasks = [docs_of([p[0] for p in pairs], 0), docs_of([p[1] for p in pairs], 1)]
    decision, results, _ = run_global(step, tasks)
    n = len(pairs)
    assert decision["drop_index"][:decision["drop_offsets"][1]].size == 0  # no base dropped
    dropped = decision["drop_index"][decision["drop_offsets"][1]:]
    assert (decision["kept_task"] == 0).all() and np.array_equal(decision["kept_index"], dropped)
    caught = np.zeros(n, dtype=bool)
    caught[dropped] = True
    assert step.counters == {"clusters": int(caught.sum()), "duplicates": int(caught.sum())}
    assert [isinstance(r, str) for r in results[1]] == caught.tolist()

    true_s = np.array([p[2] for p in pairs])
    levels = np.array([p[3] for p in pairs])
    table = []
    for level in LEVELS:
        sel = levels == level
        assert np.all(np.abs(true_s[sel] - level) < 0.03)  # the generator hits the levels
        p = np.array([lsh_probability(s) for s in true_s[sel]])
        expected, measured = p.mean(), caught[sel].mean()
        sd = math.sqrt((p * (1 - p)).sum()) / sel.sum()
        table.append(tuple(round(float(v), 3) for v in (level, true_s[sel].mean(), expected, measured, sd)))
        assert abs(measured - expected) <= 4 * sd + 0.01, table[-1]
    print("\nlevel, mean true s, expected, measured, binomial sd:", *table, sep="\n")

    # Jaccard estimates from the signatures agree with the true similarities (112 values: sd <= 0.048).
    mh = MinHasher(112, 5, 1)
    errors = [estimate_jaccard(mh.signature(a), mh.signature(b)) - s for a, b, s, _ in pairs[::10]]
    assert abs(np.mean(errors)) < 0.02 and np.max(np.abs(errors)) < 0.2


def test_identical_after_normalization_always_caught():
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(2000)]
    bases = [" ".join(words[i * 40:(i + 1) * 40]) for i in range(50)]
    variants = [b.upper().replace(" ", ",  ") + "!" for b in bases]  # case, punctuation, spacing differ
    step = MinhashDedup()
    decision, results, _ = run_global(step, [docs_of(bases + variants)])
    assert dropped_pairs(decision) == [(0, i) for i in range(50, 100)]
    assert decision["kept_index"].tolist() == list(range(50))
    assert step.counters == {"clusters": 50, "duplicates": 50}


def test_short_and_empty_documents():
    step = MinhashDedup()
    texts = ["hello world", "Hello, world!", "hello", "", "...", "world hello", "", "hello world again"]
    decision, results, _ = run_global(step, [docs_of(texts)])
    # "hello world" twice (one shingle of 2 words); empty signatures are never duplicates.
    assert dropped_pairs(decision) == [(0, 1)]
    assert results[0][1] == "near_duplicate"
    assert step.counters == {"clusters": 1, "duplicates": 1}


# ---------------------------------------------------------------- minhash: clustering and determinism


def band_signature(bands: int, rows: int, fill: int, shared: dict[int, int]) -> np.ndarray:
    """A signature whose band b is all `shared[b]` for the bands given and unique values elsewhere."""
    sig = np.arange(bands * rows, dtype=np.uint64) + np.uint64(fill * 1000)
    for band, value in shared.items():
        sig[band * rows:(band + 1) * rows] = value
    return sig


def test_union_find_transitivity_in_decide():
    # A~B share band 0, B~C share band 5, A and C share nothing: one cluster, A kept. D~E share band 13.
    a = band_signature(14, 8, 1, {0: 7})
    b = band_signature(14, 8, 2, {0: 7, 5: 9})
    c = band_signature(14, 8, 3, {5: 9})
    d = band_signature(14, 8, 4, {13: 11})
    e = band_signature(14, 8, 5, {13: 11})
    f = band_signature(14, 8, 6, {})
    assert not np.any(a == c)
    step = MinhashDedup()
    # C first, in task 0; A in task 1 before B: C is the cluster's first document and is kept.
    decision = savez_roundtrip(step.decide([pack([c, d]), pack([a, f, b]), pack([e])]))
    assert dropped_pairs(decision) == [(1, 0), (1, 2), (2, 0)]
    assert decision["kept_task"].tolist() == [0, 0, 0] and decision["kept_index"].tolist() == [0, 0, 1]
    assert step.counters == {"clusters": 2, "duplicates": 3}


def test_union_find_matches_naive():
    rng = np.random.default_rng(0)
    for n, m in ((10, 5), (200, 150), (1000, 2000)):
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        uf = UnionFind(n)
        uf.union_pairs(a[: m // 2], b[: m // 2])
        uf.union_pairs(a[m // 2:], b[m // 2:])
        scalar = UnionFind(n)
        for x, y in zip(a.tolist(), b.tolist()):
            scalar.union(x, y)
        # naive: label propagation to the component minimum
        label = np.arange(n)
        while True:
            new = label.copy()
            np.minimum.at(new, a, label[b])
            np.minimum.at(new, b, label[a])
            new = new[new]
            if np.array_equal(new, label):
                break
            label = new
        assert np.array_equal(uf.roots(), label)
        assert [scalar.find(i) for i in range(n)] == label.tolist()
    chain = UnionFind(6)
    chain.union_pairs(np.array([4, 3, 2, 1, 0]), np.array([5, 4, 3, 2, 1]))
    assert chain.roots().tolist() == [0] * 6


def test_decide_split_across_tasks_equals_one_task():
    rng = random.Random(5)
    words = ["".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(400)]
    texts = []
    for _ in range(120):  # a few families of near-duplicates and many singletons
        if any(texts) and rng.random() < 0.4:
            w = rng.choice([t for t in texts if t]).split()
            for _ in range(rng.randint(0, 2)):
                w[rng.randrange(len(w))] = rng.choice(words)
            texts.append(" ".join(w))
        else:
            texts.append(" ".join(rng.choices(words, k=rng.randint(0, 60))))
    step = MinhashDedup()
    docs = docs_of(texts)
    (one,) = signatures_of(step, [docs])
    whole = savez_roundtrip(step.decide([one]))
    cuts = [0, 0, 17, 18, 60, 119, 120]  # empty tasks, a one-document task, an ending empty task
    split = savez_roundtrip(step.decide(signatures_of(step, [docs[i:j] for i, j in zip(cuts, cuts[1:])])))

    def to_global(dec, cuts):
        kept = [cuts[t] + i for t, i in zip(dec["kept_task"].tolist(), dec["kept_index"].tolist())]
        return [cuts[t] + i for t, i in dropped_pairs(dec)], kept

    assert whole["drop_index"].size > 10
    assert to_global(whole, [0]) == to_global(split, cuts)
    assert split["task_offsets"].tolist() == cuts


def test_minhash_deterministic_regardless_of_signature_order():
    rng = random.Random(9)
    words = ["".join(rng.choices(string.ascii_lowercase, k=4)) for _ in range(50)]
    texts = [" ".join(rng.choices(words, k=100)) for _ in range(60)]
    texts += [t.replace(t.split()[3], "zzz", 1) for t in texts[:30]]  # near-duplicates
    tasks = [docs_of(texts[:45], 0), docs_of(texts[45:], 1)]
    step = MinhashDedup()
    reference = savez_roundtrip(step.decide(signatures_of(step, tasks)))
    # Signatures computed by fresh step instances, documents visited in a random order, then put back in
    # (task, index) order as the pipeline stores them.
    for seed in range(3):
        worker = pickle.loads(pickle.dumps(MinhashDedup()))
        order = [(t, i) for t in range(2) for i in range(len(tasks[t]))]
        random.Random(seed).shuffle(order)
        computed = {(t, i): worker.signature(tasks[t][i]) for t, i in order}
        sigs = [pack([computed[(t, i)] for i in range(len(tasks[t]))]) for t in range(2)]
        again = savez_roundtrip(MinhashDedup().decide(sigs))
        assert again.keys() == reference.keys()
        for k in reference:
            assert np.array_equal(again[k], reference[k]), k
    assert reference["drop_index"].size >= 25


def test_minhash_params_change_signatures():
    doc = Document("a", " ".join(f"w{i}" for i in range(50)), "s")
    assert MinhashDedup().signature(doc).shape == (112,)
    small = MinhashDedup(MinhashDedup.Params(bands=4, rows=2, seed=3))
    assert small.signature(doc).shape == (8,)
    with pytest.raises(ValueError, match="expected 112"):
        MinhashDedup().decide([pack([small.signature(doc)])])


# ---------------------------------------------------------------- boilerplate lines


FOOTER = "Copyright 2024 Example Corp. All rights reserved."
MENU = "Home | About us | Contact | Privacy policy"
RARE = "This line is shared by exactly two documents here."


def test_boilerplate_lines_removed_only_in_enough_documents():
    texts = []
    for i in range(6):
        body = f"Document number {i} talks about its own topic in a long line."
        lines = [MENU, "", body, "}", FOOTER]
        if i < 2:
            lines.insert(3, RARE)
        if i == 0:
            lines.append(FOOTER)  # twice in one document: still one document
        texts.append("\n".join(lines))
    texts.append(f"{MENU}\n  {FOOTER}  \n\n")  # only boilerplate (indented footer is the same line)
    texts.append("short\n}\nshort")  # nothing long enough
    step = BoilerplateLines(BoilerplateLines.Params(min_docs=5, min_line_chars=20))
    decision, results, applier = run_global(step, [docs_of(texts[:3], 0), docs_of(texts[3:], 1)])
    assert decision["boilerplate"].size == 2  # MENU (7 docs), FOOTER (7 docs); RARE is in 2
    assert step.counters == {"boilerplate_lines": 2}
    out = [r for task in results for r in task]
    assert out[0].text == "\nDocument number 0 talks about its own topic in a long line.\n" + RARE + "\n}"
    assert out[3].text == "\nDocument number 3 talks about its own topic in a long line.\n}"
    assert out[6] == "only_boilerplate"
    assert out[7].text == "short\n}\nshort" and out[7] is results[1][4]
    assert applier.counters["lines_removed"] == 2 * 7 + 1  # MENU and FOOTER everywhere, FOOTER twice in doc 0
    # One document fewer with the menu: below the threshold, nothing removed.
    step6 = BoilerplateLines(BoilerplateLines.Params(min_docs=8, min_line_chars=20))
    decision6, results6, applier6 = run_global(step6, [docs_of(texts)])
    assert decision6["boilerplate"].size == 0
    assert [r.text for r in results6[0]] == texts and applier6.counters["lines_removed"] == 0


def test_line_hashes_and_removal_helpers():
    text = "a long enough line here\r\n   a long   enough line here  \nxx\n"
    hs = line_hashes(text, 5)
    assert hs.size == 1  # whitespace-collapsed, stripped: the same line twice (the \r is whitespace)
    assert line_hashes(text, 100).size == 0
    assert remove_lines(text, hs, 5) == ("xx\n", 2)
    assert remove_lines(text, np.zeros(0, dtype=np.uint64), 5) == (text, 0)
    assert remove_lines("Line With Case Here", line_hashes("line with case here", 5), 5)[1] == 0
