"""Bulk appends (``Ledger.appending(bulk=True)``, large ingests): SQLite's rollback journal instead of WAL.

The mode only changes how SQLite writes pages: the entries, their atomicity and the ledger's WAL mode
afterwards must be exactly as without it, and it must step aside when another connection has the file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import ledger.store as store
from ledger import Ledger, ingest
from ledger.ingest.errors import IngestError
from tests.ingest_support import FIXTURES, pseud
from tests.test_ingest_ledger import _malformed


@pytest.fixture(autouse=True)
def _short_busy_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    # A second connection waiting on the bulk transaction's exclusive lock would otherwise hang for 120 s:
    # make any such wait (inside this process) fail fast, so a read through another connection shows up.
    monkeypatch.setattr(store, "SQLITE_BUSY_MS", 3000)


def _mode(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        return str(con.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        con.close()


def _inner_mode(conn: Any) -> str:
    return str(store._driver(conn).execute("PRAGMA journal_mode").fetchone()[0])


def _entries(led: Ledger) -> list[tuple[int, str, bytes]]:
    return [(e.seq, e.kind, e.body_bytes) for e in led.entries(start=1, payloads=False)]


def test_bulk_transaction_runs_in_rollback_mode_and_restores_wal(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, create=True) as led:
        led.append("note", {"i": -1})  # leaves an idle pooled connection: bulk must close it, not give up
        with led.appending(bulk=True) as app:
            assert _inner_mode(app.connection) == "truncate"
            # no memory map while it lasts: mapped pages would make resident memory grow with the ingest
            assert store._driver(app.connection).execute("PRAGMA mmap_size").fetchone()[0] == 0
            app.append_many([("note", {"i": i}) for i in range(500)])
            assert not (tmp_path / "l.db-wal").exists() or (tmp_path / "l.db-wal").stat().st_size == 0
        assert led.size == 502
        assert led.verify().ok
        with led.appending() as app:
            assert _inner_mode(app.connection) == "wal"
            raw = store._driver(app.connection)
            assert raw.execute("PRAGMA mmap_size").fetchone()[0] == store.SQLITE_MMAP_BYTES
    assert _mode(path) == "wal"


def test_bulk_steps_aside_when_another_connection_has_the_file(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, create=True) as led, Ledger.open(path) as other:
        assert other.size == 1  # other's pool now holds an open connection
        with led.appending(bulk=True) as app:
            assert _inner_mode(app.connection) == "wal"  # readers keep reading: WAL as usual
            app.append_many([("note", {"i": i}) for i in range(10)])
            assert other.size == 1  # a concurrent reader is not blocked and sees the last commit
        assert other.size == 11
    assert _mode(path) == "wal"


def test_bulk_rollback_appends_nothing_and_restores_wal(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, create=True) as led:
        led.append("note", {"i": 0})
        size, root = led.size, led.root()
        with pytest.raises(RuntimeError, match="boom"), led.appending(bulk=True) as app:
            app.append_many([("note", {"i": i}) for i in range(2000)])
            raise RuntimeError("boom")
        assert (led.size, led.root()) == (size, root)
        assert led.verify().ok
    assert _mode(path) == "wal"


def _bulk_writer(path: str, ready: Any) -> None:
    led = Ledger.open(path)
    with led.appending(bulk=True) as app:
        i = 0
        while True:
            app.append_many([("note", {"i": i, "pad": "x" * 1500}) for _ in range(200)])
            i += 1
            if i == 20:
                ready.set()  # well past SQLite's page cache: pages are in the database file and journal


def test_bulk_writer_killed_mid_transaction_leaves_the_ledger_as_before(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, create=True) as led:
        led.append_many([("note", {"i": i}) for i in range(50)])
        size, root = led.size, led.root()
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_bulk_writer, args=(str(path), ready), daemon=True)
    proc.start()
    assert ready.wait(60), "bulk writer did not get going"
    time.sleep(0.05)
    assert (tmp_path / "l.db-journal").exists()  # it really is writing in rollback-journal mode
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with Ledger.open(path) as led:  # opening rolls the hot journal back and puts WAL back
        assert (led.size, led.root()) == (size, root)
        res = led.verify()
        assert res.ok, res.reason
        assert led.append("note", {"after": True}) == size
    assert _mode(path) == "wal"


def test_bulk_ingest_appends_the_same_entries(tmp_path: Path) -> None:
    exports = [
        ("labelbox", "labelbox_export_v2.ndjson"),
        ("labelbox", "labelbox_v1_export.json"),
        ("labelbox", "labelbox_mal_import.ndjson"),
        ("labelstudio", "labelstudio_export.json"),
        ("jsonl", "generic_labels.jsonl"),
        ("jsonl", "generic_labels.csv"),
    ]
    with Ledger.open(tmp_path / "a.db", create=True) as a, Ledger.open(tmp_path / "b.db", create=True) as b:
        for source, name in exports:
            sa = ingest.ingest(source, FIXTURES / name, a, pseudonym_key=pseud(), bulk=False)
            sb = ingest.ingest(source, FIXTURES / name, b, pseudonym_key=pseud(), bulk=True)
            assert sa.to_json() == sb.to_json()
        assert _entries(a) == _entries(b)
        assert b.verify().ok
        # re-ingesting under bulk is still detected and adds nothing
        again = ingest.ingest(
            "labelbox", FIXTURES / "labelbox_export_v2.ndjson", b, pseudonym_key=pseud(), bulk=True
        )
        assert again.already_ingested and again.records == 0
    assert _mode(tmp_path / "b.db") == "wal"


def test_bulk_ingest_of_a_malformed_export_appends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, create=True) as led:
        ingest.labelbox(FIXTURES / "labelbox_mal_import.ndjson", led, pseudonym_key=pseud())
        size, root = led.size, led.root()
        for source, name, data, line, field in _malformed(tmp_path):
            p = tmp_path / name
            p.write_bytes(data)
            with pytest.raises(IngestError) as ei:
                ingest.ingest(source, p, led, pseudonym_key=pseud(), bulk=True)
            err = ei.value
            assert err.line == (line if line is not None else err.line) and err.line is not None, name
            assert field is None or err.field == field, name
            assert (led.size, led.root()) == (size, root)
        assert led.verify().ok
    assert _mode(path) == "wal"


def test_cli_ingest_bulk_by_size_and_shared_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import ledger.ingest.parallel as parallel
    from audit.cli import main

    seen: list[bool] = []
    real = Ledger.appending

    def spy(self: Ledger, *, bulk: bool = False) -> Any:
        seen.append(bulk)
        return real(self, bulk=bulk)

    monkeypatch.setattr(Ledger, "appending", spy)
    export = FIXTURES / "labelbox_export_v2.ndjson"
    key = tmp_path / "k"
    key.write_text(bytes(range(32)).hex() + "\n")
    key.chmod(0o600)
    args = ["ingest", "labelbox", str(export), "--pseudonym-key", str(key), "--json"]
    ok = CliRunner().invoke(main, [*args, "--ledger", str(tmp_path / "a.db")])
    assert ok.exit_code == 0, ok.output
    assert seen[-1] is False  # a small export: WAL as usual
    monkeypatch.setattr(parallel, "MIN_BYTES", 1)  # every export counts as large
    ok = CliRunner().invoke(main, [*args, "--ledger", str(tmp_path / "b.db")])
    assert ok.exit_code == 0, ok.output
    assert seen[-1] is True
    ok = CliRunner().invoke(main, [*args, "--ledger", str(tmp_path / "c.db"), "--shared"])
    assert ok.exit_code == 0, ok.output
    assert seen[-1] is False
    with (
        Ledger.open(tmp_path / "a.db") as a,
        Ledger.open(tmp_path / "b.db") as b,
        Ledger.open(tmp_path / "c.db") as c,
    ):
        assert _entries(a) == _entries(b) == _entries(c) and len(_entries(a)) > 3
