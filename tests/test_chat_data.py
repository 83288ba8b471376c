import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.posttrain.chat_data import (
    UNKNOWN_SHAPE,
    Rejects,
    load_preferences,
    load_prompts,
    load_sft,
    load_unpaired,
    read_records,
    require_examples,
)

SYS = {"role": "system", "content": "You answer questions about Python."}
U1 = {"role": "user", "content": "What does len() return?"}
A1 = {"role": "assistant", "content": "The number of items."}
U2 = {"role": "user", "content": "And for a str?"}
A2 = {"role": "assistant", "content": "The number of code points."}
CHAT = [SYS, U1, A1, U2, A2]
LONG = "Python lists grow as needed. " * 40  # far more than 64 tokens with a 512-token vocabulary


@pytest.fixture(scope="module")
def tok(tiny_data) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_data["tokenizer"])


def write_jsonl(path, rows) -> str:
    """Rows are dicts (dumped) or raw str/bytes lines (written as is, for broken input)."""
    with open(path, "wb") as f:
        for row in rows:
            if not isinstance(row, bytes):
                row = (row if isinstance(row, str) else json.dumps(row)).encode()
            f.write(row + b"\n")
    return str(path)


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def sft(tok, rows, tmp_path, max_length=512, **kw):
    rejects = Rejects()
    return load_sft(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length, rejects, **kw), rejects


# ---- SFT formats ----


def test_messages_multi_turn(tok, tmp_path):
    (ex,), rejects = sft(tok, [{"messages": CHAT}], tmp_path)
    ids, mask = tok.encode_chat(CHAT)
    assert ex.ids == ids and ex.trained == [bool(m) for m in mask]
    # The mask covers both assistant turns (content and <|end|>) and nothing else.
    spans = runs(ex.trained)
    assert [tok.decode(ex.ids[s:e]) for s, e in spans] == [A1["content"] + "<|end|>",
                                                           A2["content"] + "<|end|>"]
    assert ex.prompt_ids == tok.encode_chat(CHAT[:-1], add_generation_prompt=True)[0]
    assert ex.ids[: len(ex.prompt_ids)] == ex.prompt_ids
    assert ex.prompt_ids[-2:] == [tok.token_to_id("<|assistant|>"), *tok.encode("\n")]
    assert ex.reference == A2["content"] and ex.source == f"{tmp_path / 'd.jsonl'}:1" and not ex.truncated
    assert rejects.total() == 0 and rejects.truncated == 0

    (ex_all,), _ = sft(tok, [{"messages": CHAT}], tmp_path, loss_on="all")
    assert ex_all.ids == ids and ex_all.trained == [False] + [True] * (len(ids) - 1)


def test_conversation_not_ending_with_assistant_has_no_reference(tok, tmp_path):
    (ex,), _ = sft(tok, [{"messages": [U1, A1, U2]}], tmp_path)
    assert ex.ids == tok.encode_chat([U1, A1, U2])[0]
    assert ex.prompt_ids is None and ex.reference is None
    assert [tok.decode(ex.ids[s:e]) for s, e in runs(ex.trained)] == [A1["content"] + "<|end|>"]


def test_alpaca_with_and_without_input(tok, tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye!"},
    ]
    exs, rejects = sft(tok, rows, tmp_path)
    expected = [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye!"}],
    ]
    assert rejects.total() == 0 and len(exs) == 3
    for ex, messages in zip(exs, expected):
        ids, mask = tok.encode_chat(messages)
        assert ex.ids == ids and ex.trained == [bool(m) for m in mask]
        assert ex.prompt_ids == tok.encode_chat(messages[:1], add_generation_prompt=True)[0]
        assert ex.reference == messages[1]["content"]


def test_prompt_completion_text(tok, tmp_path):
    (ex,), _ = sft(tok, [{"prompt": "The capital of France is", "completion": " Paris."}], tmp_path)
    p, c = tok.encode("The capital of France is"), tok.encode(" Paris.")
    assert ex.ids == [tok.bos_id, *p, *c, tok.eos_id]
    assert ex.trained == [False] * (1 + len(p)) + [True] * (len(c) + 1)
    assert ex.prompt_ids == [tok.bos_id, *p] and ex.reference == " Paris."


def test_prompt_completion_messages_trains_only_the_completion(tok, tmp_path):
    # TRL semantics: an assistant turn inside the prompt is context, not a target.
    (ex,), _ = sft(tok, [{"prompt": [SYS, U1, A1, U2], "completion": [A2]}], tmp_path)
    ids, _ = tok.encode_chat(CHAT)
    assert ex.ids == ids
    assert [tok.decode(ex.ids[s:e]) for s, e in runs(ex.trained)] == [A2["content"] + "<|end|>"]
    assert ex.prompt_ids == tok.encode_chat(CHAT[:-1], add_generation_prompt=True)[0]
    # A string completion after a message prompt is the assistant's reply.
    (ex2,), _ = sft(tok, [{"prompt": [SYS, U1, A1, U2], "completion": A2["content"]}], tmp_path)
    assert ex2.ids == ex.ids and ex2.trained == ex.trained


# ---- files: parquet, gzip, directories ----


def test_parquet_gzip_and_directory(tok, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"messages": [U1, A1]}])
    with gzip.open(d / "b.jsonl.gz", "wb") as f:
        f.write((json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n").encode())
    rows = [
        {"messages": [U1, A1]},
        {"instruction": "Say bye.", "input": "now", "output": "Bye!"},
        {"prompt": "One plus one is", "completion": " two."},
        {"messages": [U1]},  # no assistant turn
    ]
    keys = sorted({k for r in rows for k in r})  # a column per key; a record's missing keys are null
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys}), d / "c.parquet")
    (d / "notes.txt").write_text("not a dataset")

    rejects = Rejects()
    exs = load_sft(d, tok, 512, rejects)
    assert [e.source for e in exs] == [f"{d / 'a.jsonl'}:1", f"{d / 'b.jsonl.gz'}:1",
                                       f"{d / 'c.parquet'}:row 1", f"{d / 'c.parquet'}:row 2",
                                       f"{d / 'c.parquet'}:row 3"]
    assert rejects.counts == {"no assistant turn": 1}
    assert rejects.examples == {"no assistant turn": [f"{d / 'c.parquet'}:row 4"]}
    assert exs[0].ids == exs[2].ids == tok.encode_chat([U1, A1])[0]
    assert exs[1].ids == tok.encode_chat([{"role": "user", "content": "Say hi."},
                                          {"role": "assistant", "content": "Hi!"}])[0]
    assert exs[3].ids == tok.encode_chat([{"role": "user", "content": "Say bye.\n\nnow"},
                                          {"role": "assistant", "content": "Bye!"}])[0]
    assert exs[4].ids == [tok.bos_id, *tok.encode("One plus one is"), *tok.encode(" two."), tok.eos_id]

    # A single file, a gz file alone, and a list of paths read the same records.
    one = Rejects()
    assert len(load_sft([d / "a.jsonl", str(d / "b.jsonl.gz")], tok, 512, one)) == 2 and one.total() == 0


def test_unreadable_and_missing_inputs(tok, tmp_path):
    bad_gz = tmp_path / "x.jsonl.gz"
    bad_gz.write_bytes(b"this is not gzip")
    rejects = Rejects()
    assert list(read_records(bad_gz, rejects)) == []
    assert rejects.counts == {"unreadable file": 1} and rejects.examples["unreadable file"] == [f"{bad_gz}:1"]
    with pytest.raises(LlmcycleError, match="does not exist"):
        list(read_records(tmp_path / "nope.jsonl", Rejects()))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LlmcycleError, match="no .jsonl"):
        list(read_records(tmp_path / "empty_dir", Rejects()))


# ---- bad input accounting ----


def test_sft_bad_records_are_counted_with_locations(tok, tmp_path):
    rows = [
        {"messages": [U1, A1]},                                            # 1 good
        '{"messages": [',                                                  # 2 malformed JSON
        "[1, 2]",                                                          # 3 not an object
        {"instruction": "Say hi.", "output": "Hi!"},                       # 4 good
        {"messages": [SYS, U1]},                                           # 5 no assistant turn
        {"messages": [U1, {"role": "robot", "content": "42"}, A1]},         # 6 unknown role
        {"prompt": "Two plus two is", "completion": " four."},             # 7 good
        {"messages": [U1, {"role": "assistant"}]},                         # 8 missing content
        {"messages": [U1, {"role": "assistant", "content": 7}]},           # 9 non-string content
        {"text": "plain pretraining text"},                                # 10 unknown shape
        {"messages": [U1, {"role": "assistant", "content": "  "}]},        # 11 empty assistant content
        "",                                                                # 12 blank line: no record
        {"messages": [{"role": "system", "content": LONG}, U1, A1]},       # 13 prompt longer than max_length
        {"messages": [U1, {"role": "assistant", "content": LONG}]},        # 14 good, truncated
        {"instruction": "Say hi."},                                        # 15 unknown shape (no output)
        {"messages": [U2, A2]},                                            # 16 good
        b'{"messages": "\xff\xfe"}',                                       # 17 invalid UTF-8
        {"messages": "hello"},                                             # 18 malformed messages
        {"messages": [U1, A1, U1]},                                        # 19 good (no reference)
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',          # 20 lone surrogate
        {"instruction": "Say hi.", "input": 3, "output": "Hi!"},           # 21 non-string content
        {"messages": [U1]},                                                # 22 no assistant turn
    ]
    exs, rejects = sft(tok, rows, tmp_path, max_length=64)
    f = tmp_path / "d.jsonl"
    assert [e.source for e in exs] == [f"{f}:{n}" for n in (1, 4, 7, 14, 16, 19)]
    assert rejects.counts == {
        "malformed JSON": 1, "record is not an object": 1, "no assistant turn": 2, "unknown role 'robot'": 1,
        "missing or non-string content": 3, UNKNOWN_SHAPE: 2, "empty assistant content": 1,
        "prompt longer than max_length": 1, "invalid UTF-8": 2,
        "messages are not a list of {role, content} objects": 1,
    }
    assert rejects.examples == {
        "malformed JSON": [f"{f}:2"], "record is not an object": [f"{f}:3"],
        "no assistant turn": [f"{f}:5", f"{f}:22"], "unknown role 'robot'": [f"{f}:6"],
        "missing or non-string content": [f"{f}:8", f"{f}:9", f"{f}:21"],
        UNKNOWN_SHAPE: [f"{f}:10", f"{f}:15"], "empty assistant content": [f"{f}:11"],
        "prompt longer than max_length": [f"{f}:13"], "invalid UTF-8": [f"{f}:17", f"{f}:20"],
        "messages are not a list of {role, content} objects": [f"{f}:18"],
    }
    assert rejects.total() == 15
    assert rejects.truncated == 1 and rejects.truncated_examples == [f"{f}:14"]
    cut = exs[3]
    full_ids, full_mask = tok.encode_chat([U1, {"role": "assistant", "content": LONG}])
    assert cut.truncated and cut.ids == full_ids[:64] and cut.trained == [bool(m) for m in full_mask[:64]]
    assert cut.prompt_ids == tok.encode_chat([U1], add_generation_prompt=True)[0] and cut.reference == LONG
    assert [e.truncated for e in exs] == [False, False, False, True, False, False]
    assert "  3 missing or non-string content" in rejects.summary()
    assert f"  2 no assistant turn ({f}:5, {f}:22)" in rejects.summary().splitlines()
    assert f"  1 truncated to the length limit (kept) ({f}:14)" in rejects.summary().splitlines()
    d = rejects.to_dict()
    assert d["rejected"] == 15 and d["truncated"] == 1 and d["rejected_by_reason"]["invalid UTF-8"] == 2
    json.dumps(d)  # manifests store it


def test_rejects_keep_first_locations_only():
    r = Rejects()
    for i in range(1, 8):
        r.add("no assistant turn", f"d.jsonl:{i}")
    assert r.counts == {"no assistant turn": 7}
    assert r.examples["no assistant turn"] == [f"d.jsonl:{i}" for i in range(1, 6)]
    assert r.summary() == "  7 no assistant turn (d.jsonl:1, d.jsonl:2, d.jsonl:3, d.jsonl:4, d.jsonl:5, ...)"
    assert Rejects().summary() == ""


def test_refusal_when_nothing_is_usable(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"messages": [U1]}, {"messages": [U1]}])
    rejects = Rejects()
    exs = load_sft(path, tok, 64, rejects)
    with pytest.raises(LlmcycleError) as e:
        require_examples(exs, rejects, "SFT", path)
    msg = str(e.value)
    assert "no usable SFT example" in msg and "3 records were rejected" in msg
    assert f"  2 no assistant turn ({path}:2, {path}:3)" in msg and f"  1 malformed JSON ({path}:1)" in msg

    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(LlmcycleError, match="no SFT records found"):
        require_examples(load_sft(empty, tok, 64, Rejects()), Rejects(), "SFT", [empty])
    good = Rejects()
    require_examples(load_sft(write_jsonl(tmp_path / "g.jsonl", [{"messages": [U1, A1]}]), tok, 64, good),
                     good, "SFT", tmp_path)


# ---- preferences ----


def test_preference_formats(tok, tmp_path):
    end = tok.token_to_id("<|end|>")
    rows = [
        {"prompt": "Is 7 prime?", "chosen": " Yes.", "rejected": " No."},
        {"prompt": [SYS, U1], "chosen": [A1], "rejected": [A2]},
        {"prompt": [SYS, U1], "chosen": A1["content"], "rejected": A2["content"]},
        {"chosen": [SYS, U1, A1], "rejected": [SYS, U1, A2]},  # implicit prompt
    ]
    rejects = Rejects()
    text, msgs, mixed, implicit = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), tok, 512, rejects)
    assert rejects.total() == 0
    assert text.prompt_ids == [tok.bos_id, *tok.encode("Is 7 prime?")]
    assert text.chosen_ids == [*tok.encode(" Yes."), tok.eos_id]
    assert text.rejected_ids == [*tok.encode(" No."), tok.eos_id]

    p = tok.encode_chat([SYS, U1], add_generation_prompt=True)[0]
    assert msgs.prompt_ids == p
    full = tok.encode_chat([SYS, U1, A1])[0]
    assert full[: len(p)] == p and msgs.chosen_ids == full[len(p): -1]  # not the template's trailing newline
    assert msgs.chosen_ids == [*tok.encode(A1["content"]), end]
    assert msgs.rejected_ids == [*tok.encode(A2["content"]), end]
    for ex in (mixed, implicit):
        assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (msgs.prompt_ids, msgs.chosen_ids,
                                                                   msgs.rejected_ids)
    assert implicit.source == f"{tmp_path / 'p.jsonl'}:4"


def test_preference_bad_records_and_truncation(tok, tmp_path):
    long_a = LONG + "The end A."
    long_b = LONG + "The end B."
    rows = [
        {"prompt": "Q?", "chosen": " Yes.", "rejected": " No."},                   # 1 good
        {"prompt": "Q?", "chosen": " Yes."},                                       # 2 missing rejected
        {"prompt": "Q?", "chosen": "", "rejected": " No."},                        # 3 empty chosen
        {"prompt": "Q?", "chosen": " Same.", "rejected": " Same."},                # 4 equal
        {"prompt": LONG, "chosen": " Yes.", "rejected": " No."},                   # 5 prompt too long
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},  # 6 unknown role
        {"prompt": "Q?", "chosen": LONG + "Yes.", "rejected": " No."},             # 7 good, truncated
        {"prompt": "Q?", "chosen": long_a, "rejected": long_b},                    # 8 equal after the cut
        {"chosen": [U1, A1], "rejected": [U2, A2]},                                # 9 no shared prompt
        {"chosen": " Yes.", "rejected": " No."},                                   # 10 missing prompt
        {"prompt": [U1], "chosen": [U1, A1], "rejected": [A2]},                    # 11 not one assistant msg
        {"chosen": [U1, A1], "rejected": [U1, A1]},                                # 12 equal (implicit)
        {"prompt": [U1], "chosen": [A1], "rejected": [A2]},                        # 13 good
    ]
    rejects = Rejects()
    exs = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), tok, 64, rejects)
    f = tmp_path / "p.jsonl"
    assert [e.source for e in exs] == [f"{f}:1", f"{f}:7", f"{f}:13"]
    assert rejects.examples == {
        "missing key 'rejected'": [f"{f}:2"], "empty chosen or rejected": [f"{f}:3"],
        "chosen equal to rejected": [f"{f}:4", f"{f}:12"], "prompt longer than max_length": [f"{f}:5"],
        "unknown role 'robot'": [f"{f}:6"], "chosen equal to rejected after truncation": [f"{f}:8"],
        "chosen and rejected differ before their last assistant turn": [f"{f}:9"],
        "missing key 'prompt'": [f"{f}:10"], "completion is not a single assistant message": [f"{f}:11"],
    }
    assert sum(rejects.counts.values()) == 10 and rejects.counts["chosen equal to rejected"] == 2
    assert rejects.truncated == 1 and rejects.truncated_examples == [f"{f}:7"]
    cut = exs[1]
    assert cut.truncated and len(cut.prompt_ids) + len(cut.chosen_ids) == 64
    assert cut.prompt_ids == [tok.bos_id, *tok.encode("Q?")]
    assert cut.chosen_ids == tok.encode(LONG + "Yes.")[: 64 - len(cut.prompt_ids)]
    assert cut.rejected_ids == [*tok.encode(" No."), tok.eos_id]


# ---- KTO and prompts ----


def test_unpaired(tok, tmp_path):
    rows = [
        {"prompt": "Is 7 prime?", "completion": " Yes.", "label": True},
        {"prompt": [U1], "completion": [A1], "label": False},
        {"prompt": "Q?", "completion": " Yes.", "label": "yes"},
        {"prompt": "Q?", "completion": " Yes.", "label": 1},
        {"prompt": "Q?", "completion": " Yes."},
        {"prompt": "Q?", "completion": "", "label": True},
        {"prompt": "Q?", "completion": LONG, "label": True},
    ]
    rejects = Rejects()
    f = write_jsonl(tmp_path / "k.jsonl", rows)
    a, b, c = load_unpaired(f, tok, 64, rejects)
    assert (a.prompt_ids, a.completion_ids, a.label) == ([tok.bos_id, *tok.encode("Is 7 prime?")],
                                                         [*tok.encode(" Yes."), tok.eos_id], True)
    p = tok.encode_chat([U1], add_generation_prompt=True)[0]
    assert (b.prompt_ids, b.completion_ids, b.label) == (p, tok.encode_chat([U1, A1])[0][len(p): -1], False)
    assert c.truncated and len(c.prompt_ids) + len(c.completion_ids) == 64 and c.source == f"{f}:7"
    assert rejects.examples == {"label is not true/false": [f"{f}:3", f"{f}:4"],
                                "missing key 'label'": [f"{f}:5"], "empty completion": [f"{f}:6"]}
    assert rejects.total() == 4 and rejects.truncated == 1


def test_prompts(tok, tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "answer": "4"},
        {"prompt": [SYS, U1], "reference": "len"},
        {"prompt": "What is 3+3?", "solution": 6},
        {"prompt": "Tell me a story."},
        {"prompt": LONG, "answer": "x"},
        {"question": "no prompt key"},
        {"prompt": "Q?", "answer": ["4"]},
        {"prompt": "   "},
        {"prompt": [{"role": "robot", "content": "hi"}]},
    ]
    rejects = Rejects()
    f = write_jsonl(tmp_path / "q.jsonl", rows)
    a, b, c, d = load_prompts(f, tok, 64, rejects)
    q = [tok.bos_id, *tok.encode("What is 2+2?")]
    assert (a.prompt_ids, a.prompt, a.reference) == (q, "What is 2+2?", "4")
    chat = tok.encode_chat([SYS, U1], add_generation_prompt=True)[0]
    assert (b.prompt_ids, b.prompt, b.reference) == (chat, [SYS, U1], "len")
    assert c.reference == "6" and d.reference is None and d.source == f"{f}:4"
    assert rejects.examples == {
        "prompt longer than max_prompt_length": [f"{f}:5"], "missing key 'prompt'": [f"{f}:6"],
        "answer is not a string": [f"{f}:7"], "empty prompt": [f"{f}:8"], "unknown role 'robot'": [f"{f}:9"],
    }
    assert rejects.total() == 5
    # The limit is exclusive: a prompt of exactly max_prompt_length tokens leaves no room to generate.
    edge = write_jsonl(tmp_path / "edge.jsonl", [{"prompt": "What is 2+2?"}])
    at_limit = Rejects()
    assert load_prompts(edge, tok, len(q), at_limit) == []
    assert at_limit.counts == {"prompt longer than max_prompt_length": 1}
    assert [e.prompt_ids for e in load_prompts(edge, tok, len(q) + 1, Rejects())] == [q]


# ---- a user's own data: held-out share, messages that say what is wrong ----


def test_a_json_array_file_is_refused_naming_jsonl(tmp_path):
    for text in ('[{"prompt": "a", "completion": "b"}]\n', '[\n  {"prompt": "a", "completion": "b"}\n]\n'):
        path = tmp_path / "data.json"
        path.write_text(text)
        with pytest.raises(LlmcycleError, match=r"JSON array.*JSON Lines \(\.jsonl\)"):
            list(read_records(path, Rejects()))


def test_unknown_record_shape_names_the_accepted_shapes(tok, tmp_path):
    rejects = Rejects()
    load_sft(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}]), tok, 64, rejects)
    (reason,) = rejects.counts
    assert "{messages}" in reason and "{prompt, completion}" in reason and "{instruction" in reason


def test_split_holdout_is_deterministic_and_takes_at_least_one(tok, tmp_path, caplog):
    from llmcycle.train.config import DataSection
    from llmcycle.train.posttrain.chat_data import holds_out_user_data, split_holdout

    records = [{"prompt": f"What is {a} plus 0?", "completion": str(a)} for a in range(60)]
    examples = load_sft(write_jsonl(tmp_path / "sft.jsonl", records), tok, 64, Rejects())
    caplog.set_level(logging.INFO, logger="llmcycle")
    train, held = split_holdout(examples, "examples")
    lines = list(caplog.messages)
    assert 1 <= len(held) < 10 and len(train) + len(held) == 60
    assert not {e.source for e in held} & {e.source for e in train}
    again = split_holdout(list(reversed(examples)), "examples")[1]
    assert sorted(e.source for e in again) == sorted(e.source for e in held)
    assert "held out" in lines[0] and "data.eval" in lines[0]
    assert len(split_holdout(examples[:2], "examples")[1]) == 1
    assert holds_out_user_data(DataSection(train="mine.jsonl"))
    assert not holds_out_user_data(DataSection())
    assert not holds_out_user_data(DataSection(train="mine.jsonl", eval=None))


def _stage_opts(out, model, **extra) -> list[str]:
    base = {"out_dir": str(out), "model": model, "train.max_steps": 1, "train.batch_size": 2,
            "train.warmup_steps": 0, "train.dtype": "fp32", "train.threads": 1, "data.max_length": 64,
            "eval.every": 0, "checkpoint.every": 0}
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def test_sft_on_a_user_file_holds_out_its_own_data(tiny_base_model, tmp_path, caplog):
    """data.train is the user's file, data.eval left at its default: no silent embedded-task evaluation."""
    from llmcycle.config import load_config
    from llmcycle.train.posttrain.sft import SFTConfig, sft

    records = [{"prompt": f"What is {a} plus 0?", "completion": str(a)} for a in range(40)]
    data = write_jsonl(tmp_path / "mine.jsonl", records)
    caplog.set_level(logging.INFO, logger="llmcycle")
    result = sft(load_config(SFTConfig, None, _stage_opts(tmp_path / "run", tiny_base_model,
                                                           **{"data.train": data})))
    said = "\n".join(caplog.messages)
    assert "held out" in said and "not your data" in said
    assert not (tmp_path / "run" / "data").exists()  # the embedded tasks were not even written
    assert 1 <= 40 - result["train_examples"] <= 4


def test_a_kto_format_eval_file_is_reported(tiny_base_model, tmp_path, caplog):
    from llmcycle.config import load_config
    from llmcycle.train.posttrain.dpo import DPOConfig, dpo

    pairs = [{"prompt": f"What is {a} plus 0?", "chosen": str(a), "rejected": str(a + 1)} for a in range(8)]
    kto = [{"prompt": "What is 1 plus 0?", "completion": "1", "label": True}]
    opts = _stage_opts(tmp_path / "run", tiny_base_model, **{
        "data.train": write_jsonl(tmp_path / "pairs.jsonl", pairs), "data.eval": write_jsonl(tmp_path / "kto.jsonl", kto)})
    caplog.set_level(logging.INFO, logger="llmcycle")
    dpo(load_config(DPOConfig, None, opts))
    said = "\n".join(caplog.messages)
    assert "kto.jsonl:1" in said and "missing key 'chosen'" in said
    assert "held-out evaluation takes preference pairs {prompt, chosen, rejected}" in said


def test_a_failing_reward_function_names_itself_and_the_record(tmp_path):
    from llmcycle.train.rl.rewards import compute_rewards, load_reward_functions

    (tmp_path / "myrewards.py").write_text(
        "def picky(prompts, completions, references):\n"
        "    return [1.0 / len(c) for c in completions]\n")
    funcs = load_reward_functions([f"{tmp_path / 'myrewards.py'}:picky"])
    with pytest.raises(LlmcycleError, match=r"picky.*ZeroDivisionError.*completion 1.*What is 2 plus 2\?.*''"):
        compute_rewards(funcs, ["What is 1 plus 1?", "What is 2 plus 2?"], ["2", ""], ["2", "4"])


def test_grpo_ppo_prompts_hold_out_a_share_of_the_users_file(tok, tmp_path, caplog):
    from llmcycle.train.rl.online import load_prompt_sets

    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"What is {a} plus 0?", "answer": str(a)} for a in range(40)])
    caplog.set_level(logging.INFO, logger="llmcycle")
    train, held, _, _ = load_prompt_sets([path], [], tok, 64, 8, holdout=True)
    lines = caplog.messages
    assert held and len(train) + len(held) == 40
    assert not {e.source for e in held} & {e.source for e in train}
    assert any("held out" in line for line in lines)
