"""gradledger audit: queries, lineage, exports, analytics and influence over a ledger."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """Lazy ``audit.influence(ledger, run, ...)`` (the module is callable) without importing torch up front."""
    if name == "influence":
        return importlib.import_module("audit.influence")
    raise AttributeError(f"module 'audit' has no attribute {name!r}")
