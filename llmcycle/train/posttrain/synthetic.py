"""Instruction, preference and prompt datasets derived offline from the embedded corpus.

The embedded default post-trains a tiny model (a few million parameters, pre-trained for minutes on
Python source) for a few minutes on a CPU, and its exact-match accuracy has to rise visibly from the
base model to SFT to preference tuning. So every task has a short answer (1-8 tokens) in one fixed
format (the bare answer: no sentence, no trailing period), a prompt that holds everything needed to
answer it, and a *plausible* wrong answer - the mistake a half-trained model makes - that preference
methods learn to push down. Tasks, with the reason each is there:

- ``add``: "What is 17 + 25?" -> "42" (distinct operands below 36). Wrong: off by one or by ten. Small
  operands keep the table small enough for a tiny model to fill in held-out cells from their neighbours.
- ``sub``: "What is 52 - 17?" -> "35" (first operand below 60, never a negative result). Wrong as ``add``.
- ``max``: "Which is larger, 37 or 52?" -> "52" (0-99, the larger first or second at random). Wrong:
  the other number, exactly the 50/50 error a model makes before it learns to compare.
- ``last``: "What is the last letter of 'socket'?" -> "t". Wrong: the nearest earlier letter that
  differs ("e"), the slip a model makes inside a multi-letter token.
- ``upper``: "Write 'socket' in uppercase." -> "SOCKET". Wrong: "Socket". Python source is full of
  UPPER_CASE constants, so the pre-trained model knows the uppercase pieces.
- ``name``: "Which function does `def urljoin(base, url, allow_fragments=True)` define?" -> "urljoin".
  Wrong: its first parameter. A copy task: the first one SFT gets right, so the rise is visible early.
- ``param``: "What is the second parameter of `def urljoin(base, url, allow_fragments=True)`?" -> "url"
  (first, second or last). Wrong: the parameter next to it. Needs attention to position.
- ``arity``: "How many parameters does `def urljoin(base, url, allow_fragments=True)` take?" -> "3",
  counting as `inspect.signature` does (``*args`` and ``**kwargs`` are one each). Wrong: off by one.
- ``import``: "Write the import statement for `urljoin` from `urllib.parse`." ->
  "from urllib.parse import urljoin" (functions and classes). Wrong: "import urllib.parse.urljoin" or
  the two names swapped. Real Python syntax the pre-trained model has seen thousands of times.

The words of ``last`` and ``upper`` are identifier parts, and the functions of ``name``, ``param``,
``arity`` and ``import`` are the public top-level functions (and, for ``import``, classes) with
docstrings of public modules, both taken from the corpus' ``stdlib-docstrings`` documents (signatures
as `ast.unparse` wrote them) and checked against its ``stdlib-source`` documents, so the data is
exactly as deterministic as the corpus: the same Python gives the same files.

Also available, but not in `TASKS` (`data.embedded_tasks` picks them): ``tool`` ("Call `urljoin` with url
set to 'socket'." with `urljoin` listed as a tool -> ``<tool_call>\n{"name": "urljoin", "arguments": {"url":
"socket"}}\n</tool_call>``; wrong: the same JSON without its tags, a call that stays text), whose records
carry `tools` for the chat template; ``reverse`` ("Reverse the word 'socket'." -> "tekcos") and
``count`` ("How many times does 'e' occur in 'deepcopy'?" -> "2"). They need every letter of every BPE
token (and reversing re-splits the word into different tokens), where ``last`` needs one letter and
``upper`` maps piece to piece; a few CPU minutes will not teach a tiny model that, so in the default
they would mostly dilute the tasks it can learn.

Items are unique per task; evaluation items are chosen by a hash of the prompt (`split_items`), so no
evaluation prompt occurs in any training file and adding tasks or items never moves an item across.
One function or word may appear in several tasks, on both sides of the split: that shares context, not
answers, since its questions differ.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import platform
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmcycle.artifacts import atomic_write_text
from llmcycle.data.pycorpus import collect_python_corpus
from llmcycle.errors import LlmcycleError

TASKS: tuple[str, ...] = ("add", "sub", "max", "last", "upper", "name", "param", "arity", "import")
EXTRA_TASKS: tuple[str, ...] = ("reverse", "count", "tool")
SPLIT_SALT = "llmcycle-synthetic"
MAX_SIGNATURE = 60  # characters of `def f(...)` shown in a prompt: longer ones make slow, hard prompts


@dataclass
class Item:
    task: str
    prompt: str
    answer: str
    wrong: str  # a plausible incorrect answer, never equal to `answer`
    tools: list[dict] | None = None  # the tools the chat template lists for this item (the `tool` task)


# --- what the corpus gives -------------------------------------------------------------------------------

# Headers of stdlib-docstrings documents, which pycorpus writes on one line each. Methods ("def C.f(...)")
# and nested classes fail `[A-Za-z]\w*`, as do private names.
_DEF = re.compile(r"^def ([A-Za-z]\w*)\((.*)\)$", re.MULTILINE)
_CLASS = re.compile(r"^class ([A-Za-z]\w*)(?:\(.*\))?$", re.MULTILINE)
_ANY_HEADER = re.compile(r"^(?:async )?(?:def|class) ([\w.]+)(.*)$", re.MULTILINE)
_WORD = re.compile(r"[a-z]{3,8}")
MAX_NAME = 16  # characters of a function name, so that answers stay within ~8 tokens
MAX_IMPORT = 32  # characters of "from module import name"


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    signature: str  # "def name(args)", args as ast.unparse wrote them
    params: tuple[str, ...]  # in order, counted as inspect.signature counts them


@dataclass(frozen=True)
class CorpusPools:
    functions: tuple[Function, ...]  # public top-level functions of public modules, with docstrings
    imports: tuple[tuple[str, str], ...]  # (module, name) of those functions and of such classes
    words: tuple[str, ...]  # lowercase parts (3-8 letters) of the identifiers in every header, sorted


def _all_params(args: ast.arguments) -> tuple[str, ...]:
    star = [a for a in (args.vararg,) if a] + args.kwonlyargs + [a for a in (args.kwarg,) if a]
    return tuple(a.arg for a in args.posonlyargs + args.args + star)


def _defined(kind: str, name: str, source: str) -> bool:
    # A module docstring comes first in a stdlib-docstrings document, unindented, and may show example
    # code: only a definition at the start of a line of the file's source is a real one.
    return re.search(rf"^{kind} {name}\b", source, re.MULTILINE) is not None


@functools.lru_cache(maxsize=1)
def corpus_pools() -> CorpusPools:
    """What the corpus-derived tasks draw from; the corpus is parsed once per process (~2 s)."""
    docs = collect_python_corpus()
    sources = {d.metadata["path"]: d.text for d in docs if d.source == "stdlib-source"}
    functions: dict[tuple[str, str], Function] = {}
    imports: dict[tuple[str, str], None] = {}  # an ordered set
    words: set[str] = set()
    for d in docs:
        if d.source != "stdlib-docstrings":
            continue
        for m in _ANY_HEADER.finditer(d.text):
            for ident in re.findall(r"\w+", m.group(1) + " " + m.group(2)):
                words.update(p for p in ident.split("_") if _WORD.fullmatch(p))
        module, source = d.metadata["module"], sources.get(d.metadata["path"], "")
        if any(part.startswith("_") for part in module.split(".")):
            continue
        defs = [m for m in _DEF.finditer(d.text) if _defined("def", m.group(1), source)]
        classes = [m.group(1) for m in _CLASS.finditer(d.text) if _defined("class", m.group(1), source)]
        for name in [m.group(1) for m in defs] + classes:
            if len(name) <= MAX_NAME and len(f"from {module} import {name}") <= MAX_IMPORT:
                imports[(module, name)] = None
        for m in defs:
            name, sig = m.group(1), f"def {m.group(1)}({m.group(2)})"
            if len(name) > MAX_NAME or len(sig) > MAX_SIGNATURE:
                continue
            try:
                args = ast.parse(sig + ": pass").body[0].args
            except SyntaxError:
                continue
            functions.setdefault((module, name), Function(module, name, sig, _all_params(args)))
    return CorpusPools(tuple(functions.values()), tuple(imports), tuple(sorted(words)))


# --- tasks: each lists all its candidate items in a fixed order --------------------------------------------


def _near(rng: random.Random, n: int) -> str:
    """Off by one or by ten, never negative."""
    wrong = n + rng.choice((-10, -1, 1, 10))
    return str(wrong if wrong >= 0 else n + (n - wrong))


def _near1(rng: random.Random, n: int) -> str:
    """Off by one, never negative."""
    return str(n + 1 if n == 0 else n + rng.choice((-1, 1)))


def _pairs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Each unordered pair of distinct numbers below n once, in a random order: "17 + 25" and "25 + 17"
    never fall on opposite sides of the split, where one would give the other's answer away."""
    return [(a, b) if rng.random() < 0.5 else (b, a) for a in range(n) for b in range(a + 1, n)]


def _add(rng: random.Random) -> list[Item]:
    return [Item("add", f"What is {a} + {b}?", str(a + b), _near(rng, a + b)) for a, b in _pairs(rng, 36)]


def _sub(rng: random.Random) -> list[Item]:
    return [Item("sub", f"What is {a} - {b}?", str(a - b), _near(rng, a - b))
            for a in range(60) for b in range(a + 1)]


def _max(rng: random.Random) -> list[Item]:
    return [Item("max", f"Which is larger, {a} or {b}?", str(max(a, b)), str(min(a, b)))
            for a, b in _pairs(rng, 100)]


def _last(rng: random.Random) -> list[Item]:
    out = []
    for w in corpus_pools().words:
        # Wrong: the nearest earlier letter that differs - the off-by-one a model makes inside a token.
        wrong = next((c for c in reversed(w) if c != w[-1]), "a" if w[-1] != "a" else "e")
        out.append(Item("last", f"What is the last letter of '{w}'?", w[-1], wrong))
    return out


def _upper(rng: random.Random) -> list[Item]:
    return [Item("upper", f"Write '{w}' in uppercase.", w.upper(), w.capitalize())
            for w in corpus_pools().words]


def _reverse(rng: random.Random) -> list[Item]:
    # A palindrome's plausible wrong answer (the word itself) would be right, so palindromes are left out.
    return [Item("reverse", f"Reverse the word '{w}'.", w[::-1], w)
            for w in corpus_pools().words if w != w[::-1]]


def _count(rng: random.Random) -> list[Item]:
    return [Item("count", f"How many times does '{c}' occur in '{w}'?", str(w.count(c)),
                 _near1(rng, w.count(c))) for w in corpus_pools().words for c in sorted(set(w))]


def _name(rng: random.Random) -> list[Item]:
    # Wrong: the other name in the prompt (the first parameter), else the name cut short.
    return [Item("name", f"Which function does `{f.signature}` define?", f.name,
                 f.params[0] if f.params else f.name[:-1]) for f in corpus_pools().functions]


def _param(rng: random.Random) -> list[Item]:
    out = []
    for f in corpus_pools().functions:
        p = f.params
        # (which, index of the answer, index of its neighbour: the wrong one); "last" only when not "second".
        asks = [("first", 0, 1), ("second", 1, 0)] if len(p) >= 2 else []
        asks += [("last", len(p) - 1, len(p) - 2)] if len(p) >= 3 else []
        for which, i, j in asks:
            out.append(Item("param", f"What is the {which} parameter of `{f.signature}`?", p[i], p[j]))
    return out


def _arity(rng: random.Random) -> list[Item]:
    return [Item("arity", f"How many parameters does `{f.signature}` take?", str(len(f.params)),
                 _near1(rng, len(f.params))) for f in corpus_pools().functions]


def _import(rng: random.Random) -> list[Item]:
    out = []
    for module, name in corpus_pools().imports:
        wrongs = [f"import {module}.{name}"] + ([f"from {name} import {module}"] if name != module else [])
        out.append(Item("import", f"Write the import statement for `{name}` from `{module}`.",
                        f"from {module} import {name}", rng.choice(wrongs)))
    return out


def _tool(rng: random.Random) -> list[Item]:
    """Call a listed function with one argument: the format of a tool call, and a copy of name and value."""
    out = []
    words = corpus_pools().words
    for f in corpus_pools().functions:
        params = [p for p in f.params if p.isidentifier()][:3]
        if not params:
            continue
        schema = {"type": "object", "properties": {p: {"type": "string"} for p in params}}
        tool = {"type": "function", "function": {"name": f.name, "parameters": schema}}
        param, value = rng.choice(params), rng.choice(words)
        call = json.dumps({"name": f.name, "arguments": {param: value}})
        # Wrong: the same call without its tags - the slip that leaves a call unparsed, as text.
        out.append(Item("tool", f"Call `{f.name}` with {param} set to '{value}'.",
                        f"<tool_call>\n{call}\n</tool_call>", call, [tool]))
    return out


GENERATORS: dict[str, Callable[[random.Random], list[Item]]] = {
    "add": _add, "sub": _sub, "max": _max, "last": _last, "upper": _upper, "name": _name, "param": _param,
    "arity": _arity, "import": _import, "reverse": _reverse, "count": _count, "tool": _tool,
}


# --- items, split, files ---------------------------------------------------------------------------------


def _check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "tasks must be distinct"
        raise LlmcycleError(f"Synthetic datasets: {what}; valid tasks are {', '.join(GENERATORS)}.")


def make_items(seed: int = 0, per_task: int = 400, tasks: Sequence[str] = TASKS) -> list[Item]:
    """`per_task` distinct items of each task, shuffled together; the same arguments give the same list.

    Each task draws from its own `Random(f"{seed}:{task}")`, so one task's items do not depend on which
    other tasks are asked for, and a larger `per_task` keeps all of a smaller one's items.
    """
    _check_tasks(tasks)
    if per_task < 1:
        raise LlmcycleError(f"Synthetic datasets: per_task must be at least 1, got {per_task}.")
    items = []
    for task in tasks:
        rng = random.Random(f"{seed}:{task}")
        seen, unique = set(), []
        for item in GENERATORS[task](rng):
            if item.prompt not in seen and item.wrong != item.answer:
                seen.add(item.prompt)
                unique.append(item)
        if per_task > len(unique):
            raise LlmcycleError(
                f"Synthetic datasets: task {task!r} has {len(unique)} distinct items on this Python, "
                f"fewer than per_task={per_task}."
            )
        rng.shuffle(unique)
        items.extend(unique[:per_task])
    random.Random(seed).shuffle(items)
    return items


def is_eval(prompt: str, eval_fraction: float) -> bool:
    """The split decision for one prompt: the first 8 bytes of sha256(salt + prompt) below the fraction."""
    h = int.from_bytes(hashlib.sha256((SPLIT_SALT + prompt).encode("utf-8")).digest()[:8], "big")
    return h < int(eval_fraction * 2**64)


def split_items(items: Sequence[Item], eval_fraction: float = 0.1) -> tuple[list[Item], list[Item]]:
    """(train, eval) by a hash of each prompt: disjoint, and independent of the seed and of other items."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise LlmcycleError(f"Synthetic datasets: eval_fraction must be in [0, 1], got {eval_fraction}.")
    train, held = [], []
    for item in items:
        (held if is_eval(item.prompt, eval_fraction) else train).append(item)
    return train, held


def _user(item: Item) -> list[dict]:
    return [{"role": "user", "content": item.prompt}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _records(name: str, items: list[Item]) -> list[dict]:
    return [{**r, "tools": it.tools} if it.tools else r for r, it in zip(_plain_records(name, items), items)]


def _plain_records(name: str, items: list[Item]) -> list[dict]:
    if name.startswith("sft"):
        return [{"messages": _user(it) + _assistant(it.answer)} for it in items]
    if name.startswith("pref"):
        return [{"prompt": _user(it), "chosen": _assistant(it.answer), "rejected": _assistant(it.wrong)}
                for it in items]
    if name.startswith("prompts"):
        return [{"prompt": _user(it), "answer": it.answer} for it in items]
    # KTO: alternate within each task, so both labels are balanced overall and per task.
    seen: dict[str, int] = {}
    out = []
    for it in items:
        good = seen.get(it.task, 0) % 2 == 0
        seen[it.task] = seen.get(it.task, 0) + 1
        completion = _assistant(it.answer if good else it.wrong)
        out.append({"prompt": _user(it), "completion": completion, "label": good})
    return out


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text)  # a crash never leaves half a file under the real name


def write_embedded_datasets(
    out_dir: str | Path, seed: int = 0, per_task: int = 400, eval_fraction: float = 0.1,
    tasks: Sequence[str] = TASKS,
) -> dict[str, Path]:
    """Write the post-training datasets as JSONL under `out_dir`; returns each file's path by name.

    Names: sft_train, sft_eval, pref_train, pref_eval, kto_train, prompts_train, prompts_eval, and info
    (info.json: arguments, per-task counts of each split, and each file's record count and sha256).
    The same arguments (on the same Python) give byte-identical files.
    """
    train, held = split_items(make_items(seed, per_task, tasks), eval_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"sft_train": train, "sft_eval": held, "pref_train": train, "pref_eval": held,
              "kto_train": train, "prompts_train": train, "prompts_eval": held}
    paths: dict[str, Path] = {}
    files = {}
    for name, items in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records(name, items))
        paths[name] = out / f"{name}.jsonl"
        _write(paths[name], text)
        files[name] = {"file": paths[name].name, "records": len(items),
                       "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    counts = {t: {"train": sum(i.task == t for i in train), "eval": sum(i.task == t for i in held)}
              for t in tasks}
    info = {"seed": seed, "per_task": per_task, "eval_fraction": eval_fraction, "tasks": list(tasks),
            "python": platform.python_version(), "counts": counts, "files": files}
    paths["info"] = out / "info.json"
    _write(paths["info"], json.dumps(info, indent=2) + "\n")
    return paths
