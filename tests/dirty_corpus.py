"""A dirty corpus the data-pipeline tests generate, with every planted defect counted.

English-looking documents are random sentences over a fixed vocabulary (seeded), so unrelated
documents share no 5-word shingle; defects are planted on top with known counts: exact duplicates,
near-duplicates (one word changed in ~120: Jaccard ~0.92, caught by 14x8 LSH with probability
> 0.9999), PII of each kind, other languages, malformed records of each kind.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "good new first last long great little own other old big high different small large next early young "
    "important few public bad same able make know take see come think look want give use find tell ask seem "
    "feel try leave call keep let begin help talk turn start show hear play run move like live believe hold "
    "bring happen write provide sit stand lose pay meet include continue set learn lead understand watch follow"
).split()

GERMAN = ("Die Stadt liegt an einem großen Fluss und hat viele alte Häuser. Im Sommer kommen zahlreiche "
          "Besucher, um die Kirchen und Museen zu sehen. Die Menschen hier sind freundlich und sprechen gern "
          "über die Geschichte ihrer Heimat, die sehr reich und interessant ist. Am Abend gehen viele Leute "
          "in die kleinen Restaurants am Marktplatz, wo man gut essen und trinken kann.")
FRENCH = ("La ville se trouve au bord d'une grande rivière et possède de nombreuses maisons anciennes. En été, "
          "beaucoup de visiteurs viennent voir les églises et les musées. Les habitants sont aimables et "
          "parlent volontiers de l'histoire de leur région, qui est très riche et intéressante. Le soir, "
          "beaucoup de gens vont dans les petits restaurants de la place du marché.")

PII = {
    "email": "alice.smith@example.com",
    "ip": "192.168.10.45",
    "phone": "+1 415-555-0134",
    "credit_card": "4111 1111 1111 1111",  # Luhn-valid test number
}


def english_doc(rng: random.Random, n_words: int = 120) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    sentences, i = [], 0
    while i < len(words):
        k = rng.randint(8, 14)
        s = words[i:i + k]
        sentences.append(" ".join(s).capitalize() + ".")
        i += k
    return " ".join(sentences)


def near_duplicate(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    j = rng.randrange(5, len(words) - 5)
    words[j] = "zebra" + str(rng.randrange(10**6))
    return " ".join(words)


def make_dirty_corpus(root: Path, num_files: int = 4, docs_per_file: int = 30, seed: int = 0) -> dict:
    """Write `num_files` clean-ish JSONL files plus bad-input files under root; return expected counts."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    originals: list[str] = []
    expected = {"unique": 0, "exact_duplicate": 0, "near_duplicate": 0, "lang": {"de": 0, "fr": 0},
                "pii": {k: 0 for k in PII}, "bad": {}}
    for f in range(num_files):
        rows = []
        for i in range(docs_per_file):
            text = english_doc(rng)
            if i % 10 == 3:  # one PII kind per such document, round robin
                kind = list(PII)[(f * docs_per_file + i) // 10 % len(PII)]
                text += f" Contact {PII[kind]} for details."
                expected["pii"][kind] += 1
            originals.append(text)
            rows.append({"id": f"f{f}-{i}", "text": text})
            expected["unique"] += 1
        if f > 0:  # duplicates of documents from the previous file: the earlier copy is kept
            for k in range(3):
                rows.append({"id": f"f{f}-dup{k}", "text": originals[(f - 1) * docs_per_file + k * 7]})
                expected["exact_duplicate"] += 1
            for k in range(2):
                src = originals[(f - 1) * docs_per_file + k * 7 + 1]
                rows.append({"id": f"f{f}-near{k}", "text": near_duplicate(rng, src)})
                expected["near_duplicate"] += 1
        rows.append({"id": f"f{f}-de", "text": GERMAN + f" Nummer {f}."})
        rows.append({"id": f"f{f}-fr", "text": FRENCH + f" Numéro {f}."})
        expected["lang"]["de"] += 1
        expected["lang"]["fr"] += 1
        with open(root / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")

    # Bad input, each kind a known number of times.
    bad = root / "bad.jsonl"
    with open(bad, "wb") as fh:
        fh.write(json.dumps({"id": "ok-1", "text": english_doc(rng)}).encode() + b"\n")
        fh.write(b'{"id": "broken", "text": "no closing\n')                      # line 2 malformed_json
        fh.write(b'{"id": "latin1", "text": "caf\xe9"}\n')                      # line 3 invalid_utf8
        fh.write(json.dumps({"id": "notext", "body": "x"}).encode() + b"\n")     # line 4 missing_text
        fh.write(json.dumps({"id": "empty", "text": "   "}).encode() + b"\n")    # line 5 empty_document
        fh.write(json.dumps({"id": "huge", "text": "word " * 6000}).encode() + b"\n")  # over_size_limit
        fh.write(b"[1, 2, 3]\n")                                                  # line 7 malformed_json
    expected["unique"] += 1
    expected["bad"] = {"malformed_json": 2, "invalid_utf8": 1, "missing_text": 1, "empty_document": 1,
                       "over_size_limit": 1}
    # A gzip file cut in the middle: the complete lines before the cut are kept.
    lines = [json.dumps({"id": f"gz-{i}", "text": english_doc(rng)}) + "\n" for i in range(6)]
    data = gzip.compress("".join(lines).encode())
    cut = data[: int(len(data) * 0.7)]
    (root / "cut.jsonl.gz").write_bytes(cut)
    expected["bad"]["truncated_compressed"] = 1
    expected["gz_complete_lines"] = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    expected["unique"] += expected["gz_complete_lines"]
    return expected
