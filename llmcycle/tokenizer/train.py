"""Train a tokenizer (BPE, Unigram or WordPiece) on an iterable of texts. See docs/tokenizer.md.

- bpe: byte-level BPE with Llama-3's pre-tokenization regex and all 256 bytes in the initial alphabet,
  so every Unicode string round-trips and nothing is ever unknown.
- unigram: the same byte-level pre-tokenization and decoder around a Unigram model (again all 256
  bytes are kept as pieces), so it round-trips too.
- wordpiece: BERT-style (cased); it normalizes text and drops whitespace, so it does not round-trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, END_OF_TURN_TOKEN
from llmcycle.tokenizer.tokenizer import SPECIAL_TOKEN_LIST, SPECIAL_TOKENS, UNK_TOKEN, Tokenizer

KINDS = ("bpe", "unigram", "wordpiece")

# Llama-3's split: contractions, letter runs (with one leading non-letter, e.g. " word"), numbers in
# groups of at most 3 digits, punctuation runs, newlines, and the remaining whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


def _byte_level(backend: Backend) -> None:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()


def _build(kind: str, vocab_size: int, min_frequency: int) -> tuple[Backend, trainers.Trainer]:
    n_special = len(SPECIAL_TOKEN_LIST)
    if kind == "bpe":
        backend = Backend(models.BPE())
        _byte_level(backend)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKEN_LIST,
            initial_alphabet=BYTE_ALPHABET, show_progress=False,
        )
    elif kind == "unigram":
        # No unk token: the 256 byte pieces are always kept (they are "required characters" for the
        # trainer), so any input has a segmentation. Unigram has no min_frequency setting.
        backend = Backend(models.Unigram())
        _byte_level(backend)
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKEN_LIST, initial_alphabet=BYTE_ALPHABET,
            max_piece_length=16, show_progress=False,
        )
    else:  # wordpiece
        backend = Backend(models.WordPiece(unk_token=UNK_TOKEN, max_input_chars_per_word=100))
        # Cased BERT: drop control characters, map all whitespace to " ", space out CJK ideographs; keep
        # case and accents (code and identifiers are case-sensitive).
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        # Each character enters the vocab twice ("x" and "##x"), so cap the alphabet to leave room for
        # merges in a small vocab; rarer characters become <|unk|>.
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=[*SPECIAL_TOKEN_LIST, UNK_TOKEN],
            limit_alphabet=max(1, (vocab_size - n_special - 1) // 4), continuing_subword_prefix="##",
            show_progress=False,
        )
    return backend, trainer


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 4096,
    min_frequency: int = 2,
    chat_template: str | None = None,
    model_max_length: int = 2048,
) -> Tokenizer:
    """Train a tokenizer of `kind` with `vocab_size` ids in total (special tokens included).

    Special tokens take ids 0..7 (8 is <|unk|> for WordPiece); `chat_template=None` uses the default.
    """
    if kind not in KINDS:
        raise LlmcycleError(f"Unknown tokenizer kind {kind!r}; valid choices are {', '.join(KINDS)}.")
    n_special = len(SPECIAL_TOKEN_LIST) + (kind == "wordpiece")
    # Unigram needs room for one learned piece: with none, the tokenizers trainer overshoots the size.
    minimum = n_special + len(BYTE_ALPHABET) + (kind == "unigram")
    if vocab_size < minimum:
        raise LlmcycleError(
            f"vocab_size={vocab_size} is too small for a {kind} tokenizer: the {n_special} special tokens "
            f"and the 256-entry byte alphabet need at least {minimum}."
        )
    backend, trainer = _build(kind, vocab_size, min_frequency)

    seen = {"chars": 0}

    def counted() -> Iterator[str]:
        # Counts as it streams, so `texts` can be a one-pass generator over a large corpus.
        for t in texts:
            if not isinstance(t, str):
                raise LlmcycleError(f"Tokenizer training texts must be strings, got {type(t).__name__}.")
            seen["chars"] += len(t)
            yield t

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen["chars"] == 0:
        raise LlmcycleError("Cannot train a tokenizer on an empty corpus (no text was given).")
    # The backend adds BOS as Llama's does, so transformers tokenizes a prompt exactly as we do with
    # encode(add_special_tokens=True). Explicit callers (shards: add_bos/add_eos, rendered chat templates,
    # which carry the BOS text) encode without it, so BOS is never doubled.
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    # Reload from JSON so the object we return is exactly what save_pretrained writes and a load reads
    # (Unigram scores can differ in the last bit after a JSON round trip).
    backend = Backend.from_str(backend.to_str())
    if kind != "wordpiece":
        # Without an unk token, a byte symbol missing from the vocab would make encode() fail on some input.
        missing = [c for c in BYTE_ALPHABET if backend.token_to_id(c) is None]
        if missing:
            raise RuntimeError(f"{kind} training dropped {len(missing)} of the 256 byte symbols: {missing[:5]}")
    if backend.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise RuntimeError(f"{kind} training produced {backend.get_vocab_size()} ids, more than {vocab_size}")
    config = {
        **SPECIAL_TOKENS,
        **({"unk_token": UNK_TOKEN} if kind == "wordpiece" else {}),
        "end_of_turn_token": END_OF_TURN_TOKEN,
        "model_max_length": model_max_length,
        "chat_template": chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE,
        "llmcycle_kind": kind,
    }
    return Tokenizer(backend, config)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compression: UTF-8 bytes of `texts` per token they encode to (higher is better)."""
    texts = [t for t in texts if t]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    if n_tokens == 0:
        raise LlmcycleError("bytes_per_token needs at least one non-empty text.")
    return n_bytes / n_tokens
