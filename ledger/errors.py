"""Typed ledger errors: callers (the CLI above all) map them to exit codes without parsing messages.

``LedgerInputError`` and its subclasses mean "unusable input" (exit 2); a *verification failure* is never
raised, it is returned as a ``VerifyResult`` with ``ok=False`` (exit 1).
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error the ledger package raises on purpose."""


class LedgerInputError(LedgerError):
    """Unusable input: a path that is not a ledger, an unreadable database, a malformed value (exit 2)."""


class LedgerNotFound(LedgerInputError):
    """The path or URL holds no gradledger ledger (and ``create`` was not asked for)."""


class LedgerExists(LedgerInputError):
    """``init`` on a path or URL that already holds a ledger."""


class LedgerUnreadable(LedgerInputError):
    """The database cannot be opened or read (corrupted SQLite file, unreachable server, bad URL)."""


class CanonicalError(LedgerInputError, ValueError):
    """A body or payload cannot be encoded canonically (unsupported type, reserved key, unsafe integer)."""


class EntryNotFound(LedgerInputError, IndexError):
    """A sequence number outside ``[0, size)``."""


class CheckpointRefused(LedgerError):
    """Signing was refused: the tree is inconsistent with a checkpoint signed earlier (or unverifiable)."""


class IndexerError(LedgerError):
    """An indexer is missing, misdeclared, or failed inside the append transaction."""
