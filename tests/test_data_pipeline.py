"""The data pipeline as a whole: recipe checks, exact funnel counts, bad input, executors, kill and resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, tiny_train_overrides
from dirty_corpus import make_dirty_corpus
from llmcycle.config import build
from llmcycle.data.config import DataConfig
from llmcycle.data.output import balanced_cuts, shard_count
from llmcycle.data.run import run_data
from llmcycle.data.shards import ShardSet
from llmcycle.errors import ConfigError

STEPS = ["normalize", {"language": {"languages": ["en"]}}, "pii", "exact_dedup", "minhash_dedup"]


def _cfg(out: Path, inputs: list[dict], steps=STEPS, **kw) -> DataConfig:
    data = {"out_dir": str(out), "inputs": inputs, "steps": steps, "max_doc_bytes": 20000, "workers": 1,
            "tokenizer": {"vocab_size": 300}, "shards": {"val_fraction": 0.1, "shard_tokens": 4000}}
    for k, v in kw.items():
        data[k] = v
    return build(DataConfig, data)


def _dirty_inputs(root: Path) -> list[dict]:
    return [{"type": "jsonl", "paths": [str(root / "part-*.jsonl"), str(root / "bad.jsonl"),
                                        str(root / "cut.jsonl.gz")]}]


def _tree_hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _outputs(out: Path) -> dict[str, str]:
    """Everything a run publishes that must not depend on executor, worker count or interruptions."""
    hashes = {}
    for sub in ("train", "val", "tokenizer"):
        hashes.update({f"{sub}/{k}": v for k, v in _tree_hashes(out / sub).items()})
    from llmcycle.data.pipeline import iter_docs

    for f in sorted((out / "documents").iterdir()):
        hashes[f"documents/{f.name}"] = hashlib.sha256(
            json.dumps([vars(d) for d in iter_docs(f)], sort_keys=True).encode()).hexdigest()
    return hashes


def _funnel(out: Path) -> list[tuple]:
    stats = json.loads((out / "stats.json").read_text())
    return [(s["name"], s["docs_in"], s["docs_out"], s["dropped"], s["counters"]) for s in stats["steps"]]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty")
    expected = make_dirty_corpus(root / "in")
    out = root / "out-local"
    result = run_data(_cfg(out, _dirty_inputs(root / "in"), workers=2))
    # workers are not this process's children (forkserver): they report their own peak memory
    assert 20 < result["worker_peak_rss_mb"] < 8000
    return root, expected, out


def test_funnel_counts_are_exact(dirty):
    root, exp, out = dirty
    stats = json.loads((out / "stats.json").read_text())
    steps = {s["name"]: s for s in stats["steps"]}
    read_ok = exp["unique"] + exp["exact_duplicate"] + exp["near_duplicate"] + 8
    assert steps["read"]["docs_out"] == read_ok
    assert steps["read"]["dropped"] == exp["bad"]
    assert steps["language"]["docs_in"] == read_ok
    assert sum(steps["language"]["dropped"].values()) == 8
    assert steps["pii"]["counters"] == {k: n for k, n in exp["pii"].items()}
    assert steps["exact_dedup"]["dropped"] == {"exact_duplicate": exp["exact_duplicate"]}
    assert steps["minhash_dedup"]["dropped"] == {"near_duplicate": exp["near_duplicate"]}
    assert steps["minhash_dedup"]["docs_out"] == exp["unique"]
    assert steps["tokenize"]["docs_in"] == exp["unique"]
    # bad input is listed by reason with file and line
    problems = stats["problems"]
    assert problems["counts"] == exp["bad"]
    assert any(loc.startswith(f"{root / 'in' / 'bad.jsonl'}:2") for loc in problems["locations"]["malformed_json"])
    assert problems["locations"]["invalid_utf8"][0].startswith(f"{root / 'in' / 'bad.jsonl'}:3")
    # samples of dropped documents are kept per reason
    samples = [json.loads(line) for line in (out / "dropped_samples.jsonl").read_text().splitlines()]
    assert {(s["step"], s["reason"]) for s in samples} >= {("exact_dedup", "exact_duplicate"),
                                                          ("minhash_dedup", "near_duplicate")}


def test_outputs_are_shards_pretraining_reads(dirty, tmp_path):
    _, exp, out = dirty
    train, val = ShardSet(out / "train", verify=True), ShardSet(out / "val", verify=True)
    assert len(train) + len(val) == exp["unique"]
    assert len(val) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "data"
    assert manifest["metrics"]["train"]["num_tokens"] == train.num_tokens
    assert not any(k.startswith("work/") for k in manifest["outputs"])
    assert all(v.startswith(("docs:",)) or len(v) == 64 for v in manifest["inputs"].values())
    # the cleaned documents carry no planted PII
    from llmcycle.data.pipeline import iter_docs
    text = "".join(d.text for f in (out / "documents").iterdir() for d in iter_docs(f))
    assert "alice.smith@example.com" not in text and "4111 1111 1111 1111" not in text


def test_ray_executor_gives_identical_output(dirty, tmp_path):
    pytest.importorskip("ray")
    root, _, out_local = dirty
    out = tmp_path / "out-ray"
    result = run_data(_cfg(out, _dirty_inputs(root / "in"), executor="ray", workers=2))
    assert result["worker_peak_rss_mb"] > 20
    assert _outputs(out) == _outputs(out_local)
    assert _funnel(out) == _funnel(out_local)


def test_single_worker_gives_identical_output(dirty, tmp_path):
    root, _, out_local = dirty
    out = tmp_path / "out-one"
    run_data(_cfg(out, _dirty_inputs(root / "in"), workers=1))
    assert _outputs(out) == _outputs(out_local)


def test_second_run_reuses_every_task(dirty, tmp_path, caplog):
    root, _, out = dirty
    before = {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.done.json")}
    with caplog.at_level(logging.INFO, logger="llmcycle"):
        run_data(_cfg(out, _dirty_inputs(root / "in"), workers=2))
    assert {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.done.json")} == before
    assert any("already done" in line for line in caplog.messages)


SLOW_HOOK = '''
import time
def score(text):
    time.sleep(0.02)
    return 0.0
'''


def test_killed_run_resumes_with_identical_output(tmp_path):
    """Kill a real `llmcycle data` process mid-phase; the rerun equals an uninterrupted run."""
    make_dirty_corpus(tmp_path / "in", num_files=6, docs_per_file=12, seed=1)
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "slowhook.py").write_text(SLOW_HOOK)
    steps = ["normalize", {"harmful": {"classifier": "slowhook:score"}}, "exact_dedup", "minhash_dedup"]

    def args(out):
        inputs = [{"type": "jsonl", "paths": [str(tmp_path / "in" / "part-*.jsonl")]}]
        return ["data", f"out_dir={out}", f"inputs={json.dumps(inputs)}", f"steps={json.dumps(steps)}",
                "workers=1", "tokenizer.vocab_size=300", "shards.val_fraction=0.1", "shards.shard_tokens=3000"]

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hooks"), "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    r = subprocess.run([sys.executable, "-m", "llmcycle", *args(full)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", *args(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((killed / "work").glob("phase0-*/task-*.done.json"))
        if len(done) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "work").glob("phase0-*/task-*.done.json")))
    assert 2 <= done < 6, "the kill must land in the middle of phase 0"
    r = subprocess.run([sys.executable, "-m", "llmcycle", *args(killed)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"({done} already done)" in r.stdout
    assert _outputs(killed) == _outputs(full)
    assert _funnel(killed) == _funnel(full)


def test_misconfigured_recipe_is_refused_before_work(tmp_path):
    out = tmp_path / "out"
    r = run_cli(["data", f"out_dir={out}", "steps=[nosuchstep]"])
    assert r.returncode == 2 and "unknown step 'nosuchstep'" in r.stderr and "gopher_quality" in r.stderr
    r = run_cli(["data", f"out_dir={out}", 'steps=[{gopher_quality: {min_doc_words: many}}]'])
    assert r.returncode == 2 and "steps[0].gopher_quality.min_doc_words" in r.stderr
    r = run_cli(["data", f"out_dir={out}", "inputs=[{type: jsonl, paths: [/nonexistent/*.jsonl]}]"])
    assert r.returncode == 2 and "matches no file" in r.stderr
    r = run_cli(["data", f"out_dir={out}", "inputs=[{type: csv}]"])
    assert r.returncode == 2 and "valid reader types" in r.stderr
    assert not out.exists()
    from llmcycle.data.run import check_config

    with pytest.raises(ConfigError, match="unknown reader 'wrac'"):
        check_config(_cfg(out, [{"type": "python"}], steps=[{"exact_dedup": {"apply_to": ["wrac"]}}]))


def test_apply_to_limits_a_step_to_some_readers(tmp_path):
    """Documents of other readers pass a limited step untouched (and skip a limited dedup)."""
    rows = [{"id": f"d{i}", "text": "Same text in every row. Contact bob@example.org now."} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.txt").write_text(rows[0]["text"])
    inputs = [{"type": "jsonl", "paths": [str(tmp_path / "a.jsonl")]},
              {"type": "text", "paths": [str(tmp_path / "b.txt")]}]
    steps = [{"pii": {"apply_to": ["text"]}}, {"exact_dedup": {"apply_to": ["jsonl"]}}]
    out = tmp_path / "out"
    run_data(_cfg(out, inputs, steps=steps, tokenize=False))
    funnel = {name: (n_in, n_out, dropped, counters) for name, n_in, n_out, dropped, counters in _funnel(out)}
    assert funnel["pii"] == (4, 4, {}, {"email": 1, "not_applied": 3})
    assert funnel["exact_dedup"][:3] == (4, 2, {"exact_duplicate": 2})
    from llmcycle.data.pipeline import iter_docs

    texts = [d.text for f in sorted((out / "documents").iterdir()) for d in iter_docs(f)]
    assert texts == [rows[0]["text"], rows[0]["text"].replace("bob@example.org", "<EMAIL>")]


def test_data_help_lists_readers_and_steps():
    r = run_cli(["data", "--help"])
    assert r.returncode == 0
    for word in ("minhash_dedup", "gopher_quality", "warc", "parquet", "shards.num_ranks", "--executor"):
        assert word in r.stdout


def test_balanced_cuts():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1000)
    for n in (1, 2, 4, 8, 16):
        cuts = balanced_cuts(lengths, n)
        assert cuts[0] == 0 and cuts[-1] == 1000 and all(a < b for a, b in zip(cuts, cuts[1:]))
        sums = [lengths[a:b].sum() for a, b in zip(cuts, cuts[1:])]
        assert max(sums) - min(sums) <= 2 * lengths.max()
    assert balanced_cuts(np.array([5, 5, 5]), 3) == [0, 1, 2, 3]
    assert shard_count(total_tokens=1000, num_docs=100, shard_tokens=300, num_ranks=4) == 4
    assert shard_count(total_tokens=1000, num_docs=100, shard_tokens=100, num_ranks=4) == 12
    assert shard_count(total_tokens=1000, num_docs=3, shard_tokens=100, num_ranks=4) == 3


def test_python_and_warc_to_shards_then_pretrain(tmp_path):
    """The issue's 'done when': the embedded corpus plus a WARC file become shards pretrain trains on."""
    from test_data_readers import write_sample_warc  # the readers' tests build WARC files

    warc = tmp_path / "crawl.warc.gz"
    write_sample_warc(warc)
    out = tmp_path / "data"
    inputs = [{"type": "python", "max_bytes": 300000, "parts": 2}, {"type": "warc", "paths": [str(warc)]}]
    r = run_cli(["data", "-c", "data", f"out_dir={out}", f"inputs={json.dumps(inputs)}", "workers=2",
                 "tokenizer.vocab_size=512", "shards.val_fraction=0.2"])
    assert r.returncode == 0, r.stderr
    assert "read" in r.stdout and "minhash_dedup" in r.stdout and "bad input" in r.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert {t["reader"] for t in stats["tasks"]} == {"python", "warc"}
    train = ShardSet(out / "train", verify=True)
    assert any(e["sources"].get("warc") for e in train.meta["shards"])
    assert any(e["sources"].get("python") for e in train.meta["shards"])
    overrides = tiny_train_overrides(tmp_path / "pt", steps=4, **{"eval.every": 4, "checkpoint.every": 4})
    r = run_cli(["pretrain", "-c", "tiny", *overrides, f"tokenizer.path={out / 'tokenizer'}",
                 f"data.train_shards={out / 'train'}", f"data.val_shards={out / 'val'}"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pt" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["data", "web"])
def test_shipped_data_recipes_are_valid(name, tmp_path):
    from llmcycle.config import load_config
    from llmcycle.data.steps import build_step

    cfg = load_config(DataConfig, name)
    steps = [build_step(spec, f"steps[{i}]") for i, spec in enumerate(cfg.steps)]
    assert {"normalize", "pii", "exact_dedup", "minhash_dedup"} <= {s.name for s in steps}
    if name == "data":  # reads only what ships with Python, so the whole plan can be checked
        from llmcycle.data.run import check_config

        assert len(check_config(cfg).tasks) == 8


def _session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of every live process of session `sid`, from /proc (zombies are dead: left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append((int(entry.name), cmd))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads sessions from /proc")
def test_killed_driver_leaves_no_worker_forkserver_or_tracker(tmp_path):
    """SIGKILL a multi-process `llmcycle data` mid-phase: its worker pool, forkserver and resource tracker
    end within seconds instead of living on (each holds ~120 MB)."""
    make_dirty_corpus(tmp_path / "in", num_files=6, docs_per_file=12, seed=1)
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "slowhook.py").write_text(SLOW_HOOK)
    inputs = [{"type": "jsonl", "paths": [str(tmp_path / "in" / "part-*.jsonl")]}]
    steps = ["normalize", {"harmful": {"classifier": "slowhook:score"}}]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hooks"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", "data", f"out_dir={out}", f"inputs={json.dumps(inputs)}",
                             f"steps={json.dumps(steps)}", "workers=2", "tokenizer.vocab_size=300"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((out / "work").glob("phase0-*/task-*.done.json")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before a task finished"
            time.sleep(0.01)
        assert len(_session_members(proc.pid)) >= 4  # driver, forkserver, tracker, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while (left := _session_members(proc.pid)) and time.time() < deadline:
            time.sleep(0.1)
        assert not left, f"still running after the driver was killed: {left}"
    finally:
        for pid, _ in _session_members(proc.pid):  # do not leak them into the rest of the test run
            os.kill(pid, signal.SIGKILL)
