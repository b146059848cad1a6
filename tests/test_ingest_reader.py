"""The streaming export reader: shapes, exact error locations, bounded elements, running sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def _strict(x: object) -> object:
    """A comparable form that tells 1 from 1.0 from True (== does not)."""
    if isinstance(x, dict):
        return ("d", [(k, _strict(v)) for k, v in x.items()])
    if isinstance(x, list):
        return ("l", [_strict(v) for v in x])
    if isinstance(x, float) and x != x:
        return ("nan",)
    return (type(x).__name__, x)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: msgspec keeps them ints, as json does
    | st.floats(allow_nan=False, allow_infinity=False)  # json.dumps would write NaN / Infinity literals
    | st.text(max_size=8)  # lone surrogates too: msgspec refuses them, the json path reads them
)
_values = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.dictionaries(st.text(max_size=5), _values, max_size=4), max_size=6),  # NDJSON rows: objects
    st.sampled_from(["\n", "\r\n", "\n\n"]),
    st.booleans(),
)
def test_fast_path_reads_what_json_reads(tmp_path: Path, values: list[object], nl: str, ascii_: bool) -> None:
    text = "".join(json.dumps(v, ensure_ascii=ascii_) + nl for v in values)
    p = tmp_path / "v.ndjson"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        want = [json.loads(x) for x in text.split("\n") if x.strip()]
    except ValueError:
        return  # raw lone surrogates (ensure_ascii=False) are not UTF-8: the reader refuses the file
    _, out = _read(p)
    assert [_strict(o) for _, _, o in out] == [_strict(w) for w in want]
    assert [i for _, i, _ in out] == list(range(len(want)))


def test_fast_path_edges_keep_json_semantics(tmp_path: Path) -> None:
    big = 2**70
    data = (
        f'{{"a": {big}, "b": -{big}}}\n'  # beyond 64 bits: ints, not floats
        '{"s": "\\ud800x"}\n'  # a lone surrogate escape: json reads it, msgspec refuses
        '{"f": 1e400}\n'  # overflows a double: json reads inf
        '{"multi":\n  [1,\n 2]}\n'  # one value over several lines
        '{"x": 1} {"y": 2}\n'  # two values on one line
        '{"z": 3}'  # no final newline
    )
    p = _write(tmp_path, "e.ndjson", data.encode())
    _, out = _read(p)
    assert [(line, o) for line, _, o in out] == [
        (1, {"a": big, "b": -big}),
        (2, {"s": "\ud800x"}),
        (3, {"f": float("inf")}),
        (4, {"multi": [1, 2]}),
        (7, {"x": 1}),
        (7, {"y": 2}),
        (8, {"z": 3}),
    ]
    assert type(out[0][2]["a"]) is int


def test_deep_nesting_is_one_clear_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "deep.ndjson", b'{"a":1}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(IngestError, match="nesting too deep") as ei:
        _read(p)
    assert ei.value.line == 2
