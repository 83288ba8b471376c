"""Publishing a directory so that a crash never loses the last good one.

Every artifact directory (a model, a tokenizer, a shard set) is built in a sibling staging directory
(`staging_dir`), then swapped in by `publish_dir`:

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
import os
import shutil
from pathlib import Path

AT_FDCWD = -100  # <fcntl.h>
RENAME_EXCHANGE = 2  # <linux/fs.h>


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

