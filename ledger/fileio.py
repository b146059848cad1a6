"""Small file operations the ledger, ingest and CLI share: hashing a file, writing one atomically.

Why one module: an auditor's files (signed exports, archive manifests, reports) must never be found
half-written, and every writer should get the same guarantees (temporary file in the same directory,
fsync, rename, directory fsync, no stray temporary on failure).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

READ_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while block := fh.read(READ_BLOCK):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8) all at once: readers see the old file or the new one."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
