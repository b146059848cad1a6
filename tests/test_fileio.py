"""ledger.fileio: the file hash and the atomic write every report, export and archive manifest goes through."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ledger import fileio


def test_file_sha256_matches_hashlib_across_read_blocks(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    data = os.urandom(fileio.READ_BLOCK * 2 + 123)
    p.write_bytes(data)
    assert fileio.file_sha256(p) == (hashlib.sha256(data).hexdigest(), len(data))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert fileio.file_sha256(empty) == (hashlib.sha256(b"").hexdigest(), 0)


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "out.json"
    fileio.write_atomic(p, "first é\n")
    assert p.read_bytes() == "first é\n".encode()
    fileio.write_atomic(p, b"second\n")
    assert p.read_bytes() == b"second\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "out.json"
    p.write_bytes(b"old\n")

    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        fileio.write_atomic(p, b"new\n")
    assert p.read_bytes() == b"old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]  # the temporary was removed
