"""A thin tokenizer wrapper over a Hugging Face `tokenizers.Tokenizer`, saved in the transformers layout.

The directory format is transformers' own (tokenizer.json + tokenizer_config.json +
special_tokens_map.json), so `AutoTokenizer.from_pretrained(dir)` loads what we save, and we load what
transformers saves.

Two ways to encode, as in transformers:
- `encode(text, add_special_tokens=True)` follows the tokenizer's own convention, its post-processor:
  BOS first for Llama-style tokenizers and for ours, nothing for Qwen2-style ones (`bos_token: null`). It
  equals `AutoTokenizer.from_pretrained(dir)(text).input_ids`. Prompts and plain training text use it.
- `encode(text)` / `encode(text, add_bos=..., add_eos=...)` encodes the bare text and adds exactly what is
  asked for (the data stage's shards, completions, a rendered chat template, which already holds the BOS
  text, so it is never doubled).
Tokenizer directories written by llmcycle before tokenizers carried a post-processor (an `llmcycle_kind`
in tokenizer_config.json, no post-processor in tokenizer.json) keep their old behaviour: BOS first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from llmcycle.artifacts import atomic_write_json
from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer.chat import (
    CHAT_ROLES,
    DEFAULT_CHAT_TEMPLATE,
    END_OF_TURN_TOKEN,
    check_messages,
    find_assistant_spans,
    render_chat,
)

# The special tokens of every tokenizer we train, with fixed ids 0..7 whatever the kind; WordPiece also
# needs an unknown token, which gets id 8 so the shared ids stay the same.
SPECIAL_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "pad_token": "<|pad|>",
    "mask_token": "<|mask|>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN_TOKEN]
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKEN_LIST = [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]

TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
# transformers passes these to chat templates too (BERT-style templates use cls/sep).
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# End-of-turn tokens of common chat formats, for tokenizers written by other tools.
KNOWN_END_OF_TURN = (END_OF_TURN_TOKEN, "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|eot|>")


def _token_str(value) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LlmcycleError(f"{path}: file is missing.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmcycleError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise LlmcycleError(f"{path}: expected a JSON object.")
    return data


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte <-> printable character table, which the ByteLevel pre-tokenizer/decoder use.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, config: dict):
        self.backend = backend
        self.config = dict(config)
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        self.mask_token = _token_str(config.get("mask_token"))
        self.end_of_turn_token = _token_str(config.get("end_of_turn_token")) or next(
            (t for t in KNOWN_END_OF_TURN if backend.token_to_id(t) is not None), None
        )
        template = config.get("chat_template")
        if isinstance(template, list):  # the older multi-template format: [{"name", "template"}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.model_max_length = int(config.get("model_max_length") or 2048)
        # Our own directories from before the BOS post-processor: prompts always started with BOS there.
        self._legacy_bos = "llmcycle_kind" in config and backend.post_processor is None
        self._token_bytes: list[int] | None = None

    # ---- ids and sizes ----

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def mask_id(self) -> int | None:
        return self.token_to_id(self.mask_token)

    @property
    def end_of_turn_ids(self) -> list[int]:
        """Ids that end a generated assistant turn: eos and the end-of-turn token, where they exist."""
        ids = [self.eos_id, self.token_to_id(self.end_of_turn_token)]
        return sorted({i for i in ids if i is not None})

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    # ---- encoding ----

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise LlmcycleError("This tokenizer has no bos_token, so add_bos=True cannot be honoured.")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise LlmcycleError("This tokenizer has no eos_token, so add_eos=True cannot be honoured.")
            ids = [*ids, self.eos_id]
        return ids

    def _special_wrap(self, ids: list[int], add_special_tokens: bool, add_bos: bool, add_eos: bool):
        if add_special_tokens and (add_bos or add_eos):
            # Both would add BOS twice on a Llama-style tokenizer: the caller must pick one convention.
            raise ValueError("add_special_tokens=True adds what the tokenizer adds; drop add_bos/add_eos.")
        if add_special_tokens and self._legacy_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return self._wrap(ids, add_bos, add_eos)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, *,
               add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`.

        add_special_tokens=True: what the tokenizer itself adds (its post-processor), i.e. exactly
        `AutoTokenizer.from_pretrained(dir)(text).input_ids`. Otherwise the bare text plus BOS/EOS only where
        add_bos/add_eos ask for them (an error if the tokenizer has no such token).
        """
        post = add_special_tokens and not self._legacy_bos
        ids = self.backend.encode(text, add_special_tokens=post).ids
        return self._special_wrap(ids, add_special_tokens, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False, *,
                     add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` of many texts in parallel (Rust threads); the fast path skips computing offsets."""
        texts = list(texts)
        post = add_special_tokens and not self._legacy_bos
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encoded = fast(texts, add_special_tokens=post)
        return [self._special_wrap(e.ids, add_special_tokens, add_bos, add_eos) for e in encoded]

    @property
    def adds_bos(self) -> bool:
        """Whether `encode(text, add_special_tokens=True)` starts with BOS (the tokenizer's convention)."""
        bos = self.bos_id
        return bos is not None and self.encode("", add_special_tokens=True)[:1] == [bos]

    @property
    def adds_eos(self) -> bool:
        """Whether `encode(text, add_special_tokens=True)` ends with EOS."""
        eos = self.eos_id
        return eos is not None and self.encode("", add_special_tokens=True)[-1:] == [eos]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # int() so numpy/torch integer tensors work as well as lists.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ----

    def _template_variables(self) -> dict:
        # The named special tokens that are set: what transformers passes to templates as its
        # special_tokens_map, and what we write to special_tokens_map.json.
        values = {k: _token_str(self.config.get(k)) for k in TEMPLATE_TOKEN_KEYS}
        values.update({k: getattr(self, k) for k in TOKEN_KEYS})
        return {k: v for k, v in values.items() if v is not None}

    def _render(self, messages: list[dict], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> tuple[str, list[dict], list]:
        if self.chat_template is None:
            raise LlmcycleError("This tokenizer has no chat_template in its tokenizer_config.json.")
        # Our own template only knows these roles; say so before Jinja does, with the message index.
        messages = check_messages(messages, strict_roles=self.chat_template == DEFAULT_CHAT_TEMPLATE)
        variables = self._template_variables()
        text, spans = render_chat(self.chat_template, messages, add_generation_prompt, variables, tools)
        return text, messages, spans

    def _prefix_renderer(self, messages: list[dict], tools: list[dict] | None = None):
        """i -> messages[:i] rendered with the generation prompt, or None where the template refuses it."""
        variables = self._template_variables()

        def render(i: int) -> str | None:
            try:
                return render_chat(self.chat_template, messages[:i], True, variables, tools)[0]
            except LlmcycleError:  # e.g. a template that needs a first user message
                return None

        return render

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None) -> str:
        return self._render(messages, add_generation_prompt, tools)[0]

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat and its assistant mask.

        The mask is 1 on every token that overlaps an assistant message's content or the end-of-turn
        token after it (the `{% generation %}` spans of the template), 0 on system/user text, role headers
        and bos. The ids are exactly `encode(apply_chat_template(messages))`.
        """
        text, messages, spans = self._render(messages, add_generation_prompt, tools)
        if not GENERATION_TAG.search(self.chat_template):
            end_tokens = [t for t in (self.end_of_turn_token, self.eos_token) if t]
            spans = find_assistant_spans(text, messages, end_tokens, self._prefix_renderer(messages, tools))
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        for i, (start, end) in enumerate(enc.offsets):
            end = max(end, start + 1)
            if any(start < e and end > s for s, e in spans):
                mask[i] = 1
        return list(enc.ids), mask

    # ---- bytes, hashing ----

    def token_bytes(self) -> list[int]:
        """For each id, how many UTF-8 bytes it decodes to (0 for special tokens).

        Exact for byte-level tokenizers: sum(token_bytes()[i] for i in encode(s)) == len(s.encode()). For
        WordPiece it counts the piece's characters only (the pre-tokenizer drops whitespace).
        """
        if self._token_bytes is None:
            self._token_bytes = self._compute_token_bytes()
        return list(self._token_bytes)

    def _compute_token_bytes(self) -> list[int]:
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {d.get("type") for d in decoders}
        wp_prefix = next((d.get("prefix", "##") for d in decoders if d.get("type") == "WordPiece"), None)
        added = self.backend.get_added_tokens_decoder()
        out = []
        for i in range(self.vocab_size):
            tok = self.backend.id_to_token(i)
            if tok is None or (i in added and added[i].special):
                out.append(0)
            elif i in added:  # added non-special tokens are stored as raw text
                out.append(len(tok.encode("utf-8")))
            elif "ByteLevel" in kinds and all(c in BYTE_OF_CHAR for c in tok):
                out.append(len(tok))
            elif "ByteFallback" in kinds and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out.append(1)
            elif "ByteFallback" in kinds or "Metaspace" in kinds:
                out.append(len(tok.replace("\u2581", " ").encode("utf-8")))
            elif wp_prefix is not None:
                out.append(len(tok.removeprefix(wp_prefix).encode("utf-8")))
            else:
                out.append(len(self.backend.decode([i], skip_special_tokens=False).encode("utf-8")))
        return out

    def content_hash(self) -> str:
        """sha256 of the canonical tokenizer.json, the chat template and the special-token names."""
        # Floats (Unigram scores) are rounded: the Rust writer's last digit can differ after a load/save.
        content = json.loads(self.backend.to_str(), parse_float=lambda s: format(float(s), ".12g"))
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False)
        extra = json.dumps(
            {"chat_template": self.chat_template, "end_of_turn_token": self.end_of_turn_token,
             **self._template_variables()},
            sort_keys=True,
        )
        return hashlib.sha256((canonical + "\n" + extra).encode("utf-8")).hexdigest()

    # ---- files ----

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer directory written by us or by transformers' save_pretrained."""
        path = Path(path)
        if not path.is_dir():
            raise LlmcycleError(f"{path}: tokenizer directory does not exist.")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise LlmcycleError(f"{tok_file}: file is missing.")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON or unknown models
            raise LlmcycleError(f"{tok_file}: not a valid tokenizers file ({str(e)[:200]}).") from None
        config = _read_json(path / "tokenizer_config.json")
        # Older transformers versions keep some special tokens only in special_tokens_map.json.
        smap_file = path / "special_tokens_map.json"
        if smap_file.is_file():
            for key, value in _read_json(smap_file).items():
                if key in TEMPLATE_TOKEN_KEYS and _token_str(config.get(key)) is None:
                    config[key] = value
        # transformers >= 4.47 writes the template to chat_template.jinja, which wins over the config.
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        return cls(backend, config)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"), pretty=True)
        added = {
            str(i): {
                "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                "single_word": t.single_word, "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        special = self._template_variables()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "end_of_turn_token": self.end_of_turn_token,
            "model_max_length": self.model_max_length,
            # Byte-level text must decode verbatim; transformers' cleanup would turn " ." into ".".
            "clean_up_tokenization_spaces": False,
            # What the post-processor does, stated as Llama's tokenizer_config does (transformers 5 follows
            # the post-processor in tokenizer.json; older tools read these flags).
            "add_bos_token": self.adds_bos,
            "add_eos_token": self.adds_eos,
            "chat_template": self.chat_template,
            "added_tokens_decoder": added,
        }
        for key in ("llmcycle_kind",):  # our own bookkeeping survives a save/load
            if key in self.config:
                config[key] = self.config[key]
        # A chat_template.jinja left by transformers would win over the template we write below.
        (path / "chat_template.jinja").unlink(missing_ok=True)
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            atomic_write_json(path / name, data, ensure_ascii=False)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.config.get('llmcycle_kind', '?')}, vocab_size={self.vocab_size})"


__all__ = ["Tokenizer", "SPECIAL_TOKENS", "ROLE_TOKENS", "UNK_TOKEN", "CHAT_ROLES", "DEFAULT_CHAT_TEMPLATE"]
