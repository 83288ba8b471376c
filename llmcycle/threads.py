"""CPU threads that behave on a shared machine.

Two things made a `llmcycle run` collapse from ~11k to ~480 training tokens/s when another CPU-heavy process
shared its two cores (25x, where a fair share is 2x):

- OpenMP's waiting. PyTorch's CPU kernels run in OpenMP parallel regions, and GNU OpenMP's threads spin
  (burn their core) for ~300k iterations at each barrier before sleeping. A decode or training step is
  thousands of regions, each ending at a barrier that waits for the slowest thread; when one of our threads
  has lost its core to another process, the others spin through the time slice the late one needs. Two
  such processes spin against each other. `openmp_env()` makes threads spin briefly and then sleep
  (`GOMP_SPINCOUNT`), which costs little on an idle machine (measured in docs/benchmarks.md) and gives
  the core away on a busy one. It must be in the environment before the OpenMP runtime loads, which is
  when torch is first imported: `llmcycle/__init__.py` applies it, so every `llmcycle` command (and every
  process it starts) has it. A program that imports torch before llmcycle keeps its own setting.
- The thread count. torch starts one thread per CPU in the affinity mask, but a container's CPU quota
  (cgroup `cpu.max`) can be smaller: 8 threads on a 2-CPU quota are descheduled at every barrier.
  `usable_cpus()` takes both into account and `set_threads()` is what every command calls. And while it
  runs, a CPU that another process keeps busy is not ours either: `adapt_threads()`, called once per
  training and engine step, follows the CPUs left free (`ThreadGovernor`).

An explicit `OMP_WAIT_POLICY`, `GOMP_SPINCOUNT` or `OMP_NUM_THREADS` from the user always wins, and a thread
count given as an option (`train.threads`, `serve --threads`) is kept fixed: the count changes numerics in
the last bits (reductions split differently), which a run that must reproduce bit for bit may not want.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Spins before a waiting OpenMP thread sleeps. GNU OpenMP's default is 300k (~0.1-1 ms at 2-3 GHz: far
# longer than most of our parallel regions, so a descheduled peer costs whole spin periods); 0 (passive)
# sleeps at once and adds a futex wake-up to every region. 10k spins (a few microseconds) keeps an idle
# machine's decode and training speed and yields the core to a busy neighbour (docs/benchmarks.md).
SPINCOUNT = "10000"


def openmp_env(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Make OpenMP threads spin briefly then sleep, unless the user chose a wait policy or spin count."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPINCOUNT


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 `cpu.max`, else v1 CFS quota); None: none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS when set, else `usable_cpus()`, and from then
    on (only in that last case) `adapt_threads()` follows the CPUs other processes leave free. Returns the
    number set."""
    import torch

    global _governor
    _governor = None
    if not threads:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            threads = usable_cpus()
            _governor = ThreadGovernor(threads)
    torch.set_num_threads(threads)
    return threads


def adaptive() -> bool:
    """True when the last `set_threads` left the count to follow the machine (no count given)."""
    return _governor is not None


def adapt_threads() -> None:
    """Called once per training or engine step, from the thread that runs it: cheap (a clock read) except every
    `ThreadGovernor.interval_s`. A no-op when the user fixed the thread count."""
    if _governor is not None:
        _governor.check()


class ThreadGovernor:
    """Keeps torch's threads at the CPUs that other processes leave free, between 1 and `limit`.

    Every `interval_s` it reads how busy this process's CPUs were (/proc/stat, steal included) and how much
    of that was this process (/proc/self/stat); the rest is other processes. A thread whose core another
    process holds stalls every parallel region of ours, so beside one CPU-bound process on two cores one
    thread trains at ~56% of the idle two-thread rate where two threads fell to ~35-42%
    (benchmarks/busy_machine.py). A change needs two readings in a row that agree, so a burst of
    activity does not flip the count back and forth. Linux only; elsewhere it never changes anything.
    """

    def __init__(self, limit: int, interval_s: float = 2.0, proc: Path = Path("/proc")) -> None:
        self.limit, self.interval_s, self.proc = limit, interval_s, proc
        try:
            self.cpus = sorted(os.sched_getaffinity(0))
            self._tick = os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self.cpus = []
        self.threads = limit
        self._pending: int | None = None
        self._last = self._sample()

    def _sample(self) -> tuple[float, int, int] | None:
        """(monotonic time, busy ticks of our CPUs, ticks of this process), or None off Linux."""
        if not self.cpus:
            return None
        try:
            busy = 0
            wanted = {f"cpu{c}" for c in self.cpus}
            for line in (self.proc / "stat").read_text().splitlines():
                name, *v = line.split()
                if name in wanted:  # user nice system idle iowait irq softirq steal
                    busy += sum(int(x) for x in v[:3]) + sum(int(x) for x in v[5:8])
            own = (self.proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
            return time.monotonic(), busy, int(own[11]) + int(own[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return None

    def check(self) -> int:
        """Re-read the machine when `interval_s` has passed; set the thread count when it should change."""
        if self._last is None or time.monotonic() - self._last[0] < self.interval_s:
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        elapsed = (now[0] - self._last[0]) * self._tick
        others = max(0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / elapsed
        self._last = now
        want = max(1, min(self.limit, round(len(self.cpus) - others)))
        if want == self.threads:
            self._pending = None
        elif self._pending != want:
            self._pending = want
        else:
            import torch

            log.debug(f"threads {self.threads} -> {want}: other processes use {others:.1f} of {len(self.cpus)} CPUs")
            torch.set_num_threads(want)
            self.threads, self._pending = want, None
        return self.threads


_governor: ThreadGovernor | None = None
