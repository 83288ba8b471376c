"""This process's memory as the operating system counts it: resident set now, its high-water mark, and
handing freed heap back before a measurement starts. Torch-free (the stage graph reads it at `--help` speed).

Linux reads /proc/self/status (VmRSS, VmHWM; `reset_peak` rewinds VmHWM to the current resident set).
Elsewhere the peak is the process's `ru_maxrss`, and the current resident set is unknown (None).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

_MB = 1024  # /proc/self/status and ru_maxrss (Linux) count KiB


def _status_mb(field: str) -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    value = next((ln.split()[1] for ln in status.splitlines() if ln.startswith(f"{field}:")), None)
    return int(value) / _MB if value is not None else None


def rss_mb() -> float | None:
    """The resident set now, in MB (None where the OS does not say)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The resident set's high-water mark in MB: since the last `reset_peak` on Linux, else since the process
    started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / _MB


def release_free_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS (glibc's malloc_trim), so that the resident
    set is what is live: a peak measured from here is not inflated by what an earlier step freed but kept."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim, or no way to
        pass


def reset_peak() -> bool:
    """Rewind the high-water mark to the current resident set (Linux: `echo 5 > /proc/self/clear_refs`).
    False where the OS cannot: `peak_rss_mb` is then the process's peak so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
