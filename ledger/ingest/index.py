"""The ``ingest_refs`` indexer: (kind, source, id) → seq and record digest, kept in the append transaction.

It answers the questions ingest asks per chunk without scanning the log: was this export (sha256) already
ingested, is this label already recorded with the same content (re-ingest duplicate), which entry holds the
suggestion a label was seeded from, and which ``annotation`` entry a manifest's label id means.
``Ledger.verify(deep=True)`` rebuilds it from the entries and compares.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import BigInteger, Column, Connection, Index, Integer, MetaData, String, Table, Text, select

from ledger import indexers

_metadata = MetaData()
_BigKey = BigInteger().with_variant(Integer(), "sqlite")

refs = Table(
    "ingest_refs",
    _metadata,
    Column("seq", _BigKey, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),  # export | annotation | suggestion
    Column("source", String(64), nullable=False),
    Column("ref", Text, nullable=False),  # export sha256 | label id | suggestion id
    Column("digest", String(64), nullable=True),  # record_sha256 (annotation, suggestion)
    Index("ix_ingest_refs_kind_ref", "kind", "ref", "source"),
)

IN_CHUNK = 500  # ids per IN (...) query: far below SQLite's and PostgreSQL's parameter limits


class IngestIndex:
    """Implements ``ledger.indexers.Indexer``."""

    def __init__(self) -> None:
        self.name = "ingest_refs"
        self.kinds = frozenset({"export", "annotation", "suggestion"})
        self.tables: Sequence[Table] = (refs,)
        self.float_rtol = 0.0

    def apply(self, conn: Connection, entries: Sequence[Any]) -> None:
        hints = _hints()
        rows: list[tuple[int, str, str, str, str | None]] = []
        for e in entries:
            h = hints.pop(e.seq, None)
            if h is not None and h[0] == e.kind:
                rows.append((e.seq, *h))
                continue
            ref = _ref_of(e.kind, e.body)
            if ref is not None:
                rows.append((e.seq, e.kind, ref["source"], ref["ref"], ref["digest"]))  # type: ignore[arg-type]
        if rows and conn.dialect.name == "sqlite":  # driver executemany: no per-row SQLAlchemy processing
            raw: Any = conn.connection.driver_connection
            raw.executemany(
                "INSERT INTO ingest_refs (seq, kind, source, ref, digest) VALUES (?, ?, ?, ?, ?)", rows
            )
        elif rows:
            cols = ("seq", "kind", "source", "ref", "digest")
            conn.execute(refs.insert(), [dict(zip(cols, r, strict=True)) for r in rows])


# The body field that names each kind's reference. Entries of these kinds written by other tools (a
# hand-appended "annotation" without an ingest record's fields) are not ingest records: they are skipped,
# never a reason to fail someone else's append. A rebuild skips exactly the same entries.
_REF_FIELD = {"export": "sha256", "annotation": "label_id", "suggestion": "suggestion_id"}


def _ref_of(kind: str, body: Any) -> dict[str, str | None] | None:
    field = _REF_FIELD.get(kind)
    if field is None or not isinstance(body, dict):
        return None
    source, ref = body.get("source"), body.get(field)
    if not isinstance(source, str) or not isinstance(ref, str):
        return None
    digest = body.get("record_sha256") if kind != "export" else None
    return {"source": source, "ref": ref, "digest": digest if isinstance(digest, str) else None}


INDEX = indexers.register(IngestIndex())

# seq -> (kind, source, ref, digest), from the very records being appended. The ingest pipeline
# fills it just before it appends a chunk (under the write lock), so ``apply`` need not re-parse 1-2 KB of
# canonical JSON per label; a rebuild (verify --deep) has no hints and decodes, and must agree.
# Thread-local: ``apply`` runs in the appending thread, and two threads may ingest into two ledgers.
_LOCAL = threading.local()


def _hints() -> dict[int, tuple[str, str, str, str | None]]:
    h = getattr(_LOCAL, "hints", None)
    if h is None:
        h = _LOCAL.hints = {}
    return h


def hint_ref(seq: int, kind: str, source: str, ref: str, digest: str | None) -> None:
    """The row ``apply`` will add for entry ``seq``, named by the caller (its body is already encoded)."""
    _hints()[seq] = (kind, source, ref, digest)


def clear_hints() -> None:
    _hints().clear()


def lookup(
    conn: Connection, kind: str, ids: Iterable[str], source: str | None = None
) -> dict[tuple[str, str], tuple[int, str | None]]:
    """{(source, id): (seq, digest)} of the latest entry of ``kind`` for each id (optionally one source)."""
    out: dict[tuple[str, str], tuple[int, str | None]] = {}
    uniq = sorted(set(ids))
    sqlite = conn.dialect.name == "sqlite"
    for i in range(0, len(uniq), IN_CHUNK):
        part = uniq[i : i + IN_CHUNK]
        if sqlite:  # through the driver: SQLAlchemy renders an expanding IN per parameter (~14% of ingest)
            sql = f"SELECT source, ref, seq, digest FROM ingest_refs WHERE kind = ? AND ref IN ({','.join('?' * len(part))})"
            params: list[Any] = [kind, *part]
            if source is not None:
                sql += " AND source = ?"
                params.append(source)
            rows: Iterable[Any] = conn.connection.driver_connection.execute(sql, params)  # type: ignore[union-attr]
        else:
            q = select(refs.c.source, refs.c.ref, refs.c.seq, refs.c.digest).where(
                refs.c.kind == kind, refs.c.ref.in_(part)
            )
            if source is not None:
                q = q.where(refs.c.source == source)
            rows = conn.execute(q)
        for src, ref, seq, digest in rows:
            key = (src, ref)
            if key not in out or out[key][0] < seq:
                out[key] = (int(seq), digest)
    return out


def has_any(conn: Connection, kind: str, source: str) -> bool:
    q = select(refs.c.seq).where(refs.c.kind == kind, refs.c.source == source).limit(1)
    return conn.execute(q).first() is not None
