"""Ledger tables, declared with SQLModel; the append and verify paths use their Core ``__table__`` objects.

The tables live in their own SQLAlchemy registry (not ``SQLModel.metadata``) so creating a ledger creates
exactly these tables and nothing another package happens to declare.

* ``meta``: key/value strings (``origin``, ``format``, ``indexer:<name>``). The ``origin`` row is also the
  PostgreSQL sequencer lock (``SELECT ... FOR UPDATE``).
* ``entries``: one row per entry; ``body`` holds the canonical JSON bytes, ``prev`` and ``leaf_hash`` raw
  32-byte hashes. On SQLite ``seq`` is the rowid (``INTEGER PRIMARY KEY``), so the table is clustered by seq.
* ``payloads``: one row per (entry, payload name): dtype, canonical shape JSON, sha256 and the raw bytes.
* ``tree_nodes``: every *complete perfect* Merkle subtree of height >= 1, keyed by
  ``node_key(level, index) = level << 48 | index`` (leaves, level 0, are ``entries.leaf_hash``). With these,
  an append reads only the O(log n) frontier and a proof reads O(log n) nodes.
* ``signed_checkpoints``: every checkpoint note ``gradledger checkpoint`` signed, as text.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

# SQLite only makes ``INTEGER PRIMARY KEY`` a rowid alias; PostgreSQL needs 64-bit keys.
BigKey = BigInteger().with_variant(Integer(), "sqlite")

NODE_LEVEL_SHIFT = 48


def node_key(level: int, index: int) -> int:
    """Primary key of the perfect subtree covering leaves ``[index << level, (index + 1) << level)``."""
    return (level << NODE_LEVEL_SHIFT) | index


class LedgerModel(SQLModel, registry=registry()):
    """Base for ledger tables: a private registry and metadata."""


class Meta(LedgerModel, table=True):
    __tablename__ = "meta"
    key: str = Field(sa_column=Column(String(200), primary_key=True))
    value: str = Field(sa_column=Column(Text, nullable=False))


class EntryRow(LedgerModel, table=True):
    __tablename__ = "entries"
    __table_args__ = (Index("ix_entries_kind_seq", "kind", "seq"),)
    seq: int = Field(sa_column=Column(BigKey, primary_key=True, autoincrement=False))
    kind: str = Field(sa_column=Column(String(64), nullable=False))
    v: int = Field(sa_column=Column(Integer, nullable=False))
    ts: str = Field(sa_column=Column(String(40), nullable=False))
    prev: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    leaf_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class PayloadRow(LedgerModel, table=True):
    __tablename__ = "payloads"
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    name: str = Field(sa_column=Column(String(64), primary_key=True))
    dtype: str = Field(sa_column=Column(String(8), nullable=False))
    shape: str = Field(sa_column=Column(String(200), nullable=False))
    sha256: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class TreeNodeRow(LedgerModel, table=True):
    __tablename__ = "tree_nodes"
    node: int = Field(sa_column=Column(BigKey, primary_key=True, autoincrement=False))
    hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class SignedCheckpointRow(LedgerModel, table=True):
    __tablename__ = "signed_checkpoints"
    id: int | None = Field(default=None, sa_column=Column(BigKey, primary_key=True, autoincrement=True))
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    root: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    note: str = Field(sa_column=Column(Text, nullable=False))
    signed_at: str = Field(sa_column=Column(String(40), nullable=False))


metadata: MetaData = LedgerModel.metadata
meta: Table = Meta.__table__  # type: ignore[attr-defined]
entries: Table = EntryRow.__table__  # type: ignore[attr-defined]
payloads: Table = PayloadRow.__table__  # type: ignore[attr-defined]
tree_nodes: Table = TreeNodeRow.__table__  # type: ignore[attr-defined]
signed_checkpoints: Table = SignedCheckpointRow.__table__  # type: ignore[attr-defined]
CORE_TABLES: tuple[Table, ...] = (meta, entries, payloads, tree_nodes, signed_checkpoints)
