"""Threads on a shared machine: the OpenMP environment, the CPU count (affinity, cgroup quota), and the
governor that follows the CPUs other processes leave free."""

import os
import subprocess
import sys
import time

import pytest
import torch

from llmcycle import threads
from llmcycle.threads import ThreadGovernor, _cgroup_cpu_limit, openmp_env, set_threads, usable_cpus


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    threads._governor = None
    torch.set_num_threads(before)


def test_openmp_env_sets_a_short_spin_unless_the_user_chose():
    env = {}
    openmp_env(env)
    assert env == {"GOMP_SPINCOUNT": threads.SPINCOUNT}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(user)
        openmp_env(env)
        assert env == user


def test_the_llmcycle_process_has_it_before_torch_loads():
    out = subprocess.run([sys.executable, "-c", "import os, llmcycle, torch; print(os.environ['GOMP_SPINCOUNT'])"],
                         capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items()
                                                                          if k != "GOMP_SPINCOUNT"})
    assert out.stdout.strip() == threads.SPINCOUNT


def test_cgroup_quota(tmp_path):
    assert _cgroup_cpu_limit(tmp_path) is None  # no files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _cgroup_cpu_limit(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert _cgroup_cpu_limit(tmp_path) is None


def test_usable_cpus_never_exceeds_the_affinity_mask(monkeypatch):
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 0.5)
    assert usable_cpus() == 1  # a fractional quota still gets one thread


def test_explicit_counts_stay_fixed(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_threads(1) == 1 and threads._governor is None and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads() == 1 and threads._governor is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert set_threads() == usable_cpus() and threads._governor is not None


def _fake_proc(root, busy: list[int], own: int) -> None:
    """/proc/stat with one line per CPU (`busy` user ticks each, idle 0) and /proc/self/stat with `own` ticks."""
    (root / "self").mkdir(exist_ok=True)
    lines = ["cpu  0 0 0 0 0 0 0 0"] + [f"cpu{i} {b} 0 0 1000 0 0 0 0" for i, b in enumerate(busy)]
    (root / "stat").write_text("\n".join(lines) + "\n")
    fields = ["S"] + ["0"] * 10 + [str(own), "0"] + ["0"] * 30
    (root / "self" / "stat").write_text("123 (python (x)) " + " ".join(fields))


def test_governor_follows_other_processes_with_two_agreeing_readings(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    clock = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    _fake_proc(tmp_path, [0, 0], own=0)
    gov = ThreadGovernor(limit=2, interval_s=1.0, proc=tmp_path)
    tick = gov._tick
    busy, own = [0, 0], 0

    def after(seconds: float, others: float, mine: float) -> int:
        nonlocal own
        clock[0] += seconds
        busy[0] += int(others * seconds * tick)
        busy[1] += int(mine * seconds * tick)
        own += int(mine * seconds * tick)
        _fake_proc(tmp_path, busy, own)
        return gov.check()

    assert after(0.5, 1.0, 1.0) == 2  # before interval_s: not even read
    assert after(1.0, 1.0, 1.0) == 2  # one reading says 1: not yet
    assert after(1.0, 1.0, 1.0) == 1 and torch.get_num_threads() == 1  # the second agrees
    assert after(1.0, 0.0, 1.0) == 1  # the neighbour stopped: one reading is not enough
    assert after(1.0, 1.0, 1.0) == 1  # ...and it came back: the pending change is dropped
    assert after(1.0, 0.1, 1.0) == 1
    assert after(1.0, 0.1, 1.0) == 2 and torch.get_num_threads() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
def test_governor_gives_a_core_to_a_real_busy_neighbour():
    cpus = len(os.sched_getaffinity(0))
    gov = ThreadGovernor(limit=cpus, interval_s=0.3)
    rivals = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus - 1)]
    try:
        deadline = time.monotonic() + 10
        while gov.threads == cpus and time.monotonic() < deadline:
            time.sleep(0.05)
            gov.check()
    finally:
        for r in rivals:
            r.kill()
            r.wait()
    assert gov.threads < cpus


def test_a_bare_cuda_device_is_this_ranks_gpu():
    """torchrun starts one process per GPU: `train.device: cuda` must not put them all on cuda:0."""
    from llmcycle.train.core.distributed import pick_device

    assert pick_device("cuda", 3) == torch.device("cuda:3")
    assert pick_device("cuda:1", 3) == torch.device("cuda:1")  # an explicit index is kept
    assert pick_device("cpu", 3) == torch.device("cpu")


def test_a_thread_count_below_one_is_refused_before_any_work(capsys):
    from llmcycle.cli import main
    from llmcycle.errors import ConfigError
    from llmcycle.train.config import OptimSection

    with pytest.raises(ConfigError, match="train.threads must be positive"):
        OptimSection(threads=0)
    assert main(["pretrain", "train.threads=-1"]) == 2
    assert "train.threads must be positive" in capsys.readouterr().err
