"""A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" vocabulary in GGUF metadata.

llama.cpp does not run the `tokenizers` library: it re-implements byte-level BPE and picks the split regex
by name (`tokenizer.ggml.pre`, see its src/llama-vocab.cpp). So the exporter must name a pre-tokenizer
whose splitting is the one tokenizer.json describes, and also match how merges are applied:

- llmcycle's BPE splits with Llama-3's regex. llama.cpp knows that regex under two kinds of names:
  "llama-bpe" (which also sets `ignore_merges`: a pre-token that is itself in the vocabulary becomes
  that token, as tokenizer.json's `"ignore_merges": true` does) and "smaug-bpe"/"dbrx" (same regex,
  merges always applied, as `"ignore_merges": false`, the `tokenizers` default and what llmcycle
  trains, does). With BPE the two can differ: "abc" in the vocabulary may still be merged as a + bc.
- Qwen2's regex (digits one at a time) is "qwen2"; plain GPT-2 byte-level (ByteLevel's own regex) is
  "gpt-2". Both apply merges always.

Anything else (another regex, a normalizer llama.cpp would not run, WordPiece, Unigram) is refused with
a message rather than exported with a tokenizer that would quietly split text differently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError

log = logging.getLogger(__name__)

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2 = "<ByteLevel use_regex>"  # ByteLevel's built-in GPT-2 split, no Split step before it

# (split, ignore_merges) -> the llama.cpp pre-tokenizer name that splits and merges the same way.
PRE_TOKENIZERS = {
    (LLAMA3_REGEX, True): "llama-bpe",
    (LLAMA3_REGEX, False): "smaug-bpe",
    (QWEN2_REGEX, False): "qwen2",
    (GPT2, False): "gpt-2",
}

# gguf.TokenType values (written as plain ints so this module needs no gguf import).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    """What the GGUF file says about the tokenizer (`tokenizer.ggml.*` keys)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk, eot -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _split_of(pre: dict | None) -> str:
    """The split a byte-level pre-tokenizer applies: a Split regex followed by ByteLevel without its own
    regex, or ByteLevel with its GPT-2 regex alone."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if s else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space") and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {})):
        return steps[0]["pattern"]["Regex"]
    raise LlmcycleError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not a byte-level split "
                        "llama.cpp implements; GGUF export supports byte-level BPE with Llama-3's, Qwen2's "
                        "or GPT-2's split.")


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` name for a tokenizer.json whose splitting and merging llama.cpp reproduces."""
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LlmcycleError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')}.")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise LlmcycleError("GGUF export supports plain byte-level BPE (no byte fallback, no word prefix/suffix).")
    norm = spec.get("normalizer")
    # NFC: llama.cpp does not normalize, which changes nothing for text that is already NFC (Qwen2 ships it).
    if norm is not None and norm.get("type") != "NFC":
        raise LlmcycleError(f"the tokenizer normalizes text ({norm.get('type')}), which llama.cpp does not do.")
    key = (_split_of(spec.get("pre_tokenizer")), bool(model.get("ignore_merges", False)))
    if key not in PRE_TOKENIZERS:
        raise LlmcycleError(f"llama.cpp knows no pre-tokenizer that splits with {key[0]!r} "
                            f"(ignore_merges={key[1]}); GGUF export cannot keep this tokenizer's ids.")
    return PRE_TOKENIZERS[key]


def _merges(model: dict) -> list[str]:
    # tokenizers writes merges as "a b" (older files) or as ["a", "b"] pairs (newer ones); GGUF wants "a b".
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _adds_bos(spec: dict, bos: str | None) -> bool:
    """True when encoding a text puts BOS first (a TemplateProcessing post-processor starting with it)."""
    post = spec.get("post_processor") or {}
    first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
    return bos is not None and first.get("SpecialToken", {}).get("id") == bos


def read_vocab(tokenizer_dir: str | Path, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of the tokenizer in `tokenizer_dir` for a model with `vocab_size` embedding rows.

    Token i of the list is id i; ids the tokenizer does not use (a model padded beyond its tokenizer) are
    "[PADi]" with type UNUSED. Added special tokens are CONTROL (llama.cpp renders them only on request
    and matches them in prompts as llmcycle does), other added tokens USER_DEFINED."""
    tokenizer_dir = Path(tokenizer_dir)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg_file = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    pre = pre_tokenizer_name(spec)
    model = spec["model"]
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise LlmcycleError(f"the tokenizer has id {max(by_id)} but the model only {vocab_size} embedding rows.")
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)]
    ids = {text: i for i, (text, _) in enumerate(tokens)}

    def token_id(key: str) -> int | None:
        value = cfg.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return ids.get(text) if isinstance(text, str) else None

    special = {name: token_id(key) for name, key in (("bos", "bos_token"), ("eos", "eos_token"),
               ("pad", "pad_token"), ("unk", "unk_token"), ("eot", "end_of_turn_token"))}
    template = cfg.get("chat_template")
    if isinstance(template, str):
        # HF's {% generation %} marks assistant tokens for training masks and renders nothing; llama.cpp's
        # Jinja engine does not know the tag, so it is dropped.
        template = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    bos_text = tokens[special["bos"]][0] if special["bos"] is not None else None
    return GGUFVocab(pre=pre, tokens=[t for t, _ in tokens], token_types=[k for _, k in tokens],
                     merges=_merges(model), special_ids={k: v for k, v in special.items() if v is not None},
                     add_bos=_adds_bos(spec, bos_text), add_eos=bool(cfg.get("add_eos_token", False)),
                     chat_template=template if isinstance(template, str) else None)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add `vocab` to a gguf.GGUFWriter under llama.cpp's tokenizer keys."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
              "unk": writer.add_unk_token_id, "eot": writer.add_eot_token_id}
    for name, token in vocab.special_ids.items():
        adders[name](token)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
