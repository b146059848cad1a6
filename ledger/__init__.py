"""gradledger's tamper-evident ledger: canonical entries in an RFC 9162 Merkle log with signed checkpoints."""

from __future__ import annotations

from .errors import (
    CanonicalError,
    CheckpointRefused,
    EntryNotFound,
    IndexerError,
    LedgerError,
    LedgerExists,
    LedgerInputError,
    LedgerNotFound,
    LedgerUnreadable,
)
from .store import Entry, InclusionProof, Ledger, NewEntry, StoredCheckpoint, VerifyResult

__all__ = [
    "CanonicalError",
    "CheckpointRefused",
    "Entry",
    "EntryNotFound",
    "InclusionProof",
    "IndexerError",
    "Ledger",
    "LedgerError",
    "LedgerExists",
    "LedgerInputError",
    "LedgerNotFound",
    "LedgerUnreadable",
    "NewEntry",
    "StoredCheckpoint",
    "VerifyResult",
]
