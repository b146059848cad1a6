"""Ledger storage: append/read round trips, proofs against the list-based Merkle functions, indexers."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Column, Connection, Float, Integer, MetaData, String, Table, select, text

from ledger import (
    CanonicalError,
    Entry,
    EntryNotFound,
    Ledger,
    LedgerExists,
    LedgerNotFound,
    LedgerUnreadable,
    merkle,
)
from ledger import indexers as ix_registry
from ledger.canonical import ENTRY_PREFIX


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


def test_create_append_read_round_trip(url: str) -> None:
    with Ledger.open(url, create=True) as led:
        assert led.size == 1
        zero = led.entry(0)
        assert zero.kind == "ledger" and zero.body == {"origin": led.origin, "format": 1}
        assert zero.prev == bytes(32)
        norms = np.arange(12, dtype=np.float32).reshape(4, 3)
        seq = led.append(
            "step", {"run": "r", "loss": math.nan, "ids": ["a", "b"]}, {"grad_norms": norms}, v=2
        )
        assert seq == 1
        seqs = led.append_many(
            [("note", {"i": i}) for i in range(5)] + [{"kind": "step", "body": {"run": "s"}}]
        )
        assert seqs == list(range(2, 8))
        e = led.entry(1)
        assert (e.kind, e.v) == ("step", 2)
        assert math.isnan(e.body["loss"]) and e.body["ids"] == ["a", "b"]
        np.testing.assert_array_equal(e.payloads["grad_norms"], norms)
        assert e.descriptors["grad_norms"]["shape"] == [4, 3]
        assert e.prev == zero.leaf_hash
        assert merkle.leaf_hash(e.leaf_data()) == e.leaf_hash
        assert e.leaf_data().startswith(ENTRY_PREFIX)
        assert [x.seq for x in led.entries(kind="step")] == [1, 7]
        assert [x.seq for x in led.entries(kind={"note", "step"}, start=5)] == [5, 6, 7]
        assert led.size == 8
        with pytest.raises(EntryNotFound):
            led.entry(8)
        assert led.verify().ok


def test_entries_stream_across_chunks_with_payloads(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.db", create=True) as led:
        led.append_many([("x", {"i": i}, {"a": np.full(2, i, dtype=np.int32)}) for i in range(600)])
        got = list(led.entries(kind="x"))
        assert [e.body["i"] for e in got] == list(range(600))
        assert all(int(e.payloads["a"][0]) == e.body["i"] for e in got)
        assert [e.seq for e in led.entries(start=598, payloads=False)] == [598, 599, 600]


def test_append_rejects_bad_input_atomically(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.db", create=True) as led:
        with pytest.raises(CanonicalError):
            led.append_many([("ok", {"a": 1}), ("ok", {"$bad": 1})])
        with pytest.raises(CanonicalError):
            led.append("Bad Kind", {})
        with pytest.raises(CanonicalError):
            led.append("ok", {}, {"x": np.array(["s"])})
        assert led.size == 1


def test_roots_and_proofs_match_list_based_merkle(url: str) -> None:
    with Ledger.open(url, create=True) as led:
        for i in range(0, 70, 7):  # uneven batches exercise the frontier across commits
            led.append_many([("t", {"i": j}) for j in range(i, i + 7)])
        leaves = [e.leaf_data() for e in led.entries()]
        assert len(leaves) == 71
        for size in (1, 2, 3, 8, 13, 64, 71):
            root = merkle.root(leaves[:size])
            assert led.root(size) == root
            for i in {0, size // 2, size - 1}:
                proof = led.inclusion_proof(i, size)
                assert proof == merkle.inclusion_proof(leaves[:size], i)
                assert merkle.verify_inclusion(i, size, merkle.leaf_hash(leaves[i]), proof, root)
            for old in range(1, size + 1):
                proof = led.consistency_proof(old, size)
                assert proof == merkle.consistency_proof(leaves[:size], old)
                assert merkle.verify_consistency(old, size, proof, merkle.root(leaves[:old]), root)
        p = led.prove(5)
        assert p.verify() and p.root == led.root() and p.size == 71
        with pytest.raises(EntryNotFound):
            led.prove(71)
        with pytest.raises(EntryNotFound):
            led.root(72)


def test_open_missing_or_foreign_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(LedgerNotFound):
        Ledger.open(missing)
    assert not missing.exists()
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    with pytest.raises(LedgerNotFound):
        Ledger.open(foreign)
    assert foreign.read_bytes() == before
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 200)
    before = garbage.read_bytes()
    with pytest.raises(LedgerUnreadable):
        Ledger.open(garbage)
    assert garbage.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.db", "garbage.db"]


def test_create_twice(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.create(path, origin="example.org/test-1") as led:
        assert led.origin == "example.org/test-1"
    with pytest.raises(LedgerExists):
        Ledger.create(path)
    with Ledger.open(path, create=True) as again:  # create=True opens an existing ledger
        assert again.origin == "example.org/test-1" and again.size == 1


# ---- indexers ------------------------------------------------------------------------------------------

_md = MetaData()
label_sums = Table(
    "test_label_sums",
    _md,
    Column("label", String(32), primary_key=True),
    Column("n", Integer, nullable=False),
    Column("total", Float, nullable=False),
)


class LabelSums:
    """A tiny aggregate: per label, the count of entries and the sum of their payload ``norms``."""

    name = "test_label_sums"
    kinds = frozenset({"obs"})
    tables: Sequence[Table] = (label_sums,)
    float_rtol = 1e-9
    fail_on: str | None = None

    def apply(self, conn: Connection, entries: Sequence[Entry]) -> None:
        for e in entries:
            label = e.body["label"]
            if label == self.fail_on:
                raise RuntimeError("indexer failed")
            total = float(e.payloads["norms"].sum())
            hit = conn.execute(select(label_sums.c.n).where(label_sums.c.label == label)).first()
            if hit is None:
                conn.execute(label_sums.insert(), [{"label": label, "n": 1, "total": total}])
            else:
                conn.execute(
                    label_sums.update()
                    .where(label_sums.c.label == label)
                    .values(n=label_sums.c.n + 1, total=label_sums.c.total + total)
                )


@pytest.fixture
def label_indexer() -> Iterator[LabelSums]:
    ix = LabelSums()
    ix_registry.register(ix)
    yield ix
    ix_registry.unregister(ix.name)


def _obs(label: str, k: float) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    return ("obs", {"label": label}, {"norms": np.full(3, k, dtype=np.float32)})


def test_indexer_atomic_with_append_and_deep_verify_catches_edits(url: str, label_indexer: LabelSums) -> None:
    with Ledger.open(url, create=True) as led:
        led.append_many([_obs("cat", 1.0), _obs("dog", 2.0), ("other", {"x": 1})])
        led.append(*_obs("cat", 0.5))
        with led.engine.connect() as c:
            rows = sorted(c.execute(select(label_sums)).all())
        assert rows == [("cat", 2, 4.5), ("dog", 1, 6.0)]
        # a failing indexer rolls back the whole batch: no entry, no aggregate row
        label_indexer.fail_on = "bird"
        with pytest.raises(RuntimeError):
            led.append_many([_obs("cat", 9.0), _obs("bird", 1.0)])
        label_indexer.fail_on = None
        assert led.size == 5
        with led.engine.connect() as c:
            assert sorted(c.execute(select(label_sums)).all()) == rows
        good = led.verify(deep=True)
        assert good.ok and "test_label_sums" in good.indexers_checked, good.reason
        with led.engine.begin() as c:
            c.execute(text("UPDATE test_label_sums SET total = 4.75 WHERE label = 'cat'"))
        plain = led.verify()
        assert plain.ok  # aggregates are derived data: only --deep rebuilds them
        bad = led.verify(deep=True)
        assert not bad.ok and "test_label_sums" in (bad.reason or "") and bad.first_bad_seq is None
        with led.engine.connect() as c:  # deep verify's rebuild was rolled back
            assert c.execute(select(label_sums.c.total).where(label_sums.c.label == "cat")).scalar() == 4.75


def test_indexer_registered_late_is_backfilled(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, create=True) as led:
        led.append_many([_obs("a", 1.0), _obs("a", 1.0)])
    ix = LabelSums()
    ix_registry.register(ix)
    try:
        with Ledger.open(path) as led:
            led.append(*_obs("b", 2.0))
            with led.engine.connect() as c:
                assert sorted(c.execute(select(label_sums)).all()) == [("a", 2, 6.0), ("b", 1, 6.0)]
            assert led.verify(deep=True).ok
    finally:
        ix_registry.unregister(ix.name)


def test_deep_verify_checks_canonical_bodies(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, create=True) as led:
        led.append("x", {"a": 1})
        assert led.verify(deep=True).ok


def test_benchmark_quick_runs() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ledger_bench", Path(__file__).parent.parent / "benchmarks" / "ledger_bench.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--json"])
    assert out["append_norms_per_s"] > 0 and out["verify_to_sha256_ratio"] > 0
    assert out["inclusion_proof_gen_ms"] > 0 and out["proof_ledger_entries"] >= 5000


def test_append_stream_one_transaction_bounded_chunks(tmp_path: Path) -> None:
    # append_stream: contiguous seqs, chunks of `chunk` entries share a ts, and an error in the iterable
    # rolls back every chunk already written
    led = Ledger.open(tmp_path / "s.db", create=True)

    def items(n: int, fail_at: int | None = None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("producer failed")
            yield ("tick", {"i": i}, {"x": np.arange(i, i + 3, dtype=np.int32)})

    seqs = led.append_stream(items(7), chunk=3)
    assert seqs == range(1, 8) and led.size == 8
    ts = [e.ts for e in led.entries(start=1)]
    assert ts[0] == ts[1] == ts[2] and ts[3] == ts[4] == ts[5]
    assert [e.body["i"] for e in led.entries(start=1)] == list(range(7))
    assert led.entry(7).payloads["x"].tolist() == [6, 7, 8]
    with pytest.raises(RuntimeError, match="producer failed"):
        led.append_stream(items(10, fail_at=8), chunk=3)
    assert led.size == 8
    assert led.append_stream(iter(())) == range(8, 8)
    assert led.verify().ok


def test_appending_reads_its_own_chunks(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "a.db", create=True)
    with led.appending() as app:
        assert app.size == 1
        assert app.append_many([("a", {"n": 1}), ("b", {"n": 2})]) == [1, 2]
        assert app.size == 3
        n = app.connection.exec_driver_sql("SELECT count(*) FROM entries").scalar()
        assert n == 3  # the transaction sees its own chunks
        assert app.append_many([("c", {"n": 3})]) == [3]
    assert led.size == 4 and led.verify().ok
    with pytest.raises(ValueError), led.appending() as app:
        app.append_many([("d", {"n": 4})])
        raise ValueError("abort")
    assert led.size == 4
