"""Parallel ingest (worker processes) appends exactly what a serial ingest appends, errors included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import ledger.ingest.parallel as parallel
from ledger import Ledger, ingest
from ledger.ingest.errors import IngestError
from ledger.ingest.pseudonym import Pseudonymizer
from tests.ingest_support import EMAIL, FIXTURES, KEY, pseud
from tests.test_ingest_ledger import _malformed


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # many blocks over the workers, a block boundary inside most exports
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 700)


def _rows(n: int) -> bytes:
    """Labelbox Export v2 rows built from the fixture's rows with fresh ids (consensus rows, reviews, skips)."""
    base = [json.loads(x) for x in (FIXTURES / "labelbox_export_v2.ndjson").read_bytes().splitlines()]
    out = []
    for i in range(n):
        row = json.loads(json.dumps(base[i % len(base)]))
        row["data_row"]["id"] = f"dr{i:06d}"
        labels = [label for p in row["projects"].values() for label in p["labels"]]
        for k, label in enumerate(labels):
            label["id"] = f"lb{i:06d}{k}"
        out.append(json.dumps(row))
    return ("\n".join(out) + "\n").encode()


def _entries(led: Ledger) -> list[tuple[int, str, bytes]]:
    """(seq, kind, body bytes) after entry 0 (whose origin is unique to each ledger)."""
    return [(e.seq, e.kind, e.body_bytes) for e in led.entries(start=1, payloads=False)]


def _both(tmp_path: Path, source: str, export: Path, **kw: object) -> tuple[object, object, Ledger, Ledger]:
    tmp_path.mkdir(exist_ok=True)
    a = Ledger.open(tmp_path / "serial.db", create=True)
    b = Ledger.open(tmp_path / "parallel.db", create=True)
    sa = ingest.ingest(source, export, a, pseudonym_key=pseud(), workers=0, **kw)  # type: ignore[arg-type]
    sb = ingest.ingest(source, export, b, pseudonym_key=pseud(), workers=2, **kw)  # type: ignore[arg-type]
    return sa, sb, a, b


def _same_summary(sa: object, sb: object) -> None:
    da, db = sa.to_json(), sb.to_json()  # type: ignore[attr-defined]
    assert da == db


def test_labelbox_v2_same_entries_as_serial(tmp_path: Path) -> None:
    export = tmp_path / "lb.ndjson"
    export.write_bytes(_rows(60))
    sa, sb, a, b = _both(tmp_path, "labelbox", export, chunk=7)
    _same_summary(sa, sb)
    assert sb.records == 120 and sb.items == 60  # type: ignore[attr-defined]
    assert _entries(a) == _entries(b)
    assert b.verify(deep=True).ok


def test_duplicates_and_reingest(tmp_path: Path) -> None:
    first, second = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    rows = _rows(40).splitlines(keepends=True)
    first.write_bytes(b"".join(rows[:30]))
    second.write_bytes(b"".join(rows[20:]))  # 10 rows overlap
    led = Ledger.open(tmp_path / "l.db", create=True)
    ingest.labelbox(first, led, pseudonym_key=pseud(), workers=2)
    s = ingest.labelbox(second, led, pseudonym_key=pseud(), workers=2)
    overlap = sum(len(p["labels"]) for r in rows[20:30] for p in json.loads(r)["projects"].values())
    total = sum(len(p["labels"]) for r in rows[20:] for p in json.loads(r)["projects"].values())
    assert (s.records, s.duplicates) == (total - overlap, overlap) and overlap > 0
    again = ingest.labelbox(second, led, pseudonym_key=pseud(), workers=2)
    assert again.already_ingested and again.records == 0


def test_mal_links_and_generic_seeds_match_serial(tmp_path: Path) -> None:
    for source, name in (("jsonl", "generic_labels.jsonl"), ("labelbox", "labelbox_mal_import.ndjson")):
        sa, sb, a, b = _both(tmp_path / source, source, FIXTURES / name)
        _same_summary(sa, sb)
        assert _entries(a) == _entries(b)
        if source == "labelbox":  # the v2 export after the MAL import: feature ids link to the suggestions
            la = ingest.labelbox(FIXTURES / "labelbox_export_v2.ndjson", a, pseudonym_key=pseud(), workers=0)
            lb = ingest.labelbox(FIXTURES / "labelbox_export_v2.ndjson", b, pseudonym_key=pseud(), workers=2)
            assert la.seeded == lb.seeded == 1
            assert _entries(a) == _entries(b)


def test_identity_map_and_annotators(tmp_path: Path) -> None:
    export = tmp_path / "lb.ndjson"
    export.write_bytes(_rows(30))
    maps = []
    for w in (0, 2):
        idmap = tmp_path / f"map{w}.jsonl"
        led = Ledger.open(tmp_path / f"l{w}.db", create=True)
        s = ingest.labelbox(export, led, pseudonym_key=Pseudonymizer(KEY, identity_map=idmap), workers=w)
        maps.append((s.annotators, sorted(idmap.read_text().splitlines())))
        assert not EMAIL.search(Path(led.location).read_bytes())
    assert maps[0] == maps[1] and maps[0][0] > 0 and maps[0][1]


@pytest.mark.parametrize("bulk", [False, True])
def test_lines_a_worker_cannot_read_fall_back_to_the_serial_reader(tmp_path: Path, bulk: bool) -> None:
    rows = _rows(20).splitlines(keepends=True)
    pretty = json.dumps(json.loads(rows[12]), indent=2).encode() + b"\n"  # one value over many lines
    overflow = rows[15].replace(b'"height": 40.0', b'"height": 1e400', 1)  # msgspec refuses; json: inf
    assert overflow != rows[15]
    export = tmp_path / "mixed.ndjson"
    export.write_bytes(b"".join(rows[:12]) + pretty + b"".join(rows[13:15]) + overflow + b"".join(rows[16:]))
    sa, sb, a, b = _both(tmp_path, "labelbox", export, bulk=bulk)  # bulk: the retry takes it again
    _same_summary(sa, sb)
    assert _entries(a) == _entries(b)
    assert b.verify().ok


def test_errors_are_the_serial_ones_and_append_nothing(tmp_path: Path) -> None:
    for source, name, data, _, _ in _malformed(tmp_path):
        if source == "labelstudio" or name.endswith(".csv"):
            continue  # JSON arrays and CSV are always read serially
        p = tmp_path / name
        p.write_bytes(data)
        errs = []
        for w in (0, 2):
            led = Ledger.open(tmp_path / f"{name}.{w}.db", create=True)
            with pytest.raises(IngestError) as ei:
                ingest.ingest(source, p, led, pseudonym_key=pseud(), workers=w)
            errs.append(str(ei.value))
            assert led.size == 1, name
        assert errs[0] == errs[1], name
    # an error in a later block, found by a worker while normalising
    rows = _rows(40).splitlines(keepends=True)
    bad = json.loads(rows[33])
    bad["data_row"]["id"] = 5.5
    p = tmp_path / "late.ndjson"
    p.write_bytes(b"".join(rows[:33]) + json.dumps(bad).encode() + b"\n" + b"".join(rows[34:]))
    led = Ledger.open(tmp_path / "late.db", create=True)
    with pytest.raises(IngestError, match="expected string or integer id, got number") as ei:
        ingest.labelbox(p, led, pseudonym_key=pseud(), workers=2)
    assert ei.value.line == 34 and ei.value.field == "data_row.id" and led.size == 1


@pytest.mark.postgres
def test_postgresql_serial_and_parallel(tmp_path: Path, pg_url: str) -> None:
    export = tmp_path / "lb.ndjson"
    export.write_bytes(_rows(20))
    with Ledger.open(pg_url, create=True) as led:
        s = ingest.labelbox(export, led, pseudonym_key=pseud(), workers=2, bulk=True)  # bulk: SQLite only
        again = ingest.labelbox(FIXTURES / "labelbox_export_v2.ndjson", led, pseudonym_key=pseud(), workers=0)
        assert s.records > 0 and again.records == 6
        bodies = [e.body_bytes for e in led.entries(kind="annotation", payloads=False)]
        assert len(bodies) == s.records + 6 and led.verify(deep=True).ok


def test_no_worker_processes_means_a_serial_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise OSError("no processes here")

    monkeypatch.setattr(parallel.subprocess, "Popen", refuse)
    export = tmp_path / "lb.ndjson"
    export.write_bytes(_rows(10))
    led = Ledger.open(tmp_path / "l.db", create=True)
    s = ingest.labelbox(export, led, pseudonym_key=pseud(), workers=2)
    serial = Ledger.open(tmp_path / "s.db", create=True)
    ingest.labelbox(export, serial, pseudonym_key=pseud(), workers=0)
    assert s.records > 0 and _entries(led) == _entries(serial)


@pytest.mark.parametrize("workers", [0, 1])
def test_ingest_freezes_the_heap_only_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """The ingest keeps pre-existing objects out of GC passes while it runs (serial or parallel) and hands
    them back after; a caller's own gc.freeze() is left as it was."""
    import gc

    import ledger.ingest.index as index

    export = tmp_path / "lb.ndjson"
    export.write_bytes(_rows(5))
    seen: list[int] = []
    real = index.lookup

    def spy(*a: Any, **kw: Any) -> Any:
        seen.append(gc.get_freeze_count())
        return real(*a, **kw)

    monkeypatch.setattr(index, "lookup", spy)
    with Ledger.open(tmp_path / "a.db", create=True) as led:
        ingest.labelbox(export, led, pseudonym_key=pseud(), workers=workers)
    assert seen and min(seen) > 0  # frozen during the ingest
    assert gc.get_freeze_count() == 0  # and unfrozen after
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        with Ledger.open(tmp_path / "b.db", create=True) as led:
            ingest.labelbox(export, led, pseudonym_key=pseud(), workers=workers)
        assert (
            0 < gc.get_freeze_count() <= mine
        )  # the caller's freeze is untouched (frozen objects can be freed)
    finally:
        gc.unfreeze()


def test_workers_start_only_for_an_export_they_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON array export (Labelbox v1) is read serially: no worker processes are started for it."""
    started: list[int] = []
    real = parallel.start_pool

    def spy(workers: int) -> Any:
        started.append(workers)
        return real(workers)

    monkeypatch.setattr(parallel, "start_pool", spy)
    with Ledger.open(tmp_path / "a.db", create=True) as led:
        ingest.labelbox(FIXTURES / "labelbox_v1_export.json", led, pseudonym_key=pseud(), workers=2)
        assert started == []
        export = tmp_path / "lb.ndjson"
        export.write_bytes(_rows(5))
        ingest.labelbox(export, led, pseudonym_key=pseud(), workers=2)
        assert started == [2]
