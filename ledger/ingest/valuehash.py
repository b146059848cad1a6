"""sha256 of a label value's RFC 8785 bytes.

The bytes are ``ledger.canonical.canonical_json`` (whose lean fast path serves values that came out of
``json.loads``); this module only names the two operations ingest needs. ``tests/test_ingest_valuehash.py``
compares them with an independent canonicaliser on generated values.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ledger.canonical import canonical_json


def canonical_value(value: Any) -> bytes:
    """RFC 8785 bytes of a label value (errors name the path ``value``)."""
    return canonical_json(value, "value")


def value_sha256(value: Any) -> str:
    return hashlib.sha256(canonical_value(value)).hexdigest()
