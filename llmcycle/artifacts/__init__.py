"""The artifact layer: how every stage writes what it makes, and how a chain of artifacts is verified.

    io.py        atomic writes of one file (returning its sha256) and atomic publishing of a directory
    hashing.py   sha256 of a file
    manifest.py  manifest.json: what made an artifact, from which inputs, the hashes of its files
    lineage.py   `llmcycle lineage`: the chain of manifests from a model back to its raw sources, re-hashed

io and hashing import nothing of llmcycle; manifest builds on both; lineage reads manifests. The names
most stages need are importable from here (`from llmcycle.artifacts import publish_dir, atomic_write_json`).
"""

from llmcycle.artifacts.hashing import sha256_file
from llmcycle.artifacts.io import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    is_temporary,
    publish_dir,
    recover,
    staging_dir,
)

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_tree",
           "is_temporary", "publish_dir", "recover", "sha256_file", "staging_dir"]
