import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_train_overrides
from llmcycle.config import load_config
from llmcycle.errors import LlmcycleError
from llmcycle.model import Transformer
from llmcycle.train.config import PretrainConfig
from llmcycle.train.core.checkpoint import latest_checkpoint
from llmcycle.train.pretrain.loop import TrainingDiverged, pretrain


def _cfg(tiny_data, out_dir, steps=20, **extra):
    return load_config(PretrainConfig, None, tiny_data["overrides"] + tiny_train_overrides(out_dir, steps, **extra))


def _losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretrain_learns_and_writes_a_hf_model_dir(tiny_data, tmp_path):
    result = pretrain(_cfg(tiny_data, tmp_path, steps=100, **{"eval.every": 50}))
    losses = _losses(tmp_path)
    assert len(losses) == 100
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:5]) / 5 - 0.8
    assert result["val_bpb"] < result["unigram_bpb"]
    model_dir = tmp_path / "model"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "manifest.json"):
        assert (model_dir / name).exists(), name
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and "model.safetensors" in manifest["outputs"]
    model = Transformer.from_pretrained(model_dir)
    assert model.config.vocab_size == 512
    samples = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("samples" in r for r in samples)


def test_masked_lm_objective_learns(tiny_data, tmp_path):
    result = pretrain(_cfg(tiny_data, tmp_path, steps=80, **{"train.objective": "masked", "eval.every": 80}))
    losses = list(_losses(tmp_path).values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.6
    assert result["val_loss"] < math.log(512) - 0.8  # well below a uniform guess over the vocabulary
    assert "val_loss" in result and "val_bpb" not in result
    assert Transformer.from_pretrained(tmp_path / "model").config.is_causal is False


def test_kill_and_resume_reproduces_uninterrupted_losses(tiny_data, tmp_path):
    steps = 40
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    pretrain(_cfg(tiny_data, ref_dir, steps=steps))
    reference = _losses(ref_dir)

    args = ["pretrain", *tiny_data["overrides"], *tiny_train_overrides(run_dir, steps)]
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    import os
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **env})
    deadline = time.time() + 120
    # Kill with SIGKILL once the step-10 checkpoint is published and training has gone past it.
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if (run_dir / "checkpoints" / "latest").exists() and metrics.exists() and len(_losses(run_dir)) >= 13:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (run_dir / "model").exists()
    resumed = run_cli([*args, "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: continuing" in resumed.stdout + resumed.stderr
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-6), step
    a = Transformer.from_pretrained(ref_dir / "model").state_dict()
    b = Transformer.from_pretrained(run_dir / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_process_ddp_matches_one_process(tiny_data, tmp_path):
    steps = 6
    one = tmp_path / "one"
    pretrain(_cfg(tiny_data, one, steps=steps, **{"train.batch_size": 8}))
    two = tmp_path / "two"
    args = [*tiny_data["overrides"], *tiny_train_overrides(two, steps, **{"train.batch_size": 4})]
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "llmcycle", "pretrain", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert proc.stdout.count("train: ") == 1  # progress from rank 0 alone
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l2) == list(range(1, steps + 1))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), s
    a = Transformer.from_pretrained(one / "model").state_dict()
    b = Transformer.from_pretrained(two / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    pretrain(_cfg(tiny_data, tmp_path, steps=10))
    before = latest_checkpoint(tmp_path / "checkpoints")
    with pytest.raises(TrainingDiverged, match="step_00000010"):
        pretrain(_cfg(tiny_data, tmp_path, steps=30, **{"train.lr": 1e30, "train.grad_clip": 0}), resume=True)
    assert latest_checkpoint(tmp_path / "checkpoints") == before


def test_resume_refuses_a_recipe_that_does_not_match(tiny_data, tmp_path):
    pretrain(_cfg(tiny_data, tmp_path, steps=10))
    with pytest.raises(LlmcycleError, match="model.hidden_size is 96 in the recipe, 64 in the checkpoint"):
        pretrain(_cfg(tiny_data, tmp_path, steps=20, **{"model.hidden_size": 96}), resume=True)
    with pytest.raises(LlmcycleError, match="--resume"):
        pretrain(_cfg(tiny_data, tmp_path, steps=20), resume=False)


def test_corrupt_checkpoint_is_refused_on_resume(tiny_data, tmp_path):
    pretrain(_cfg(tiny_data, tmp_path, steps=10))
    weights = tmp_path / "checkpoints" / "step_00000010" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    r = run_cli(["pretrain", *tiny_data["overrides"], *tiny_train_overrides(tmp_path, 20), "--resume"])
    assert r.returncode == 2
    assert "model.safetensors" in r.stderr and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_tokenizer_larger_than_model_vocab_is_refused(tiny_data, tmp_path):
    from llmcycle.model import ModelConfig
    small = Transformer(ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(LlmcycleError, match="tokenizer has 512 tokens"):
        pretrain(_cfg(tiny_data, tmp_path / "out", steps=2, init_from=str(tmp_path / "small")))


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n')
    r = run_cli(["pretrain", f"out_dir={tmp_path / 'out'}", f"data.corpus={empty}"])
    assert r.returncode == 2
    assert "no non-empty documents" in r.stderr and "Traceback" not in r.stderr


def test_grad_accumulation_matches_the_full_batch(tiny_data, tmp_path):
    full = pretrain(_cfg(tiny_data, tmp_path / "full", steps=4, **{"train.batch_size": 8}))
    accum = pretrain(_cfg(tiny_data, tmp_path / "accum", steps=4, **{"train.batch_size": 4, "train.grad_accum": 2}))
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "accum")
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)
    assert accum["val_loss"] == pytest.approx(full["val_loss"], rel=1e-4)


def test_continued_pretraining_starts_from_the_given_model(tiny_data, tmp_path):
    first = tmp_path / "first"
    pretrain(_cfg(tiny_data, first, steps=30))
    first_losses = _losses(first)
    # Continue from the final model directory: its tokenizer comes along, the loss starts where it ended.
    overrides = [o for o in tiny_data["overrides"] if not o.startswith("tokenizer.path")]
    cfg = load_config(PretrainConfig, None, overrides + tiny_train_overrides(tmp_path / "second", 5)
                      + [f"init_from={first / 'model'}"])
    pretrain(cfg)
    second = _losses(tmp_path / "second")
    assert second[1] < first_losses[1] - 0.5
    assert second[1] == pytest.approx(first_losses[30], abs=0.5)


def test_two_process_fsdp_matches_one_process_and_resumes(tiny_data, tmp_path):
    one = tmp_path / "one"
    pretrain(_cfg(tiny_data, one, steps=8, **{"train.batch_size": 8, "checkpoint.every": 4}))
    two = tmp_path / "two"
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def torchrun(steps: int, *extra: str):
        args = [*tiny_data["overrides"], *tiny_train_overrides(two, steps, **{"train.batch_size": 4,
                                                                              "train.parallel": "fsdp",
                                                                              "checkpoint.every": 4})]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "llmcycle", "pretrain", *args, *extra],
                              capture_output=True, text=True, env=env, timeout=300)

    first = torchrun(4)  # stop at step 4, then resume sharded to step 8
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(8, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l2) == list(range(1, 9))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), s
    a = Transformer.from_pretrained(one / "model").state_dict()
    b = Transformer.from_pretrained(two / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
