"""Writing artifacts so that a crash never leaves half a file or loses the last good directory.

One file (a config, a record, a marker, `latest`) is written by `atomic_open` / `atomic_write_bytes` /
`atomic_write_text` / `atomic_write_json`: into `.<name>.tmp-<pid>` beside it, flushed and fsync'd, renamed
over `<name>` (`os.replace`, atomic on POSIX), then the directory is fsync'd. A reader sees the old
bytes or the new ones, never a torn file, and once the call returns the new bytes survive a power cut.
The bytes are those the caller gives; nothing is added.

fsync policy, decided here once: an artifact's files are fsync'd, file and directory (`durable=True`, the
default). They are few and small next to the tensors and shards they describe, and a rename that reaches
the disk before the data it names is the torn file the rename is there to prevent (ext4 and xfs may
commit the rename first). The one exception is a resumable pipeline's intermediate files (the data
stage's work/: per-task documents, signatures, token runs and their markers), written with
`durable=False`: renamed, so a killed process never leaves half a file, but not synced (as before this
module). There are hundreds per run (syncing them nearly doubled a small data run's fsyncs, 270 against
142), and what is published from them is synced by `publish_dir`. The price: after a power cut (not a
kill) one of them may be empty behind its marker, so a run cut by one is best restarted without work/.

A directory (a model, a tokenizer, a shard set) is built in a sibling staging directory (`staging_dir`),
then swapped in by `publish_dir`:

1. every file and directory of the new tree is fsync'd, so what the rename publishes is on disk;
2. the new tree takes the final name. On Linux this is one `renameat2(RENAME_EXCHANGE)`: the old and the
   new tree trade names in a single atomic step, so a reader (a server loading the model, `llmcycle
   lineage`, a resumed run) finds a complete directory at every instant, the old one or the new one.
   Where the call or the file system does not support it, two renames: the old tree is renamed aside
   to `<final>.old-<pid>`, then the new one to `<final>`. A crash between the two leaves no `<final>`
   but a complete `.old-*` beside it, which `recover` renames back (every publish of that folder runs
   it first; so does `latest_checkpoint`);
3. the old tree is removed last.

Staging directories are named `.<final>.tmp-<pid>` (hidden, same file system as the final one, so the
rename cannot turn into a copy); leftovers of crashed writers are removed by `recover`.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

AT_FDCWD = -100  # <fcntl.h>
RENAME_EXCHANGE = 2  # <linux/fs.h>
TMP_MARK = ".tmp-"  # in every temporary name this module makes: `.<name>.tmp-<pid>`


def temp_name(path: Path) -> Path:
    """Where the next version of `path` is written before it takes the name: hidden, same directory."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temporary(name: str) -> bool:
    """True for a writer's temporary file: ours (`.<name>.tmp-<pid>`) or the older `<name>.tmp`, so that a
    crash's leftover is never taken for an artifact's file."""
    base = Path(name).name
    return (base.startswith(".") and TMP_MARK in base) or base.endswith(".tmp")


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", durable: bool = True, **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` for writing whose file takes the name `path` only when the block ends without an
    exception (fsync'd unless not `durable`, renamed, directory fsync'd: see the module's docstring); on an
    exception the temporary file is removed and `path` is untouched. For streams: torch.save, np.savez,
    line by line."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[bytes], durable: bool = True) -> str:
    """Write `data` (bytes, or chunks of them) to `path` atomically; return the sha256 of what was written."""
    h = hashlib.sha256()
    with atomic_open(path, "wb", durable=durable) as f:
        for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8", durable: bool = True) -> str:
    """Write `text` to `path` atomically, as is (no newline translation); return the sha256 of its bytes."""
    return atomic_write_bytes(path, text.encode(encoding), durable)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Any = None, ensure_ascii: bool = True, end: str = "\n", durable: bool = True) -> str:
    """`json.dumps(obj, ...) + end` written atomically; return its sha256. The arguments are json.dumps's, so
    each caller keeps the exact bytes it has always written (most: indent 2 and a final newline)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=ensure_ascii)
    return atomic_write_text(path, text + end, durable=durable)


def staging_dir(final: Path) -> Path:
    """A new, empty directory beside `final` to build its next version in (made after `recover(final)`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, final: Path) -> Path:
    """Make the complete directory `tmp` be `final`, replacing any previous `final` atomically (see the
    module's docstring); `tmp` must be on the same file system, ideally from `staging_dir(final)`."""
    tmp, final = Path(tmp), Path(final)
    recover(final, keep=tmp)
    fsync_tree(tmp)
    if not final.exists():
        os.rename(tmp, final)
        _fsync(final.parent)
        return final
    old = tmp if _exchange(tmp, final) else _swap_by_renames(tmp, final)
    _fsync(final.parent)  # the new tree is in place, durably, before the old one goes
    shutil.rmtree(old)
    return final


def _swap_by_renames(tmp: Path, final: Path) -> Path:
    """The fallback swap: the old `final` aside, then `tmp` in; returns where the old tree went."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)  # a crash before this line leaves no `final`: recover() restores `old`
    return old


def recover(final: Path, keep: Path | None = None) -> None:
    """Undo what a crashed publish of `final` left: restore `<final>.old-*` when `final` itself is
    missing, and remove stale `.old-*` and staging directories (all but `keep`)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    olds = sorted(final.parent.glob(f"{glob.escape(final.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.rename(olds.pop(), final)  # the newest aside: the one a crash took away
        _fsync(final.parent)
    for p in [*olds, *final.parent.glob(f".{glob.escape(final.name)}.tmp-*")]:
        if p != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (directories after their entries)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, making the renames in it durable; best effort (not every platform or file system
    allows opening or syncing a directory)."""
    try:
        _fsync(Path(directory))
    except OSError:
        pass


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of `a` and `b` atomically (Linux renameat2); False where that is not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):  # unsupported here: two renames
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")

