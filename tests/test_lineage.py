"""`llmcycle lineage`: a real pretrain -> SFT chain traced back to its data, and every kind of tampering caught."""

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_overrides
from llmcycle.artifacts.lineage import add_lineage_arguments, lineage_main, trace
from llmcycle.config import load_config
from llmcycle.errors import LlmcycleError
from llmcycle.train.config import PretrainConfig
from llmcycle.train.posttrain.sft import SFTConfig, sft
from llmcycle.train.pretrain.loop import pretrain


@pytest.fixture(scope="module")
def chain(tiny_data, tmp_path_factory) -> Path:
    """data/ (prepared shards) -> pre/model (3 steps) -> sft/model (2 steps), recorded with relative paths."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chain")
    shutil.copytree(Path(tiny_data["train"]).parent, root / "data")
    _sft_rows(root / "sft_train.jsonl")
    old = os.getcwd()
    os.chdir(root)  # the runs record paths relative to where they were started, as in runs/
    try:
        pretrain(load_config(PretrainConfig, None, ["tokenizer.path=data/tokenizer", "data.train_shards=data/train",
                                                    "data.val_shards=data/val", *tiny_train_overrides(Path("pre"), 3)]))
        sft(load_config(SFTConfig, None, ["out_dir=sft", "model=pre/model", "data.train=sft_train.jsonl",
                                          "data.eval=null", "train.max_steps=2", "train.batch_size=4",
                                          "train.dtype=fp32", "train.threads=1", "data.max_length=32",
                                          "eval.every=0", "checkpoint.every=0"]))
    finally:
        os.chdir(old)
    return root


def _sft_rows(path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("apple", "river", "garden", "music") * 4]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def moved_run(tiny_data, tmp_path_factory) -> Path:
    """A run folder recorded with absolute paths, as `llmcycle run` records them (data/, pre/model,
    sft/model, inputs/sft_train.jsonl), then moved: no recorded path exists any more."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("moved")
    root = base / "runs" / "mini"
    shutil.copytree(Path(tiny_data["train"]).parent, root / "data")
    (root / "inputs").mkdir()
    _sft_rows(root / "inputs" / "sft_train.jsonl")
    data = root / "data"
    pretrain(load_config(PretrainConfig, None, [f"tokenizer.path={data / 'tokenizer'}", f"data.train_shards={data / 'train'}",
                                                f"data.val_shards={data / 'val'}", *tiny_train_overrides(root / "pre", 3)]))
    sft(load_config(SFTConfig, None, [f"out_dir={root / 'sft'}", f"model={root / 'pre' / 'model'}",
                                      f"data.train={root / 'inputs' / 'sft_train.jsonl'}", "data.eval=null",
                                      "train.max_steps=2", "train.batch_size=4", "train.dtype=fp32", "train.threads=1",
                                      "data.max_length=32", "eval.every=0", "checkpoint.every=0"]))
    assert json.loads((root / "sft" / "model" / "manifest.json").read_text())["inputs"]["model"]["path"] == \
        str(root / "pre" / "model")
    moved = base / "elsewhere"
    os.rename(base / "runs", moved)  # mv runs elsewhere
    return moved / "mini"


def test_a_moved_run_folder_verifies_against_its_own_files(moved_run, capsys):
    links = trace(moved_run / "sft" / "model")
    assert [(x.stage, x.status) for x in links] == [
        ("sft", "OK"), ("pretrain", "OK"), ("prepared-data", "OK"), ("corpus", "UNVERIFIABLE"),
        ("tokenizer", "UNVERIFIABLE"), ("file", "OK")]
    inside = str(moved_run.resolve())
    assert all(x.key.startswith(inside) for x in links if x.stage != "corpus")
    rc, _, err = _lineage(capsys, moved_run / "sft" / "model")
    assert rc == 0 and err == ""


def test_a_copied_run_folder_is_checked_against_the_copy_not_the_original(moved_run, tmp_path, capsys):
    """Two copies under other names: a byte changed in one copy's pre-trained weights fails that copy only."""
    a = Path(shutil.copytree(moved_run, tmp_path / "a" / "copy-a"))
    b = Path(shutil.copytree(moved_run, tmp_path / "b" / "copy-b"))
    weights = a / "pre" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rc, _, err = _lineage(capsys, a / "sft" / "model")
    assert rc == 1 and f"input model {weights}: changed" in err
    assert _lineage(capsys, b / "sft" / "model")[0] == 0


def test_a_deleted_parent_fails_unless_missing_is_allowed(moved_run, tmp_path, capsys):
    root = Path(shutil.copytree(moved_run, tmp_path / "copy"))
    shutil.rmtree(root / "pre")
    rc, out, err = _lineage(capsys, root / "sft" / "model", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["ok"] is False
    recorded = moved_run.parents[1] / "runs" / "mini" / "pre" / "model"  # where it was when sft ran
    assert doc["missing"] == [f"sft {root / 'sft' / 'model'}: model {recorded} not found"]
    assert "lineage: MISSING: sft " in err and "are missing; the chain cannot be verified" in err
    rc, out, err = _lineage(capsys, root / "sft" / "model", "--json", "--allow-missing")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] is True and len(doc["missing"]) == 1
    assert "lineage: MISSING (allowed): sft " in err
    assert [x["status"] for x in doc["links"] if x["stage"] == "?"] == ["MISSING"]


def _lineage(capsys, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_lineage_arguments(parser)
    rc = lineage_main(parser.parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _copy(chain: Path, tmp_path: Path) -> Path:
    """A copy of the whole chain: relative paths must resolve inside the copy, not back to the original."""
    return Path(shutil.copytree(chain, tmp_path / "copy"))


def test_untouched_chain_traces_sft_to_pretrain_to_data_and_passes(chain, capsys):
    links = trace(chain / "sft" / "model")
    assert [(x.stage, x.status) for x in links] == [
        ("sft", "OK"), ("pretrain", "OK"), ("prepared-data", "OK"), ("corpus", "UNVERIFIABLE"),
        ("tokenizer", "UNVERIFIABLE"), ("file", "OK")]
    sft_link, pre, data = links[:3]
    assert pre.key == str((chain / "pre" / "model").resolve()) and data.key == str((chain / "data").resolve())
    assert [r for r, _ in sft_link.inputs] == ["model", "data"] and sft_link.config["train.max_steps"] == 2
    assert [r for r, _ in pre.inputs] == ["data", "tokenizer.path"]  # train and val shards: one folder, once
    assert pre.metrics["steps"] == 3 and not any(x.problems for x in links)
    assert "Python" in links[3].notes[0]
    rc, out, err = _lineage(capsys, chain / "sft" / "model")
    assert rc == 0 and err == ""
    assert out.splitlines()[0].startswith(f"sft  {chain / 'sft' / 'model'}  created ") and "[OK]" in out
    assert "\n  model: pretrain  " in out and "\n    data: prepared-data  " in out


def test_a_modified_byte_in_the_pretrained_weights_fails_naming_the_file(chain, tmp_path, capsys):
    root = _copy(chain, tmp_path)
    weights = root / "pre" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rc, out, err = _lineage(capsys, root / "sft" / "model")
    assert rc == 1
    assert f"lineage: MODIFIED: pretrain {root / 'pre' / 'model'}: file {weights}: changed" in err
    assert f"lineage: MODIFIED: sft {root / 'sft' / 'model'}: input model {weights}: changed" in err
    assert "2 artifact(s)" in err and "[MODIFIED]" in out
    assert trace(chain / "sft" / "model")[1].status == "OK"  # the original is untouched and still resolves


def test_a_changed_training_file_is_reported_as_a_changed_input(chain, tmp_path, capsys):
    root = _copy(chain, tmp_path)
    with open(root / "sft_train.jsonl", "a") as f:
        f.write('{"messages": []}\n')
    links = trace(root / "sft" / "model")
    recorded = links[-1].hashes["sha256"]
    assert len(links[0].problems) == 1
    assert links[0].problems[0].startswith(f"input data {root / 'sft_train.jsonl'}: changed (recorded {recorded[:12]}")
    assert links[-1].status == "MODIFIED" and links[1].status == "OK"
    rc, _, err = _lineage(capsys, root / "sft" / "model", "--no-verify")
    assert rc == 0 and err == ""  # nothing re-hashed, nothing to complain about


def test_tampered_shards_an_added_file_and_a_missing_input(chain, tmp_path):
    root = _copy(chain, tmp_path)
    shard = next((root / "data" / "val").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    (root / "sft" / "model" / "extra.txt").write_text("x")
    (root / "sft_train.jsonl").unlink()
    links = {x.stage: x for x in trace(root / "sft" / "model")}
    assert links["prepared-data"].problems[0].startswith(f"file {shard}: changed")
    assert links["sft"].problems == [f"file {root / 'sft' / 'model' / 'extra.txt'}: added after the manifest "
                                     "was written"]
    assert links["?"].status == "MISSING" and links["?"].path.endswith("sft_train.jsonl")


def test_a_directory_without_manifest_is_a_clear_error(chain, tmp_path, capsys):
    with pytest.raises(LlmcycleError, match=f"{tmp_path}: no manifest.json; not an llmcycle artifact"):
        trace(tmp_path)
    with pytest.raises(LlmcycleError, match=r"did you mean .*sft/model"):
        trace(chain / "sft")


def test_json_output_holds_every_stage(chain, capsys):
    rc, out, _ = _lineage(capsys, chain / "sft" / "model", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] is True
    assert {x["stage"] for x in doc["links"]} == {"sft", "pretrain", "prepared-data", "corpus", "tokenizer", "file"}
    by_key = {x["key"]: x for x in doc["links"]}
    assert all(k in by_key for x in doc["links"] for _, k in x["inputs"])
