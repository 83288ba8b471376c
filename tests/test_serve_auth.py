import argparse
import threading

import pytest

from llmcycle.errors import LlmcycleError
from llmcycle.serve.auth import KeyStore, RateLimiter, add_keys_arguments, hash_key, keys_main

# ---------------------------------------------------------------- KeyStore


def test_create_stores_only_hash(tmp_path):
    db = tmp_path / "keys.sqlite"
    store = KeyStore(db)
    plain, rec = store.create("alice", requests_per_minute=60, tokens_per_minute=1000)
    assert plain.startswith("llm-") and len(plain) == 4 + 43
    assert rec.prefix == plain[:12] and rec.name == "alice" and rec.revoked_at is None
    assert (rec.requests_per_minute, rec.tokens_per_minute) == (60, 1000)
    assert len(rec.id) == 8 and int(rec.id, 16) >= 0
    raw = db.read_bytes()
    assert plain.encode() not in raw and plain[4:].encode() not in raw
    assert hash_key(plain).encode() in raw  # it is the hash that is stored
    assert store.list() == [rec]


def test_verify_good_bad_revoked(tmp_path):
    store = KeyStore(tmp_path / "k.sqlite")
    plain, rec = store.create("a")
    plain_b, _ = store.create("b")
    assert store.verify(plain) == rec
    assert store.verify(plain + "x") is None
    assert store.verify("llm-" + "A" * 43) is None
    assert store.verify("") is None and store.verify(None) is None
    assert len(store) == 2
    revoked = store.revoke("a")
    assert revoked.id == rec.id and revoked.revoked_at is not None
    assert store.verify(plain) is None and store.verify(plain_b) is not None
    assert len(store) == 1
    assert [r.name for r in store.list()] == ["b"]
    assert [r.name for r in store.list(include_revoked=True)] == ["a", "b"]


def test_revoke_seen_by_other_instance(tmp_path):
    server = KeyStore(tmp_path / "k.sqlite")
    plain, rec = server.create("svc")
    assert server.verify(plain) == rec
    KeyStore(tmp_path / "k.sqlite").revoke(rec.id)  # as `llmcycle keys revoke` in another process
    assert server.verify(plain) is None


def test_revoke_errors_and_unique_names(tmp_path):
    store = KeyStore(tmp_path / "k.sqlite")
    _, rec = store.create("a")
    with pytest.raises(LlmcycleError, match="already exists"):
        store.create("a")
    with pytest.raises(LlmcycleError, match="No key with id or name 'zzz'"):
        store.revoke("zzz")
    store.revoke(rec.id)
    with pytest.raises(LlmcycleError, match="already revoked"):
        store.revoke("a")
    plain2, rec2 = store.create("a")  # the name is free again once revoked
    assert rec2.id != rec.id and store.verify(plain2) == rec2
    with pytest.raises(LlmcycleError, match="positive integer"):
        store.create("c", requests_per_minute=0)
    with pytest.raises(LlmcycleError, match="non-empty name"):
        store.create("  ")


def test_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("this is not a database\n" * 100)
    with pytest.raises(LlmcycleError, match="bad.sqlite"):
        KeyStore(bad)
    with pytest.raises(LlmcycleError, match="does not exist"):
        KeyStore(tmp_path / "missing.sqlite", create=False)


def test_threads_verify_concurrently(tmp_path):
    store = KeyStore(tmp_path / "k.sqlite")
    plain, rec = store.create("t")
    limiter = RateLimiter()
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(store.verify(plain) == rec)
                results.append(store.verify(plain + "!") is None)
                limiter.check_request(rec.id, 1000, None, now=0.0)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 240 and all(results)
    # 120 requests consumed exactly once each: 880 of the 1000-request bucket left at now=0.
    assert limiter._buckets[(rec.id, "req")] == (880.0, 0.0)


# ---------------------------------------------------------------- RateLimiter


def test_requests_per_minute_bucket():
    rl = RateLimiter()
    for _ in range(3):
        assert rl.check_request("k", 3, None, now=100.0) is None
    wait = rl.check_request("k", 3, None, now=100.0)
    assert wait == pytest.approx(20.0)  # one request refills in 60/3 s
    assert rl.check_request("k", 3, None, now=110.0) == pytest.approx(10.0)
    assert rl.check_request("k", 3, None, now=120.0) is None
    assert rl.check_request("k", 3, None, now=120.0) == pytest.approx(20.0)
    assert rl.check_request("other", 3, None, now=120.0) is None  # keys are independent
    # Long idle: refills to capacity, not beyond.
    for _ in range(3):
        assert rl.check_request("k", 3, None, now=10_000.0) is None
    assert rl.check_request("k", 3, None, now=10_000.0) is not None
    # No limits: always allowed.
    assert all(rl.check_request("free", None, None, now=0.0) is None for _ in range(100))


def test_tokens_per_minute_debit_blocks_then_refills():
    rl = RateLimiter()
    assert rl.check_request("k", None, 600, now=0.0) is None  # 600 tpm = 10 tokens/s
    rl.record_tokens("k", 800, 600, now=0.0)  # bucket: 600 - 800 = -200
    assert rl.check_request("k", None, 600, now=0.0) == pytest.approx(20.1)  # back to 1 token: 201/10 s
    assert rl.check_request("k", None, 600, now=20.0) == pytest.approx(0.1)
    assert rl.check_request("k", None, 600, now=20.1) is None
    assert rl.check_request("k", None, 600, now=20.1) is None  # requests themselves cost no tokens
    rl.record_tokens("k", 5, None, now=21.0)  # no limit: nothing recorded
    assert rl._buckets[("k", "tok")] == (pytest.approx(1.0), 20.1)


def test_both_limits_wait_is_the_longer():
    rl = RateLimiter()
    assert rl.check_request("k", 60, 60, now=0.0) is None
    rl.record_tokens("k", 119, 60, now=0.0)  # tokens: 60 - 119 = -59 -> 60 s until 1 token
    assert rl.check_request("k", 60, 60, now=0.0) == pytest.approx(60.0)
    assert rl.check_request("k", 60, 60, now=59.0) == pytest.approx(1.0)
    assert rl.check_request("k", 60, 60, now=60.0) is None


# ---------------------------------------------------------------- CLI


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="llmcycle keys")
    add_keys_arguments(parser)
    assert keys_main(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_cli_create_list_revoke(tmp_path, capsys):
    db = str(tmp_path / "runs" / "keys.sqlite")
    out = _run(["create", "bob", "--rpm", "30", "--db", db], capsys)
    plain = next(line for line in out.splitlines() if line.startswith("llm-"))
    assert "will not be shown again" in out
    rec = KeyStore(db).verify(plain)
    assert rec is not None and rec.name == "bob" and rec.requests_per_minute == 30 and rec.tokens_per_minute is None

    out = _run(["list", "--db", db], capsys)
    assert plain not in out and plain[12:20] not in out
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "ROLE", "PREFIX", "CREATED", "REVOKED", "RPM", "TPM", "BUDGET"]
    assert row.split() == [rec.id, "bob", "user", rec.prefix + "...", rec.created_at, "-", "30", "-", "-"]

    out = _run(["revoke", "bob", "--db", db], capsys)
    assert f"id {rec.id}" in out and "Revoked" in out
    assert KeyStore(db).verify(plain) is None
    assert len(_run(["list", "--db", db], capsys).splitlines()) == 1
    assert len(_run(["list", "--all", "--db", db], capsys).splitlines()) == 2

    parser = argparse.ArgumentParser()
    add_keys_arguments(parser)
    with pytest.raises(LlmcycleError, match="No key"):
        keys_main(parser.parse_args(["revoke", "nobody", "--db", db]))
    with pytest.raises(LlmcycleError, match="does not exist"):
        keys_main(parser.parse_args(["list", "--db", str(tmp_path / "none.sqlite")]))
    assert parser.parse_args(["list"]).db == "runs/keys.sqlite"


def test_budgets_on_keys_and_an_older_database(tmp_path, capsys):
    import sqlite3

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as con:  # the schema before budgets existed, with a key in it
        con.executescript("""CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL, revoked_at TEXT,
            requests_per_minute INTEGER, tokens_per_minute INTEGER);""")
        con.execute("INSERT INTO api_keys VALUES ('ab12cd34', 'old', 'llm-xxxxxxxx', ?, '2026-01-01', NULL, NULL, NULL)",
                    (hash_key("llm-old-key"),))
    store = KeyStore(db)
    assert store.verify("llm-old-key").budget is None
    out = _run(["create", "capped", "--budget", "2.5", "--budget-period", "day", "--db", str(db)], capsys)
    assert "budget 2.5/day" in out
    rec = next(r for r in store.list() if r.name == "capped")
    assert (rec.budget, rec.budget_period) == (2.5, "day")
    assert "2.5/day" in _run(["list", "--db", str(db)], capsys)
    for bad in ({"budget": -1}, {"budget": 1, "budget_period": "week"}):
        with pytest.raises(LlmcycleError, match="budget"):
            store.create("x", **bad)
