import os

import pytest

from llmcycle.errors import LlmcycleError
from llmcycle.train.core.checkpoint import LATEST, latest_checkpoint, save_checkpoint
from llmcycle.train.core.schedule import lr_at


def _writer(payload: bytes):
    def write(d):
        (d / "weights.bin").write_bytes(payload)
    return write


def test_atomic_save_keep_last_k(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _writer(bytes([step]) * 100), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["step_00000020", "step_00000030"]
    assert latest_checkpoint(tmp_path).name == "step_00000030"
    assert not list(tmp_path.glob(".tmp-*"))


def test_crash_during_write_keeps_previous_latest(tmp_path):
    save_checkpoint(tmp_path, 10, _writer(b"ok" * 10), keep=3)

    def crashing(d):
        (d / "weights.bin").write_bytes(b"half")
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 20, crashing, keep=3)
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    assert not (tmp_path / "step_00000020").exists()


def test_truncated_and_corrupt_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 10, _writer(b"x" * 1000), keep=2)
    f = path / "weights.bin"
    with open(f, "r+b") as fh:
        fh.truncate(500)
    with pytest.raises(LlmcycleError, match="truncated"):
        latest_checkpoint(tmp_path)
    f.write_bytes(b"y" * 1000)
    with pytest.raises(LlmcycleError, match="corrupt"):
        latest_checkpoint(tmp_path)
    os.remove(path / "checkpoint.json")
    with pytest.raises(LlmcycleError, match="incomplete"):
        latest_checkpoint(tmp_path)


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert not (tmp_path / LATEST).exists()


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_at(500, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_a_step_written_again_replaces_the_old_copy_and_survives_a_crash_amid_the_swap(tmp_path):
    """Writing step 10 a second time swaps the new copy in; a crash between the fallback swap's two
    renames (the old copy renamed aside, the new one not yet in) must not lose the checkpoint `latest` names."""
    save_checkpoint(tmp_path, 10, _writer(b"first" * 10), keep=3)
    save_checkpoint(tmp_path, 10, _writer(b"again" * 10), keep=3)
    assert (latest_checkpoint(tmp_path) / "weights.bin").read_bytes() == b"again" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_00000010"]
    os.rename(tmp_path / "step_00000010", tmp_path / "step_00000010.old-4242")  # what that crash leaves
    assert (latest_checkpoint(tmp_path) / "weights.bin").read_bytes() == b"again" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_00000010"]


def test_a_swap_leftover_is_not_counted_as_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 10, _writer(b"a"), keep=2)
    save_checkpoint(tmp_path, 20, _writer(b"b"), keep=2)
    (tmp_path / "step_00000020.old-4242").mkdir()  # a stale aside copy next to a complete step 20
    save_checkpoint(tmp_path, 30, _writer(b"c"), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_00000020", "step_00000030"]
