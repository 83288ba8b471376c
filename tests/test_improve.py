"""Feedback export (pairs from ratings and labels, SFT from high ratings, PII, dedup, decontamination, lineage)
and the gated `llmcycle improve` turn: too little data waits, a worse model is refused and never registered,
a passing one becomes @challenger under an A/B split, and a promotion moves @production."""

import json
import time

import pytest

from conftest import run_cli
from llmcycle.errors import LlmcycleError
from llmcycle.improve.export import export_feedback
from llmcycle.improve.feedback import FeedbackStore, check_feedback
from llmcycle.improve.labels import Labels
from llmcycle.improve.loop import ImproveConfig, Turn
from llmcycle.improve.registry import Registry
from llmcycle.monitor.request_log import RequestLog
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.posttrain.chat_data import Rejects, load_preferences, load_sft
from llmcycle.train.posttrain.synthetic import make_items, split_items

EVAL_PROMPT = split_items(make_items(0, 400), 0.1)[1][0].prompt  # an item of the suite's held-out set


def _log(db, rows: list[dict]) -> None:
    """Requests as the server logs them (store_text: messages and completion), written by a real RequestLog."""
    log = RequestLog(db, flush_interval=0.01)
    for r in rows:
        log.submit({"time": time.time(), "route": "/v1/chat/completions", "status": 200, "num_prompts": 1,
                    "finish_reasons": ["stop"], "model": "chat", "variant": "1", **r})
    log.close()


def _rated(db, prompt: str, answers: list[tuple[str, dict]], start: int) -> None:
    """One prompt answered several times, each answer rated."""
    _log(db, [{"request_id": f"r{start + i}", "messages": [{"role": "user", "content": prompt}], "completion": text}
              for i, (text, _) in enumerate(answers)])
    fb = FeedbackStore(db)
    for i, (_, rating) in enumerate(answers):
        fb.add(check_feedback({"request_id": f"r{start + i}", **rating}))


def test_export_makes_pairs_and_sft_data_the_trainers_read(tmp_path, tiny_data):
    db = tmp_path / "monitor.sqlite"
    _rated(db, "Add 2 and 3.", [("5", {"thumbs": "up"}), ("6", {"thumbs": "down"}), ("5", {"score": 5}),
                                  ("7", {"score": 1})], 0)
    _rated(db, "Mail me at jane.doe@example.com please", [("ok", {"score": 5}), ("no", {"score": 2})], 10)
    _rated(db, EVAL_PROMPT, [("a", {"thumbs": "up"}), ("b", {"thumbs": "down"})], 20)  # an evaluation item
    _rated(db, "Say hi", [("hi", {"score": 3})], 30)  # no verdict: neither pair nor SFT
    labels = Labels(db)
    labels.add_items([{"prompt": "Name a color", "a": "blue", "b": "the"}])
    item = labels.next_item("x")["item_id"]
    for who in ("x", "y", "z"):
        labels.submit(who, item, "a")
    counts = export_feedback(db, tmp_path / "out")
    assert counts["dropped_eval_overlap"] == 1
    prefs = [json.loads(line) for line in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    got = {(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in prefs}
    assert got == {("Add 2 and 3.", "5", "6"), ("Add 2 and 3.", "5", "7"),
                   ("Mail me at <EMAIL> please", "ok", "no"), ("Name a color", "blue", "the")}
    assert len(prefs) == 4  # the two "5" answers are one chosen text: deduplicated
    assert sorted(s["messages"][-1]["content"] for s in sft) == ["5", "ok"]
    assert "jane.doe" not in (tmp_path / "out" / "preferences.jsonl").read_text()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["inputs"]["request_ids"]) == {"r0", "r1", "r3", "r10", "r11"}  # r2 repeats r0
    assert manifest["inputs"]["label_items"] == [item]
    tok = Tokenizer.from_pretrained(tiny_data["tokenizer"])
    rejects = Rejects()
    assert len(load_preferences([tmp_path / "out" / "preferences.jsonl"], tok, 256, rejects)) == 4
    assert len(load_sft([tmp_path / "out" / "sft.jsonl"], tok, 256, rejects)) == 2
    assert rejects.total() == 0
    r = run_cli(["feedback", "export", str(tmp_path / "cli"), "--db", str(db)])
    assert r.returncode == 0 and "4 preference pairs" in r.stdout, r.stderr


def turn_setup_db(reg: Registry) -> str:
    return str(reg.store.path.parent / "." / reg.store.path.name)  # the same file, spelled another way


@pytest.fixture()
def turn_setup(tmp_path, tiny_base_model, tiny_data):
    db = tmp_path / "monitor.sqlite"
    reg = Registry(db)
    reg.register("chat", tiny_base_model)
    reg.alias("chat", "production", 1)
    items = split_items(make_items(1, 40), 0.1)[0][:24]
    for i, it in enumerate(items):
        _rated(db, it.prompt, [(it.answer, {"thumbs": "up"}), (it.wrong, {"thumbs": "down"})], 100 + 2 * i)

    def cfg(**kw) -> ImproveConfig:
        return ImproveConfig(**{"name": "chat", "out_dir": str(tmp_path / "turn"), "db": str(db),
                                "heldout": tiny_data["val"], "gate_limit": 8, "min_examples": 8,
                                "train": ["train.max_steps=4", "eval.every=100", "eval.generate=0",
                                          "eval.max_pairs=8", "data.eval=null"], **kw})
    return reg, cfg


def test_a_turn_refused_by_the_gate_registers_nothing(turn_setup):
    reg, cfg = turn_setup
    rec = Turn(cfg(threshold=-1.0), reg).run()  # a negative tolerance: no candidate can pass
    assert rec["status"] == "refused" and rec["steps"]["gate"]["metrics"]["failed"]
    assert [v.version for v in reg.versions("chat")] == [1] and reg.split("chat") is None


def test_a_turn_trains_gates_registers_splits_and_promotes(turn_setup):
    reg, cfg = turn_setup
    assert Turn(cfg(min_examples=1000), reg).run()["status"] == "too little feedback"
    c = cfg(threshold=1.0)
    rec = Turn(c, reg).run()
    assert rec["status"] == "waiting for the A/B test"  # no traffic yet
    assert [s["status"] for s in rec["steps"].values()] == ["done"] * 5 + ["waiting for the A/B test"]
    assert reg.aliases("chat")["chat"] == {"production": 1, "challenger": 2}
    assert reg.state("chat")["weights"] == {"1": 90.0, "2": 10.0}  # challenger_weight 10
    v2 = reg.version("chat", 2)
    assert v2.metrics["eval"]["exact_match"] is not None  # the gate's evaluation travels with the version
    manifest = json.loads(open(f"{v2.path}/manifest.json").read())
    assert any(k.endswith("preferences.jsonl") for k in manifest["inputs"]["data"])  # lineage: the feedback
    seconds = rec["steps"]["train"]["seconds"]
    rec = Turn(c, reg, promote=True).run()  # resumes at decide: the done steps are not redone
    assert rec["steps"]["train"]["seconds"] == seconds
    assert rec["status"] == "promoted" and reg.resolve("chat").version == 2 and reg.split("chat") is None
    assert reg.aliases("chat")["chat"] == {"production": 2}  # the challenger is production now
    rec = Turn(c, reg).run()  # the next turn starts from the new production, over the last turn's folder
    assert rec["production"] == 2 and rec["status"] == "waiting for the A/B test"
    assert reg.aliases("chat")["chat"] == {"production": 2, "challenger": 3}
    with pytest.raises(LlmcycleError, match="under way with other settings"):  # its A/B test runs
        Turn(cfg(threshold=1.0, method="sft"), reg)
    Turn(cfg(threshold=1.0, alpha=0.01, db=str(turn_setup_db(reg))), reg)  # decision settings may change


def test_registry_feedback_labels_and_ab_report_on_postgresql(postgres_url, tmp_path, tiny_base_model):
    """The same database URL option as the request log: everything of improve/ on a real PostgreSQL server."""
    from llmcycle.improve.abtest import ab_report

    reg = Registry(postgres_url, root=tmp_path / "versions", audit=None)
    v1, _ = reg.register("pg", tiny_base_model)
    reg.alias("pg", "production", v1.version)
    assert reg.resolve("pg") == v1 and reg.register("pg", tiny_base_model) == (v1, False)
    log = RequestLog(postgres_url, flush_interval=0.01)
    for i in range(4):
        log.submit({"time": time.time(), "request_id": f"pg{i}", "route": "/v1/chat/completions", "status": 200,
                    "model": "pg", "variant": str(1 + i % 2), "num_prompts": 1, "finish_reasons": ["stop"],
                    "messages": [{"role": "user", "content": "Add 4 and 5."}], "completion": str(8 + i % 2)})
    log.close()
    fb = FeedbackStore(postgres_url)
    for i in range(4):
        fb.add(check_feedback({"request_id": f"pg{i}", "thumbs": "up" if i % 2 else "down"}))
    rep = ab_report(postgres_url, "pg")
    assert {v["variant"]: v["positive_rate"] for v in rep["variants"]} == {"1": 0.0, "2": 1.0}
    labels = Labels(postgres_url)
    labels.add_items([{"prompt": "Pick", "a": "x", "b": "y"}])
    item = labels.next_item("ann")["item_id"]
    labels.submit("ann", item, "b")
    assert labels.report()["labels"] == 1
    counts = export_feedback(postgres_url, tmp_path / "out")
    assert counts["pairs_from_ratings"] == 1 and counts["sft_examples"] == 1
