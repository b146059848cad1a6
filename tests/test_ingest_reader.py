"""The streaming export reader: shapes, exact error locations, bounded elements, running sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import ledger.ingest.reader as reader_mod
from ledger.ingest.errors import IngestError
from ledger.ingest.reader import ExportReader
from tests.ingest_support import FIXTURES, samples


def _read(path: Path, **kw: int) -> tuple[ExportReader, list[tuple[int, int, object]]]:
    r = ExportReader(path, **kw)
    return r, list(r)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_ndjson_lines_and_hash(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.ndjson", b'{"a":1}\n{"b":2}\n\n{"c":3}\n')
    r, out = _read(p)
    assert [(line, i) for line, i, _ in out] == [(1, 0), (2, 1), (4, 2)]
    assert [o for _, _, o in out] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert r.mode == "sequence"
    assert r.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() and r.size == p.stat().st_size


def test_array_with_small_chunks_keeps_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_mod, "CHUNK", 7)  # force elements and numbers to straddle reads
    data = (
        b'\xef\xbb\xbf[{"a":12345678, "b": "' + b"x" * 40 + b'"},\n 123456789,\n {"c":[true,false,null]}]\n'
    )
    r, out = _read(_write(tmp_path, "a.json", data))
    assert r.mode == "array"
    assert out == [
        (1, 0, {"a": 12345678, "b": "x" * 40}),
        (2, 1, 123456789),
        (3, 2, {"c": [True, False, None]}),
    ]
    assert r.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "data, line, needle",
    [
        (b'{"a":1}\n{"b":2\n{"c":3}\n', 3, "invalid JSON"),
        (b'[{"a":1},\n {"b":2},\n {"c":3},]\n', 3, "invalid JSON"),
        (b'[{"a":1},\n {"b":"\xff"}]\n', 2, "not valid UTF-8"),
        (b'[{"a":1} {"b":2}]', 1, "expected ',' or ']'"),
        (b'{"a":1}\n{"a":NaN}\n', 2, "NaN is not a JSON value"),
        (b'[{"a":1}] x', 1, "extra data after the array"),
        (b'[{"a":1},\n', 2, "unterminated array"),
        (b'{"a":1}\n{"b":tru}\n', 2, "invalid JSON"),
    ],
)
def test_errors_name_the_line(tmp_path: Path, data: bytes, line: int, needle: str) -> None:
    p = _write(tmp_path, "bad.json", data)
    with pytest.raises(IngestError) as ei:
        _read(p)
    assert ei.value.line == line
    assert needle in str(ei.value)
    assert str(ei.value).startswith(f"{p}:{line}")


def test_oversized_element_is_refused_with_bounded_reads(tmp_path: Path) -> None:
    p = _write(tmp_path, "big.ndjson", b'{"a":1}\n{"b":"' + b"x" * 5000 + b'"}\n')
    with pytest.raises(IngestError, match="larger than the 1024-byte limit") as ei:
        _read(p, max_item_bytes=1024)
    assert ei.value.line == 2


def test_empty_inputs(tmp_path: Path) -> None:
    assert _read(_write(tmp_path, "e.json", b""))[1] == []
    assert _read(_write(tmp_path, "e2.json", b" [ ] \n"))[1] == []


def test_reads_every_sample_and_fixture() -> None:
    files = sorted(samples().glob("*.json")) + sorted(FIXTURES.glob("*.json*"))
    for f in files:
        r, out = _read(f)
        assert out, f
        assert r.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
