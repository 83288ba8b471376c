"""Post-training datasets: JSONL / Parquet records -> tokenized examples, with an account of bad input.

Formats follow Hugging Face TRL and are detected per record, so one file may mix them:
  SFT          {"messages": [...]}, Alpaca {"instruction", "input"?, "output"}, {"prompt", "completion"}
  preferences  {"prompt", "chosen", "rejected"}, or implicit-prompt {"chosen": [...], "rejected": [...]}
  KTO          {"prompt", "completion", "label": bool}
  prompts      {"prompt", "answer"?} ("reference" or "solution" also name the answer)
A prompt or completion is text or a list of {"role", "content"} messages; messages go through the chat
template, text is [bos] + prompt and completion + [eos].

Real datasets always hold some broken records. None of them crashes a run or vanishes: each is counted in
`Rejects` under a short reason with its location ("file:line", "file:row N"), and a run reports the
counts. Only a dataset with no usable example at all is refused (`require_examples`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer import CHAT_ROLES, Tokenizer
from llmcycle.train.config import DataSection
from llmcycle.train.posttrain.examples import PreferenceExample, PromptExample, SFTExample, UnpairedExample

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
KEEP_LOCATIONS = 5  # locations remembered per reason: enough to find the pattern, small in a manifest

# Reasons a record is rejected (plus "missing key 'x'", "unknown role 'x'", "chat template error: ...").
UNREADABLE = "unreadable file"
INVALID_UTF8 = "invalid UTF-8"
MALFORMED_JSON = "malformed JSON"
NOT_OBJECT = "record is not an object"
UNKNOWN_SHAPE = ("unknown record shape (SFT records are {messages}, {prompt, completion} or "
                 "{instruction, input?, output})")
MALFORMED_MESSAGES = "messages are not a list of {role, content} objects"
BAD_CONTENT = "missing or non-string content"
NO_ASSISTANT = "no assistant turn"
EMPTY_ASSISTANT = "empty assistant content"
BAD_TOOLS = "tools is not a list of function schemas"
EMPTY_COMPLETION = "empty completion"
NOT_ONE_ASSISTANT = "completion is not a single assistant message"
NOT_PREFIX = "prompt does not tokenize as a prefix of the conversation"
PROMPT_TOO_LONG = "prompt longer than max_length"
EMPTY_PAIR = "empty chosen or rejected"
SAME_PAIR = "chosen equal to rejected"
SAME_AFTER_TRUNCATION = "chosen equal to rejected after truncation"
NO_SHARED_PROMPT = "chosen and rejected differ before their last assistant turn"
BAD_LABEL = "label is not true/false"
BAD_ANSWER = "answer is not a string"
EMPTY_PROMPT = "empty prompt"
PROMPT_TOO_LONG_ONLINE = "prompt longer than max_prompt_length"

# A \u escape of a UTF-16 surrogate: paired ones (emoji) decode fine, a lone one makes a str that cannot
# be encoded, so only lines where this matches pay for the check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass
class Rejects:
    """Counts of rejected records by reason, with the first few locations of each, plus a truncation count."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0
    truncated_examples: list[str] = field(default_factory=list)

    def add(self, reason: str, source: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        locations = self.examples.setdefault(reason, [])
        if len(locations) < KEEP_LOCATIONS:
            locations.append(source)

    def add_truncated(self, source: str) -> None:
        self.truncated += 1
        if len(self.truncated_examples) < KEEP_LOCATIONS:
            self.truncated_examples.append(source)

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason, most frequent first, then truncations; "" when nothing to report."""

        def line(n: int, what: str, locations: list[str]) -> str:
            more = ", ..." if n > len(locations) else ""
            return f"  {n} {what} ({', '.join(locations)}{more})"

        by_count = sorted(self.counts.items(), key=lambda x: (-x[1], x[0]))
        lines = [line(n, reason, self.examples[reason]) for reason, n in by_count]
        if self.truncated:
            kept = "truncated to the length limit (kept)"
            lines.append(line(self.truncated, kept, self.truncated_examples))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "rejected": self.total(),
            "rejected_by_reason": dict(self.counts),
            "rejected_examples": {k: list(v) for k, v in self.examples.items()},
            "truncated": self.truncated,
            "truncated_examples": list(self.truncated_examples),
        }


class _Bad(Exception):
    """A record that cannot become an example; `reason` is what `Rejects` counts it under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- files and records ----


def _as_list(paths) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def dataset_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files behind `paths`: files as given, directories as their *.jsonl, *.jsonl.gz, *.parquet, sorted.

    A missing path is a mistake in the recipe, not bad data, so it raises instead of being counted.
    """
    files: list[Path] = []
    for p in map(Path, _as_list(paths)):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise LlmcycleError(f"{p}: no .jsonl, .jsonl.gz or .parquet files in this directory.")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LlmcycleError(f"{p}: dataset file or directory does not exist.")
    if not files:
        raise LlmcycleError("No dataset paths were given.")
    return files


def _has_lone_surrogate(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _jsonl_records(file: Path, rejects: Rejects) -> Iterator[tuple[str, dict]]:
    opener = gzip.open if file.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                source = f"{file}:{lineno}"
                try:
                    line = raw.decode("utf-8").removeprefix("\ufeff")
                except UnicodeDecodeError:
                    rejects.add(INVALID_UTF8, source)
                    continue
                if not line.strip():  # blank lines (a trailing newline) hold no record
                    continue
                if lineno == 1 and line.lstrip().startswith("["):
                    raise LlmcycleError(_json_array_message(file))
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    rejects.add(MALFORMED_JSON, source)
                    continue
                if not isinstance(record, dict):
                    rejects.add(NOT_OBJECT, source)
                elif _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(record):
                    rejects.add(INVALID_UTF8, source)
                else:
                    yield source, record
    except (OSError, EOFError, zlib.error):  # unreadable or corrupt/truncated gzip: count where it stopped
        rejects.add(UNREADABLE, f"{file}:{lineno + 1}")


def _json_array_message(file: Path) -> str:
    target = Path(file).with_suffix(".jsonl").name
    return (f"{file}: this is a JSON array; datasets are JSON Lines (.jsonl): one JSON object per line, no "
            f"enclosing [ ]. Convert it, e.g. `jq -c '.[]' {file} > {target}`.")


def _parquet_records(file: Path, rejects: Rejects) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                # A column a record lacks reads back as null: treat it as absent, as in JSONL.
                yield f"{file}:row {row}", {k: v for k, v in record.items() if v is not None}
    except (OSError, ValueError, pa.ArrowException):  # ArrowInvalid is a ValueError
        rejects.add(UNREADABLE, f"{file}:row {row + 1}")


def read_records(path: str | Path | Sequence[str | Path], rejects: Rejects) -> Iterator[tuple[str, dict]]:
    """(source, record) for every object in the dataset; records that are not JSON objects go to `rejects`."""
    for file in dataset_files(path):
        reader = _parquet_records if file.name.endswith(".parquet") else _jsonl_records
        yield from reader(file, rejects)


# ---- record pieces -> token ids ----


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad(MALFORMED_MESSAGES)
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value):
        raise _Bad(MALFORMED_MESSAGES)
    # An assistant turn that calls tools may have no text (OpenAI's and TRL's shape: content null).
    if not all(isinstance(m.get("content"), str) or (_calls(m) and m.get("content") is None) for m in value):
        raise _Bad(BAD_CONTENT)
    return value


def _calls(message: dict) -> bool:
    calls = message.get("tool_calls")
    return message.get("role") == "assistant" and isinstance(calls, list) and bool(calls)


def _tools(record: dict) -> list[dict] | None:
    """A record's `tools` (TRL's column: function schemas the template lists), a list or its JSON text."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise _Bad(BAD_TOOLS) from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _Bad(BAD_TOOLS)
    return tools or None


def _encode_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                 tools: list[dict] | None = None):
    try:
        return tok.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except LlmcycleError as e:  # the template refused this conversation: a bad record, not a bad run
        unknown = [m["role"] for m in messages if m["role"] not in CHAT_ROLES]
        if unknown:
            raise _Bad(f"unknown role {unknown[0][:30]!r}") from None
        raise _Bad(f"chat template error: {str(e)[:80]}") from None


def _text(value) -> str:
    """A completion's text: a string, or the content of a single assistant message."""
    if isinstance(value, list):
        messages = _messages(value)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise _Bad(NOT_ONE_ASSISTANT)
        return messages[0]["content"]
    if not isinstance(value, str):
        raise _Bad(BAD_CONTENT)
    return value


def _prompt_ids(tok: Tokenizer, prompt, tools: list[dict] | None = None) -> tuple[list[int], list[dict] | None]:
    """Ids a completion follows: the chat (with its `tools`) and the generation prompt, or [bos] + text."""
    if isinstance(prompt, list):
        messages = _messages(prompt)
        return _encode_chat(tok, messages, add_generation_prompt=True, tools=tools)[0], messages
    if not isinstance(prompt, str):
        raise _Bad(BAD_CONTENT)
    return tok.encode(prompt, add_special_tokens=True), None


def _completion_ids(tok: Tokenizer, prompt_ids: list[int], messages: list[dict] | None,
                    text: str, tools: list[dict] | None = None) -> list[int]:
    """The tokens after `prompt_ids`: the assistant span (content + end-of-turn), or text + eos."""
    if messages is None:
        return tok.encode(text, add_eos=True)
    ids, mask = _encode_chat(tok, [*messages, {"role": "assistant", "content": text}], tools=tools)
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:
        raise _Bad(NOT_PREFIX)
    span = [i for i in range(n, len(ids)) if mask[i]]
    if not span:
        raise _Bad(EMPTY_COMPLETION)
    return ids[n : span[-1] + 1]  # drops what the template writes after the turn (a newline)


def pair_ids(tok: Tokenizer, prompt: str, answer: str) -> list[int]:
    """The ids a reward model scores for a (prompt, answer) pair, tokenized exactly as a preference record
    `{"prompt": [user turn], "chosen": answer}` (plain text where the tokenizer has no chat template)."""
    try:
        prompt_ids, messages = _prompt_ids(tok, [{"role": "user", "content": prompt}] if tok.chat_template
                                           else prompt)
        return prompt_ids + _completion_ids(tok, prompt_ids, messages, answer)
    except _Bad as exc:
        raise LlmcycleError(f"cannot score this pair: {exc}") from None


def _need(record: dict, *keys: str) -> None:
    for key in keys:
        if key not in record:
            raise _Bad(f"missing key {key!r}")


def _load(paths, rejects: Rejects, parse: Callable[[dict, str], object]) -> list:
    out = []
    for source, record in read_records(paths, rejects):
        try:
            example = parse(record, source)
        except _Bad as bad:
            rejects.add(bad.reason, source)
            continue
        if getattr(example, "truncated", False):
            rejects.add_truncated(source)
        out.append(example)
    return out


# ---- SFT ----


def _sft_chat(tok: Tokenizer, messages: list[dict], n_prompt: int = 0, tools: list[dict] | None = None):
    """ids, trained, prompt_ids, reference of a chat; with n_prompt, only turns after it are trained. With
    `tools` (listed by the template), assistant tool calls are trained like text; tool results, shown in
    their own turns, are context."""
    if not any(m["role"] == "assistant" for m in messages[n_prompt:]):
        raise _Bad(NO_ASSISTANT)
    if any(m["role"] == "assistant" and not (m.get("content") or "").strip() and not _calls(m) for m in messages):
        raise _Bad(EMPTY_ASSISTANT)
    ids, mask = _encode_chat(tok, messages, tools=tools)
    trained = [bool(x) for x in mask]
    if n_prompt:  # TRL's prompt-completion: assistant turns inside the prompt are context, not targets
        head = _encode_chat(tok, messages[:n_prompt], add_generation_prompt=True, tools=tools)[0]
        if ids[: len(head)] != head:
            raise _Bad(NOT_PREFIX)
        trained = [t and i >= len(head) for i, t in enumerate(trained)]
    prompt_ids = reference = None
    if messages[-1]["role"] == "assistant" and len(messages) > 1 and not _calls(messages[-1]):
        p = _encode_chat(tok, messages[:-1], add_generation_prompt=True, tools=tools)[0]
        # A template that renders history differently (e.g. drops earlier reasoning) breaks the prefix;
        # the example still trains, it just has no exact-match pair.
        if ids[: len(p)] == p:
            prompt_ids, reference = p, messages[-1]["content"]
    return ids, trained, prompt_ids, reference


def _sft_record(tok: Tokenizer, record: dict):
    if "messages" in record:
        return _sft_chat(tok, _messages(record["messages"]), tools=_tools(record))
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):
            messages = _messages(prompt)
            if isinstance(completion, list):
                done = _messages(completion)
            elif isinstance(completion, str):
                done = [{"role": "assistant", "content": completion}]
            else:
                raise _Bad(BAD_CONTENT)
            return _sft_chat(tok, messages + done, n_prompt=len(messages), tools=_tools(record))
        text = _text(completion)
        if not isinstance(prompt, str):
            raise _Bad(BAD_CONTENT)
        if not text.strip():
            raise _Bad(EMPTY_COMPLETION)
        p, c = tok.encode(prompt, add_special_tokens=True), tok.encode(text, add_eos=True)
        return p + c, [False] * len(p) + [True] * len(c), p, text
    if "instruction" in record and "output" in record:
        instruction, output = record["instruction"], record["output"]
        extra = "" if record.get("input") is None else record["input"]
        if not all(isinstance(x, str) for x in (instruction, extra, output)):
            raise _Bad(BAD_CONTENT)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _sft_chat(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    raise _Bad(UNKNOWN_SHAPE)


def load_sft(paths, tokenizer: Tokenizer, max_length: int, rejects: Rejects,
             loss_on: str = "assistant") -> list[SFTExample]:
    """SFT examples: messages, Alpaca or prompt-completion records, cut to max_length tokens.

    `trained` is the assistant mask (prompt-completion: the completion only), or with loss_on="all" every
    token but the first.
    """
    if loss_on not in ("assistant", "all"):
        raise LlmcycleError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}.")

    def parse(record: dict, source: str) -> SFTExample:
        ids, trained, prompt_ids, reference = _sft_record(tokenizer, record)
        if loss_on == "all":
            trained = [False] + [True] * (len(ids) - 1)
        truncated = len(ids) > max_length
        if truncated:
            if not any(trained[:max_length]):
                raise _Bad(PROMPT_TOO_LONG)
            ids, trained = ids[:max_length], trained[:max_length]
        if prompt_ids is not None and len(prompt_ids) >= max_length:  # no room left to generate an answer
            prompt_ids = reference = None
        return SFTExample(ids, trained, source, prompt_ids, reference, truncated)

    return _load(paths, rejects, parse)


# ---- preferences, KTO, prompts ----


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: the messages chosen and rejected share, then one assistant message each."""
    if chosen == rejected:
        raise _Bad(SAME_PAIR)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    for tail in (chosen[n:], rejected[n:]):
        if n == 0 or len(tail) != 1 or tail[0]["role"] != "assistant":
            raise _Bad(NO_SHARED_PROMPT)
    return chosen[:n], chosen[n:], rejected[n:]


def _fit(prompt_ids: list[int], completions: list[list[int]],
         max_length: int) -> tuple[list[list[int]], bool]:
    """Cut completions so prompt + completion <= max_length; the prompt (shorter, checked) is kept whole."""
    room = max_length - len(prompt_ids)
    return [c[:room] for c in completions], any(len(c) > room for c in completions)


def load_preferences(paths, tokenizer: Tokenizer, max_length: int,
                     rejects: Rejects) -> list[PreferenceExample]:
    """Preference pairs: {prompt, chosen, rejected}, or chosen/rejected conversations with a shared prompt."""

    def parse(record: dict, source: str) -> PreferenceExample:
        _need(record, "chosen", "rejected")
        chosen, rejected = record["chosen"], record["rejected"]
        if "prompt" in record:
            prompt = record["prompt"]
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_implicit(_messages(chosen), _messages(rejected))
        else:
            raise _Bad("missing key 'prompt'")
        chosen, rejected = _text(chosen), _text(rejected)
        if not chosen.strip() or not rejected.strip():
            raise _Bad(EMPTY_PAIR)
        if chosen == rejected:
            raise _Bad(SAME_PAIR)
        tools = _tools(record)
        p, messages = _prompt_ids(tokenizer, prompt, tools)
        if len(p) >= max_length:  # before encoding the completions: they would be thrown away
            raise _Bad(PROMPT_TOO_LONG)
        full = [_completion_ids(tokenizer, p, messages, t, tools) for t in (chosen, rejected)]
        (c, r), truncated = _fit(p, full, max_length)
        if c == r:  # the pair differed only past the cut: nothing left to prefer
            raise _Bad(SAME_AFTER_TRUNCATION)
        return PreferenceExample(p, c, r, source, truncated)

    return _load(paths, rejects, parse)


def load_unpaired(paths, tokenizer: Tokenizer, max_length: int, rejects: Rejects) -> list[UnpairedExample]:
    """KTO feedback: {prompt, completion, label} with label a JSON true/false."""

    def parse(record: dict, source: str) -> UnpairedExample:
        _need(record, "prompt", "completion", "label")
        if not isinstance(record["label"], bool):  # "yes", 1, null: guessing would flip the training signal
            raise _Bad(BAD_LABEL)
        text = _text(record["completion"])
        if not text.strip():
            raise _Bad(EMPTY_COMPLETION)
        tools = _tools(record)
        p, messages = _prompt_ids(tokenizer, record["prompt"], tools)
        if len(p) >= max_length:
            raise _Bad(PROMPT_TOO_LONG)
        (c,), truncated = _fit(p, [_completion_ids(tokenizer, p, messages, text, tools)], max_length)
        return UnpairedExample(p, c, record["label"], source, truncated)

    return _load(paths, rejects, parse)


def load_prompts(paths, tokenizer: Tokenizer, max_prompt_length: int,
                 rejects: Rejects) -> list[PromptExample]:
    """Prompts for online methods, with the answer ("answer", "reference" or "solution") when there is one."""

    def parse(record: dict, source: str) -> PromptExample:
        _need(record, "prompt")
        prompt = record["prompt"]
        answer = next((record[k] for k in ("answer", "reference", "solution") if k in record), None)
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise _Bad(BAD_ANSWER)
            answer = str(answer)  # numeric answers (GSM8K-style) compare as text
        if isinstance(prompt, str) and not prompt.strip():
            raise _Bad(EMPTY_PROMPT)
        p, _ = _prompt_ids(tokenizer, prompt, _tools(record))
        if len(p) >= max_prompt_length:
            raise _Bad(PROMPT_TOO_LONG_ONLINE)
        return PromptExample(p, prompt, answer, source)

    return _load(paths, rejects, parse)


# ---- held-out data ----

HOLDOUT_FRACTION = 0.05
PAIRS = "preference pairs {prompt, chosen, rejected}"  # what preference evaluation reads


def holds_out_user_data(data) -> bool:
    """Whether held-out data come from the user's own training file: `data.train` is a file and `data.eval`
    is left at its default 'embedded' (the embedded tasks say nothing about the user's data)."""
    return data.train != "embedded" and data.eval == "embedded"


def _content_key(example) -> float:
    """A number in [0, 1) from an example's tokens (not its location), so a split survives a move."""
    fields = {k: v for k, v in vars(example).items() if k not in ("source", "truncated")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_holdout(examples: list, what: str,
                  fraction: float = HOLDOUT_FRACTION) -> tuple[list, list]:
    """(train, held out): `fraction` of `examples` (at least one, chosen by a hash of their content) held
    out for evaluation, with a line saying so; nothing held out from fewer than two examples."""
    if len(examples) < 2:
        log.info(f"eval: none (data.eval is 'embedded' but data.train is your file, and {len(examples)} {what} "
                 "is too few to hold any out); set data.eval to a held-out file")
        return examples, []
    keys = [_content_key(e) for e in examples]
    held = {i for i, k in enumerate(keys) if k < fraction} or {min(range(len(keys)), key=keys.__getitem__)}
    train = [e for i, e in enumerate(examples) if i not in held]
    heldout = [e for i, e in enumerate(examples) if i in held]
    log.info(f"eval: {len(heldout)} of {len(examples)} {what} from data.train held out ({fraction:.0%}, by "
             "content hash) and not trained on; data.eval is left at 'embedded', which is not your data. Set "
             "data.eval to a file to evaluate on it instead, or null for no evaluation")
    return train, heldout


def report_eval_rejects(rejects: Rejects, n_heldout: int,
                        expected: str = "") -> None:
    """Log held-out rejects as training rejects are logged (INFO); say so when none of the file is usable."""
    if not rejects.total() and not rejects.truncated:
        return
    log.info("held-out data:\n" + rejects.summary())
    if not n_heldout and rejects.total():
        hint = f" (held-out evaluation takes {expected})" if expected else ""
        log.info(f"held-out data: no usable example{hint}; evaluation is skipped")


def require_examples(examples: list, rejects: Rejects, what: str, paths) -> None:
    """Refuse a dataset with no usable example, saying why every record was rejected."""
    if examples:
        return
    where = ", ".join(str(p) for p in _as_list(paths))
    if not rejects.total():
        raise LlmcycleError(f"{where}: no {what} records found (the dataset is empty).")
    n = rejects.total()
    raise LlmcycleError(
        f"{where}: no usable {what} example; all {n} records were rejected:\n{rejects.summary()}"
    )


__all__ = [
    "HOLDOUT_FRACTION", "PAIRS", "Rejects", "dataset_files", "holds_out_user_data", "load_preferences",
    "load_prompts", "load_sft", "load_unpaired",
    "read_records", "report_eval_rejects", "require_examples", "resolve_data", "split_holdout",
    "DataSets", "load_sets", "load_train_and_heldout",
]


# Which embedded file feeds each kind of dataset (names returned by synthetic.write_embedded_datasets).
EMBEDDED = {"sft": ("sft_train", "sft_eval"), "pref": ("pref_train", "pref_eval"),
            "kto": ("kto_train", "pref_eval"), "prompts": ("prompts_train", "prompts_eval")}


def resolve_data(data: DataSection, out_dir: Path, kind: str) -> tuple[list[Path], list[Path]]:
    """(train paths, eval paths); 'embedded' is generated into out_dir/data, deterministically."""
    files: dict[str, Path] = {}
    if "embedded" in (data.train, data.eval):
        from llmcycle.train.posttrain.synthetic import write_embedded_datasets

        files = write_embedded_datasets(out_dir / "data", seed=data.embedded_seed, per_task=data.embedded_per_task,
                                        **({"tasks": data.embedded_tasks} if data.embedded_tasks else {}))

    def pick(value: str | None, which: int) -> list[Path]:
        if value is None:
            return []
        if value == "embedded":
            return [files[EMBEDDED[kind][which]]]
        p = Path(value)
        if not p.exists():
            raise LlmcycleError(f"data: {p} does not exist.")
        return [p]

    return pick(data.train, 0), pick(data.eval, 1)



@dataclass
class DataSets:
    """A run's training and held-out examples, what was rejected from each, and every file read."""

    train: list
    heldout: list
    rejects: Rejects
    eval_rejects: Rejects
    paths: list[Path]


def load_train_and_heldout(data: DataSection, out_dir: Path, kind: str, load_train: Callable[[list[Path], Rejects], list],
                           load_eval: Callable[[list[Path], Rejects], list], what: str, noun: str,
                           expected: str = "", no_split: str | None = None,
                           split_noun: str | None = None) -> DataSets:
    """The recipe's `data` loaded as sft, reward and dpo do it: the training set (its rejects reported, an
    unusable one refused), and the held-out set from data.eval or, when data.train is the user's file and
    data.eval is left at 'embedded', a share of the training set (`split_holdout`). `no_split`: logged
    instead of splitting, when the training examples cannot serve as held-out ones (KTO feedback)."""
    hold = holds_out_user_data(data)
    train_paths, eval_paths = resolve_data(replace(data, eval=None) if hold else data, out_dir, kind)
    return load_sets(train_paths, eval_paths, hold, load_train, load_eval, what, noun, expected, no_split,
                     split_noun)


def load_sets(train_paths: list[Path], eval_paths: list[Path], hold: bool,
              load_train: Callable[[list[Path], Rejects], list], load_eval: Callable[[list[Path], Rejects], list],
              what: str, noun: str, expected: str = "", no_split: str | None = None,
              split_noun: str | None = None) -> DataSets:
    """`load_train_and_heldout` once the files are known; hold: the held-out set is split off the training set."""
    rejects = Rejects()
    train = load_train(train_paths, rejects)
    require_examples(train, rejects, what, train_paths)
    log.info(f"data: {len(train)} {noun} from {', '.join(map(str, train_paths))}")
    if rejects.total() or rejects.truncated:
        log.info(rejects.summary())
    eval_rejects = Rejects()
    if hold and no_split is not None:
        log.info(no_split)
        heldout = []
    elif hold:
        train, heldout = split_holdout(train, split_noun or noun)
    else:
        heldout = load_eval(eval_paths, eval_rejects) if eval_paths else []
        report_eval_rejects(eval_rejects, len(heldout), expected)
    return DataSets(train, heldout, rejects, eval_rejects, train_paths + eval_paths)
