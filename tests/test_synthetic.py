import ast
import collections
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from llmcycle.errors import LlmcycleError
from llmcycle.serve.tool_calls import parse as parse_tool_calls
from llmcycle.train.posttrain.synthetic import (
    EXTRA_TASKS,
    TASKS,
    Item,
    is_eval,
    make_items,
    split_items,
    write_embedded_datasets,
)

FILES = ("sft_train", "sft_eval", "pref_train", "pref_eval", "kto_train", "prompts_train", "prompts_eval")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    return write_embedded_datasets(tmp_path_factory.mktemp("synthetic"))


def _rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    return [json.loads(line) for line in text.splitlines()]


def _prompt_text(name: str, row: dict) -> str:
    return row["messages"][0]["content"] if name.startswith("sft") else row["prompt"][0]["content"]


def test_golden_items_pin_the_generator():
    # Procedural tasks do not depend on the Python's stdlib, so their exact items can be pinned: a change
    # to the RNG use, the templates or the shuffle shows up here.
    items = make_items(seed=0, per_task=3, tasks=("add", "max"))
    assert [(i.task, i.prompt, i.answer, i.wrong) for i in items] == GOLDEN


GOLDEN = [
    ("max", "Which is larger, 45 or 13?", "45", "13"),
    ("add", "What is 31 + 2?", "33", "23"),
    ("add", "What is 23 + 10?", "33", "32"),
    ("add", "What is 17 + 29?", "46", "56"),
    ("max", "Which is larger, 84 or 30?", "84", "30"),
    ("max", "Which is larger, 98 or 79?", "98", "79"),
]


def test_files_are_byte_identical_for_the_same_arguments(written, tmp_path):
    t0 = time.perf_counter()
    again = write_embedded_datasets(tmp_path / "again")
    assert time.perf_counter() - t0 < 3.0  # the corpus is parsed once per process; this is the rest
    assert set(again) == set(FILES) | {"info"}
    for name in again:
        assert again[name].read_bytes() == written[name].read_bytes(), name
    other = write_embedded_datasets(tmp_path / "seed1", seed=1)
    assert other["sft_train"].read_bytes() != written["sft_train"].read_bytes()


def test_same_files_in_a_fresh_process_with_another_hash_seed(written, tmp_path):
    # Byte-identical across processes too: nothing may depend on set order or str hashing.
    code = "import sys; from llmcycle.train.posttrain.synthetic import write_embedded_datasets as w; w(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=60)
    for name, path in written.items():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), name


def test_files_have_the_documented_keys(written):
    user = {"role", "content"}
    for name in FILES:
        rows = _rows(written[name])
        assert rows, name
        for r in rows:
            if name.startswith("sft"):
                assert list(r) == ["messages"]
                assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            elif name.startswith("pref"):
                assert list(r) == ["prompt", "chosen", "rejected"]
                assert [m["role"] for m in r["chosen"] + r["rejected"]] == ["assistant", "assistant"]
                assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
            elif name.startswith("kto"):
                assert list(r) == ["prompt", "completion", "label"]
                assert r["completion"][0]["role"] == "assistant" and isinstance(r["label"], bool)
            else:
                assert list(r) == ["prompt", "answer"] and isinstance(r["answer"], str) and r["answer"]
            if not name.startswith("sft"):
                assert len(r["prompt"]) == 1 and r["prompt"][0]["role"] == "user" and set(r["prompt"][0]) == user


def test_files_agree_with_items_and_info(written):
    train, held = split_items(make_items(), 0.1)
    info = json.loads(written["info"].read_text())
    assert info["seed"] == 0 and info["per_task"] == 400 and info["tasks"] == list(TASKS)
    for task in TASKS:
        assert info["counts"][task] == {"train": sum(i.task == task for i in train),
                                        "eval": sum(i.task == task for i in held)}
        assert info["counts"][task]["train"] + info["counts"][task]["eval"] == 400
    for name in FILES:
        assert info["files"][name]["records"] == len(_rows(written[name]))
        assert info["files"][name]["sha256"] == hashlib.sha256(written[name].read_bytes()).hexdigest()
    sft = _rows(written["sft_train"])
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in sft] == \
        [(i.prompt, i.answer) for i in train]
    pref = _rows(written["pref_eval"])
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in pref] == \
        [(i.prompt, i.answer, i.wrong) for i in held]
    assert [(r["prompt"][0]["content"], r["answer"]) for r in _rows(written["prompts_eval"])] == \
        [(i.prompt, i.answer) for i in held]
    # KTO: every training item once; per task, labels alternate (so half and half, +-1).
    kto = _rows(written["kto_train"])
    assert [r["prompt"][0]["content"] for r in kto] == [i.prompt for i in train]
    labels = collections.defaultdict(list)
    for r, it in zip(kto, train):
        assert r["completion"][0]["content"] == (it.answer if r["label"] else it.wrong)
        labels[it.task].append(r["label"])
    for task, ls in labels.items():
        assert ls == [k % 2 == 0 for k in range(len(ls))], task


def test_no_eval_prompt_in_any_train_file(written):
    train_prompts = {_prompt_text(n, r) for n in FILES if n.endswith("_train") for r in _rows(written[n])}
    eval_prompts = {_prompt_text(n, r) for n in FILES if n.endswith("_eval") for r in _rows(written[n])}
    assert len(eval_prompts) > 250 and len(train_prompts) > 3000
    assert not train_prompts & eval_prompts
    # Nor the commuted twin of an eval prompt ("25 + 17" for "17 + 25").
    def key(p: str):
        m = re.fullmatch(r"What is (\d+) \+ (\d+)\?|Which is larger, (\d+) or (\d+)\?", p)
        return m and (p[:5], frozenset(x for x in m.groups() if x))
    assert not {key(p) for p in train_prompts if key(p)} & {key(p) for p in eval_prompts if key(p)}


def test_split_is_by_prompt_only():
    items = make_items(seed=3, per_task=200)
    train, held = split_items(items, 0.25)
    assert len(train) + len(held) == len(items) and 0.18 < len(held) / len(items) < 0.32
    # A subset splits as it did inside the whole; the decision does not depend on the seed or neighbours.
    sub_train, sub_held = split_items(items[::7], 0.25)
    assert sub_held == [i for i in items[::7] if i in held] and sub_train == [i for i in items[::7] if i in train]
    assert split_items(items, 0.0) == (items, []) and split_items(items, 1.0) == ([], items)
    assert is_eval("What is 2 + 16?", 0.1) == (
        int.from_bytes(hashlib.sha256(b"llmcycle-syntheticWhat is 2 + 16?").digest()[:8], "big") < 0.1 * 2**64)


def _stdlib_source(module: str) -> str:
    root = Path(sysconfig.get_paths()["stdlib"]) / module.replace(".", "/")
    path = root.with_suffix(".py") if root.with_suffix(".py").is_file() else root / "__init__.py"
    return path.read_text(encoding="utf-8")


class _Anything:
    """Stands for any name a default or annotation uses: attributes, calls and operators give it back."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def _same(self, *args):
        return self

    __or__ = __ror__ = __and__ = __add__ = __radd__ = __sub__ = __mul__ = __neg__ = __getitem__ = _same


class _Names(dict):
    def __missing__(self, key):
        return _Anything()


def _signature(code: str) -> inspect.Signature:
    """inspect.signature of the function `def f(...)` defines, run for real (defaults need no imports)."""
    scope = _Names()
    exec(code + ": pass", {"__builtins__": {}}, scope)
    return inspect.signature(next(v for v in scope.values() if inspect.isfunction(v)))


def _check(item: Item) -> None:
    """Recompute the answer from the prompt alone, independently of the generator's code."""
    p, a = item.prompt, item.answer
    if item.task in ("add", "sub"):
        x, op, y = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p).groups()
        assert a == str(int(x) + int(y) if op == "+" else int(x) - int(y)) and int(a) >= 0
        assert abs(int(item.wrong) - int(a)) in (1, 10) and int(item.wrong) >= 0
    elif item.task == "max":
        x, y = re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", p).groups()
        assert x != y and a == str(max(int(x), int(y))) and item.wrong == str(min(int(x), int(y)))
    elif item.task == "last":
        (w,) = re.fullmatch(r"What is the last letter of '([a-z]+)'\?", p).groups()
        assert a == w[-1] and item.wrong in w
    elif item.task == "upper":
        (w,) = re.fullmatch(r"Write '([a-z]+)' in uppercase\.", p).groups()
        assert a == w.upper() and item.wrong == w.capitalize()
    elif item.task == "reverse":
        (w,) = re.fullmatch(r"Reverse the word '([a-z]+)'\.", p).groups()
        assert a == w[::-1]
    elif item.task == "count":
        c, w = re.fullmatch(r"How many times does '([a-z])' occur in '([a-z]+)'\?", p).groups()
        assert a == str(w.count(c))
    elif item.task in ("name", "param", "arity"):
        code = re.search(r"`(def .*)`", p).group(1)
        fn = ast.parse(code + ": pass").body[0]
        params = list(_signature(code).parameters)
        if item.task == "name":
            assert a == fn.name
        elif item.task == "arity":
            assert a == str(len(params)) and abs(int(item.wrong) - len(params)) == 1
        else:
            which = re.match(r"What is the (first|second|last) parameter", p).group(1)
            assert a == params[{"first": 0, "second": 1, "last": -1}[which]] and item.wrong in params
    elif item.task == "import":
        name, module = re.fullmatch(r"Write the import statement for `(\w+)` from `([\w.]+)`\.", p).groups()
        assert a == f"from {module} import {name}"
        assert re.search(rf"^(def|class) {name}\b", _stdlib_source(module), re.MULTILINE)
    elif item.task == "tool":
        name, param, value = re.fullmatch(r"Call `(\w+)` with (\w+) set to '(\w+)'\.", p).groups()
        (tool,) = item.tools
        assert tool["function"]["name"] == name and param in tool["function"]["parameters"]["properties"]
        content, calls = parse_tool_calls(a, "hermes", {name})  # the answer is a call the server parses
        assert content == "" and [(c.name, c.arguments) for c in calls] == [(name, {param: value})]
        assert parse_tool_calls(item.wrong, "hermes", {name})[1] == []  # the wrong one stays text
    else:
        raise AssertionError(item.task)


def test_answers_are_right_and_wrong_answers_wrong():
    items = make_items(seed=0, per_task=400) + make_items(seed=5, per_task=60, tasks=EXTRA_TASKS)
    seen = collections.Counter(i.task for i in items)
    assert seen == {t: 400 for t in TASKS} | {t: 60 for t in EXTRA_TASKS}
    for task in TASKS:
        assert len({i.prompt for i in items if i.task == task}) == 400, task
    for item in items:
        assert item.wrong != item.answer and item.answer.strip() == item.answer and item.answer, item
        _check(item)


def test_tool_records_carry_their_tools_and_load_with_them(tmp_path, tiny_data):
    from llmcycle.tokenizer import Tokenizer
    from llmcycle.train.posttrain.chat_data import Rejects, load_preferences, load_prompts, load_sft

    files = write_embedded_datasets(tmp_path, per_task=30, tasks=("add", "tool"))
    rows = _rows(files["sft_train"])
    assert {("tools" in r) for r in rows} == {True, False}
    assert all(("tools" in r) == r["messages"][1]["content"].startswith("<tool_call>") for r in rows)
    tok = Tokenizer.from_pretrained(tiny_data["tokenizer"])
    rejects = Rejects()
    sft = load_sft([files["sft_train"]], tok, max_length=1024, rejects=rejects)
    prefs = load_preferences([files["pref_train"]], tok, max_length=1024, rejects=rejects)
    prompts = load_prompts([files["prompts_train"]], tok, max_prompt_length=1024, rejects=rejects)
    assert rejects.total() == 0 and len(sft) == len(prefs) == len(prompts) == len(rows)
    tool_rows = [i for i, r in enumerate(rows) if "tools" in r]
    for i in tool_rows[:5]:  # the tools turn is in every prompt of the item, and the call is what is trained
        name = rows[i]["tools"][0]["function"]["name"]
        for ids in (sft[i].prompt_ids, prefs[i].prompt_ids, prompts[i].prompt_ids):
            assert "You may call these tools" in tok.decode(ids, skip_special_tokens=False) and name in tok.decode(ids)
        trained = tok.decode([t for t, m in zip(sft[i].ids, sft[i].trained) if m], skip_special_tokens=False)
        assert trained.startswith("<tool_call>") and trained.endswith("<|end|>")
    # a recipe picks the task with data.embedded_tasks
    from llmcycle.train.config import DataSection
    from llmcycle.train.posttrain.chat_data import resolve_data

    train, _ = resolve_data(DataSection(embedded_tasks=["add", "tool"], embedded_per_task=20), tmp_path / "r", "sft")
    assert any('"tools"' in line for line in train[0].read_text().splitlines())


def test_answers_are_short():
    # 1-8 tokens for a 4096-token BPE: about 32 characters at most, digits and one letter for most tasks.
    for item in make_items(seed=0, per_task=400):
        assert len(item.answer) <= 32 and len(item.prompt) <= 110, item
        if item.task in ("add", "sub", "max", "arity"):
            assert item.answer.isdigit() and len(item.answer) <= 3


def test_tasks_do_not_depend_on_each_other():
    alone = make_items(seed=2, per_task=50, tasks=("sub",))
    mixed = make_items(seed=2, per_task=50, tasks=("add", "sub", "name"))
    assert sorted((i.prompt, i.wrong) for i in alone) == sorted((i.prompt, i.wrong) for i in mixed if i.task == "sub")
    bigger = make_items(seed=2, per_task=80, tasks=("sub",))
    assert {i.prompt for i in alone} < {i.prompt for i in bigger}


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(LlmcycleError, match="unknown task"):
        make_items(tasks=("add", "poetry"))
    with pytest.raises(LlmcycleError, match="distinct"):
        make_items(tasks=("add", "add"))
    with pytest.raises(LlmcycleError, match="per_task"):
        make_items(per_task=0)
    with pytest.raises(LlmcycleError, match="fewer than per_task=100000"):
        make_items(per_task=100_000, tasks=("add",))
    with pytest.raises(LlmcycleError, match="eval_fraction"):
        write_embedded_datasets(tmp_path, eval_fraction=1.5)
