"""Annotation ingest: platform exports → pseudonymised, normalised ``annotation`` / ``suggestion`` /
``export`` entries (see ``docs/ingest-formats.md``).

Python API (each returns an :class:`IngestSummary`, raises :class:`IngestError` and appends nothing on bad
input)::

    from ledger import ingest
    ingest.labelbox("export.ndjson", ledger, project="cl...", pseudonym_key="lb.key")
    ingest.labelstudio("project-7.json", ledger)
    ingest.jsonl("weak_labels.jsonl", ledger)      # also .csv
"""

from __future__ import annotations

import os
from typing import Any

from ledger.ingest.errors import FieldError, IngestError, PseudonymKeyError
from ledger.ingest.pipeline import IngestSummary, ingest
from ledger.ingest.pseudonym import Pseudonymizer
from ledger.store import Ledger

__all__ = [
    "FieldError",
    "IngestError",
    "IngestSummary",
    "PseudonymKeyError",
    "Pseudonymizer",
    "ingest",
    "jsonl",
    "labelbox",
    "labelstudio",
]

PathLike = str | os.PathLike[str]


def labelbox(path: PathLike, ledger: Ledger | PathLike, **options: Any) -> IngestSummary:
    """Ingest a Labelbox Export v2 NDJSON, legacy v1 JSON array or MAL import NDJSON (detected)."""
    return ingest("labelbox", path, ledger, **options)


def labelstudio(path: PathLike, ledger: Ledger | PathLike, **options: Any) -> IngestSummary:
    """Ingest a Label Studio JSON export (tasks with annotations, drafts and predictions)."""
    return ingest("labelstudio", path, ledger, **options)


def jsonl(path: PathLike, ledger: Ledger | PathLike, **options: Any) -> IngestSummary:
    """Ingest the generic gradledger JSONL (or, for a ``.csv`` file, CSV) label format."""
    return ingest("jsonl", path, ledger, **options)
