"""Executors run the same task function over many tasks: local processes, or Ray.

A task function takes one picklable argument, does its work, writes its own completion marker and
returns a small picklable summary. Executors only decide where it runs; results come back in the
order of the tasks given, whatever order they finished in, so everything downstream is deterministic.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import resource
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from llmcycle.errors import LlmcycleError
from llmcycle.threads import usable_cpus


def _with_peak(fn: Callable[[Any], Any], item: Any) -> tuple[Any, int]:
    """Run a task in a worker and say how much memory that worker has held at most (KiB), so the driver
    can report workers' peak memory (they are not its children: forkserver and Ray start them)."""
    return fn(item), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _driver_alive(pid: int) -> bool:
    """Whether process `pid` still runs; a zombie (killed, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel (a zombie then still counts as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _exit_with(driver: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # a pidfd turns readable when its process exits
    else:
        while _driver_alive(driver):
            time.sleep(0.5)
    os._exit(1)


def die_with_driver(driver: int) -> None:
    """Pool initializer: end this worker as soon as the driver process `driver` ends, even by SIGKILL.

    Nothing else would: a forkserver worker holds both ends of the pool's call-queue pipe, the write end
    of the forkserver's "driver alive" pipe and the resource tracker's pipe (that is how forkserver hands
    them over), so after a SIGKILL of the driver it waits for work forever, and it keeps the forkserver
    and the tracker from ever seeing EOF. Once the workers are gone those two exit by themselves.
    (PR_SET_PDEATHSIG does not help: a worker's parent is the forkserver, which the workers keep alive.)
    A daemon thread waits on a pidfd of the driver (Linux 5.3+), else polls it twice a second.
    """
    try:
        pidfd = os.pidfd_open(driver)
    except (AttributeError, OSError):  # not Linux, an old kernel, or the driver already gone
        pidfd = None
    threading.Thread(target=_exit_with, args=(driver, pidfd), daemon=True, name="exit-with-driver").start()


class LocalExecutor:
    """A pool of worker processes (one per core by default); one task or one worker runs inline."""

    name = "local"

    def __init__(self, workers: int = 0):
        self.workers = workers if workers > 0 else usable_cpus()
        self.worker_peak_kb = 0  # the largest worker of any map so far (0: everything ran inline)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        if self.workers == 1 or len(items) == 1:
            return [fn(x) for x in items]
        # forkserver: workers start from a clean interpreter, not a fork of a driver that may hold
        # threads (tokenizers, torch) which do not survive fork.
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(items)), mp_context=ctx,
                                 initializer=die_with_driver, initargs=(os.getpid(),)) as pool:
            pairs = list(pool.map(functools.partial(_with_peak, fn), items))
        self.worker_peak_kb = max([self.worker_peak_kb, *(peak for _, peak in pairs)])
        return [result for result, _ in pairs]

    def close(self) -> None:
        pass


class RayExecutor:
    """One Ray task per item (1 CPU each), on a cluster at `address` or a local instance started here."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 0):
        try:
            import ray
        except ImportError:
            raise LlmcycleError("executor 'ray' needs Ray: pip install 'llmcycle[ray]'.") from None
        self._ray = ray
        self._started = False
        self.worker_peak_kb = 0
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": True,
                                      "configure_logging": False}
            if address is None:
                kwargs["num_cpus"] = workers if workers > 0 else usable_cpus()
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                raise LlmcycleError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
            self._started = True

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        remote = self._ray.remote(num_cpus=1, max_retries=2)(_with_peak)
        pairs = self._ray.get([remote.remote(fn, x) for x in items])
        self.worker_peak_kb = max([self.worker_peak_kb, *(peak for _, peak in pairs)])
        return [result for result, _ in pairs]

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(kind: str, workers: int = 0, ray_address: str | None = None) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(ray_address, workers)
    raise LlmcycleError(f"unknown executor {kind!r}; choose local or ray.")
