"""Typed field access for export elements: every failure names the field path (``FieldError``)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ledger.errors import CanonicalError
from ledger.ingest.errors import FieldError
from ledger.ingest.pseudonym import Pseudonymizer
from ledger.ingest.valuehash import canonical_value

_MISSING = object()
_dumps = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
_URL_QUERY = re.compile(r"(https?://[^\s?#\"]+)\?[^\s#\"]*")

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def _tname(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _jtype(v: object) -> str:
    if v is None:
        return "null"
    return _TYPE_NAMES.get(type(v), type(v).__name__)


def get(d: dict[str, Any], key: str, types: tuple[type, ...], path: str, *, required: bool = False) -> Any:
    """``d[key]`` checked against ``types`` (null counts as absent unless required)."""
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if required:
            raise FieldError(path, "missing required field" if v is _MISSING else "must not be null")
        return None
    # bool is an int subclass: never accept it where a number is expected
    if (bool in types or type(v) is not bool) and isinstance(v, types):
        return v
    raise FieldError(path, f"expected {_tname(types)}, got {_jtype(v)}")


def obj(v: object, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise FieldError(path, f"expected object, got {_jtype(v)}")
    return v


def ident(v: object, path: str, *, required: bool = False) -> str | None:
    """An id that platforms emit as a string or an integer; returned as a string."""
    if v is None:
        if required:
            raise FieldError(path, "missing required field")
        return None
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise FieldError(path, f"expected string or integer id, got {_jtype(v)}")
    s = str(v)
    if required and not s:
        raise FieldError(path, "must not be empty")
    return s


def number(v: object, path: str, lo: float | None = None, hi: float | None = None) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise FieldError(path, f"expected number, got {_jtype(v)}")
    f = float(v)
    if not math.isfinite(f):
        raise FieldError(path, "must be finite")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        raise FieldError(path, f"{v} outside [{lo}, {hi}]")
    return f


def boolean(v: object, path: str, default: bool = False) -> bool:
    if v is None:
        return default
    if not isinstance(v, bool):
        raise FieldError(path, f"expected boolean, got {_jtype(v)}")
    return v


def clean_value(value: Any, pseud: Pseudonymizer) -> Any:
    """What a label value may carry into the ledger: e-mails become pseudonyms, URL query strings (signed
    tokens such as Labelbox ``instanceURI?token=...``) are dropped."""
    if isinstance(value, dict | list):
        text = _dumps(value)
        if "@" not in text and "://" not in text:
            return value  # the common case: one C-speed scan instead of a Python walk
    return _clean(value, pseud)


def clean_value_json(value: Any, pseud: Pseudonymizer) -> tuple[Any, bytes | None]:
    """``clean_value`` plus the cleaned value's RFC 8785 bytes when they come for free.

    The e-mail / URL scan runs over the canonical text (RFC 8785 escapes neither ``@`` nor ``/``), so a
    clean value is serialised once for both the scan and ``value_sha256`` instead of twice.
    """
    if isinstance(value, dict | list):
        try:
            raw = canonical_value(value)
        except CanonicalError:
            raw = None  # reported with its field when the record body is built
        if raw is not None and b"@" not in raw and b"://" not in raw:
            return value, raw
    return clean_value(value, pseud), None


def _clean(value: Any, pseud: Pseudonymizer) -> Any:
    if isinstance(value, str):
        if "://" in value and "?" in value:
            value = _URL_QUERY.sub(r"\1", value)
        return pseud.scrub_text(value)
    if isinstance(value, dict):
        return {pseud.scrub_text(k): _clean(v, pseud) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v, pseud) for v in value]
    return value


def clean_text(value: str | None, pseud: Pseudonymizer) -> str | None:
    return None if value is None else pseud.scrub_text(value)
