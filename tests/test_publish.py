"""Publishing an artifact directory: the new tree replaces the old in one step, readers never find the
folder missing, and a crash between the fallback's two renames loses nothing."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from llmcycle.artifacts.io import _swap_by_renames, publish_dir, recover, staging_dir


def _tree(d: Path, version: str, files: int = 3) -> None:
    for i in range(files):
        (d / f"part{i}.txt").write_text(version)


def _versions(d: Path) -> set[str]:
    return {p.read_text() for p in d.iterdir()}


def test_publish_replaces_the_old_tree_and_leaves_nothing_beside_it(tmp_path):
    final = tmp_path / "model"
    for version in ("v1", "v2"):
        tmp = staging_dir(final)
        _tree(tmp, version)
        assert publish_dir(tmp, final) == final
        assert _versions(final) == {version}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_readers_never_find_the_folder_missing(tmp_path):
    """A reader looping while another thread publishes 40 versions always finds the folder and its files.
    (A reader that opened the old tree just before the swap may see it emptied by the removal: a folder
    swap cannot help that; it only guarantees that the name always leads to a whole version.)"""
    final = tmp_path / "model"
    tmp = staging_dir(final)
    _tree(tmp, "v0")
    publish_dir(tmp, final)
    done = threading.Event()
    seen, missing = [], []

    def reader():
        while not done.is_set():
            try:
                seen.append((final / "part2.txt").read_text())
            except FileNotFoundError as e:  # what deleting before renaming exposed
                missing.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(1, 41):
            tmp = staging_dir(final)
            _tree(tmp, f"v{v}")
            publish_dir(tmp, final)
    finally:
        done.set()
        t.join()
    assert seen and not missing and _versions(final) == {"v40"}


def test_a_crash_between_the_two_renames_restores_the_old_tree(tmp_path):
    """The fallback's window: the old tree renamed aside, the new one not yet in. `recover` (which every
    publish runs first) puts the old one back; the next publish then completes normally."""
    final = tmp_path / "model"
    tmp = staging_dir(final)
    _tree(tmp, "v1")
    publish_dir(tmp, final)
    os.rename(final, final.with_name("model.old-12345"))  # exactly what a crash at that moment leaves
    (tmp_path / ".model.tmp-12345").mkdir()  # and its half-written staging folder
    recover(final)
    assert _versions(final) == {"v1"} and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    tmp = staging_dir(final)
    _tree(tmp, "v2")
    old = _swap_by_renames(tmp, final)  # the fallback, run to its end
    assert _versions(final) == {"v2"} and _versions(old) == {"v1"}


CHILD = """
import sys, time
from pathlib import Path
from llmcycle.artifacts import publish_dir, staging_dir
final = Path(sys.argv[1])
v = 0
while True:
    v += 1
    tmp = staging_dir(final)
    for i in range(3):
        (tmp / f"part{i}.txt").write_text(f"v{v}" * 20000)
    publish_dir(tmp, final)
    print(v, flush=True)
"""


def test_sigkill_while_publishing_leaves_one_whole_version(tmp_path):
    """A real process publishing in a loop is SIGKILLed at some moment: the folder holds one complete
    version, and the next publish cleans up whatever the dead writer left beside it."""
    final = tmp_path / "model"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(final)], stdout=subprocess.PIPE, text=True, env=env)
    for _ in range(3):  # a few publishes done: the kill lands among the later ones
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recover(final)
    versions = _versions(final)
    assert len(versions) == 1 and [len(p.read_text()) for p in final.iterdir()] == [len(next(iter(versions)))] * 3
    tmp = staging_dir(final)
    _tree(tmp, "next")
    publish_dir(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
