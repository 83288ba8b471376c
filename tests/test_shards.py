import hashlib
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import write_shards
from llmcycle.data.shards import ShardSet, ShardWriter, tokenize_to_shards
from llmcycle.errors import LlmcycleError

BOS = 1


def make_docs(n=50, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    return [[BOS] + rng.integers(2, vocab, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


def test_round_trip_across_shards(tmp_path):
    docs = make_docs()
    meta = write_shards(tmp_path, docs, vocab_size=300, tokenizer_hash="abc", bos_id=BOS, shard_tokens=100,
                        metadata={"source": "unit"})
    assert len(meta["shards"]) > 3  # small shard_tokens forces several shards
    s = ShardSet(tmp_path, verify=True)
    assert (s.num_docs, s.num_tokens) == (len(docs), sum(map(len, docs)))
    assert (s.vocab_size, s.tokenizer_hash, s.bos_id) == (300, "abc", BOS)
    assert s.meta["metadata"] == {"source": "unit"} and s.meta["num_bytes"] is None
    for i, d in enumerate(docs):
        assert s.doc(i).tolist() == d
    assert s.doc(-1).tolist() == docs[-1]
    assert s.doc_lengths().tolist() == [len(d) for d in docs]
    pos = s.doc_offsets()[:-1]
    assert s.take(pos).tolist() == [BOS] * len(docs)
    # Documents never span shards and idx files follow the spec.
    first = meta["shards"][0]
    idx = np.fromfile(tmp_path / f"{first['name']}.idx", dtype="<i8")
    assert idx[0] == 0 and idx[-1] == first["num_tokens"] and len(idx) == first["num_docs"] + 1


def test_dtype_choice(tmp_path):
    write_shards(tmp_path / "a", [[0, 65535]], vocab_size=65536, tokenizer_hash="h", bos_id=0)
    write_shards(tmp_path / "b", [[0, 65536]], vocab_size=65537, tokenizer_hash="h", bos_id=0)
    a, b = ShardSet(tmp_path / "a"), ShardSet(tmp_path / "b")
    assert a.meta["dtype"] == "uint16" and a.dtype == np.dtype("<u2")
    assert b.meta["dtype"] == "uint32" and b.dtype == np.dtype("<u4")
    assert (tmp_path / "a" / "shard_00000.bin").stat().st_size == 4
    assert (tmp_path / "b" / "shard_00000.bin").stat().st_size == 8
    assert b.doc(0).tolist() == [0, 65536]


def test_writer_rejects_bad_ids(tmp_path):
    with ShardWriter(tmp_path, vocab_size=10, tokenizer_hash="h", bos_id=0) as w:
        w.add([0, 9])
        with pytest.raises(ValueError):
            w.add([0, 10])
        with pytest.raises(ValueError):
            w.add([0, -1])
        with pytest.raises(ValueError):
            w.add([3, 4])  # does not start with BOS
        with pytest.raises(ValueError):
            w.add([])
    assert ShardSet(tmp_path).num_docs == 1


def test_truncated_bin_detected(tmp_path):
    write_shards(tmp_path, make_docs(), 300, "h", BOS)
    path = tmp_path / "shard_00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(LlmcycleError, match="shard_00000.bin.*truncated"):
        ShardSet(tmp_path)


def test_missing_sidecar_detected(tmp_path):
    write_shards(tmp_path, make_docs(), 300, "h", BOS)
    (tmp_path / "shards.json").unlink()
    with pytest.raises(LlmcycleError, match="shards.json is missing"):
        ShardSet(tmp_path)


def test_unknown_format_detected(tmp_path):
    write_shards(tmp_path, make_docs(), 300, "h", BOS)
    side = tmp_path / "shards.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "format": "other"}))
    with pytest.raises(LlmcycleError, match="shards.json"):
        ShardSet(tmp_path)


def test_verify_catches_flipped_byte(tmp_path):
    write_shards(tmp_path, make_docs(), 300, "h", BOS)
    path = tmp_path / "shard_00000.bin"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))
    ShardSet(tmp_path)  # sizes still agree: only verify=True reads the content
    with pytest.raises(LlmcycleError, match="shard_00000.bin.*sha256"):
        ShardSet(tmp_path, verify=True)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    meta = write_shards(tmp_path, make_docs(200), 300, "h", BOS, shard_tokens=500)
    expected = {"shards.json"} | {f"{s['name']}.{ext}" for s in meta["shards"] for ext in ("bin", "idx")}
    assert {p.name for p in tmp_path.iterdir()} == expected


def test_incomplete_write_has_no_sidecar(tmp_path):
    write_shards(tmp_path, make_docs(), 300, "h", BOS)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 300, "h", BOS, shard_tokens=50) as w:
            for d in make_docs():
                w.add(d)
            raise RuntimeError("crash mid-write")
    # The old sidecar is gone and no new one was written: the directory reads as incomplete.
    with pytest.raises(LlmcycleError, match="missing"):
        ShardSet(tmp_path)


def test_content_hash(tmp_path):
    write_shards(tmp_path / "a", make_docs(seed=0), 300, "h", BOS)
    write_shards(tmp_path / "b", make_docs(seed=0), 300, "h", BOS)
    write_shards(tmp_path / "c", make_docs(seed=1), 300, "h", BOS)
    a, b, c = (ShardSet(tmp_path / n).content_hash() for n in "abc")
    assert a == b != c


class TinyBPE:
    """The four members tokenize_to_shards needs, over a `tokenizers` BPE."""

    def __init__(self, texts):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.bos_id = tok.token_to_id("<bos>")
        self.eos_id = tok.token_to_id("<eos>")

    def encode_batch(self, texts, add_bos=True, add_eos=True):
        return [[self.bos_id] * add_bos + e.ids + [self.eos_id] * add_eos for e in self.tok.encode_batch(texts)]

    def content_hash(self):
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


def test_tokenize_to_shards_with_real_bpe(tmp_path):
    texts = [f"document {i}: the quick brown fox jumps over {i % 7} lazy dogs. héllo wörld" for i in range(60)]
    texts.append("")
    tok = TinyBPE(texts)
    meta = tokenize_to_shards(iter(texts), tok, tmp_path, batch_size=16, shard_tokens=400, progress=False,
                              metadata={"corpus": "toy"})
    assert meta["num_docs"] == len(texts) and len(meta["shards"]) > 1
    assert meta["num_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    s = ShardSet(tmp_path, verify=True)
    assert (s.vocab_size, s.bos_id, s.tokenizer_hash) == (tok.vocab_size, tok.bos_id, tok.content_hash())
    for i, text in enumerate(texts):
        ids = s.doc(i).tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.tok.decode(ids[1:-1]) == text


def test_tokenize_to_shards_empty_input(tmp_path):
    tok = TinyBPE(["some text to train on"])
    with pytest.raises(LlmcycleError, match="no documents"):
        tokenize_to_shards([], tok, tmp_path, progress=False)
    assert not (tmp_path / "shards.json").exists()
