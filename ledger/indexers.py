"""Indexers: derived tables (query aggregates) kept in the same transaction as the entries they summarise.

An indexer declares a unique ``name``, the entry ``kinds`` it consumes and its SQLAlchemy Core ``tables``
(in its own ``MetaData``), and implements ``apply(conn, entries)``. ``Ledger.append_many`` calls ``apply``
inside the append transaction with the just-appended entries of those kinds (decoded from their stored
canonical bytes, so a rebuild sees exactly the same values), so an aggregate can never disagree with the
log after a crash. ``apply`` must be deterministic and depend only on the entries (and the rows it wrote).

Lifecycle: registering is process-wide (``register(MyIndexer())`` at import time of the module that
defines it). The first write to a ledger after registration creates the tables and back-fills them from
every existing entry (the ``meta`` row ``indexer:<name>`` records the module that defines it). Writers that
have not imported that module import it themselves before appending, so a materialised indexer is never
silently skipped. ``Ledger.verify(deep=True)`` copies each indexer's tables aside, rebuilds them from the
entries inside a transaction that is rolled back, and compares row by row (``float_rtol`` allows for float
sums accumulated in a different batch order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from sqlalchemy import Connection, Table

from .errors import IndexerError

if TYPE_CHECKING:
    from .store import Entry


@runtime_checkable
class Indexer(Protocol):
    name: str
    kinds: frozenset[str]
    tables: Sequence[Table]
    float_rtol: float

    def apply(self, conn: Connection, entries: Sequence[Entry]) -> None: ...


class BaseIndexer:
    """Convenience base: subclasses set ``name``, ``kinds``, ``tables`` and implement ``apply``."""

    name: ClassVar[str] = ""
    kinds: ClassVar[frozenset[str]] = frozenset()
    tables: Sequence[Table] = ()
    float_rtol: float = 0.0

    def apply(self, conn: Connection, entries: Sequence[Entry]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, Indexer] = {}


def register(indexer: Indexer) -> Indexer:
    """Add ``indexer`` to the process-wide registry (re-registering the same name replaces it)."""
    if not isinstance(indexer, Indexer) or not indexer.name or not indexer.kinds:
        raise IndexerError(f"{indexer!r} is not an indexer: it needs name, kinds, tables and apply()")
    names = {t.name for t in indexer.tables}
    from .schema import metadata

    clash = names & set(metadata.tables)
    if clash:
        raise IndexerError(
            f"indexer {indexer.name!r} declares table(s) {sorted(clash)} that the ledger core owns"
        )
    _REGISTRY[indexer.name] = indexer
    return indexer


def unregister(name: str) -> None:
    """Remove an indexer from the registry (tests)."""
    _REGISTRY.pop(name, None)


def registered() -> list[Indexer]:
    """The registered indexers, in registration order."""
    return list(_REGISTRY.values())


def get(name: str) -> Indexer | None:
    return _REGISTRY.get(name)
